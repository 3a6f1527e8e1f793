"""`blip-tools` CLI: arguments in, clean output and exit codes out, never a traceback.

Commands run in this process through `blip_tools.cli.main` on the tiny checkpoint (set through `BLIP_*`
variables, as a user would); the process-wide shared service the CLI installs is restored after each test.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _testlib import run_cli

from blip_tools.cli import main


@pytest.fixture
def one_image(tmp_path: Path, make_image: Callable[..., Any]) -> Path:
    path = tmp_path / "one.png"
    make_image(11).save(path)
    return path


def test_caption_takes_a_data_uri(tiny_env: None, one_image: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A data URI longer than a file name may be is an image, not a folder to look up."""
    uri = "data:image/png;base64," + base64.b64encode(one_image.read_bytes()).decode("ascii")
    assert len(uri) > 300
    code, out, _ = run_cli(capsys, "caption", uri, "--max-new-tokens", "3", "--json")
    assert code == 0
    assert json.loads(out)["image"]["source"].startswith("data URI")


@pytest.mark.parametrize(
    ("argv", "env", "names"),
    [
        (["--max-batch-size", "0"], {}, ["max_batch_size", "--max-batch-size", "BLIP_MAX_BATCH_SIZE", "got 0"]),
        ([], {"BLIP_MAX_BATCH_SIZE": "abc"}, ["max_batch_size", "BLIP_MAX_BATCH_SIZE", "'abc'"]),
        ([], {"BLIP_ALLOWED_DIRS": "[bad json"}, ["allowed_dirs", "--allowed-dir", "BLIP_ALLOWED_DIRS"]),
    ],
)
def test_invalid_settings_are_a_clean_usage_error(
    tiny_env: None,
    one_image: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    names: list[str],
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for command in (["caption", str(one_image)], ["ask", str(one_image), "what is it?"]):
        code, _, err = run_cli(capsys, *command, *argv)
        assert code == 2
        assert err.startswith("error: Invalid settings: ") and err.count("\n") == 1
        for name in names:
            assert name in err


def test_tiny_checkpoint_into_an_unwritable_place_is_a_clean_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run_cli(capsys, "tiny-checkpoint", str(blocker / "ckpt"))
    assert code == 2
    assert err.startswith(f"error: Cannot write the tiny checkpoint to {blocker / 'ckpt'}: Not a directory")


def test_tiny_checkpoint_prints_only_its_two_lines(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """Nothing else reaches stdout (the tokenizer trainer's progress display once wrote blank lines there, from
    Rust, so only file-descriptor capture sees it); `caption --demo` builds the same checkpoint on first use."""
    root = tmp_path / "ckpt"
    assert main(["tiny-checkpoint", str(root)]) == 0
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "Writing" not in err, err  # nor transformers' save progress bars on stderr
    assert out == (
        f"wrote {root / 'captioner'} and {root / 'retrieval'}\n"
        f"use it with: BLIP_MODEL={root / 'captioner'} BLIP_RETRIEVAL_MODEL={root / 'retrieval'}\n"
    )


def test_caption_json_shape_follows_the_arguments(
    tiny_env: None, tmp_path: Path, make_image: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """A list for a folder, a glob or several arguments, however many images they hold; an object for one file."""
    single = tmp_path / "single"
    single.mkdir()
    make_image(21).save(single / "only.png")
    pair = tmp_path / "pair"
    pair.mkdir()
    make_image(22).save(pair / "a.png")
    make_image(23).save(pair / "b.png")
    only = str(single / "only.png")

    def shape(*images: str) -> Any:
        code, out, _ = run_cli(capsys, "caption", *images, "--max-new-tokens", "2", "--json")
        assert code == 0
        return json.loads(out)

    assert isinstance(shape(only), dict)
    assert [row["image"]["source"] for row in shape(str(single))] == [only]  # a folder holding one image
    assert [row["image"]["source"] for row in shape(str(single / "*.png"))] == [only]  # a quoted glob matching one file
    assert [row["image"]["source"] for row in shape(str(pair))] == [str(pair / "a.png"), str(pair / "b.png")]
    assert len(shape(only, only)) == 2


def test_caption_shows_a_data_uri_by_its_size(
    tiny_env: None, one_image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uri = "data:image/png;base64," + base64.b64encode(one_image.read_bytes()).decode("ascii")
    code, out, _ = run_cli(capsys, "caption", uri, "--max-new-tokens", "2")
    assert code == 0
    assert out.startswith("data URI (") and "base64" not in out


def test_caption_finds_a_folder_named_without_a_slash(
    tiny_env: None,
    tmp_path: Path,
    make_image: Callable[..., Any],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`blip-tools caption photos` from the folder above it (a bare name also reads as base64)."""
    (tmp_path / "photos").mkdir()
    make_image(24).save(tmp_path / "photos" / "a.png")
    monkeypatch.chdir(tmp_path)
    code, out, _ = run_cli(capsys, "caption", "photos", "--max-new-tokens", "2", "--json")
    assert code == 0
    assert [row["image"]["source"] for row in json.loads(out)] == ["photos/a.png"]


def test_demo_with_a_daemon_is_refused_before_building_anything(
    tiny_env: None, one_image: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import blip_tools.testing

    def never() -> Path:
        raise AssertionError("the demo checkpoint was built for a command the daemon serves")

    monkeypatch.setattr(blip_tools.testing, "ensure_demo_checkpoint", never)
    monkeypatch.setenv("BLIP_REMOTE_URL", "http://127.0.0.1:9/mcp")  # refused before any connection
    code, _, err = run_cli(capsys, "caption", str(one_image), "--demo")
    assert code == 2 and err.startswith("error: --demo configures a model loaded here")


def test_the_demo_checkpoint_is_rebuilt_when_it_is_of_an_older_version(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Version 1 had too few positions for the longest request; `--demo` must not keep using it."""
    import blip_tools.testing as testing

    built: list[Path] = []

    def build(root: Path) -> Path:
        built.append(root)
        (root / testing.MARKER_FILE).write_text(json.dumps({"version": testing.TINY_VERSION}))
        return root

    root = tmp_path / "demo"
    root.mkdir()
    monkeypatch.setattr(testing, "demo_checkpoint_dir", lambda: root)
    monkeypatch.setattr(testing, "build_tiny_checkpoint", build)
    (root / testing.MARKER_FILE).write_text(json.dumps({"seed": 0, "kind": "blip-tools tiny checkpoint"}))
    assert testing.ensure_demo_checkpoint() == root and built == [root]  # no version: rebuilt
    assert testing.ensure_demo_checkpoint() == root and built == [root]  # current: kept
    (root / testing.MARKER_FILE).write_text("not json")
    testing.ensure_demo_checkpoint()
    assert len(built) == 2


def test_both_commands_print_their_version_and_the_package_runs_as_a_module() -> None:
    import subprocess
    import sys

    from blip_tools import __version__

    for argv, prog in (
        (["-m", "blip_tools", "--version"], "blip-tools"),
        (["-m", "mcp_server", "--version"], "blip-mcp"),
        (["-m", "blip_tools", "--help"], None),
    ):
        proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        if prog:
            assert proc.stdout.strip() == f"{prog} {__version__}"
