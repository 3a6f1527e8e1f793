"""What a fine-tuning run writes into its output folder, and how to tell such a folder from anything else.

No torch import here: `finetune()` checks the output folder before it loads anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .lock import LOCK_FILE
from .writes import STAGING_PREFIX

CHECKPOINT_DIR = "checkpoints"
"""Resumable checkpoints live in `out_dir/checkpoints/step-N/state.pt`."""
METRICS_FILE = "metrics.json"
"""Per-step metrics, the options and the final report."""
_STEP_DIR_RE = re.compile(r"^step-(\d+)$")


def find_checkpoints(out_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint in `out_dir`, oldest first."""
    root = out_dir / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR_RE.match(child.name)
        if match and (child / "state.pt").is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def is_empty(out_dir: Path) -> bool:
    """Whether `out_dir` holds nothing but, at most, the lock file of a run (this one's, or a killed one's)."""
    return all(child.name == LOCK_FILE for child in out_dir.iterdir())


def is_run_folder(out_dir: Path) -> bool:
    """Whether `out_dir` holds what a fine-tuning run writes, so `resume` may write there.

    True with a checkpoint, with a `metrics.json` of ours (a finished run), or when the folder holds nothing but
    a `checkpoints/` folder and temporary files of a run stopped before its first checkpoint or export completed
    (and the lock file of a run killed while it held the folder).
    """
    if find_checkpoints(out_dir):
        return True
    try:
        metrics = json.loads((out_dir / METRICS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        metrics = None
    if isinstance(metrics, dict) and {"base_model", "config", "steps"} <= metrics.keys():
        return True
    leftovers = {CHECKPOINT_DIR, METRICS_FILE + ".tmp", LOCK_FILE}
    return all(child.name in leftovers or child.name.startswith(STAGING_PREFIX) for child in out_dir.iterdir())


__all__ = ["CHECKPOINT_DIR", "METRICS_FILE", "find_checkpoints", "is_empty", "is_run_folder"]
