"""What a fine-tuning run leaves for others: exported files readable as the umask allows (not 0600), one run per
output folder (a second fails at once; a killed one blocks nothing), a resume refused when an image's bytes
changed under the same name, and a first export that no reader sees half-moved."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blip_tools import BlipSettings
from blip_tools.finetune import finetune

FAST: dict[str, Any] = {"val_fraction": 0, "progress": False}
LOCK = ".finetune.lock"
REPO = Path(__file__).resolve().parents[2]


def _settings(model: Path) -> BlipSettings:
    return BlipSettings(model=str(model), device="cpu", dtype="float32", max_wait_ms=1.0)


def _tree(folder: Path) -> Iterator[Path]:
    yield folder
    yield from folder.rglob("*")


@pytest.mark.parametrize(
    ("umask", "file_mode", "dir_mode"),
    [pytest.param(0o022, 0o644, 0o755, id="umask-022"), pytest.param(0o077, 0o600, 0o700, id="umask-077")],
)
def test_every_exported_file_gets_the_mode_of_a_normally_created_file(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, umask: int, file_mode: int, dir_mode: int
) -> None:
    # safetensors writes model.safetensors through a private temporary file (0600): a model trained as one user
    # and served by a service account was unreadable to it.
    out = tmp_path / "out"
    previous = os.umask(umask)
    try:
        finetune(
            caption_data, out, settings=_settings(tiny_checkpoint / "captioner"),
            max_steps=2, save_every=1, keep_checkpoints=5, **FAST,
        )  # fmt: skip
    finally:
        os.umask(previous)
    modes = {str(p.relative_to(tmp_path)): stat.S_IMODE(p.stat().st_mode) for p in _tree(out)}
    assert "out/model.safetensors" in modes and "out/checkpoints/step-0000001/state.pt" in modes
    want = {name: dir_mode if (tmp_path / name).is_dir() else file_mode for name in modes}
    assert {k: oct(v) for k, v in modes.items()} == {k: oct(v) for k, v in want.items()}


def test_the_first_export_never_shows_a_config_without_the_rest(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import Blip2ForConditionalGeneration

    out = tmp_path / "out"
    seen: list[set[str]] = []
    real = os.replace

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        real(src, dst, *args, **kwargs)
        if Path(dst).parent == out:  # what a reader of the folder sees after each rename
            seen.append({p.name for p in out.iterdir() if not p.name.startswith(".")})

    monkeypatch.setattr(os, "replace", replace)
    finetune(caption_data, out, settings=_settings(tiny_checkpoint / "captioner"), max_steps=1, **FAST)
    monkeypatch.undo()
    model_files = seen[-1] - {"metrics.json"}
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= model_files
    # Until config.json appears nothing takes the folder for a model; once it does, all the rest is there.
    assert [names for names in seen if "config.json" in names and not model_files <= names] == []
    assert Blip2ForConditionalGeneration.from_pretrained(out) is not None
