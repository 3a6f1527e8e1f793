"""The fine-tuning loop: frozen vision encoder, trained Q-Former + query tokens + projection (+ optional LoRA).

The loss is the causal LM loss on the target tokens only: image tokens, the prompt and padding are masked with
-100, and every target ends with the token the runtime stops at (the newline for captioning checkpoints, as
LAVIS trains them, else EOS), so the served model knows where to stop.

Resumable checkpoints (`out_dir/checkpoints/step-N/state.pt`) hold the trained weights, optimizer, scheduler,
step and RNG state. The data order of every epoch is a function of (seed, epoch), so a resumed run sees
exactly the batches an uninterrupted run would have seen.

The output folder is written by `save_pretrained` from a fresh copy of the base checkpoint with only the
trained tensors replaced (and LoRA deltas merged into the decoder weights), so every frozen weight — the
vision encoder above all — is bit-identical to the base, and the folder loads like any checkpoint. Checkpoints,
the export and metrics.json are written under temporary names and moved into place when complete (`writes.py`),
and a failed write (a full disk above all) ends the run with an `InvalidInput` saying what, where and what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..batching import is_out_of_memory
from ..errors import InvalidInput, ModelNotAvailable
from ..images import load_image
from ..runtime import MAX_PROMPT_TOKENS, Blip2Runtime, model_key, resolve_device
from ..settings import BlipSettings
from .clock import RunClock
from .config import LORA_NEEDS_PEFT, FinetuneConfig, FinetuneReport, SkippedLine
from .data import DataIssue, Example, IssueLog
from .layout import CHECKPOINT_DIR, METRICS_FILE, find_checkpoints
from .writes import install, normal_modes, replace_text, staged_folder, writing

logger = logging.getLogger(__name__)

MIN_SAVE_INTERVAL = 200
"""Default checkpoints fall at epoch ends at least this many steps apart."""
_TRAINED_MODULES = ("qformer.", "query_tokens", "language_projection.")


@dataclass(frozen=True)
class StepInfo:
    """What one optimizer step did; passed to the `on_step` callback."""

    step: int
    total_steps: int
    epoch: float
    loss: float
    lr: float
    """The learning rate this step applied."""
    elapsed_s: float
    val_loss: float | None = None


@dataclass
class _Encoded:
    """One example as token ids: `<image>` × Q + prompt (with BOS) + target + end token, and its labels."""

    index: int
    input_ids: list[int]
    labels: list[int]


@dataclass
class _History:
    """Metrics kept across resumes."""

    steps: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    best_val: float | None = None
    best_step: int | None = None
    bad_evals: int = 0


def _precision(config: FinetuneConfig, device: str) -> tuple[torch.dtype, bool]:
    """(dtype of frozen weights and autocast, whether to autocast): bf16/fp16 on CUDA, fp32 elsewhere."""
    cuda = device.startswith("cuda")
    name = config.precision
    if name == "auto":
        if not cuda:
            return torch.float32, False
        return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), True
    if name == "fp32":
        return torch.float32, False
    if not cuda:
        raise InvalidInput(f"precision={name} needs a CUDA device (training on {device}); use precision='fp32'.")
    return (torch.bfloat16 if name == "bf16" else torch.float16), True


def _damaged_checkpoint(path: Path, exc: BaseException) -> InvalidInput:
    return InvalidInput(
        f"Cannot resume from the checkpoint {path}: it is damaged or incomplete ({type(exc).__name__}: "
        f"{str(exc)[:160]}). Delete that folder to resume from the checkpoint before it (or start over in a new "
        "output folder)."
    )


def _refuse_another_run(where: str, saved: dict[str, Any], now: dict[str, Any]) -> None:
    """Refuse a resume whose data or training options differ from the saved run's, listing every difference.

    A key `saved` lacks was not recorded by the version that wrote it: it is not compared.
    """
    if isinstance(saved.get("base_model"), str):  # recorded as written by a version that kept the spelling
        saved = saved | {"base_model": model_key(saved["base_model"])}
    diff = {k: (saved[k], v) for k, v in now.items() if k in saved and saved[k] != v}
    if diff:
        images = (
            " (images: an image file holds other bytes than when the run was saved, e.g. the same name with new pixels)"
            if "images" in diff
            else ""
        )
        raise InvalidInput(
            f"Cannot resume {where}: the run differs in {diff} (saved, now){images}. Use the same data and options, "
            "or a new output folder."
        )


def _fingerprint_from_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """What a metrics.json written before it kept the fingerprint says about the run: its options and step count.

    The data digests were not recorded there, so they are not compared; everything else a resume checks is.
    """
    config, report = metrics.get("config"), metrics.get("report")
    if not isinstance(config, dict):
        return {}
    saved: dict[str, Any] = {k: metrics[k] for k in ("base_model",) if k in metrics}
    options = ("batch_size", "grad_accum", "seed", "lr", "weight_decay", "max_grad_norm", "lora")
    saved |= {k: config[k] for k in options if k in config}
    lora = bool(config.get("lora"))
    for key in ("lora_r", "lora_alpha", "lora_dropout"):
        saved[key] = config.get(key) if lora else None
    saved["lora_targets"] = sorted(config.get("lora_targets") or ()) if lora else None
    if isinstance(report, dict) and isinstance(report.get("total_steps"), int):
        total = report["total_steps"]
        saved["total_steps"] = total
        saved["train_examples"] = report.get("train_examples")
        warmup = config.get("warmup_steps")
        saved["warmup_steps"] = warmup if warmup is not None else int(config.get("warmup_ratio", 0.0) * total)
    return saved


def _dtype_name(dtype: torch.dtype) -> str:
    return {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}[dtype]


def _cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier: linear warm-up from 0, then cosine decay to 0 at `total`."""

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))

    return factor


