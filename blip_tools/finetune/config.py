"""Typed options of a fine-tuning run (`FinetuneConfig`) and what a run reports back (`FinetuneReport`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import InvalidInput
from ..params import format_validation_error

Precision = Literal["auto", "fp32", "bf16", "fp16"]

LORA_NEEDS_PEFT = "lora=True needs the peft package: pip install 'blip-tools[lora]' (or pip install peft)."


class FinetuneConfig(BaseModel):
    """Hyper-parameters and switches of one fine-tuning run; every field has a safe default."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    epochs: int = Field(default=3, ge=1, le=10_000)
    """Passes over the training examples (ignored when `max_steps` is set)."""

    max_steps: int | None = Field(default=None, ge=1)
    """Total optimizer steps; the cosine schedule is laid out over this many. Overrides `epochs`."""

    batch_size: int = Field(default=8, ge=1, le=4096)
    """Examples per forward pass."""

    grad_accum: int = Field(default=1, ge=1, le=1024)
    """Forward passes per optimizer step (effective batch = batch_size × grad_accum)."""

    lr: float = Field(default=1e-4, gt=0.0, le=10.0)
    """Peak learning rate of AdamW (reached after warmup, then cosine decay to 0)."""

    weight_decay: float = Field(default=0.05, ge=0.0, le=1.0)
    """AdamW weight decay (not applied to biases, norms and the query tokens)."""

    warmup_ratio: float = Field(default=0.05, ge=0.0, le=1.0)
    """Fraction of the steps spent warming up linearly from 0 (used when `warmup_steps` is None)."""

    warmup_steps: int | None = Field(default=None, ge=0)
    """Warm-up steps; overrides `warmup_ratio`."""

    max_grad_norm: float | None = Field(default=1.0, gt=0.0)
    """Clip the gradient norm to this (None: no clipping)."""

    lora: bool = False
    """Also train LoRA adapters on the OPT decoder's attention (needs `pip install 'blip-tools[lora]'`)."""

    lora_r: int = Field(default=8, ge=1, le=1024)
    """LoRA rank."""

    lora_alpha: int = Field(default=16, ge=1)
    """LoRA scaling numerator (scale = alpha / r)."""

    lora_dropout: float = Field(default=0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""

    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    """Decoder linear layers that get adapters (module name suffixes)."""

    cache_features: bool = True
    """Run the frozen vision encoder once per image and keep its outputs (CPU memory) for all epochs."""

    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30 % more time."""

    precision: Precision = "auto"
    """`auto`: bf16 autocast on CUDA with bf16 support (else fp16), fp32 elsewhere. Trained weights stay fp32."""

    device: str | None = None
    """Where to train (`cuda`, `cuda:1`, `cpu`, ...); None uses `BlipSettings.device`."""

    seed: int = 0
    """Seeds the validation split, the shuffling and torch."""

    val_fraction: float = Field(default=0.1, ge=0.0, lt=1.0)
    """Share of the examples held out for validation loss (at least 1 when > 0 and there are ≥ 2)."""

    val_data: Path | None = None
    """A separate validation file/folder; overrides `val_fraction`."""

    eval_every: int | None = Field(default=None, ge=1)
    """Compute validation loss every N steps (None: at the end of each epoch)."""

    patience: int | None = Field(default=None, ge=1)
    """Early stopping: stop after this many evaluations without improvement (None: never)."""

    min_delta: float = Field(default=0.0, ge=0.0)
    """Smallest drop in validation loss that counts as an improvement."""

    save_every: int | None = Field(default=None, ge=1)
    """Write a resumable checkpoint every N steps (None: at epoch ends, at least 200 steps apart)."""

    keep_checkpoints: int = Field(default=2, ge=1)
    """How many resumable checkpoints to keep (oldest deleted first)."""

    max_target_tokens: int = Field(default=64, ge=1, le=2048)
    """Longest caption/answer in tokens (end token included); longer lines are reported as bad data."""

    on_error: Literal["skip", "stop"] = "stop"
    """Bad data lines: `stop` refuses to train and lists them; `skip` warns and lists them in the report."""

    progress: bool = True
    """Show a progress bar with the loss on stderr."""

    @model_validator(mode="after")
    def _check(self) -> FinetuneConfig:
        if self.lora and not self.lora_targets:
            raise ValueError("lora_targets must name at least one decoder layer when lora is on")
        return self

    @classmethod
    def from_options(cls, base: FinetuneConfig | None = None, **options: Any) -> FinetuneConfig:
        """`base` (or the defaults) with `options` applied; bad values raise `InvalidInput` with a readable message."""
        data = base.model_dump() if base is not None else {}
        data.update(options)
        try:
            return cls(**data)
        except ValidationError as exc:
            raise InvalidInput(format_validation_error(exc)) from exc


class SkippedLine(BaseModel):
    """A data line that was left out of training, and why."""

    file: str
    line: int
    reason: str


class FinetuneReport(BaseModel):
    """What a fine-tuning run did: data, steps, losses, where the model went."""

    out_dir: Path
    """The servable checkpoint folder (`BLIP_MODEL=out_dir`)."""
    base_model: str
    """The checkpoint training started from."""
    data_file: Path
    train_examples: int
    val_examples: int
    skipped: list[SkippedLine] = Field(default_factory=list)
    """Every bad data line that was skipped (empty with `on_error='stop'`, which raises instead)."""
    steps: int
    """Optimizer steps done in total (including those before a resume)."""
    total_steps: int
    """Steps the schedule was laid out for."""
    epochs: float
    """Epochs done (fractional when stopped early)."""
    resumed_from_step: int | None = None
    early_stopped: bool = False
    first_loss: float | None = None
    """Training loss of the first step (of this run's history, resumed runs included)."""
    final_loss: float | None = None
    """Mean training loss of the last few steps."""
    best_val_loss: float | None = None
    best_step: int | None = None
    """Step whose weights were saved (the best validation step when there is validation)."""
    trainable_params: int
    total_params: int
    lora: bool = False
    device: str
    precision: str
    seconds: float
    """Wall time of this call: reading and checking the data, loading the model, training, validation and export.
    The imports of torch and transformers are left out (`import_seconds`); a resumed run counts only its own part."""
    import_seconds: float = 0.0
    """Time this call spent importing torch and transformers (not in `seconds`; 0 when they were loaded already)."""
    metrics_path: Path
    """JSON with per-step loss, lr and time, and every validation loss."""


__all__ = ["LORA_NEEDS_PEFT", "FinetuneConfig", "FinetuneReport", "Precision", "SkippedLine"]
