"""`BlipSettings`: the one place that reads `BLIP_*` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

DEFAULT_MODEL = "Salesforce/blip2-opt-2.7b-coco"
DEFAULT_RETRIEVAL_MODEL = "Salesforce/blip2-itm-vit-g"

DeviceName = Literal["auto", "cpu", "cuda", "mps"] | str
DTypeName = Literal["auto", "float32", "float16", "bfloat16"]


class BlipSettings(BaseSettings):
    """Settings for the shared BLIP-2 service, read from `BLIP_*` environment variables or arguments."""

    model_config = SettingsConfigDict(env_prefix="BLIP_", extra="ignore", frozen=True)

    model: str = DEFAULT_MODEL
    """Captioning/VQA checkpoint: a Hugging Face hub id or a local `save_pretrained` directory."""

    retrieval_model: str = DEFAULT_RETRIEVAL_MODEL
    """Retrieval checkpoint (aligned image/text embeddings and ITM head), loaded lazily on first use."""

    device: DeviceName = "auto"
    """`auto` picks cuda, then mps, then cpu; or name one (`cuda:1`)."""

    dtype: DTypeName = "auto"
    """`auto` is bfloat16 on CUDA with bf16 support (else float16), float16 on MPS and float32 on CPU."""

    max_batch_size: int = Field(default=16, ge=1, le=1024)
    """Most requests the batcher puts in one forward pass."""

    max_wait_ms: float = Field(default=2.0, ge=0.0, le=1000.0)
    """Wait window (counted from the oldest request) used only when the worker was idle. Requests whose image is
    still being prepared (a burst of callers) may be waited for longer, up to `max_merge_wait_ms`."""

    max_merge_wait_ms: float = Field(default=50.0, ge=0.0, le=10_000.0)
    """After a batch, hold the next one open this long at most while the callers it served come back (closed
    loops, agents), so alternating groups of callers merge into full batches. Never longer than the last batch
    took, and only while they keep arriving. Also how long an idle worker's batch may wait for requests whose image
    is still being prepared (never longer than the last batch took). 0 turns both off."""

    max_queue: int = Field(default=256, ge=1, le=1_000_000)
    """Requests that may wait; one more is rejected at once with `Overloaded`."""

    request_timeout_s: float = Field(default=120.0, gt=0.0)
    """A request still queued after this long fails with `RequestTimeout`."""

    allowed_dirs: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    """Directories that image paths must lie in (after `..` and symlinks). Empty: any readable path.
    From the environment: one path, several joined by the OS path separator (`:`), or a JSON list."""

    allow_urls: bool = False
    """Allow http(s) image URLs (public addresses only; private, loopback and metadata ranges refused)."""

    url_timeout_s: float = Field(default=10.0, gt=0.0)
    """Overall deadline for fetching one image URL, redirects included."""

    max_image_bytes: int = Field(default=20_000_000, ge=1)
    """Largest encoded image accepted (file, download or decoded base64)."""

    max_image_pixels: int = Field(default=40_000_000, ge=1)
    """Largest image accepted, in pixels, read from the header before decoding."""

    feature_cache_size: int = Field(default=256, ge=0)
    """Images whose vision + Q-Former features are kept (LRU) so follow-up questions skip the encoder."""

    prefix_cache_size: int = Field(default=32, ge=0)
    """Images whose language-model KV cache of the image-token prefix is kept (LRU; 0 disables)."""

    quantize: Literal["none", "int8"] = "none"
    """`int8`: dynamic int8 quantization of the vision encoder's and language model's linear layers (CPU only;
    faster compute-bound stages, small output drift: see the README's benchmark section). Ignored on GPU."""

    static_cache: bool = False
    """Decode with a static (preallocated) KV cache instead of a growing one; needed for `compile` to pay off on
    GPU. Turns the image-prefix KV cache off."""

    compile: bool = False
    """`torch.compile` the vision encoder and the decoding step (GPU; the first calls of each shape are slow)."""

    cuda_graphs: bool = False
    """Decode greedy and sampled batches with blip-tools' own static-KV-cache loop, each step replayed as a CUDA
    graph captured once per batch-size bucket (GPU; batches are padded up to 1, 2, 4, ... rows). Off a GPU the same
    loop runs without graphs. Beam search keeps `generate()`. Turns nothing else off (the prefix cache feeds it)."""

    cudnn_attention: bool = False
    """Let PyTorch's attention (SDPA) use cuDNN on GPU, a process-wide PyTorch switch. Off by default: cuDNN plans
    each new attention shape (~1 ms per attention call), and dynamic batching keeps making new shapes."""

    gc_freeze: bool = False
    """After each model load, move every object then alive out of the garbage collector's reach (`gc.freeze`), so
    a full collection no longer walks the ~400,000 objects of torch, transformers and the model: on the tiny
    model such a pause took 210-230 ms, stalling every request in flight, and 8 ms with this on. Frozen objects
    are still freed when nothing refers to them, but never as part of a reference cycle, so it suits a process
    that keeps its service for good: `blip-mcp` and Ray replicas turn it on unless `BLIP_GC_FREEZE` is set."""

    max_new_tokens_limit: int = Field(default=256, ge=1)
    """Upper bound a caller may ask for with `max_new_tokens`."""

    max_output_chars: int = Field(default=2000, ge=16)
    """Generated text is capped at this many characters."""

    cache_dir: Path | None = None
    """Where hub downloads are cached (default: the Hugging Face cache)."""

    index_path: Path | None = None
    """SQLite image index file (default: `~/.cache/blip-tools/index.sqlite`)."""

    remote_url: str | None = None
    """If set, interfaces talk to a shared blip-mcp daemon at this URL instead of loading a model."""

    remote_send_files: Literal["auto", "always", "never"] = "auto"
    """How a client of a remote daemon passes image paths: `auto` sends file bytes unless the daemon is on
    loopback (same machine, same files), `always` sends bytes, `never` sends paths."""

    token: str | None = Field(default=None, repr=False)
    """Bearer token for the HTTP server (required for a non-loopback bind). Empty or only whitespace (`BLIP_TOKEN=`)
    is no token, as if unset."""

    @field_validator("token", mode="before")
    @classmethod
    def _blank_token_is_none(cls, value: Any) -> Any:
        """`BLIP_TOKEN=` (set but empty, e.g. by a template) means no token, not a token too short to use."""
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("allowed_dirs", mode="before")
    @classmethod
    def _split_dirs(cls, value: Any) -> Any:
        """Accept one path, `PATH`-style joined paths or a JSON list."""
        if isinstance(value, str):
            text = value.strip()
            if not text:
                return []
            if text.startswith("["):
                import json

                return json.loads(text)
            return [part for part in text.split(os.pathsep) if part]
        return value

    @field_validator("allowed_dirs")
    @classmethod
    def _resolve_dirs(cls, value: list[Path]) -> list[Path]:
        return [Path(p).expanduser().resolve() for p in value]

    def for_server(self) -> BlipSettings:
        """These settings as a process that serves for good uses them: `gc_freeze` on, unless it was set."""
        if "gc_freeze" in self.model_fields_set:
            return self
        return self.model_copy(update={"gc_freeze": True})

    def resolved_index_path(self) -> Path:
        """The image index file, defaulting under the user's cache directory."""
        if self.index_path is not None:
            return Path(self.index_path).expanduser()
        return Path.home() / ".cache" / "blip-tools" / "index.sqlite"
