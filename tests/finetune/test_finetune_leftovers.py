"""What a fine-tuning run leaves for others: exported files readable as the umask allows (not 0600), one run per
output folder (a second fails at once; a killed one blocks nothing), a resume refused when an image's bytes
changed under the same name, and a first export that no reader sees half-moved."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _finetune_testlib import write_image

from blip_tools import BlipSettings, InvalidInput
from blip_tools.finetune import finetune
from blip_tools.finetune.trainer import StepInfo

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


def test_a_second_run_into_the_same_folder_fails_at_once_and_the_first_is_untouched(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from blip_tools import Blip2Service
    from blip_tools.cli import main

    base = tiny_checkpoint / "captioner"
    out = tmp_path / "out"
    reached = {1: threading.Event(), 2: threading.Event()}
    go = {1: threading.Event(), 2: threading.Event()}
    result: dict[str, Any] = {}

    def hold(info: StepInfo) -> None:
        if info.step in reached:
            reached[info.step].set()
            assert go[info.step].wait(120)

    def first() -> None:  # a checkpoint at step 2 (not 1), 3 steps
        try:
            result["report"] = finetune(
                caption_data, out, settings=_settings(base), on_step=hold, max_steps=3, save_every=2, **FAST
            )
        except BaseException as exc:
            result["error"] = exc
            for event in reached.values():
                event.set()

    def second(resume: bool) -> str:
        with pytest.raises(InvalidInput) as info:
            finetune(caption_data, out, settings=_settings(base), resume=resume, max_steps=3, **FAST)
        return str(info.value)

    busy = f"Another fine-tuning run (process {os.getpid()} on "
    thread = threading.Thread(target=first)
    thread.start()
    try:
        # Both started into a new folder: the first holds it (and nothing else is there yet).
        assert reached[1].wait(120) and "error" not in result, result
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
        message = second(resume=False)
        assert message.startswith(busy) and f"is using the output folder {out}: wait for it to end" in message
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
        go[1].set()
        # With the first run's checkpoint there: "another run", not "not empty, pass --resume" (it is, with its files).
        assert reached[2].wait(120) and "error" not in result, result
        before = sorted(p.name for p in out.iterdir())
        assert "checkpoints" in before
        for resume in (False, True):
            message = second(resume)
            assert message.startswith(busy) and f"is using the output folder {out}: wait for it to end" in message
        argv = ["finetune", "--data", str(caption_data), "--out", str(out), "--model", str(base), "--resume"]
        assert main([*argv, "--device", "cpu", "--max-steps", "3", "--val-fraction", "0", "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {busy}") and str(out) in err
        assert sorted(p.name for p in out.iterdir()) == before
    finally:
        for event in go.values():
            event.set()
        thread.join(120)
    assert "error" not in result, result
    assert result["report"].steps == 3
    assert LOCK not in {p.name for p in out.iterdir()}  # released and removed with the run

    # A lock file left by a run killed later (say, a resume) does not get in the way of loading or serving.
    (out / LOCK).write_text("12345 elsewhere\n")
    with Blip2Service(_settings(out)) as service:
        assert isinstance(service.caption(str(caption_data / "img" / "0.png")).caption, str)


_HOLDER = """
import sys, time
from pathlib import Path
import torch
torch.set_num_threads(1)
from blip_tools import BlipSettings
from blip_tools.finetune import finetune
def hold(info):
    if info.step == 1:
        print("ready", flush=True)
        time.sleep(600)
settings = BlipSettings(model=sys.argv[1], device="cpu", dtype="float32")
finetune(sys.argv[2], sys.argv[3], settings=settings, on_step=hold, max_steps=2, save_every=1, val_fraction=0,
         progress=False)
"""


def test_a_killed_run_holds_the_folder_until_it_dies_and_blocks_nothing_after(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    base = tiny_checkpoint / "captioner"
    out = tmp_path / "out"
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    log = tmp_path / "holder.log"
    with open(log, "w") as stderr:
        holder = subprocess.Popen(
            [sys.executable, "-c", _HOLDER, str(base), str(caption_data), str(out)],
            stdout=subprocess.PIPE, stderr=stderr, env=env, text=True,
        )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready", log.read_text()[-2000:]
        with pytest.raises(InvalidInput, match=rf"^Another fine-tuning run \(process {holder.pid} on .*{out}"):
            finetune(caption_data, out, settings=_settings(base), resume=True, max_steps=2, **FAST)
    finally:
        holder.kill()  # SIGKILL: no handler runs, the lock file stays; the OS drops the flock
        holder.wait(30)
    assert (out / LOCK).exists()
    report = finetune(caption_data, out, settings=_settings(base), resume=True, max_steps=2, **FAST)
    assert report.resumed_from_step == 1 and report.steps == 2
    assert LOCK not in {p.name for p in out.iterdir()}

    # A folder holding only a killed run's lock file counts as empty: a new run may use it without --resume.
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / LOCK).write_text("")
    assert finetune(caption_data, fresh, settings=_settings(base), max_steps=1, **FAST).steps == 1


def test_a_resume_is_refused_when_an_image_has_new_bytes_under_the_same_name(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    shutil.copytree(caption_data, data)
    settings = _settings(tiny_checkpoint / "captioner")
    options: dict[str, Any] = {"max_steps": 3, "save_every": 1, **FAST}

    class Crash(RuntimeError):
        pass

    def stop_at_2(info: StepInfo) -> None:
        if info.step == 2:
            raise Crash

    out = tmp_path / "run"
    with pytest.raises(Crash):
        finetune(data, out, settings=settings, on_step=stop_at_2, **options)
    image = data / "img" / "1.png"
    original = image.read_bytes()
    write_image(image, 999)  # same name, same size in pixels, other pixels
    assert image.read_bytes() != original
    with pytest.raises(InvalidInput, match=r"from .*step-0000002: the run differs in \{'images': .*new pixels"):
        finetune(data, out, settings=settings, resume=True, **options)

    # The same bytes again, with a new modification time (a copy, a restore): the same run, resumed.
    image.write_bytes(original)
    os.utime(image, ns=(1_000_000_000, 1_000_000_000))
    report = finetune(data, out, settings=settings, resume=True, **options)
    assert report.resumed_from_step == 2 and report.steps == 3

    # With no checkpoint left, what metrics.json records is compared the same way.
    shutil.rmtree(out / "checkpoints")
    write_image(image, 998)
    with pytest.raises(InvalidInput, match=r"as its metrics\.json records it\): the run differs in \{'images'"):
        finetune(data, out, settings=settings, resume=True, **options)


def test_a_run_saved_before_images_were_fingerprinted_still_resumes(
    tiny_checkpoint: Path, caption_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blip_tools.finetune.trainer import Trainer

    settings = _settings(tiny_checkpoint / "captioner")
    options: dict[str, Any] = {"max_steps": 3, "save_every": 1, **FAST}
    real = Trainer._fingerprint

    def without_images(self: Trainer, total_steps: int, warmup: int) -> dict[str, Any]:
        return {k: v for k, v in real(self, total_steps, warmup).items() if k != "images"}

    def stop_at_2(info: StepInfo) -> None:
        if info.step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(Trainer, "_fingerprint", without_images)  # what an earlier version saved
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        finetune(caption_data, out, settings=settings, on_step=stop_at_2, **options)
    monkeypatch.undo()
    report = finetune(caption_data, out, settings=settings, resume=True, **options)
    assert report.resumed_from_step == 2 and report.steps == 3


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
