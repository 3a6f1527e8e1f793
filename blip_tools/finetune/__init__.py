"""Fine-tune a BLIP-2 captioner on your own images, with the vision encoder frozen, into a servable folder.

    from blip_tools.finetune import finetune
    report = finetune("my_data/captions.jsonl", "my-blip2", epochs=5, lr=1e-4)
    # then: BLIP_MODEL=my-blip2 blip-mcp   (or Blip2Service(BlipSettings(model="my-blip2")))

torch and transformers load when `finetune` is called, not on import.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._ctrl_c import ctrl_c_deferred
from ..errors import InvalidInput, ModelNotAvailable
from ..settings import BlipSettings
from .clock import RunClock
from .config import LORA_NEEDS_PEFT, FinetuneConfig, FinetuneReport, SkippedLine
from .data import DataIssue, Example, IssueLog, read_examples
from .layout import CHECKPOINT_DIR, is_empty, is_run_folder
from .lock import RunLock, busy, held_elsewhere

if TYPE_CHECKING:
    from .trainer import StepInfo, Trainer

logger = logging.getLogger(__name__)


def _split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out a seeded share of the examples for validation (whole images, so no image is on both sides)."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    images = sorted({ex.image for ex in examples})
    if len(images) < 2:
        return examples, []
    random.Random(seed).shuffle(images)
    n_val = min(len(images) - 1, max(1, round(fraction * len(images))))
    held = set(images[:n_val])
    return [ex for ex in examples if ex.image not in held], [ex for ex in examples if ex.image in held]


def _check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be created or written now, not after hours of training.

    Nothing is created here: a run refused for its data leaves no empty folder behind.
    """
    existing = out.absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise InvalidInput(f"Cannot create the output folder {out}: {existing} is a file, not a folder.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise InvalidInput(f"Cannot write the output folder {out}: {existing} is not writable. Choose another folder.")


def _check_out(out: Path, resume: bool, *, locked: bool = False) -> None:
    """Refuse an output folder that holds something this run may not write into, or (unless this run holds its
    lock: `locked`) one another run holds."""
    if not out.is_dir() or is_empty(out):
        return
    if not locked and held_elsewhere(out):  # say so rather than "not empty": it is, with that run's files
        raise busy(out)
    if not resume:
        raise InvalidInput(
            f"Output folder {out} is not empty. Choose a new folder, or pass resume=True (--resume) to "
            "continue the run saved there."
        )
    if not is_run_folder(out):
        raise InvalidInput(
            f"Output folder {out} is not empty and holds no fine-tuning run to resume (no "
            f"{CHECKPOINT_DIR}/step-N/ checkpoint, no metrics.json of a run). Choose a new or empty folder; "
            "nothing there was changed."
        )


def finetune(
    data: str | Path,
    out_dir: str | Path,
    *,
    model: str | None = None,
    settings: BlipSettings | None = None,
    config: FinetuneConfig | None = None,
    resume: bool = False,
    on_step: Callable[[StepInfo], None] | None = None,
    **options: Any,
) -> FinetuneReport:
    """Fine-tune the Q-Former, query tokens and language projection (optionally LoRA on the decoder).

    Args:
        data: a `.jsonl`/`.csv` of `{"image", "caption"}` or `{"image", "question", "answer"}` rows, or a folder
            holding `captions.jsonl`/`data.jsonl`/one such file. Image paths are relative to the data file.
        out_dir: where the fine-tuned checkpoint, `metrics.json` and resumable `checkpoints/` go. It loads like
            any checkpoint: `BLIP_MODEL=out_dir`.
        model: the checkpoint to start from (default `BlipSettings().model`).
        settings: image limits and device defaults (default `BlipSettings()` from the environment).
        config: a `FinetuneConfig`; `options` (its field names, e.g. `epochs=5, lr=1e-4, lora=True`) override it.
        resume: continue from the latest checkpoint in `out_dir/checkpoints` (same data and options). With no
            checkpoint left (a finished run, `keep_checkpoints` pruned or deleted them), train the run saved there
            again from step 0, if its `metrics.json` records the same data and options.
        on_step: called with a `StepInfo` after every optimizer step (metrics, custom logging).

    Raises:
        InvalidInput: bad options, no data file, bad data lines with `on_error="stop"` (each listed with file
            and line), an `out_dir` that holds something else or cannot be created or written, an `out_dir`
            another run is using (each run holds a lock on its folder from start to end), or a resume that does
            not match the saved run (its options, or its data: the examples and the bytes of every image).
        ModelNotAvailable: the base checkpoint cannot be loaded, or is not a captioner (e.g. a retrieval checkpoint).
    """
    clock = RunClock()  # the report's seconds: from here to the end, less the imports of torch and transformers
    settings = settings if settings is not None else BlipSettings()
    cfg = FinetuneConfig.from_options(config, **options)
    model_name = model or settings.model
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InvalidInput(f"Output {out} exists and is not a folder.")
    base = Path(model_name).expanduser()
    if base.exists() and base.resolve() == out.resolve():
        raise InvalidInput(f"The output folder {out} is the base model's folder: choose a new one.")
    if model_name.startswith(("/", "./", "../", "~")) and not base.is_dir():  # a path, not a hub id: say so now,
        # not after every image of the data set has been decoded
        raise ModelNotAvailable(
            f"The base model folder {model_name} "
            + ("is not a folder" if base.exists() else "does not exist")
            + ": point --model (BLIP_MODEL) at a checkpoint folder written by save_pretrained, or at a hub id."
        )
    _check_out(out, resume)
    _check_writable(out)
    with clock.importing():
        import torch  # noqa: F401  (resolve_device needs it; importing it takes seconds that are not the run's)

        from ..runtime import resolve_device
    resolve_device(cfg.device or str(settings.device))  # a device this machine lacks fails before the data check
    if cfg.lora:  # a missing extra is told now, not after every image is checked and the base model is loaded
        with clock.importing():
            try:
                import peft  # noqa: F401
            except ImportError as exc:
                raise InvalidInput(LORA_NEEDS_PEFT) from exc

    # Held until the end: a second run into this folder fails here at once, not after interleaving its
    # checkpoints and export with this one's. It creates the folder; a run that stops before writing anything
    # into it (bad data, a base model that is no captioner) removes it again.
    lock: RunLock | None = None
    trainer = None
    try:
        with ctrl_c_deferred():  # a Ctrl-C as acquire() returns would drop the held lock unrecorded
            lock = RunLock.acquire(out)
        _check_out(out, resume, locked=True)  # again, now that no other run can write there: one may have just finished
        trainer = _trainer(data, out, model_name, settings, cfg, resume, on_step, clock)
        report = trainer.run()
    finally:
        if lock is not None:
            lock.release(keep_folder=trainer is not None and trainer.wrote_output)
    logger.info(
        "fine-tuned %s → %s: %d steps, loss %s → %s, %d lines skipped",
        model_name, out, report.steps, report.first_loss, report.final_loss, len(report.skipped),
    )  # fmt: skip
    return report


def _trainer(
    data: str | Path,
    out: Path,
    model_name: str,
    settings: BlipSettings,
    cfg: FinetuneConfig,
    resume: bool,
    on_step: Callable[[StepInfo], None] | None,
    clock: RunClock,
) -> Trainer:
    """Read and check the data, and set up the run (no model loaded yet)."""
    log = IssueLog(cfg.on_error)
    dataset = read_examples(data, settings, log)
    what = f"the data of {dataset.file}"
    if cfg.val_data is not None:
        val_set = read_examples(cfg.val_data, settings, log)
        train, val = dataset.examples, val_set.examples
        what = f"the data ({dataset.file} and the validation data {val_set.file})"
    else:
        train, val = _split(dataset.examples, cfg.val_fraction, cfg.seed)
    log.check(what)
    if cfg.val_data is not None and not val:  # asked for: training without it would save the last, not the best
        raise InvalidInput(
            f"No usable validation examples in {val_set.file}"
            + (" (all its lines were bad and skipped)" if val_set.issues else "")
            + ": fix that file, or leave out val_data (--val-data) to hold out val_fraction of the training images."
        )
    if not val and cfg.patience is not None:
        why = "val_fraction is 0" if cfg.val_data is None and cfg.val_fraction == 0 else "none could be held out"
        logger.warning(
            "patience=%d is ignored: there are no validation examples (%s), so nothing decides when to stop. Pass "
            "val_fraction (--val-fraction) with two or more images, or val_data (--val-data).",
            cfg.patience, why,
        )  # fmt: skip
    if not train:
        raise InvalidInput(
            f"No usable training examples in {dataset.file}"
            + (f" ({len(log.issues)} bad lines skipped)." if log.issues else ".")
        )

    with clock.importing():
        from .trainer import Trainer

    return Trainer(
        model_name=model_name,
        out_dir=out,
        config=cfg,
        settings=settings,
        train=train,
        val=val,
        log=log,
        data_file=dataset.file,
        resume=resume,
        on_step=on_step,
        clock=clock,
    )


__all__ = [
    "DataIssue",
    "Example",
    "FinetuneConfig",
    "FinetuneReport",
    "SkippedLine",
    "finetune",
]
