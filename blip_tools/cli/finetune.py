"""`blip-tools finetune`: fine-tune the captioner on a folder of captioned images into a servable checkpoint."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from ._common import settings_from_args

#: Flags that map one-to-one onto `FinetuneConfig` fields (dest = field name).
_CONFIG_FLAGS = (
    "epochs",
    "max_steps",
    "batch_size",
    "grad_accum",
    "lr",
    "weight_decay",
    "warmup_ratio",
    "warmup_steps",
    "max_grad_norm",
    "lora",
    "lora_r",
    "lora_alpha",
    "lora_dropout",
    "cache_features",
    "gradient_checkpointing",
    "precision",
    "seed",
    "val_fraction",
    "val_data",
    "eval_every",
    "patience",
    "min_delta",
    "save_every",
    "keep_checkpoints",
    "max_target_tokens",
    "on_error",
    "progress",
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `finetune`."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune the captioner on your images (vision encoder frozen); the output serves as --model",
        description=(
            "Train the Q-Former, query tokens and language projection (optionally LoRA on the OPT decoder) on a "
            'JSONL/CSV of {"image", "caption"} or {"image", "question", "answer"} rows. The output folder loads '
            "like any checkpoint: BLIP_MODEL=OUT or --model OUT."
        ),
    )
    p.add_argument("--data", required=True, type=Path, help="a .jsonl/.csv file, or a folder with captions.jsonl")
    p.add_argument("--out", required=True, type=Path, help="output folder (new, or the one to --resume)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out (same data and training options)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")

    m = p.add_argument_group("model")
    m.add_argument("--model", help="checkpoint to start from: hub id or local folder (default BLIP_MODEL)")
    m.add_argument("--device", help="cuda, cuda:1, cpu, ... (default BLIP_DEVICE)")
    m.add_argument("--demo", action="store_true", help="start from the tiny random checkpoint (pipeline check)")
    m.add_argument("--allowed-dir", action="append", dest="allowed_dirs", help="restrict image paths (repeatable)")

    t = p.add_argument_group("training")
    t.add_argument("--epochs", type=int, help="passes over the data (default 3)")
    t.add_argument("--max-steps", type=int, help="optimizer steps in total (overrides --epochs)")
    t.add_argument("--batch-size", type=int, help="examples per forward pass (default 8)")
    t.add_argument("--grad-accum", type=int, help="forward passes per optimizer step (default 1)")
    t.add_argument("--lr", type=float, help="peak learning rate (default 1e-4)")
    t.add_argument("--weight-decay", type=float, help="AdamW weight decay (default 0.05)")
    t.add_argument("--warmup-ratio", type=float, help="share of steps for linear warm-up (default 0.05)")
    t.add_argument("--warmup-steps", type=int, help="warm-up steps (overrides --warmup-ratio)")
    t.add_argument("--max-grad-norm", type=float, help="gradient clipping norm (default 1.0)")
    t.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="(default auto: bf16 on GPU)")
    t.add_argument("--gradient-checkpointing", action="store_true", default=None, help="save memory, ~30%% slower")
    t.add_argument(
        "--no-cache-features",
        action="store_false",
        default=None,
        dest="cache_features",
        help="run the vision encoder every step instead of once per image (saves CPU memory)",
    )
    t.add_argument("--seed", type=int, help="(default 0)")
    t.add_argument("--no-progress", action="store_false", default=None, dest="progress", help="no progress bar")

    lo = p.add_argument_group("LoRA on the OPT decoder (pip install 'blip-tools[lora]')")
    lo.add_argument("--lora", action="store_true", default=None, help="also train LoRA adapters (merged on save)")
    lo.add_argument("--lora-r", type=int, help="rank (default 8)")
    lo.add_argument("--lora-alpha", type=int, help="scale numerator (default 16)")
    lo.add_argument("--lora-dropout", type=float, help="(default 0.05)")
    lo.add_argument("--lora-targets", nargs="+", help="decoder layers (default q_proj v_proj)")

    v = p.add_argument_group("validation, early stopping and checkpoints")
    v.add_argument("--val-fraction", type=float, help="share held out for validation loss (default 0.1)")
    v.add_argument("--val-data", type=Path, help="a separate validation file or folder")
    v.add_argument("--eval-every", type=int, help="validate every N steps (default: each epoch)")
    v.add_argument("--patience", type=int, help="stop after N validations without improvement")
    v.add_argument("--min-delta", type=float, help="smallest improvement that counts (default 0)")
    v.add_argument("--save-every", type=int, help="resumable checkpoint every N steps")
    v.add_argument("--keep-checkpoints", type=int, help="checkpoints kept (default 2)")

    d = p.add_argument_group("data")
    d.add_argument("--on-error", choices=["skip", "stop"], help="bad lines: stop and list them (default) or skip")
    d.add_argument("--max-target-tokens", type=int, help="longest caption/answer in tokens (default 64)")
    p.set_defaults(handler=_finetune)


def _finetune(args: argparse.Namespace) -> int:
    from ..finetune import finetune

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    settings = settings_from_args(args)
    options: dict[str, Any] = {name: getattr(args, name) for name in _CONFIG_FLAGS if getattr(args, name) is not None}
    if args.lora_targets:
        options["lora_targets"] = tuple(args.lora_targets)
    report = finetune(args.data, args.out, model=settings.model, settings=settings, resume=args.resume, **options)
    if args.json:
        print(json.dumps(report.model_dump(mode="json"), indent=2))
        return 0
    print(f"fine-tuned {report.base_model} -> {report.out_dir}")
    print(f"  examples: {report.train_examples} train, {report.val_examples} validation, {len(report.skipped)} skipped")
    for line in report.skipped:
        print(f"    skipped {line.file}:{line.line}: {line.reason}")
    first = f"{report.first_loss:.4f}" if report.first_loss is not None else "-"
    last = f"{report.final_loss:.4f}" if report.final_loss is not None else "-"
    print(f"  steps: {report.steps}/{report.total_steps} ({report.epochs:.2f} epochs), loss {first} -> {last}")
    if report.best_val_loss is not None:
        print(f"  best validation loss {report.best_val_loss:.4f} at step {report.best_step}")
    print(f"  {report.seconds:.1f}s on {report.device} ({report.precision}); metrics: {report.metrics_path}")
    print(f"  serve it: BLIP_MODEL={report.out_dir} blip-mcp   or   blip-tools caption IMAGE --model {report.out_dir}")
    return 0
