"""Model I/O: load BLIP-2 checkpoints and run batched captioning, VQA, embeddings and ITM.

This is the only module that touches `transformers` models. Every batch method is called from the batcher's
single worker thread; preprocessing (`preprocess`, `encode_prompt`) from the preparation pool or a batch call's
thread.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import hashlib
import logging
import math
import os
import re
import threading
import time
import unicodedata
import weakref
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from . import _prepare
from .errors import BlipError, CapabilityUnavailable, InvalidInput, ModelNotAvailable
from .params import GenerationParams
from .pixels import PixelFn, processor_pixels
from .results import GeneratedText
from .settings import BlipSettings

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .decode import GraphDecoder

logger = logging.getLogger(__name__)

VQA_TEMPLATE = "Question: {question} Answer:"
MAX_PROMPT_TOKENS = 256
MAX_TEXT_TOKENS = 64
MAX_PROMPT_CHARS = 4096
"""Prompts and questions longer than this are refused before tokenising, so a huge one costs next to nothing."""
MAX_TEXT_CHARS = 4096
"""Texts to embed or score are cut here before tokenising; the retrieval model reads only 64 tokens of them."""
_IMAGE_TOKEN = "<image>"
_CONTROL_RE = re.compile(r"\s+")
_WEIGHT_SUFFIXES: Final = frozenset({".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model"})
"""The files of a checkpoint folder that make its model (weights, configs, tokenizer files)."""
_WHOLE_FILE_MAX: Final = 1 << 20
_SAMPLES: Final = 16
_SAMPLE_BYTES: Final = 4096


@functools.cache
def _cache_kwarg() -> str:
    """generate()'s keyword for a ready KV cache: `cache` from transformers 5.24 (which deprecates the old name)."""
    import transformers

    major_minor = tuple(int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    return "cache" if major_minor >= (5, 24) else "past_key_values"  # also the name of a model output's cache


def _check_weights(model: Any, missing: Iterable[str], name: str, parts: Sequence[str]) -> None:
    """Refuse a checkpoint without any weights for a part the model needs; log scattered missing weights.

    transformers fills missing weights with random ones and only logs it, so a retrieval checkpoint (which has no
    language model) loaded as the captioner served empty or random captions, and fine-tuning trained against noise.
    """
    missing = set(missing)
    if not missing:
        return
    keys = list(model.state_dict())
    absent = [
        part
        for part in parts
        if (own := [k for k in keys if k.startswith(part + ".")]) and all(k in missing for k in own)
    ]
    if absent:
        hint = (
            " It looks like a retrieval checkpoint (such as Salesforce/blip2-itm-vit-g), which belongs in "
            "BLIP_RETRIEVAL_MODEL; point BLIP_MODEL / --model at a captioning checkpoint such as "
            "Salesforce/blip2-opt-2.7b-coco."
            if absent == ["language_model"]
            else ""
        )
        raise ModelNotAvailable(
            f"The checkpoint '{name}' has no weights for its {' and '.join(absent)}, so it cannot be used as a "
            f"{type(model).__name__}.{hint}"
        )
    shown = ", ".join(sorted(missing)[:5])
    logger.warning(
        "checkpoint %r lacks %d weight(s) (%s%s); they start random", name, len(missing), shown,
        ", ..." if len(missing) > 5 else "",
    )  # fmt: skip


def _file_sample(path: str, size: int) -> bytes:
    """A digest of a checkpoint file: all of a small one; the start and evenly spaced pieces of a large one."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        if size <= _WHOLE_FILE_MAX:
            digest.update(file.read())
        else:
            digest.update(file.read(16 * _SAMPLE_BYTES))  # a safetensors header and the first tensors
            for i in range(_SAMPLES):
                file.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
                digest.update(file.read(_SAMPLE_BYTES))
    return digest.digest()


def model_key(name: str) -> str:
    """A model's identity across spellings: a local checkpoint folder as its real path, a hub id as it is.

    The same folder named relatively, from another working directory, with `~` or a trailing slash is one model,
    and a relative name that means another folder elsewhere is another model. An index records its vectors under
    it, and a fine-tuning resume compares its base model by it.
    """
    try:
        local = Path(name).expanduser()
        if local.is_dir():
            return os.path.realpath(local)
    except (OSError, ValueError):
        pass
    return name


def _weights_fingerprint(name: str) -> str | None:
    """A cheap identity of a local checkpoint folder's model, or None for a hub id (or a folder that cannot be read).

    `name` is the model as the settings name it (a folder may be relative or start with `~`). Every weight, config
    and tokenizer file at the folder's top level counts by name, size, mtime and a sample of its bytes (all of a
    small file, 17 pieces of a large one: kilobytes, not the gigabytes of the weights), so writing a fine-tuned or
    another model into the folder, or copying one over it with its timestamps kept, changes it. The same files
    written again (a new mtime) change it too: their images are embedded once more.
    """
    try:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            return None
    except (OSError, ValueError):  # a name no file system can hold (a NUL): not a folder
        return None
    digest = hashlib.sha256()
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
        for entry in entries:
            if entry.name.startswith(".") or Path(entry.name).suffix.lower() not in _WEIGHT_SUFFIXES:
                continue
            if not entry.is_file():  # follows links: a hub cache snapshot links its files to blobs
                continue
            st = entry.stat()
            digest.update(os.fsencode(entry.name) + f"\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
            digest.update(_file_sample(entry.path, st.st_size))
    except OSError as exc:  # the model cannot load from it either; loading says why
        logger.warning("cannot fingerprint the checkpoint %r: %s", name, exc)
        return None
    return digest.hexdigest()


def resolve_device(name: str) -> str:
    """`auto` → cuda, then mps, then cpu; a named device must exist here (`ModelNotAvailable` otherwise)."""
    import torch

    mps = getattr(torch.backends, "mps", None)
    mps_ok = mps is not None and mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps_ok else "cpu"
    fix = "Set BLIP_DEVICE / --device to auto, cpu, cuda, cuda:N or mps"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ModelNotAvailable(f"'{name}' is not a device torch knows ({str(exc)[:120]}). {fix}.") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ModelNotAvailable(
                f"Device '{name}' was asked for, but this machine (or torch build) has no CUDA. {fix}."
            )
        if device.index is not None and device.index >= count:
            raise ModelNotAvailable(f"Device '{name}' does not exist: this machine has {count} CUDA device(s). {fix}.")
    elif device.type == "mps" and not mps_ok:
        raise ModelNotAvailable(f"Device '{name}' was asked for, but MPS is not available here. {fix}.")
    return name


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """`auto` → bf16 (or fp16) on CUDA, fp16 on MPS, fp32 on CPU (no fast bf16 kernels there)."""
    import torch

    if name != "auto":
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float16
    if device.startswith("mps"):
        return torch.float16
    return torch.float32


def clean_text(text: str, max_chars: int) -> str:
    """Generated text as plain data: first line only, control characters removed, whitespace collapsed, capped."""
    text = text.split("\n", 1)[0]
    if not text.isprintable():  # printable text has no category-C character: skip the per-character pass
        text = "".join(ch for ch in text if unicodedata.category(ch)[0] != "C" or ch == " ")
    text = _CONTROL_RE.sub(" ", text).strip()
    return text[:max_chars]


def check_prompt(prompt: object, what: str = "prompt") -> None:
    """Refuse a prompt or question that is not a string or is over `MAX_PROMPT_CHARS`, before any tokenising."""
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidInput(f"The {what} must be a string, got {type(prompt).__name__}.")
    if prompt and len(prompt) > MAX_PROMPT_CHARS:
        raise InvalidInput(
            f"The {what} is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} are allowed. Shorten it."
        )
    if prompt:
        _check_encodable(prompt, f"The {what}")


def _check_encodable(text: str, what: str) -> None:
    """Refuse text the tokenizer cannot take (a lone surrogate is not Unicode text), as `InvalidInput`."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidInput(
            f"{what} is not valid Unicode text (a lone surrogate {text[exc.start]!r} at position {exc.start})."
        ) from exc


