"""Crash-safe writes of a fine-tuning run: a crash or full disk mid-export leaves the previous output as it was,
a full disk while saving a checkpoint or metrics.json is a typed one-line error (and the CLI exits 2), and no
temporary file or half-written checkpoint is left behind.

Disk-full failures are simulated by patching the save functions to write part of a file and then raise what the
real ones raise on a full disk: `OSError(ENOSPC)`, torch.save's `RuntimeError("... unexpected pos N vs M")` and
safetensors' `SafetensorError("... No space left on device (os error 28)")`.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from blip_tools import BlipSettings, InvalidInput
from blip_tools.finetune import finetune
from blip_tools.finetune.trainer import StepInfo

#: One quick run: one step, no checkpoint, no validation.
ONE_STEP: dict[str, Any] = {"max_steps": 1, "val_fraction": 0, "progress": False}


def _settings(model: Path) -> BlipSettings:
    return BlipSettings(model=str(model), device="cpu", dtype="float32", max_wait_ms=1.0)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` (relative path → sha256 of its bytes)."""
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _failing_save_pretrained(monkeypatch: pytest.MonkeyPatch, error: BaseException, *, write_all: bool) -> None:
    """Make the export's `save_pretrained` write (all or half of) the weights into its folder, then raise `error`."""
    from transformers import Blip2ForConditionalGeneration

    real = Blip2ForConditionalGeneration.save_pretrained

    def save_pretrained(self: Any, save_directory: Any, *args: Any, **kwargs: Any) -> None:
        weights = Path(save_directory) / "model.safetensors"
        if write_all:
            real(self, save_directory, *args, **kwargs)
            with open(weights, "r+b") as handle:  # killed while the last bytes were on their way
                handle.truncate(weights.stat().st_size // 2)
        else:
            weights.write_bytes(b"\0" * 64)
        raise error

    monkeypatch.setattr(Blip2ForConditionalGeneration, "save_pretrained", save_pretrained)


def test_a_crash_mid_export_leaves_the_previous_output_as_it_was(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from transformers import Blip2ForConditionalGeneration

    settings = _settings(tiny_checkpoint / "captioner")
    # The first export of a run crashes: the folder holds no half-written model (so a plain rerun may use it).
    first = tmp_path / "first"
    _failing_save_pretrained(monkeypatch, KeyboardInterrupt(), write_all=True)
    with pytest.raises(KeyboardInterrupt):
        finetune(caption_data, first, settings=settings, **ONE_STEP)
    assert sorted(first.iterdir()) == []

    # A finished run is resumed (with no checkpoint left it trains again) and its export crashes: the previous
    # model is untouched.
    monkeypatch.undo()
    out = finetune(caption_data, tmp_path / "run", settings=settings, **ONE_STEP).out_dir
    before = _snapshot(out)
    assert "model.safetensors" in before and "metrics.json" in before
    model_file = (out / "model.safetensors").stat().st_ino
    _failing_save_pretrained(monkeypatch, KeyboardInterrupt(), write_all=True)
    with pytest.raises(KeyboardInterrupt):
        finetune(caption_data, out, settings=settings, resume=True, **ONE_STEP)
    assert _snapshot(out) == before
    monkeypatch.undo()
    Blip2ForConditionalGeneration.from_pretrained(out)  # still the good model

    # Once the disk is fine again, the same resume replaces the model (a new file with the same weights: the same
    # data and options train the same run again; the same files, nothing left over).
    report = finetune(caption_data, out, settings=settings, resume=True, **ONE_STEP)
    assert report.steps == 1
    after = _snapshot(out)
    assert sorted(after) == sorted(before) and (out / "model.safetensors").stat().st_ino != model_file
    Blip2ForConditionalGeneration.from_pretrained(out)

    # A hard kill during a first export leaves only the staging folder: that is still a run folder to resume.
    killed = tmp_path / "killed"
    (killed / ".export-abc123").mkdir(parents=True)
    (killed / ".export-abc123" / "model.safetensors").write_bytes(b"\0" * 64)
    assert finetune(caption_data, killed, settings=settings, resume=True, **ONE_STEP).steps == 1
    assert not list(killed.glob(".export-*")) and (killed / "model.safetensors").is_file()


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device", "model.safetensors"),
        "safetensors",  # what safetensors really raises on a full disk
    ],
    ids=["oserror", "safetensors"],
)
def test_a_full_disk_during_export_is_one_typed_line_and_keeps_the_previous_output(
    tiny_checkpoint: Path,
    caption_data: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    error: BaseException | str,
) -> None:
    from safetensors import SafetensorError

    from blip_tools.cli import main

    if error == "safetensors":
        error = SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert isinstance(error, BaseException)
    base = tiny_checkpoint / "captioner"
    out = finetune(caption_data, tmp_path / "run", settings=_settings(base), **ONE_STEP).out_dir
    before = _snapshot(out)
    _failing_save_pretrained(monkeypatch, error, write_all=False)
    with pytest.raises(InvalidInput) as info:
        finetune(caption_data, out, settings=_settings(base), resume=True, **ONE_STEP)
    message = str(info.value)
    assert message.startswith(f"Could not write the fine-tuned checkpoint to {out}: the disk is full.")
    assert "Free disk space" in message and "--out" in message and "--resume" in message
    assert "\n" not in message
    assert _snapshot(out) == before  # the previous model is whole, and no staging folder is left

    argv = ["finetune", "--data", str(caption_data), "--out", str(out), "--model", str(base), "--resume"]
    code = main([*argv, "--device", "cpu", "--max-steps", "1", "--val-fraction", "0", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == [f"error: {message}"]
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534"),  # torch.save's
    ],
    ids=["oserror", "torch"],
)
def test_a_full_disk_while_saving_a_checkpoint_is_typed_and_the_run_resumes(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception
) -> None:
    import torch

    real_save: Callable[..., Any] = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        if Path(f).parent.name == "step-0000002.tmp":
            Path(f).write_bytes(b"PK\x03\x04" + b"\0" * 64)  # a partial zip, then the disk is full
            raise error
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    settings = _settings(tiny_checkpoint / "captioner")
    options = ONE_STEP | {"max_steps": 3, "save_every": 1}
    out = tmp_path / "run"
    with pytest.raises(InvalidInput) as info:
        finetune(caption_data, out, settings=settings, **options)
    message = str(info.value)
    checkpoint = out / "checkpoints" / "step-0000002"
    assert message.startswith(f"Could not write the checkpoint of step 2 to {checkpoint}: the disk is full.")
    assert "--resume" in message and "--out" in message
    # No half-written checkpoint (nor its temporary folder) takes space; the one before is complete.
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
    assert [s["step"] for s in json.loads((out / "metrics.json").read_text())["steps"]] == [1]

    monkeypatch.undo()  # space was freed
    report = finetune(caption_data, out, settings=settings, resume=True, **options)
    assert report.resumed_from_step == 1 and report.steps == 3