class Trainer:
    """One fine-tuning run. `run()` trains, writes the servable checkpoint and returns a `FinetuneReport`."""

    def __init__(
        self,
        *,
        model_name: str,
        out_dir: Path,
        config: FinetuneConfig,
        settings: BlipSettings,
        train: Sequence[Example],
        val: Sequence[Example],
        log: IssueLog,
        data_file: Path,
        resume: bool = False,
        on_step: Callable[[StepInfo], None] | None = None,
        clock: RunClock | None = None,
    ) -> None:
        self.model_name = model_name
        self.out_dir = out_dir
        self.config = config
        self.settings = settings
        self.train_examples = list(train)
        self.val_examples = list(val)
        self.log = log
        self.data_file = data_file
        self.resume = resume
        self.on_step = on_step
        self.clock = clock
        self.fingerprint: dict[str, Any] | None = None
        self.wrote_output = False
        """Whether the run began writing into `out_dir` (a checkpoint, metrics.json or the model)."""
        self.device = resolve_device(config.device or str(settings.device))
        self.frozen_dtype, self.autocast = _precision(config, self.device)
        self.model: Any = None
        self.processor: Any = None
        self._features: dict[Path, torch.Tensor] = {}
        self._lora_modules: dict[str, Any] = {}

    # ------------------------------------------------------------------ setup
    def _load(self) -> None:
        """Load the base through the runtime (same checks as serving), freeze it and choose what trains."""
        # Serving speed-ups stay out of training: int8 dynamic quantization has no backward (the Q-Former would get
        # no gradient through the quantized decoder and learn nothing) and its layers take no LoRA adapters.
        runtime = Blip2Runtime(
            self.settings.model_copy(
                update={
                    "model": self.model_name,
                    "device": self.device,
                    "dtype": _dtype_name(self.frozen_dtype),
                    "quantize": "none",
                    "compile": False,
                }
            )
        )
        loaded = runtime.load_captioner()
        self.model, self.processor = loaded.model, loaded.processor
        self._to_pixels = loaded.pixels
        self.eos_ids: list[int] = loaded.extra["eos_ids"]
        self.pad_id: int = loaded.extra["pad_id"]
        self.max_positions: int | None = loaded.extra["max_positions"]
        self.image_id = int(self.model.config.image_token_index)
        self.num_query = int(self.model.config.num_query_tokens)
        tok = self.processor.tokenizer
        newline = tok.encode("\n", add_special_tokens=False)
        # Captioning checkpoints stop at a newline (LAVIS appends "\n" to every caption); else at EOS.
        if len(newline) == 1 and int(newline[0]) in self.eos_ids:
            self.end_id = int(newline[0])
        else:
            self.end_id = int(self.model.config.text_config.eos_token_id or tok.eos_token_id)

        model = self.model
        for param in model.parameters():
            param.requires_grad_(False)
        for name, param in model.named_parameters():
            if name.startswith(_TRAINED_MODULES):
                # Master weights in fp32 (the Q-Former and query tokens already are; the projection may not be).
                param.data = param.data.float()
                param.requires_grad_(True)
        if self.config.lora:
            self._add_lora()
        if self.config.gradient_checkpointing:
            # The decoder holds nearly all activations (the Q-Former sees 32 queries); non-reentrant checkpointing
            # lets gradients reach its input embeddings although its weights are frozen.
            lm = model.language_model
            if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x name
                lm.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self._set_train_mode()

    def _add_lora(self) -> None:
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:
            raise InvalidInput(LORA_NEEDS_PEFT) from exc
        cfg = LoraConfig(
            r=self.config.lora_r,
            lora_alpha=self.config.lora_alpha,
            lora_dropout=self.config.lora_dropout,
            target_modules=list(self.config.lora_targets),
            bias="none",
        )
        lm = self.model.language_model
        try:
            inject_adapter_in_model(cfg, lm)
        except ValueError as exc:  # peft's NoMatchingPeftModuleError (and its other target checks) are ValueErrors
            raise InvalidInput(self._lora_targets_message(lm, str(exc))) from exc
        for name, module in lm.named_modules():
            if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight") and "default" in module.lora_A:
                self._lora_modules[name] = module
                for param in list(module.lora_A.parameters()) + list(module.lora_B.parameters()):
                    param.data = param.data.float()
                    param.requires_grad_(True)
        if not self._lora_modules:
            raise InvalidInput(self._lora_targets_message(lm, "no adapter was added"))
        logger.info("LoRA adapters on %d decoder layers", len(self._lora_modules))

    def _lora_targets_message(self, lm: Any, reason: str) -> str:
        names = sorted({name.rsplit(".", 1)[-1] for name, m in lm.named_modules() if isinstance(m, torch.nn.Linear)})
        return (
            f"lora_targets {list(self.config.lora_targets)} matched no linear layer of the decoder ({reason[:200]}). "
            f"Its linear layers are named {', '.join(names)}; the default is q_proj v_proj."
        )

    def _set_train_mode(self) -> None:
        self.model.train()
        self.model.vision_model.eval()  # frozen: no dropout, no gradient, never updated

    def _trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    # ------------------------------------------------------------------ data
    def _encode(self, examples: Sequence[Example], what: str) -> list[_Encoded]:
        """Token ids and labels; over-long targets go to the issue log (the caller applies the policy)."""
        tok = self.processor.tokenizer
        runtime_prompt_cache: dict[str | None, list[int]] = {}
        out: list[_Encoded] = []
        for index, ex in enumerate(examples):
            if ex.prompt not in runtime_prompt_cache:
                runtime_prompt_cache[ex.prompt] = list(tok(ex.prompt or "", add_special_tokens=True)["input_ids"])
            prompt_ids = runtime_prompt_cache[ex.prompt]
            # After a prompt the continuation starts with a space (" blue"), as the model would write it.
            text = ex.target if ex.prompt is None else " " + ex.target
            target = [*tok(text, add_special_tokens=False)["input_ids"], self.end_id]
            length = self.num_query + len(prompt_ids) + len(target)
            problem = None
            if len(target) > self.config.max_target_tokens:
                problem = f"target too long: {len(target)} tokens > max_target_tokens={self.config.max_target_tokens}"
            elif len(prompt_ids) > MAX_PROMPT_TOKENS:  # the service refuses such a prompt: nothing to train for
                problem = f"prompt too long: {len(prompt_ids)} tokens > {MAX_PROMPT_TOKENS}, the most the service takes"
            elif self.max_positions is not None and length > self.max_positions:  # past them: an IndexError
                problem = (
                    f"too long for the model: {self.num_query} image + {len(prompt_ids)} prompt + {len(target)} "
                    f"target tokens > its {self.max_positions} positions"
                )
            if problem is not None:
                file, _, line = ex.source.rpartition(":")
                self.log.add(DataIssue(file, int(line), problem))
                continue
            ids = [self.image_id] * self.num_query + prompt_ids + target
            labels = [-100] * (self.num_query + len(prompt_ids)) + target
            out.append(_Encoded(index=index, input_ids=ids, labels=labels))
        logger.info("%s: %d examples encoded", what, len(out))
        return out

    def _pixels(self, paths: Sequence[Path]) -> torch.Tensor:
        return torch.cat([self._to_pixels(load_image(p, self.settings).image) for p in paths])

    @torch.no_grad()
    def _vision(self, paths: Sequence[Path]) -> torch.Tensor:
        pixels = self._pixels(paths).to(self.device, self.frozen_dtype)
        out: torch.Tensor = self.model.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state
        return out

    def _cache_features(self, paths: Sequence[Path]) -> None:
        """Run the frozen vision encoder once per distinct image; keep the outputs on the CPU."""
        todo = [p for p in dict.fromkeys(paths) if p not in self._features]
        if not todo:
            return
        start = time.perf_counter()
        bs = max(1, self.config.batch_size)
        for i in range(0, len(todo), bs):
            chunk = todo[i : i + bs]
            feats = self._vision(chunk).cpu()
            for path, feat in zip(chunk, feats, strict=True):
                self._features[path] = feat.clone()
        logger.info("cached vision features of %d images in %.1fs", len(todo), time.perf_counter() - start)

    def _image_embeds(self, examples: Sequence[Example]) -> torch.Tensor:
        if self.config.cache_features:
            return torch.stack([self._features[ex.image] for ex in examples]).to(self.device)
        return self._vision([ex.image for ex in examples])

    def _collate(self, rows: Sequence[_Encoded]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Right-padded ids, attention mask and labels (OPT takes positions from the mask, so padding side is free)."""
        width = max(len(r.input_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r.input_ids)
            ids[i, :n] = torch.tensor(r.input_ids)
            labels[i, :n] = torch.tensor(r.labels)
            mask[i, :n] = 1
        return ids.to(self.device), mask.to(self.device), labels.to(self.device)

    # ------------------------------------------------------------------ model
    def _autocast(self) -> AbstractContextManager[Any]:
        if self.autocast:
            return torch.autocast(device_type="cuda", dtype=self.frozen_dtype)
        return nullcontext()

    def _loss_sum(self, rows: Sequence[_Encoded], examples: Sequence[Example]) -> tuple[torch.Tensor, int]:
        """Summed token cross-entropy over the target tokens of a micro-batch, and how many tokens."""
        model = self.model
        image_embeds = self._image_embeds([examples[r.index] for r in rows])
        ids, mask, labels = self._collate(rows)
        with self._autocast():
            query = model.query_tokens.expand(image_embeds.shape[0], -1, -1)
            image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=image_embeds.device)
            q_out = model.qformer(
                query_embeds=query,
                encoder_hidden_states=image_embeds,
                encoder_attention_mask=image_mask,
                return_dict=True,
            ).last_hidden_state
            feats = model.language_projection(q_out)
            embeds = model.language_model.get_input_embeddings()(ids)
            slots = (ids == self.image_id).unsqueeze(-1)
            embeds = embeds.masked_scatter(slots, feats.to(embeds.dtype))
            logits = model.language_model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        shifted = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            shifted.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        return loss, int((shifted != -100).sum().item())

    @torch.no_grad()
    def evaluate(self, rows: Sequence[_Encoded], examples: Sequence[Example]) -> float:
        """Mean token loss over `rows` (eval mode, no gradients)."""
        self.model.eval()
        total, tokens = 0.0, 0
        try:
            for i in range(0, len(rows), self.config.batch_size):
                loss, n = self._loss_sum(rows[i : i + self.config.batch_size], examples)
                total += float(loss.item())
                tokens += n
        finally:
            self._set_train_mode()
        return total / max(1, tokens)

    # ------------------------------------------------------------------ schedule
    def _groups(self, n: int, epoch: int) -> list[list[list[int]]]:
        """The epoch's optimizer steps: each a list of micro-batches of row indices, in a (seed, epoch) order."""
        gen = torch.Generator().manual_seed(self.config.seed * 100_003 + epoch)
        order = torch.randperm(n, generator=gen).tolist()
        bs, accum = self.config.batch_size, self.config.grad_accum
        micro = [order[i : i + bs] for i in range(0, n, bs)]
        return [micro[i : i + accum] for i in range(0, len(micro), accum)]

    # ------------------------------------------------------------------ checkpoints
    def _checkpoints(self) -> list[tuple[int, Path]]:
        return find_checkpoints(self.out_dir)

    def _fingerprint(self, total_steps: int, warmup: int) -> dict[str, Any]:
        """What must match for a resume to continue the same run: the data and every option the updates depend on.

        Options that leave the arithmetic alone (progress, checkpoint cadence, feature caching, gradient
        checkpointing, device, the validation cadence and patience) may change between a run and its resume.
        """
        c = self.config
        return {
            "base_model": model_key(self.model_name),
            "train_examples": len(self.train_rows),
            "train_data": self._data_digest(self.train_rows, self.train_examples),
            "val_data": self._data_digest(self.val_rows, self.val_examples),
            "images": self._images_digest(),
            "batch_size": c.batch_size,
            "grad_accum": c.grad_accum,
            "seed": c.seed,
            "total_steps": total_steps,
            "lr": c.lr,
            "weight_decay": c.weight_decay,
            "warmup_steps": warmup,
            "max_grad_norm": c.max_grad_norm,
            "lora": c.lora,
            "lora_r": c.lora_r if c.lora else None,
            "lora_alpha": c.lora_alpha if c.lora else None,
            "lora_dropout": c.lora_dropout if c.lora else None,
            "lora_targets": sorted(c.lora_targets) if c.lora else None,
        }

    def _data_digest(self, rows: Sequence[_Encoded], examples: Sequence[Example]) -> str:
        """A short hash of the encoded examples, in order (images relative to the data file: a moved folder matches)."""
        items = [[self._relative(examples[r.index].image), r.input_ids, r.labels] for r in rows]
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]

    def _images_digest(self) -> str:
        """A short hash of the bytes of every image the run uses, by name: the same names with new pixels differ.

        `_data_digest` covers the images' names only. Every image was just read whole by the data check (and
        decoded), so reading it again to hash is cheap next to that; a copied or touched folder still matches.
        """
        images = {ex.image for ex in (*self.train_examples, *self.val_examples)}

        def digest(image: Path) -> str:
            sha = hashlib.sha256()
            try:
                with open(image, "rb") as handle:
                    while chunk := handle.read(1 << 20):
                        sha.update(chunk)
            except OSError as exc:
                raise InvalidInput(f"Cannot read the image {image}: {exc.strerror or exc}.") from exc
            return sha.hexdigest()

        ordered = sorted(images)
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # hashlib frees the GIL
            hashes = list(pool.map(digest, ordered))
        items = sorted([self._relative(image), h] for image, h in zip(ordered, hashes, strict=True))
        return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]

    def _relative(self, image: Path) -> str:
        """`image` relative to the data file's folder (so a moved folder matches), else as it is."""
        try:
            return os.path.relpath(image, self.data_file.parent)
        except ValueError:  # another drive (Windows)
            return str(image)

    def _check_saved_run(self, fingerprint: dict[str, Any]) -> None:
        """A resume with no checkpoint left: refuse other data or options than the metrics.json there records.

        Such a run trains again from step 0 (its optimizer state is gone); with the same data and options that is the
        saved run again, as a resume from a checkpoint continues it.
        """
        path = self.out_dir / METRICS_FILE
        try:
            metrics = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # none (a run stopped before its first checkpoint), or not ours: nothing to match
            metrics = None
        if not isinstance(metrics, dict):  # a missing or empty folder (a mistyped --out?), or a run stopped early
            logger.warning(
                "nothing to resume in %s (no checkpoint, no %s of a run): starting from step 0",
                self.out_dir, METRICS_FILE,
            )  # fmt: skip
            return
        saved = metrics.get("fingerprint")
        if not isinstance(saved, dict):
            try:
                saved = _fingerprint_from_metrics(metrics)
            except (TypeError, ValueError):  # a hand-edited file: what cannot be read is not compared
                saved = {}
        _refuse_another_run(f"the run in {self.out_dir} (as its {METRICS_FILE} records it)", saved, fingerprint)
        report = metrics.get("report")
        if isinstance(report, dict):
            logger.warning(
                "%s holds a finished run (%s steps) and no checkpoint to continue from: training it again from step 0 "
                "with the same data and options; its model is replaced when the new one is complete.",
                self.out_dir, report.get("steps"),
            )  # fmt: skip
        else:
            logger.warning("no checkpoint left in %s: training the saved run again from step 0", self.out_dir)

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().to("cpu", copy=True) for n, p in self._trainable()}

    def _save_checkpoint(self, step: int, state: dict[str, Any]) -> None:
        path = self.out_dir / CHECKPOINT_DIR / f"step-{step:07d}"
        tmp = path.with_name(path.name + ".tmp")
        self.wrote_output = True
        with writing(f"the checkpoint of step {step}", path, "to continue from the last complete checkpoint"):
            # A hard kill (the OOM killer, SIGTERM) mid-save leaves its `step-N.tmp`, as big as a checkpoint, which
            # no later save of another step would overwrite: remove every one before this save needs the space.
            for stale in path.parent.glob("step-*.tmp"):
                shutil.rmtree(stale)
            tmp.mkdir(parents=True)
            try:
                torch.save(state, tmp / "state.pt")
                (tmp / "trainer_state.json").write_text(
                    json.dumps({"step": step, "fingerprint": state["fingerprint"]}, indent=2) + "\n"
                )
                normal_modes(tmp)
                if path.exists():
                    shutil.rmtree(path)
                os.replace(tmp, path)  # a crash mid-write never leaves a half checkpoint that resume would pick
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # a half-written state.pt only takes the space a retry needs
                raise
        for _, old in self._checkpoints()[: -self.config.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        logger.info("checkpoint %s", path)

    # ------------------------------------------------------------------ the run
    def run(self) -> FinetuneReport:
        """Train, write the servable checkpoint and the metrics JSON, and return the report."""
        clock = self.clock if self.clock is not None else RunClock()
        with clock.importing():
            _import_model_libraries()
        if self.config.seed is not None:
            torch.manual_seed(self.config.seed)
        self._load()
        self.train_rows = self._encode(self.train_examples, "training data")
        self.val_rows = self._encode(self.val_examples, "validation data")
        self.log.check(f"the data of {self.data_file}")
        if not self.train_rows:
            raise InvalidInput(f"No usable training examples in {self.data_file}.")
        if self.val_examples and not self.val_rows:
            if self.config.val_data is not None:
                raise InvalidInput(
                    f"No usable validation examples in {self.config.val_data}: every one was skipped as too long. "
                    "Fix that file, or leave out val_data (--val-data) to hold out val_fraction of the training images."
                )
            logger.warning(
                "no validation: the %d held-out examples were all skipped as too long, so the last weights are saved "
                "and patience does not apply",
                len(self.val_examples),
            )
        if self.config.cache_features:
            with self._memory("caching the vision features"):
                self._cache_features([ex.image for ex in self.train_examples + self.val_examples])
            if self.device.startswith("cuda"):
                self.model.vision_model.to("cpu")  # never run again: give its ~2 GB (ViT-g, bf16) back

        cfg = self.config
        steps_per_epoch = len(self._groups(len(self.train_rows), 0))
        total_steps = cfg.max_steps or cfg.epochs * steps_per_epoch
        warmup = cfg.warmup_steps if cfg.warmup_steps is not None else int(cfg.warmup_ratio * total_steps)
        trainable = self._trainable()
        decay = [p for n, p in trainable if p.ndim >= 2 and "query_tokens" not in n]
        no_decay = [p for n, p in trainable if not (p.ndim >= 2 and "query_tokens" not in n)]
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=(0.9, 0.999),
        )
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine_with_warmup(warmup, total_steps))
        scaler = torch.amp.GradScaler("cuda", enabled=self.autocast and self.frozen_dtype == torch.float16)
        fingerprint = self.fingerprint = self._fingerprint(total_steps, warmup)
        # Default: at epoch ends, but at least MIN_SAVE_INTERVAL steps apart (tiny data sets have 1-step epochs).
        save_every = cfg.save_every or steps_per_epoch * math.ceil(MIN_SAVE_INTERVAL / steps_per_epoch)

        history = _History()
        step = 0
        resumed_from: int | None = None
        best_state: dict[str, torch.Tensor] | None = None
        elapsed_before = 0.0
        if self.resume and self._checkpoints():
            _, path = self._checkpoints()[-1]
            try:
                state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
                saved = state["fingerprint"]
                if not isinstance(saved, dict):
                    raise TypeError(f"its fingerprint is a {type(saved).__name__}, not a dict")
            except Exception as exc:  # truncated zip, unpickling refused, not a dict, ...: all mean a broken file
                raise _damaged_checkpoint(path, exc) from exc
            _refuse_another_run(f"from {path}", saved, fingerprint)
            params = dict(self._trainable())
            try:
                with torch.no_grad():
                    for name, tensor in state["trainable"].items():
                        params[name].copy_(tensor)
                optimizer.load_state_dict(state["optimizer"])
                scheduler.load_state_dict(state["scheduler"])
                scaler.load_state_dict(state["scaler"])
                torch.set_rng_state(state["rng"]["torch"])
                if state["rng"].get("cuda") and torch.cuda.is_available():
                    torch.cuda.set_rng_state_all(state["rng"]["cuda"])
                history = _History(**state["history"])
                best_state = state.get("best_state")
                step = resumed_from = int(state["step"])
                elapsed_before = float(state["elapsed_s"])
            except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
                raise _damaged_checkpoint(path, exc) from exc
            logger.info("resumed from %s at step %d", path, step)
        elif self.resume:
            self._check_saved_run(fingerprint)

        n_trainable = sum(p.numel() for _, p in trainable)
        n_total = sum(p.numel() for p in self.model.parameters())
        logger.info(
            "training %d of %d parameters on %s (%s): %d examples, %d steps (%d per epoch), %d validation",
            n_trainable, n_total, self.device, _dtype_name(self.frozen_dtype), len(self.train_rows),
            total_steps, steps_per_epoch, len(self.val_rows),
        )  # fmt: skip
        bar = _progress(total_steps, step, cfg.progress)
        early_stopped = False
        train_start = time.perf_counter()

        def elapsed() -> float:
            return elapsed_before + time.perf_counter() - train_start

        try:
            while step < total_steps and not early_stopped:
                epoch = step // steps_per_epoch
                groups = self._groups(len(self.train_rows), epoch)
                for group in groups[step % steps_per_epoch :]:
                    lr = float(scheduler.get_last_lr()[0])  # the rate this step applies (the scheduler moves after it)
                    with self._memory(f"training step {step + 1}"):
                        loss_value = self._train_step(group, optimizer, scheduler, scaler)
                    step += 1
                    history.steps.append(
                        {"step": step, "epoch": step / steps_per_epoch, "loss": loss_value, "lr": lr}
                        | {"time_s": elapsed()}
                    )
                    val_loss = None
                    epoch_end = step % steps_per_epoch == 0
                    due_eval = step % cfg.eval_every == 0 if cfg.eval_every else epoch_end
                    if self.val_rows and (due_eval or step == total_steps):
                        with self._memory(f"the validation at step {step}"):
                            val_loss = self.evaluate(self.val_rows, self.val_examples)
                        history.evals.append({"step": step, "val_loss": val_loss, "time_s": elapsed()})
                        if history.best_val is None or val_loss < history.best_val - cfg.min_delta:
                            history.best_val, history.best_step, history.bad_evals = val_loss, step, 0
                            best_state = self._trainable_state()
                        else:
                            history.bad_evals += 1
                            if cfg.patience is not None and history.bad_evals >= cfg.patience:
                                early_stopped = True
                                logger.info("early stop at step %d: no improvement in %d evals", step, cfg.patience)
                    due_save = step % save_every == 0
                    if due_save and step < total_steps and not early_stopped:
                        self._save_checkpoint(
                            step,
                            {
                                "step": step,
                                "fingerprint": fingerprint,
                                "trainable": self._trainable_state(),
                                "optimizer": optimizer.state_dict(),
                                "scheduler": scheduler.state_dict(),
                                "scaler": scaler.state_dict(),
                                "rng": {
                                    "torch": torch.get_rng_state(),
                                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                                },
                                "history": asdict(history),
                                "best_state": best_state,
                                "elapsed_s": elapsed(),
                            },
                        )
                        self._write_metrics(history, None)
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", refresh=False)
                    if self.on_step is not None:
                        info = StepInfo(step, total_steps, step / steps_per_epoch, loss_value, lr, elapsed(), val_loss)
                        self.on_step(info)
                    if step >= total_steps or early_stopped:
                        break
        finally:
            bar.close()

        saved_step = step
        if best_state is not None and history.best_step is not None:
            params = dict(self._trainable())
            with torch.no_grad():
                for name, tensor in best_state.items():
                    params[name].copy_(tensor)
            saved_step = history.best_step
        self._export()
        tail = [s["loss"] for s in history.steps[-max(1, min(10, steps_per_epoch)) :]]
        report = FinetuneReport(
            out_dir=self.out_dir,
            base_model=self.model_name,
            data_file=self.data_file,
            train_examples=len(self.train_rows),
            val_examples=len(self.val_rows),
            skipped=[SkippedLine(file=i.file, line=i.line, reason=i.reason) for i in self.log.issues],
            steps=step,
            total_steps=total_steps,
            epochs=step / steps_per_epoch,
            resumed_from_step=resumed_from,
            early_stopped=early_stopped,
            first_loss=history.steps[0]["loss"] if history.steps else None,
            final_loss=sum(tail) / len(tail) if tail else None,
            best_val_loss=history.best_val,
            best_step=saved_step,
            trainable_params=n_trainable,
            total_params=n_total,
            lora=cfg.lora,
            device=self.device,
            precision=_dtype_name(self.frozen_dtype) + (" autocast" if self.autocast else ""),
            seconds=clock.seconds(),
            import_seconds=clock.import_seconds,
            metrics_path=self.out_dir / METRICS_FILE,
        )
        self._write_metrics(history, report)
        return report

    @contextmanager
    def _memory(self, what: str) -> Iterator[None]:
        """Turn running out of memory inside the block into a one-line `InvalidInput` saying what to change."""
        try:
            yield
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            detail = " ".join(str(exc).split())[:160] or type(exc).__name__
            where = "CPU" if isinstance(exc, MemoryError) else self.device
            if what.startswith("caching"):
                fix = "Use a smaller --batch-size: the vision encoder runs that many images at once"
                if isinstance(exc, MemoryError):
                    fix = "Pass --no-cache-features (cache_features=False) to keep no features in memory"
            else:
                fix = (
                    "Run the same command with --resume and --gradient-checkpointing (it may change on a resume), "
                    "or start again in a new output folder (--out) with a smaller --batch-size and a larger "
                    "--grad-accum (the same effective batch size)"
                )
            raise InvalidInput(
                f"Out of memory on {where} during {what} with batch size {self.config.batch_size} ({detail}). {fix}."
            ) from exc

    def _train_step(
        self, group: list[list[int]], optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any
    ) -> float:
        """One optimizer step over `group` (micro-batches); the loss is the mean over all target tokens."""
        rows = [[self.train_rows[i] for i in micro] for micro in group]
        tokens = sum(sum(1 for label in r.labels[1:] if label != -100) for micro in rows for r in micro)
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for micro in rows:
            loss_sum, _ = self._loss_sum(micro, self.train_examples)
            loss = loss_sum / max(1, tokens)
            scaler.scale(loss).backward()
            total += float(loss.item())
        if self.config.max_grad_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_([p for _, p in self._trainable()], self.config.max_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        return total

    # ------------------------------------------------------------------ output
    def _export(self) -> None:
        """Write the servable checkpoint: the base re-read from disk with the trained tensors swapped in."""
        from transformers import Blip2ForConditionalGeneration

        kwargs: dict[str, Any] = {"dtype": "auto"}
        if self.settings.cache_dir is not None:
            kwargs["cache_dir"] = str(self.settings.cache_dir)
        try:
            base = Blip2ForConditionalGeneration.from_pretrained(self.model_name, **kwargs)
        except Exception as exc:  # the training copy loaded a moment ago; this is a disk/hub hiccup
            raise ModelNotAvailable(f"Could not re-read the base checkpoint '{self.model_name}': {exc}") from exc
        targets = dict(base.named_parameters())
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name.startswith(_TRAINED_MODULES):
                    targets[name].copy_(param.detach().to("cpu"))
            for name, module in self._lora_modules.items():
                weight = base.language_model.get_submodule(name).weight
                delta = module.get_delta_weight("default").detach().float().cpu()
                weight.copy_((weight.float() + delta).to(weight.dtype))
        # Staged, then moved into place: a full disk, crash or Ctrl-C mid-write leaves the folder's previous
        # contents (an earlier export of this run, its checkpoints and metrics.json) as they were.
        resume = (
            "to continue from its last checkpoint and write the model again (writing it needs room for a whole "
            "copy: the previous model in the folder stays until the new one is complete)"
        )
        self.wrote_output = True
        with writing("the fine-tuned checkpoint", self.out_dir, resume), staged_folder(self.out_dir) as stage:
            base.save_pretrained(stage)
            self.processor.save_pretrained(stage)
            normal_modes(stage)  # safetensors writes its file with mode 0600: unreadable to a service account
            install(stage, self.out_dir)
        logger.info("saved the fine-tuned checkpoint to %s", self.out_dir)

    def _write_metrics(self, history: _History, report: FinetuneReport | None) -> None:
        payload = {
            "base_model": self.model_name,
            "data_file": str(self.data_file),
            "config": self.config.model_dump(mode="json"),
            "fingerprint": self.fingerprint,
            "steps": history.steps,
            "eval": history.evals,
            "best_step": history.best_step,
            "best_val_loss": history.best_val,
            "report": report.model_dump(mode="json") if report is not None else None,
        }
        # Rewritten whole at every checkpoint (its format is one JSON object); the temporary file and os.replace
        # mean a crash or full disk leaves the previous complete metrics.json, never a truncated one.
        path = self.out_dir / METRICS_FILE
        self.wrote_output = True
        with writing("the metrics", path, "to continue from the last complete checkpoint"):
            self.out_dir.mkdir(parents=True, exist_ok=True)
            replace_text(path, json.dumps(payload, indent=1) + "\n")


def _import_model_libraries() -> None:
    """Import what loading and saving the model needs, so the run's clock can leave the seconds it takes out."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration  # noqa: F401


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, initial: int, enabled: bool) -> Any:
    """A tqdm bar on stderr (never stdout: an MCP stdio server or a pipe may own it)."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, file=sys.stderr, desc="finetune", unit="step", dynamic_ncols=True)


__all__ = ["CHECKPOINT_DIR", "METRICS_FILE", "StepInfo", "Trainer"]