def _readable(ch: str) -> bool:
    """A character the retrieval tokenizer keeps: not whitespace, a control or format character, or U+FFFD."""
    return not (ch.isspace() or ch == "\ufffd" or unicodedata.category(ch)[0] == "C")


def _sanitize(text: str) -> str:
    # A literal "<image>" in user text would add placeholder tokens and misalign the image features.
    return text.replace(_IMAGE_TOKEN, " ").strip()


def _weakly_cached(method: Callable[[str], tuple[int, ...]], maxsize: int) -> Callable[[str], tuple[int, ...]]:
    """`functools.lru_cache` of a bound method that does not keep its object alive.

    A cache stored on an object and holding its bound method ties the object into a reference cycle: a dropped
    runtime, and its models, would then wait for a full garbage collection to be freed.
    """
    ref = weakref.WeakMethod(method)

    def call(arg: str) -> tuple[int, ...]:
        bound = ref()
        if bound is None:  # pragma: no cover - the cache lives on the object, so it goes with it
            raise ReferenceError("the object of this cached method is gone")
        return bound(arg)

    return functools.lru_cache(maxsize=maxsize)(call)


class _LRU:
    """A small LRU of tensors keyed by image hash, with hit/miss counters (worker thread only)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[str, Any] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: str) -> Any | None:
        value = self._data.get(key)
        if value is None:
            self.misses += 1
            return None
        self._data.move_to_end(key)
        self.hits += 1
        return value

    def put(self, key: str, value: Any) -> None:
        if self.capacity <= 0:
            return
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)

    def clear(self) -> None:
        self._data.clear()


@dataclass
class ImageItem:
    """One decoded and preprocessed image, keyed by its pixel hash."""

    key: str
    pixel_values: torch.Tensor
    image: Image.Image | None = None


@dataclass
class GenerationItem:
    """One caption/VQA request: image features come from `image`, the prompt is already tokenised."""

    image: ImageItem
    prompt_ids: list[int]


@dataclass
class _Loaded:
    model: Any
    processor: Any
    load_s: float
    extra: dict[str, Any] = field(default_factory=dict)
    fingerprint: str | None = None
    """`_weights_fingerprint` of a local checkpoint folder as it was when these weights were read from it."""
    pixels: PixelFn = field(init=False)
    """Image → pixel values, exactly as the processor computes them (see `pixels.py`)."""

    def __post_init__(self) -> None:
        self.pixels = processor_pixels(self.processor.image_processor)


@contextlib.contextmanager
def _seeded(params: GenerationParams, device: str) -> Iterator[None]:
    """Sampling from `params.seed` when one is given, without touching the process's own random state."""
    import torch

    if not (params.do_sample and params.seed is not None):
        yield
        return
    devices = [torch.device(device)] if device.startswith("cuda") else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(params.seed)
        yield


