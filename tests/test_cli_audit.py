"""`blip-tools` as a user meets it: a closed pipe, a mistyped path, a bare name, bad generation flags, `--help`.

Most commands run in this process through `blip_tools.cli.main` on the tiny checkpoint; what only a real process
shows (a reader that goes away, warnings written before logging is set up) runs as `python -m blip_tools`.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _testlib import child_env, run_cli

from blip_tools.cli import main


def test_a_reader_that_goes_away_ends_the_command_quietly(tiny_env: dict[str, str], tmp_path: Path) -> None:
    """`blip-tools ... | head -1`: no BrokenPipeError traceback, the shell's status for a closed pipe (141)."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the command writes anything
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "blip_tools", "duplicates", "--index", str(tmp_path / "empty.sqlite")],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env(tiny_env),
            timeout=120,
        )
    finally:
        os.close(write_end)
    assert proc.stderr == ""
    assert proc.returncode == 141


def test_a_closed_stdout_is_no_error(tiny_env: dict[str, str], tmp_path: Path) -> None:
    """`blip-tools ... >&-`: Python has no sys.stdout then, and print() writes nowhere; that is not a crash."""
    command = (
        f"exec {shlex.quote(sys.executable)} -m blip_tools duplicates --index {shlex.quote(str(tmp_path / 'i'))} >&-"
    )
    proc = subprocess.run(
        ["/bin/sh", "-c", command], stderr=subprocess.PIPE, text=True, env=child_env(tiny_env), timeout=120
    )
    assert proc.stderr == ""
    assert proc.returncode == 0


def test_tiny_checkpoint_writes_nothing_on_stderr(tmp_path: Path) -> None:
    """transformers' warnings (e.g. "requires torchvision ... falling back") stay off a fresh process's stderr."""
    proc = subprocess.run(
        [sys.executable, "-m", "blip_tools", "tiny-checkpoint", str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        env=child_env({}),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


@pytest.mark.parametrize(
    ("argv", "status"),
    [
        (["caption", "{missing}"], 1),
        (["caption", "{missing}", "--json"], 1),
        (["locate", "{missing}", "the dog"], 2),
        (["search", "--image", "{missing}"], 2),
        (["ask", "{missing}", "what is it?"], 2),
    ],
)
def test_a_missing_image_fails_before_any_model_loads(
    tiny_env: dict[str, str],
    no_model_loads: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    status: int,
) -> None:
    """A mistyped path fails in a second, not after the model loads (or a hub model starts downloading)."""
    missing = str(tmp_path / "typo.png")
    argv = [a.replace("{missing}", missing) for a in argv] + ["--index", str(tmp_path / "i.sqlite")] * (
        argv[0] == "search"
    )
    code, out, err = run_cli(capsys, *argv)
    assert code == status
    if "--json" in argv:  # still one valid JSON object, the failure in it
        row = json.loads(out)
        assert row["type"] == "InvalidImage" and "Image file not found" in row["error"]
    else:
        assert "Image file not found" in err and err.count("\n") == 1


def test_a_bare_name_that_exists_is_read_as_that_file_or_folder(
    tiny_env: dict[str, str],
    tmp_path: Path,
    make_image: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`ask photos ...` says photos is a folder, not "base64 (4 bytes) is not a recognised image"; `caption cat`
    captions the file `cat`."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    make_image(31).save(tmp_path / "cat", format="PNG")
    code, _, err = run_cli(capsys, "ask", "photos", "what is it?")
    assert code == 2 and "is a directory" in err and "base64" not in err
    code, out, err = run_cli(capsys, "caption", "cat", "--max-new-tokens", "2")
    assert code == 0, err
    assert out.startswith(os.path.join(os.curdir, "cat") + ": ")


@pytest.mark.parametrize(
    ("argv", "flags", "fields"),
    [
        (["--num-captions", "3"], ["--num-captions", "--num-beams", "--sample"], ["num_return_sequences", "do_sample"]),
        (["--min-new-tokens", "5", "--max-new-tokens", "2"], ["--min-new-tokens", "--max-new-tokens"], ["_new_"]),
        (["--num-beams", "0"], ["--num-beams", "got 0"], ["num_beams"]),
    ],
)
def test_generation_errors_name_the_flags(
    tiny_env: dict[str, str],
    no_model_loads: None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    flags: list[str],
    fields: list[str],
) -> None:
    """The user typed --num-captions, not num_return_sequences; and the flags are checked before anything loads."""
    for command in (["caption", str(tmp_path / "x.png")], ["ask", str(tmp_path / "x.png"), "what?"]):
        code, _, err = run_cli(capsys, *command, *argv)
        assert code == 2 and err.startswith("error: Invalid arguments: ") and err.count("\n") == 1, err
        assert all(flag in err for flag in flags), err
        assert not any(field in err for field in fields), err


def test_an_empty_folder_is_named_in_the_error(
    tiny_env: dict[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    code, out, err = run_cli(capsys, "caption", str(empty), "--json")
    assert code == 2 and out == ""
    assert err.startswith("error: no image files (") and err.rstrip().endswith(f"in {empty}")


@pytest.mark.parametrize("command", ["caption", "ask", "index", "search", "duplicates", "locate"])
def test_help_shows_examples_and_the_generation_defaults(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    out = capsys.readouterr().out
    assert f"examples:\n  blip-tools {command} " in out  # kept as written, one example a line
    if command in ("caption", "ask"):
        assert "--max-new-tokens N" in out and "(default 30)" in out and "--num-captions N" in out
        assert "NUM_RETURN_SEQUENCES" not in out


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["--scenario", "B9"], ["argument --scenario: unknown scenario 'B9'", "REAL or all"]),
        (["--threads", "-1"], ["argument --threads: expected a whole number >= 1, got -1"]),
    ],
)
def test_bench_refuses_bad_arguments_as_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], words: list[str]
) -> None:
    """Not a ValueError traceback from the suite after it started (or from torch.set_num_threads)."""
    with pytest.raises(SystemExit) as stop:
        main(["bench", *argv, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and "Traceback" not in err
    assert all(word in err for word in words), err
    assert not (tmp_path / "out").exists()


def test_a_glob_that_matches_nothing_says_so_without_loading_the_model(
    tiny_env: dict[str, str], no_model_loads: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pattern = str(tmp_path / "nothing" / "*.jpg")
    code, out, _ = run_cli(capsys, "caption", pattern, "--json")
    assert code == 1
    (row,) = json.loads(out)  # a glob gives a list, however many images it held
    assert row["image"] == pattern and row["type"] == "InvalidImage"
    assert row["error"].startswith(f"No files match the pattern {pattern}")
