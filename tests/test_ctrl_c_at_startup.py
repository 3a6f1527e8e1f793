"""Ctrl-C right after starting `blip-mcp` or `blip-tools`, while they still import their libraries (a second or two):
the command ends as Ctrl-C ends it later, with exit status 130 and no traceback.

Each command runs as its console script runs it (`from <module> import main; sys.exit(main())`), under
`python -X importtime`: its stderr lines say which modules have finished importing, so SIGINT is sent right after a
given heavy module is in (pydantic, the MCP SDK, ...) while the rest still loads, at the same point on any machine.
"""

from __future__ import annotations

import importlib
import re
import signal
import subprocess
from pathlib import Path

import pytest
from _testlib import WAIT_S, poll, python_process, tiny_model_args

#: Each command's entry point module (its console script calls `main()` there).
ENTRY = {"blip-mcp": "mcp_server.cli", "blip-tools": "blip_tools.cli"}
#: Each command, and the modules after whose import it gets Ctrl-C (in the order it imports them).
LANDMARKS = {
    "blip-mcp": ["pydantic", "mcp", "mcp_server.server"],
    "blip-tools": ["pydantic", "blip_tools.service", "transformers"],
}
CASES = [(command, module) for command, modules in LANDMARKS.items() for module in modules]


def _args(command: str, tiny_checkpoint: Path, image: Path) -> list[str]:
    """`python -X importtime -c <the console script> ARGS`: blip-mcp over stdio, or blip-tools captioning here."""
    script = f"import sys; from {ENTRY[command]} import main; sys.exit(main())"
    model = tiny_model_args(tiny_checkpoint)
    rest = model if command == "blip-mcp" else ["caption", "--local", str(image), *model]
    return ["-X", "importtime", "-c", script, *rest]


@pytest.mark.parametrize(("command", "module"), CASES, ids=[f"{c}-after-{m}" for c, m in CASES])
def test_ctrl_c_while_starting_exits_130_without_a_traceback(
    command: str, module: str, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    from PIL import Image

    image = tmp_path / "a.png"
    Image.new("RGB", (32, 24), "red").save(image)
    stderr = tmp_path / "stderr.txt"
    imported = re.compile(rb"^import time:.*\|\s+" + re.escape(module.encode()) + rb"$", re.MULTILINE)
    # stdin stays open (a pipe): blip-mcp serves stdio until it ends, so it is still running when the signal comes.
    with python_process(_args(command, tiny_checkpoint, image), stderr, stdout=subprocess.DEVNULL) as proc:
        poll(lambda: bool(imported.search(stderr.read_bytes())) or proc.poll() is not None, what=f"{module} imported")
        assert proc.poll() is None, f"{command} ended before Ctrl-C:\n{stderr.read_text(errors='replace')[-3000:]}"
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{command} still running {WAIT_S:.0f} s after Ctrl-C")
    text = stderr.read_text(errors="replace")
    lines = [line for line in text.splitlines() if not line.startswith("import time:")]  # what a user sees
    assert code == 130, "\n".join(lines[-40:])
    assert "Traceback" not in text and "Exception ignored" not in text, "\n".join(lines[-40:])
    if command == "blip-tools":
        assert "interrupted" in lines, lines[-10:]  # as a later Ctrl-C says it


class _InterruptedField:
    """A class attribute whose `__set_name__` gets Ctrl-C, as a dataclass or pydantic field can while its module
    is imported: Python 3.11 re-raises it as `RuntimeError` (later versions let the `KeyboardInterrupt` through)."""

    def __set_name__(self, owner: type, name: str) -> None:
        raise KeyboardInterrupt


def _parser_interrupted_while_importing() -> None:
    class Settings:  # what a module being imported for the parser might define
        field = _InterruptedField()


@pytest.mark.parametrize("command", ["blip-mcp", "blip-tools"])
def test_ctrl_c_that_python_wrapped_in_another_error_still_exits_130(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cli = importlib.import_module(ENTRY[command])
    monkeypatch.setattr(cli, "build_parser", _parser_interrupted_while_importing)
    assert cli.main([]) == 130
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("command", ["blip-mcp", "blip-tools"])
def test_an_error_not_caused_by_ctrl_c_still_propagates(command: str, monkeypatch: pytest.MonkeyPatch) -> None:
    cli = importlib.import_module(ENTRY[command])

    def broken() -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "build_parser", broken)
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main([])