def _set_cudnn_attention(enabled: bool) -> None:
    """Let (or stop) PyTorch's SDPA pick cuDNN attention; the switch is PyTorch's own, so it is process-wide.

    cuDNN builds an execution plan for every new attention shape (~1 ms per attention call the first time),
    and dynamic batching keeps making new shapes (batch size x sequence length): on an H200, 32 closed-loop
    callers got 29 captions/s with it and 67 without (`benchmarks/gpu_probe.py`).
    """
    import torch

    if torch.backends.cuda.cudnn_sdp_enabled() != enabled:
        torch.backends.cuda.enable_cudnn_sdp(enabled)
        logger.info("cuDNN attention %s (BLIP_CUDNN_ATTENTION)", "enabled" if enabled else "disabled")


class Blip2Runtime:
    """Owns the captioner and (lazily) the retrieval model on one device; all batch methods are batched."""

    def __init__(self, settings: BlipSettings) -> None:
        self.settings = settings
        self._lock = threading.RLock()
        # Agents reuse a few prompts (no prompt, the VQA template per question): tokenise each once.
        self._prompt_ids = _weakly_cached(self._tokenize_prompt, 4096)
        self._captioner: _Loaded | None = None
        self._retrieval: _Loaded | None = None
        self._attempts: dict[str, list[int]] = {"captioner": [0, 0], "retrieval": [0, 0]}
        """Per model: load attempts started, and ended (a call arriving between the two waits for one)."""
        self._failed: dict[str, tuple[int, BlipError]] = {}
        """Per model: the number of the last attempt that failed, and its error."""
        self.feature_cache = _LRU(settings.feature_cache_size)
        self.retrieval_cache = _LRU(settings.feature_cache_size)
        # Language-model KV of the image-token prefix per image: a follow-up question skips that prefill.
        self.prefix_cache = _LRU(0 if settings.static_cache else settings.prefix_cache_size)
        self.models_loaded = 0
        self.model_load_s = 0.0
        self._decoder: GraphDecoder | None = None

    @functools.cached_property
    def _placement(self) -> tuple[str, torch.dtype, ModelNotAvailable | None]:
        """(device, dtype, the device's error), resolved on first use: building a service imports no torch.

        A device this machine lacks is reported when a model loads (ModelNotAvailable, like a missing checkpoint),
        not here: servers must come up and answer each call with that error instead of dying at start.
        """
        error: ModelNotAvailable | None = None
        try:
            device = resolve_device(str(self.settings.device))
        except ModelNotAvailable as exc:
            device, error = str(self.settings.device), exc
        return device, resolve_dtype(self.settings.dtype, device), error

    @property
    def device(self) -> str:
        """The torch device the models run on (`auto` resolved)."""
        return self._placement[0]

    @property
    def dtype(self) -> torch.dtype:
        """The models' dtype (`auto` resolved for the device)."""
        return self._placement[1]

    @property
    def _device_error(self) -> ModelNotAvailable | None:
        return self._placement[2]

    # ------------------------------------------------------------------ loading
    def _from_pretrained(self, cls: Any, name: str, parts: Sequence[str] = ()) -> tuple[Any, Any]:
        """Processor and model from a hub id or local folder, on the device; `parts` must have weights in it."""
        from transformers import AutoProcessor
        from transformers.utils import logging as hf_logging

        if self._device_error is not None:
            raise ModelNotAvailable(str(self._device_error))
        # Weight-loading progress bars are noise for a long-running service (and never belong on stdout).
        hf_logging.disable_progress_bar()

        kwargs: dict[str, Any] = {"dtype": self.dtype}
        if self.settings.cache_dir is not None:
            kwargs["cache_dir"] = str(self.settings.cache_dir)
        try:
            processor = AutoProcessor.from_pretrained(
                name, **({"cache_dir": kwargs["cache_dir"]} if "cache_dir" in kwargs else {})
            )
            model, info = cls.from_pretrained(name, output_loading_info=True, **kwargs)
            _check_weights(model, info.get("missing_keys") or (), name, parts)
        except BlipError:
            raise
        except Exception as exc:  # OSError, ValueError, hub errors: one boundary, one message
            local = Path(name).expanduser()
            where = (
                f"the local directory {local.resolve()} (it exists but could not be loaded)"
                if local.exists()
                else f"a local directory {local.resolve()} (not found) and the Hugging Face Hub id '{name}'"
            )
            raise ModelNotAvailable(
                f"Could not load the BLIP-2 checkpoint '{name}': {type(exc).__name__}: {str(exc)[:300].rstrip('. ')}. "
                f"Looked for {where}. Fix: point BLIP_MODEL / --model at a local folder written by save_pretrained, "
                "make the hub reachable with the weights cached (HF_HOME), or run with --demo to use a tiny random "
                "checkpoint built on the fly."
            ) from exc
        if self.device.startswith("cuda"):
            _set_cudnn_attention(self.settings.cudnn_attention)
        try:
            model.to(self.device)
        except Exception as exc:  # out of memory on the device, a device that went away
            raise ModelNotAvailable(
                f"Loaded '{name}' but could not move it to {self.device}: {type(exc).__name__}: {str(exc)[:300]}. "
                "Free memory there, or pick another BLIP_DEVICE / --device or BLIP_DTYPE."
            ) from exc
        model.eval()
        return model, processor

    def loaded(self, *, retrieval: bool = False) -> bool:
        """Whether the captioner (or the retrieval model) is loaded already."""
        return (self._retrieval if retrieval else self._captioner) is not None

    def _load_once(self, kind: str, current: Callable[[], _Loaded | None], load: Callable[[], _Loaded]) -> _Loaded:
        """`load()` unless the model is loaded; a call that waited for another call's attempt gets its error.

        Without that, every call queued behind a load that fails (a hub id with no network takes minutes of
        retries to fail) would try once more in turn, and the last caller would wait for all of them. A call
        that arrives after a failure tries again, so a checkpoint fixed meanwhile loads without a restart.
        """
        loaded = current()
        if loaded is not None:
            return loaded
        started, ended = self._attempts[kind]
        waited_for = started if started > ended else None  # an attempt in progress, which holds the lock
        # A load, or the wait for one, takes seconds to minutes: other preparation jobs go on meanwhile.
        with _prepare.blocking(), self._lock:
            loaded = current()
            if loaded is not None:
                return loaded
            failed = self._failed.get(kind)
            if waited_for is not None and failed is not None and failed[0] >= waited_for:
                raise failed[1]
            counts = self._attempts[kind]
            counts[0] += 1
            try:
                loaded = load()
                if self.settings.gc_freeze:
                    gc.collect()  # the load's own cyclic garbage is freed, not frozen
                    gc.freeze()  # the model and the libraries stay: full collections need not walk them again
                return loaded
            except BlipError as exc:
                self._failed[kind] = (counts[0], exc)
                raise
            finally:
                counts[1] += 1

    def load_captioner(self) -> _Loaded:
        """Load the captioning/VQA checkpoint once (thread-safe)."""
        return self._load_once("captioner", lambda: self._captioner, self._load_captioner)

    def load_retrieval(self) -> _Loaded:
        """Load the retrieval checkpoint (aligned embeddings + ITM head) once, on first use."""
        return self._load_once("retrieval", lambda: self._retrieval, self._load_retrieval)

    def _load_captioner(self) -> _Loaded:
        with self._lock:
            if self._captioner is not None:
                return self._captioner
            from transformers import Blip2ForConditionalGeneration

            start = time.perf_counter()
            model, processor = self._from_pretrained(
                Blip2ForConditionalGeneration, self.settings.model, ("vision_model", "qformer", "language_model")
            )
            tok = processor.tokenizer
            tok.padding_side = "left"
            config = model.config
            image_id = tok.convert_tokens_to_ids(_IMAGE_TOKEN)
            if getattr(config, "image_token_index", None) is None:
                if image_id is None or image_id == tok.unk_token_id:
                    raise ModelNotAvailable(
                        f"The checkpoint '{self.settings.model}' has no image_token_index and its tokenizer no "
                        "<image> token; re-save it with a current transformers Blip2Processor."
                    )
                config.image_token_index = image_id
            if getattr(processor, "num_query_tokens", None) is None:
                processor.num_query_tokens = config.num_query_tokens
            if processor.num_query_tokens != config.num_query_tokens:
                raise ModelNotAvailable(
                    f"Processor num_query_tokens ({processor.num_query_tokens}) differs from the model's "
                    f"({config.num_query_tokens}) in '{self.settings.model}': features would be mis-assigned."
                )
            if image_id != config.image_token_index:
                raise ModelNotAvailable(
                    f"Tokenizer <image> id {image_id} differs from config.image_token_index "
                    f"{config.image_token_index} in '{self.settings.model}'."
                )
            eos_ids = {int(config.text_config.eos_token_id or tok.eos_token_id)}
            newline = tok.encode("\n", add_special_tokens=False)
            if len(newline) == 1:  # captioning checkpoints end a caption with a newline
                eos_ids.add(int(newline[0]))
            pad_id = tok.pad_token_id if tok.pad_token_id is not None else config.text_config.pad_token_id
            self._apply_fast_paths(model)
            elapsed = time.perf_counter() - start
            positions = getattr(config.text_config, "max_position_embeddings", None)
            self._captioner = _Loaded(
                model,
                processor,
                elapsed,
                {
                    "eos_ids": sorted(eos_ids),
                    "pad_id": int(pad_id),
                    "image_id": image_id,
                    "max_positions": positions if isinstance(positions, int) else None,
                },
            )
            self.models_loaded += 1
            self.model_load_s += elapsed
            logger.info("loaded captioner %s on %s/%s in %.2fs", self.settings.model, self.device, self.dtype, elapsed)
            return self._captioner

    def _apply_fast_paths(self, model: Any) -> None:
        """Optional speed-ups from the settings: int8 dynamic quantization (CPU) and `torch.compile` (GPU)."""
        import torch

        if self.settings.quantize == "int8":
            if self.device != "cpu":
                logger.warning("quantize=int8 is a CPU option; ignored on %s", self.device)
            else:
                import warnings

                from torch.ao.quantization import quantize_dynamic

                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # torch.ao's migration notice; the API still works
                    # The Q-Former stays float32 (as transformers keeps it): it is small and feeds every token.
                    for part in (model.vision_model, model.language_model):
                        quantize_dynamic(part, {torch.nn.Linear}, dtype=torch.qint8, inplace=True)
                logger.info("vision encoder and language model linear layers quantized to int8 (dynamic)")
        if self.settings.compile:
            # In place, so parameter names (and state dicts) stay the same; shapes vary with the batch size.
            model.vision_model.compile(dynamic=True)
            logger.info("vision encoder compiled; the decoding step compiles on first use with static_cache")

    def _load_retrieval(self) -> _Loaded:
        with self._lock:
            if self._retrieval is not None:
                return self._retrieval
            from transformers import Blip2ForImageTextRetrieval

            start = time.perf_counter()
            name = self.settings.retrieval_model
            # Taken around the load, so it describes the weights in memory even if the folder is rewritten later.
            fingerprint = _weights_fingerprint(name)
            model, processor = self._from_pretrained(Blip2ForImageTextRetrieval, name, ("vision_model", "qformer"))
            if _weights_fingerprint(name) != fingerprint:
                # Rewritten while it loaded: which files were read is unknown, so its vectors must match no others.
                logger.warning("the checkpoint %r changed while it loaded; its vectors count as a new model's", name)
                fingerprint = f"{os.urandom(16).hex()} (changed while it loaded)"
            if not getattr(model.config.qformer_config, "use_qformer_text_input", False):
                raise CapabilityUnavailable(
                    f"'{self.settings.retrieval_model}' has no Q-Former text layers, so it cannot embed text or "
                    "score image-text pairs. Set BLIP_RETRIEVAL_MODEL to a retrieval checkpoint such as "
                    "Salesforce/blip2-itm-vit-g."
                )
            elapsed = time.perf_counter() - start
            self._retrieval = _Loaded(model, processor, elapsed, fingerprint=fingerprint)
            self.models_loaded += 1
            self.model_load_s += elapsed
            logger.info("loaded retrieval model %s in %.2fs", self.settings.retrieval_model, elapsed)
            return self._retrieval

    def retrieval_fingerprint(self) -> str | None:
        """A fingerprint of the local retrieval checkpoint whose weights make the embeddings; None for a hub id.

        Once the model is loaded, the folder's fingerprint as it was when the weights were read: a model in memory
        stays what it is when its folder is rewritten, and so does this. Before that, the folder's fingerprint as
        it is now, which is what a load would read; nothing is loaded for it. An `ImageIndex` records it with its
        vectors, so that vectors of other weights under the same folder name are not mixed with these.
        """
        loaded = self._retrieval
        return loaded.fingerprint if loaded is not None else _weights_fingerprint(self.settings.retrieval_model)

    @property
    def captioner_loaded(self) -> bool:
        return self._captioner is not None

    @property
    def retrieval_loaded(self) -> bool:
        return self._retrieval is not None

    @property
    def num_query_tokens(self) -> int | None:
        return int(self._captioner.model.config.num_query_tokens) if self._captioner else None

    @property
    def prefix_cache_hits(self) -> int:
        """Rows whose image-prefix KV came from the cache (read by `Blip2Service.stats`)."""
        return self.prefix_cache.hits

    @property
    def prefix_cache_misses(self) -> int:
        """Rows that looked for their image-prefix KV in the cache and had to compute it."""
        return self.prefix_cache.misses

    def unload(self) -> None:
        """Let both models go, with their caches and decoding buffers (a closed service's); a later call loads again.

        Not under the load lock: a load in progress (minutes, for a download) must not hold up `close()`.
        """
        loaded = self._captioner is not None or self._retrieval is not None
        self._captioner = self._retrieval = None
        if loaded:  # else nothing is cached, and closing a service that never loaded must not import torch
            self.empty_cache()
        self._decoder = None

    def empty_cache(self) -> None:
        """Release cached device memory after an out-of-memory error."""
        import torch

        self.feature_cache.clear()
        self.retrieval_cache.clear()
        self.prefix_cache.clear()
        if self._decoder is not None:
            self._decoder.release()
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()

    # ------------------------------------------------------------------ caller-thread preprocessing
    def preprocess(self, image: Image.Image, key: str, *, retrieval: bool = False) -> ImageItem:
        """Turn a decoded RGB image into model pixel values (CPU tensor), off the worker thread."""
        loaded = self.load_retrieval() if retrieval else self.load_captioner()
        return ImageItem(key=key, pixel_values=loaded.pixels(image), image=image)

    def encode_prompt(self, prompt: str | None) -> list[int]:
        """Token ids of a prompt prefix (with BOS), validated for length (memoised: callers may keep the list)."""
        check_prompt(prompt)
        return list(self._prompt_ids(prompt or ""))

    def _tokenize_prompt(self, prompt: str) -> tuple[int, ...]:
        tok = self.load_captioner().processor.tokenizer
        ids: list[int] = tok(_sanitize(prompt), add_special_tokens=True)["input_ids"]
        if len(ids) > MAX_PROMPT_TOKENS:
            raise InvalidInput(
                f"The prompt is {len(ids)} tokens long; at most {MAX_PROMPT_TOKENS} are allowed. Shorten it."
            )
        return tuple(ids)

    def check_length(self, prompt_ids: Sequence[int], max_new_tokens: int) -> None:
        """Refuse a request whose image tokens, prompt and new tokens would run past the language model's positions.

        Past them a learned position table has no row: the whole batch would fail with an IndexError.
        """
        cap = self.load_captioner()
        limit = cap.extra["max_positions"]
        if limit is None:  # relative positions (e.g. T5): no fixed limit
            return
        used = int(cap.model.config.num_query_tokens) + len(prompt_ids)
        if used + max_new_tokens > limit:
            raise InvalidInput(
                f"max_new_tokens={max_new_tokens} is too long for this model: {used} image and prompt tokens + "
                f"{max_new_tokens} new tokens exceed its {limit} positions. "
                f"Use max_new_tokens <= {max(limit - used, 0)}."
            )

    def tokenize_texts(self, texts: Sequence[str]) -> list[str]:
        """Validate texts for the retrieval model (non-empty strings), cut to `MAX_TEXT_CHARS` characters.

        Runs in the caller's thread, so a huge text costs its caller, not the shared model worker.
        """
        out = []
        for text in texts:
            if not isinstance(text, str):
                raise InvalidInput(f"Texts to embed or score must be strings, got {type(text).__name__}.")
            clean = _sanitize(text.lstrip()[:MAX_TEXT_CHARS])  # leading blanks do not use up the characters
            _check_encodable(clean, "A text to embed or score")
            if not any(_readable(ch) for ch in clean):  # the tokenizer drops control characters: nothing left
                if _IMAGE_TOKEN in text:
                    raise InvalidInput(
                        f"The text {text[:40]!r} is empty once the reserved {_IMAGE_TOKEN!r} token is removed; "
                        "describe the image in words."
                    )
                raise InvalidInput(
                    "Texts to embed or score must be non-empty strings"
                    + (" (this one has only whitespace and control characters)." if text.strip() else ".")
                )
            out.append(clean)
        return out

    # ------------------------------------------------------------------ worker-thread batch methods
    def _cached_features(
        self, cache: _LRU, images: Sequence[ImageItem], compute: Callable[[torch.Tensor], torch.Tensor]
    ) -> torch.Tensor:
        """Per-image features (B, ...) from `cache`, computing the missing ones in one batch.

        Identical images inside the batch are computed once; new rows are stored in the LRU by pixel hash.
        """
        import torch

        feats: list[torch.Tensor | None] = [cache.get(item.key) for item in images]
        missing = [i for i, f in enumerate(feats) if f is None]
        if missing:
            unique: dict[str, int] = {}
            for i in missing:
                unique.setdefault(images[i].key, i)
            order = list(unique.values())
            pixels = torch.cat([images[i].pixel_values for i in order]).to(self.device, self.dtype)
            out = compute(pixels)
            by_key = {images[i].key: out[j] for j, i in enumerate(order)}
            for i in missing:
                feats[i] = by_key[images[i].key]
            if cache.capacity > 0:
                for key, value in by_key.items():
                    # A copy: a row of `out` is a view that would keep the whole batch's output alive.
                    cache.put(key, value.clone())
        return torch.stack([f for f in feats if f is not None])

    def _lm_features(self, images: Sequence[ImageItem]) -> torch.Tensor:
        """Projected Q-Former outputs (B, Q, H_lm) for each image, reusing cached ones."""
        model = self.load_captioner().model
        return self._cached_features(
            self.feature_cache, images, lambda pixels: model.get_image_features(pixel_values=pixels).pooler_output
        )

    @property
    def decoder(self) -> GraphDecoder | None:
        """The `cuda_graphs` decoding loop, once a batch has asked for it (its counters feed the service's stats)."""
        return self._decoder

    def _graph_decoder(self, params: GenerationParams) -> GraphDecoder | None:
        """The static-cache decoder (`BLIP_CUDA_GRAPHS`) when it can decode `params`, else None (`generate()`)."""
        if not self.settings.cuda_graphs:
            return None
        if self._decoder is None:
            from .decode import GraphDecoder

            self._decoder = GraphDecoder(self.load_captioner().model, self.device)
        return None if self._decoder.unsupported(params) else self._decoder

    def generate(
        self, items: Sequence[GenerationItem], params: GenerationParams
    ) -> list[list[GeneratedText] | BaseException]:
        """Caption or answer a batch (prompts may differ): left-padded prompts, one `generate()` call (or, with
        `cuda_graphs`, one run of the static-cache decoding loop in `decode.py`)."""
        import torch

        cap = self.load_captioner()
        model = cap.model
        tok = cap.processor.tokenizer
        q = int(model.config.num_query_tokens)
        image_id = int(model.config.image_token_index)
        pad_id = cap.extra["pad_id"]
        eos_ids: list[int] = cap.extra["eos_ids"]

        with torch.inference_mode():
            lm_inputs = self._lm_features([it.image for it in items])
            use_prefix = self.prefix_cache.capacity > 0 and all(it.prompt_ids for it in items)
            input_ids, attention = self._layout(items, q, image_id, pad_id, image_first=use_prefix)
            width = input_ids.shape[1]
            embeds = model.get_input_embeddings()(input_ids)
            mask = (input_ids == image_id).unsqueeze(-1).to(embeds.device)
            lm_inputs = lm_inputs.to(embeds.device, embeds.dtype)
            embeds = embeds.masked_scatter(mask, lm_inputs)

            beams = params.num_beams > 1
            # generate() repeats inputs per beam / returned sequence, but not a cache passed in: repeat it here.
            repeat = params.num_beams if beams else params.num_return_sequences
            decoder = self._graph_decoder(params)
            with _seeded(params, self.device):
                if decoder is not None:
                    if repeat > 1:
                        embeds, attention, input_ids = (
                            t.repeat_interleave(repeat, dim=0) for t in (embeds, attention, input_ids)
                        )
                    new_tokens, logprobs = decoder.run(
                        params,
                        embeds=embeds,
                        attention=attention,
                        input_ids=input_ids,
                        past=self._prefix_kv(items, lm_inputs, repeat) if use_prefix else None,
                        eos_ids=eos_ids,
                        pad_id=pad_id,
                    )
                else:
                    gen_kwargs: dict[str, Any] = dict(
                        inputs_embeds=embeds,
                        attention_mask=attention,
                        input_ids=input_ids,
                        eos_token_id=eos_ids,
                        pad_token_id=pad_id,
                        return_dict_in_generate=True,
                        output_logits=True,  # raw logits (and, for beam search, `beam_indices`): `_token_logprobs`
                        **params.generate_kwargs(),
                    )
                    if use_prefix:
                        gen_kwargs[_cache_kwarg()] = self._prefix_kv(items, lm_inputs, repeat)
                    elif self.settings.static_cache:
                        gen_kwargs["cache_implementation"] = "static"
                    if self.settings.static_cache and not self.settings.compile:
                        gen_kwargs["disable_compile"] = True
                    out = model.language_model.generate(**gen_kwargs)
                    new_tokens = out.sequences[:, width:]
                    logprobs = self._token_logprobs(model.language_model, out, new_tokens, beams)
            eos_t = torch.tensor(eos_ids, device=new_tokens.device)
            is_eos = torch.isin(new_tokens, eos_t)
            after_eos = (torch.cumsum(is_eos.long(), dim=1) - is_eos.long()) > 0
            valid = ~after_eos
            counts = valid.sum(dim=1).clamp(min=1)
            means = (logprobs.float().masked_fill(~valid, 0.0).sum(dim=1) / counts).tolist()
            texts = tok.batch_decode(new_tokens, skip_special_tokens=True)

        n = params.num_return_sequences
        results: list[list[GeneratedText] | BaseException] = []
        for i in range(len(items)):
            group = []
            for j in range(i * n, (i + 1) * n):
                mean = float(min(0.0, means[j]))
                group.append(
                    GeneratedText(
                        text=clean_text(texts[j], self.settings.max_output_chars),
                        mean_logprob=mean,
                        confidence=math.exp(mean),
                    )
                )
            if params.do_sample and not beams:
                group.sort(key=lambda g: g.mean_logprob, reverse=True)
            results.append(group)
        if self.retrieval_loaded:
            self._add_itm_confidence(items, results)
        return results

    def _layout(
        self, items: Sequence[GenerationItem], q: int, image_id: int, pad_id: int, *, image_first: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask, left-aligned to a common width.

        `image_first=False`: `[pad…][<image>×Q][prompt]`. `image_first=True`: `[<image>×Q][pad…][prompt]`, so
        every row's image prefix sits at positions 0..Q-1 and one cached prefix KV per image can be stacked
        into a batch. OPT takes positions from the attention mask, so both give the same result.
        """
        import torch

        width = q + max(len(it.prompt_ids) for it in items)
        input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(items), width), dtype=torch.long)
        for i, it in enumerate(items):
            n = len(it.prompt_ids)
            input_ids[i, width - n :] = torch.tensor(it.prompt_ids, dtype=torch.long)
            attention[i, width - n :] = 1
            start = 0 if image_first else width - n - q
            input_ids[i, start : start + q] = image_id
            attention[i, start : start + q] = 1
        return input_ids.to(self.device), attention.to(self.device)

    def _prefix_kv(self, items: Sequence[GenerationItem], lm_inputs: torch.Tensor, repeat: int) -> Any:
        """A `DynamicCache` holding each row's image-prefix KV (positions 0..Q-1), from the LRU or computed now.

        The image prefix does not depend on the prompt, so its KV per image is reused across questions. Missing
        prefixes are computed in one decoder pass (no padding: every prefix has Q tokens). Cached tensors are
        never mutated: the batch cache is built from copies (`torch.cat`).
        """
        import torch
        from transformers import DynamicCache

        lm = self.load_captioner().model.language_model
        entries: list[Any] = [self.prefix_cache.get(it.image.key) for it in items]
        missing: dict[str, int] = {}
        for i, entry in enumerate(entries):
            if entry is None:
                missing.setdefault(items[i].image.key, i)
        if missing:
            rows = list(missing.values())
            feats = lm_inputs[rows]
            ones = torch.ones(feats.shape[:2], dtype=torch.long, device=feats.device)
            out = lm.get_decoder()(inputs_embeds=feats, attention_mask=ones, use_cache=True, return_dict=True)
            layers = [(layer.keys, layer.values) for layer in getattr(out, _cache_kwarg()).layers]
            for j, key in enumerate(missing):
                entry = [(k[j : j + 1].clone(), v[j : j + 1].clone()) for k, v in layers]
                self.prefix_cache.put(key, entry)
                for i, it in enumerate(items):
                    if entries[i] is None and it.image.key == key:
                        entries[i] = entry
        data = []
        for layer in range(len(entries[0])):
            keys = torch.cat([e[layer][0] for e in entries])
            values = torch.cat([e[layer][1] for e in entries])
            if repeat > 1:
                keys, values = keys.repeat_interleave(repeat, dim=0), values.repeat_interleave(repeat, dim=0)
            data.append((keys, values))
        return DynamicCache(ddp_cache_data=data)

    def _token_logprobs(self, lm: Any, out: Any, new_tokens: torch.Tensor, beams: bool) -> torch.Tensor:
        import torch

        if new_tokens.shape[1] == 0:
            return torch.zeros_like(new_tokens, dtype=torch.float32)
        if beams:
            # The model's own log-probs, as for greedy and sampling: `out.scores` would be the beam scores after
            # the logits processors (repetition penalty, temperature...), not "log-probability under the model".
            scores = lm.compute_transition_scores(out.sequences, out.logits, out.beam_indices, normalize_logits=True)
            return scores[:, -new_tokens.shape[1] :]
        # Step by step: stacking first would copy every step's (B, vocab) logits twice more (the stack, then the
        # log-softmax), 3x what generate() already holds (1.5 GB more at batch 128 x 30 tokens of OPT's vocabulary).
        columns = [
            torch.log_softmax(step.float(), dim=-1).gather(-1, new_tokens[:, i : i + 1])
            for i, step in enumerate(out.logits)
        ]
        return torch.cat(columns, dim=1)

    def _add_itm_confidence(
        self, items: Sequence[GenerationItem], results: list[list[GeneratedText] | BaseException]
    ) -> None:
        """Attach the ITM match probability of each generated text (retrieval model already loaded)."""
        pairs: list[tuple[ImageItem, str, GeneratedText]] = []
        for item, group in zip(items, results, strict=True):
            if isinstance(group, BaseException) or item.image.image is None:
                continue
            r_item = self.preprocess(item.image.image, item.image.key, retrieval=True)
            pairs.extend((r_item, g.text, g) for g in group if g.text)
        if not pairs:
            return
        probs = self.itm([p[0] for p in pairs], [p[1] for p in pairs])
        for (_, _, g), prob in zip(pairs, probs, strict=True):
            g.itm_probability = float(prob)

    # ------------------------------------------------------------------ retrieval model
    def _vision_embeds(self, images: Sequence[ImageItem]) -> torch.Tensor:
        """Retrieval vision-encoder outputs (B, P, H_v), cached per image hash."""
        model = self.load_retrieval().model
        return self._cached_features(
            self.retrieval_cache,
            images,
            lambda pixels: model.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state,
        )

    def image_query_embeddings(self, images: Sequence[ImageItem]) -> torch.Tensor:
        """L2-normalised per-query image embeddings (B, Q, D) in the shared space."""
        import torch

        ret = self.load_retrieval().model
        with torch.inference_mode():
            image_embeds = self._vision_embeds(images)
            mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            query_tokens = ret.query_tokens.expand(image_embeds.shape[0], -1, -1)
            out = ret.qformer(
                query_embeds=query_tokens,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=mask,
                return_dict=True,
            ).last_hidden_state
            out = out.to(ret.vision_projection.weight.dtype)
            return torch.nn.functional.normalize(ret.vision_projection(out).float(), dim=-1)  # unit length in float32

    @staticmethod
    def pool_queries(query_embeds: torch.Tensor) -> torch.Tensor:
        """One vector per image: the normalised mean of its normalised query embeddings."""
        import torch

        return torch.nn.functional.normalize(query_embeds.mean(dim=1), dim=-1)

    def _tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        loaded = self.load_retrieval()
        # The first MAX_TEXT_TOKENS tokens, fewer where the Q-Former has fewer text positions: past them its
        # position table has no row, and the long text failed its whole batch (every caller in it).
        positions = getattr(loaded.model.config.qformer_config, "max_position_embeddings", None)
        limit = min(MAX_TEXT_TOKENS, positions) if isinstance(positions, int) and positions > 0 else MAX_TEXT_TOKENS
        enc = loaded.processor.tokenizer(
            list(texts), padding=True, truncation=True, max_length=limit, return_tensors="pt"
        )
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def text_embeddings(self, texts: Sequence[str]) -> torch.Tensor:
        """L2-normalised text embeddings (B, D) from the Q-Former text side ([CLS] + projection)."""
        import torch

        ret = self.load_retrieval().model
        with torch.inference_mode():
            enc = self._tokenize(texts)
            embeds = ret.embeddings(input_ids=enc["input_ids"])
            out = ret.qformer(
                query_embeds=embeds, query_length=0, attention_mask=enc["attention_mask"], return_dict=True
            ).last_hidden_state
            out = out.to(ret.text_projection.weight.dtype)
            return torch.nn.functional.normalize(ret.text_projection(out[:, 0, :]).float(), dim=-1)

    def itm(self, images: Sequence[ImageItem], texts: Sequence[str]) -> list[float]:
        """Image-text matching probability for each (image, text) pair."""
        import torch

        ret = self.load_retrieval().model
        with torch.inference_mode():
            image_embeds = self._vision_embeds(images)
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            enc = self._tokenize(texts)
            query_tokens = ret.query_tokens.expand(image_embeds.shape[0], -1, -1)
            query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=query_tokens.device)
            embeds = ret.embeddings(input_ids=enc["input_ids"], query_embeds=query_tokens)
            out = ret.qformer(
                query_embeds=embeds,
                query_length=query_tokens.shape[1],
                attention_mask=torch.cat([query_mask, enc["attention_mask"]], dim=1),
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_mask,
                return_dict=True,
            ).last_hidden_state
            out = out.to(ret.itm_head.weight.dtype)
            logits = ret.itm_head(out[:, : query_tokens.shape[1], :]).mean(dim=1)
            return torch.softmax(logits.float(), dim=-1)[:, 1].tolist()
