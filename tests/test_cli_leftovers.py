"""`blip-tools` open items of the CLI audit: index's exit status, `-` for stdin, output under a non-UTF-8
encoding, all-missing images without loading the model, one read per checked image, and `BLIP_TOKEN=`.

Commands run in this process through `blip_tools.cli.main` on the tiny checkpoint; what only a real process shows
(a real pipe on stdin, the encoding of its stdout) runs as `python -m blip_tools`.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from _testlib import child_env, run_cli

from blip_tools.cli import main

_FAST = ["--max-new-tokens", "2"]


@pytest.fixture
def png(tmp_path: Path, make_image: Callable[..., Any]) -> Path:
    path = tmp_path / "one.png"
    make_image(11).save(path)
    return path


def _pipe_in(monkeypatch: pytest.MonkeyPatch, data: bytes) -> None:
    """stdin as a pipe holding `data` (not a terminal)."""
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))


# ---------------------------------------------------------------------------------------------- 1. index


def test_index_exits_1_when_some_images_failed_and_still_indexes_the_rest(
    tiny_env: dict[str, str], tmp_path: Path, make_image: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """As `caption` does: 1 when an image failed (named on stderr), after indexing the others and the summary."""
    folder = tmp_path / "photos"
    folder.mkdir()
    make_image(1).save(folder / "good.png")
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    db = str(tmp_path / "i.sqlite")
    code, out, err = run_cli(capsys, "index", str(folder), "--index", db, "--no-captions")
    assert code == 1
    assert "1 searchable images" in out and "1 failed" in out and "done" in out
    assert "broken.png" in err and "good.png" not in err
    code, out, _ = run_cli(capsys, "index", str(folder), "--index", db, "--no-captions", "--json")
    assert code == 1  # the broken file is still there (not retried until it changes), so still not all indexed
    assert json.loads(out)["failed"] == 1
    (folder / "broken.png").unlink()
    code, out, _ = run_cli(capsys, "index", str(folder), "--index", db, "--no-captions")
    assert code == 0, out


def test_index_help_documents_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["index", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "exit status: 0 done, every image indexed; 1 some images failed" in out


# ---------------------------------------------------------------------------------------------- 2. stdin


def test_caption_reads_the_image_piped_to_stdin(
    tiny_env: dict[str, str], png: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _pipe_in(monkeypatch, png.read_bytes())
    code, out, _ = run_cli(capsys, "caption", "-", "--json", *_FAST)
    assert code == 0
    row = json.loads(out)  # one image argument: one object
    assert row["image"]["source"] == "<stdin>" and row["captions"]
    _pipe_in(monkeypatch, png.read_bytes())
    code, out, _ = run_cli(capsys, "caption", "-", str(png), *_FAST)
    assert code == 0
    assert out.startswith("<stdin>: ") and f"\n{png}: " in out
    _pipe_in(monkeypatch, png.read_bytes())
    code, out, _ = run_cli(capsys, "ask", "-", "what is it?", "--json", *_FAST)
    assert code == 0 and json.loads(out)["image"]["source"] == "<stdin>"


def test_stdin_is_capped_at_the_image_byte_limit(
    tiny_env: dict[str, str], png: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("BLIP_MAX_IMAGE_BYTES", "100")
    _pipe_in(monkeypatch, png.read_bytes())
    code, out, _ = run_cli(capsys, "caption", "-", "--json", *_FAST)
    assert code == 1
    row = json.loads(out)
    assert row["image"] == "<stdin>" and row["type"] == "PayloadTooLarge"
    assert "100-byte limit (BLIP_MAX_IMAGE_BYTES)" in row["error"]
    _pipe_in(monkeypatch, b"")
    code, _, err = run_cli(capsys, "caption", "-", *_FAST)
    assert code == 1 and err.startswith("<stdin>: error: ") and "empty (0 bytes)" in err


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["caption", "-", "-"], "given 2 times"),
        (["caption", "-"], "stdin is a terminal"),
        (["ask", "-", "what?"], "stdin is a terminal"),
        (["locate", "-", "the dog"], "stdin is a terminal"),
    ],
)
def test_stdin_twice_or_from_a_terminal_is_a_usage_error(
    tiny_env: dict[str, str],
    no_model_loads: None,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    words: str,
) -> None:
    class Terminal(io.TextIOWrapper):
        def isatty(self) -> bool:
            return True

    if "given" in words:
        _pipe_in(monkeypatch, b"x")
    else:
        monkeypatch.setattr(sys, "stdin", Terminal(io.BytesIO(b"")))
    code, out, err = run_cli(capsys, *argv)
    assert code == 2 and out == ""
    assert err.startswith("error: ") and words in err and err.count("\n") == 1, err


def test_a_real_pipe_on_stdin(tiny_env: dict[str, str], png: Path) -> None:
    """`cat photo.png | blip-tools caption -` in a real process."""
    proc = subprocess.run(
        [sys.executable, "-m", "blip_tools", "caption", "-", *_FAST],
        input=png.read_bytes(),
        capture_output=True,
        env=child_env(tiny_env),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"<stdin>: ")


# ---------------------------------------------------------------------------------------------- 3. encoding


@pytest.mark.parametrize("json_out", [False, True])
def test_a_unicode_file_name_prints_under_an_ascii_stdout(
    tiny_env: dict[str, str], tmp_path: Path, make_image: Callable[..., Any], json_out: bool
) -> None:
    """`PYTHONIOENCODING=ascii`: no UnicodeEncodeError; text escapes the name, JSON stays valid JSON."""
    path = tmp_path / "café-日本.png"
    make_image(5).save(path)
    argv = ["ask", str(path), "what?", "--json"] if json_out else ["caption", str(path)]
    proc = subprocess.run(
        [sys.executable, "-m", "blip_tools", *argv, *_FAST],
        capture_output=True,
        env=child_env({**tiny_env, "PYTHONIOENCODING": "ascii"}),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert b"Traceback" not in proc.stderr
    out = proc.stdout.decode("ascii")
    if json_out:
        assert json.loads(out)["image"]["source"] == str(path)
    else:
        assert out.startswith(str(tmp_path) + "/caf\\xe9-\\u65e5\\u672c.png: ")


def test_the_streams_are_put_back_after_an_in_process_call(
    tiny_env: dict[str, str], no_model_loads: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the command changes how its streams encode; a caller of `main()` gets them back as they were."""
    out = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", out)
    main(["caption", str(tmp_path / "missing.png")])
    assert out.errors == "strict"