def test_a_failed_metrics_write_is_typed_and_keeps_the_previous_metrics(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"

    def block_metrics(info: StepInfo) -> None:
        if info.step == 1:  # after step 1's checkpoint and metrics.json: the next write cannot make its temp file
            (out / "metrics.json.tmp").mkdir()

    options = ONE_STEP | {"max_steps": 3, "save_every": 1}
    with pytest.raises(InvalidInput) as info:
        finetune(caption_data, out, settings=_settings(tiny_checkpoint / "captioner"), on_step=block_metrics, **options)
    message = str(info.value)
    assert message.startswith(f"Could not write the metrics to {out / 'metrics.json'}: ")
    assert "metrics.json.tmp" in message and "--resume" in message
    metrics = json.loads((out / "metrics.json").read_text())  # the previous one, complete
    assert [s["step"] for s in metrics["steps"]] == [1]


def test_replace_text_leaves_the_old_file_and_no_temporary_on_a_full_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from blip_tools.finetune import writes

    path = tmp_path / "metrics.json"
    writes.replace_text(path, '{"old": true}\n')

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    full_disk = r"Could not write the metrics to .*metrics\.json: the disk is full\."
    with pytest.raises(InvalidInput, match=full_disk), writes.writing("the metrics", path, "retry."):
        writes.replace_text(path, '{"new": true}\n' * 1000)
    assert path.read_text() == '{"old": true}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_exporting_a_run_again_is_one_rename_of_the_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash between two renames of an export cannot leave new weights beside an older config."""
    import os

    from blip_tools.finetune import writes

    out, stage = tmp_path / "run", tmp_path / "run" / ".export-x"
    stage.mkdir(parents=True)
    for name in ("config.json", "tokenizer.json"):  # the same run exported again: the same configs
        (out / name).write_text(f"{name} of the base\n")
        (stage / name).write_text(f"{name} of the base\n")
    (out / "model.safetensors").write_text("old weights")
    (stage / "model.safetensors").write_text("new weights")
    (stage / "generation_config.json").write_text("new\n")  # a file the previous export did not write
    config = (out / "config.json").stat().st_ino
    renamed: list[str] = []
    real_replace = os.replace

    def replace(src: Any, dst: Any) -> None:
        renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    writes.install(stage, out)
    assert renamed == ["generation_config.json", "model.safetensors"]  # identical files stay; the weights go last
    assert (out / "config.json").stat().st_ino == config
    assert (out / "model.safetensors").read_text() == "new weights"


def test_a_checkpoint_left_half_written_by_a_hard_kill_is_removed_by_the_next_save(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "run"
    killed = out / "checkpoints" / "step-0000007.tmp"  # killed (OOM, SIGTERM) while it wrote step 7
    killed.mkdir(parents=True)
    (killed / "state.pt").write_bytes(b"PK\x03\x04" + b"\0" * 64)
    options = ONE_STEP | {"max_steps": 2, "save_every": 1}
    report = finetune(caption_data, out, settings=_settings(tiny_checkpoint / "captioner"), resume=True, **options)
    assert report.steps == 2
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000001"]