# ---------------------------------------------------------------------------------------------- 4. all missing


def test_several_missing_images_fail_without_loading_the_model(
    tiny_env: dict[str, str], no_model_loads: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = [str(tmp_path / "typo1.png"), (tmp_path / "typo2.jpg").as_uri(), str(tmp_path / "gone" / "x.png")]
    code, out, _ = run_cli(capsys, "caption", *missing, "--json")
    assert code == 1
    rows = json.loads(out)
    assert [r["type"] for r in rows] == ["InvalidImage"] * 3
    assert all("Image file not found" in r["error"] for r in rows)


def test_one_existing_image_among_missing_ones_is_read_once(
    tiny_env: dict[str, str], png: Path, tmp_path: Path, reads: Counter[str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Not all missing: nothing is checked up front, the service reads each image once."""
    code, out, _ = run_cli(capsys, "caption", str(png), str(tmp_path / "typo.png"), "--json", *_FAST)
    assert code == 1
    assert [("error" in r) for r in json.loads(out)] == [False, True]
    assert reads[str(png)] == 1


# ---------------------------------------------------------------------------------------------- 5. read once


@pytest.mark.parametrize("command", ["caption", "locate", "search"])
def test_a_single_checked_image_is_read_once_and_keeps_its_name(
    tiny_env: dict[str, str],
    png: Path,
    tmp_path: Path,
    reads: Counter[str],
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    argv = {
        "caption": ["caption", str(png), *_FAST],
        "locate": ["locate", str(png), "a thing"],
        "search": ["search", "--image", str(png), "--index", str(tmp_path / "i.sqlite")],
    }[command]
    code, out, err = run_cli(capsys, *argv, "--json")
    assert code == 0, err
    assert reads[str(png)] == 1
    image = json.loads(out)["image"]
    assert (image if command == "search" else image["source"]) == str(png)


def test_a_rotated_photo_is_turned_once(
    tiny_env: dict[str, str], tmp_path: Path, make_image: Callable[..., Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """The image handed on has its EXIF orientation applied already; the service must not apply it again."""
    from blip_tools import BlipSettings
    from blip_tools.images import load_image

    path = tmp_path / "rotated.jpg"
    im = make_image(3, (30, 20))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90° on display
    im.save(path, format="JPEG", exif=exif.tobytes())
    expected = load_image(str(path), BlipSettings()).info
    code, out, _ = run_cli(capsys, "caption", str(path), "--json", *_FAST)
    assert code == 0
    image = json.loads(out)["image"]
    assert (image["width"], image["height"], image["sha256"]) == (20, 30, expected.sha256)


# ---------------------------------------------------------------------------------------------- 6. BLIP_TOKEN=


@pytest.mark.parametrize("value", ["", "   "])
def test_an_empty_token_is_no_token(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    from blip_tools import BlipSettings
    from blip_tools.errors import InvalidInput
    from mcp_server.http import HttpConfig

    monkeypatch.setenv("BLIP_TOKEN", value)
    settings = BlipSettings()
    assert settings.token is None
    HttpConfig(host="127.0.0.1", token=settings.token).check()  # loopback without a token: allowed
    with pytest.raises(InvalidInput, match="without a token"):
        HttpConfig(host="0.0.0.0", token=settings.token).check()  # still refused beyond loopback


def test_a_short_token_is_still_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from blip_tools import BlipSettings
    from blip_tools.errors import InvalidInput
    from mcp_server.http import HttpConfig

    monkeypatch.setenv("BLIP_TOKEN", "short")
    with pytest.raises(InvalidInput, match="at least 16 characters"):
        HttpConfig(host="127.0.0.1", token=BlipSettings().token).check()
