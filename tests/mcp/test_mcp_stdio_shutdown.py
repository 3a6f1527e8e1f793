"""Stopping a stdio `blip-mcp` (the server and the `--connect` proxy) with real processes and signals.

A desktop host ends a stdio server by closing stdin; a person in a terminal presses Ctrl-C with stdin still open;
a host that crashes leaves stdout with no reader. Each must end the process promptly and quietly.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest
from _mcp_testlib import poll, write_image
from _testlib import python_process, tiny_model_args

EXIT_WAIT_S = 60.0
INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 0,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "shutdown-test", "version": "0"},
    },
}


def _command(kind: str, tiny_checkpoint: Path) -> list[str]:
    """The arguments after `python`: the proxy, the server, or the server with a slow model load."""
    if kind == "proxy":  # loads no model: nothing listens on port 9, and nothing here needs the daemon
        return ["-m", "mcp_server", "--connect", "http://127.0.0.1:9/mcp"]
    program = ["-m", "mcp_server"] if kind == "server" else [str(Path(__file__).with_name("_slow_load_server.py"))]
    return [*program, *tiny_model_args(tiny_checkpoint)]


def _readline(stream: IO[bytes], stderr: Path) -> bytes:
    """One line from `stream`, waiting at most `EXIT_WAIT_S`."""
    lines: list[bytes] = []
    reader = threading.Thread(target=lambda: lines.append(stream.readline()), daemon=True)
    reader.start()
    reader.join(EXIT_WAIT_S)
    assert lines and lines[0], f"no answer to initialize; stderr:\n{stderr.read_text(errors='replace')[-3000:]}"
    return lines[0]


@contextmanager
def _stdio(args: list[str], stderr: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`python ARGS` (a blip-mcp) over real pipes, started as from a terminal, initialized."""
    with python_process(args, stderr) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write(json.dumps(INITIALIZE).encode() + b"\n")
        proc.stdin.flush()
        answer = json.loads(_readline(proc.stdout, stderr))
        assert answer["result"]["serverInfo"]["name"] == "blip-tools", answer
        yield proc


def _exits_on_ctrl_c(proc: subprocess.Popen[bytes], stderr: Path, situation: str) -> None:
    """Send SIGINT, as Ctrl-C in a terminal does: the process must exit with 130 within `EXIT_WAIT_S`."""
    proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"blip-mcp still running {EXIT_WAIT_S:.0f} s after Ctrl-C {situation}")
    assert code == 130, stderr.read_text(errors="replace")[-3000:]


@pytest.mark.parametrize("kind", ["proxy", "server"])
def test_ctrl_c_ends_a_session_whose_client_keeps_stdin_open(kind: str, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """SIGINT, as Ctrl-C in a terminal sends it, with stdin still open (and, for the server, its model still
    loading in the background): the process exits with 130, without waiting for stdin to end."""
    stderr = tmp_path / "stderr.txt"
    with _stdio(_command(kind, tiny_checkpoint), stderr) as proc:
        _exits_on_ctrl_c(proc, stderr, f"({kind}) with stdin open")
        assert "Traceback" not in stderr.read_text(errors="replace")


def test_a_client_that_stops_reading_ends_the_session_quietly(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """The host crashed: its end of stdout is gone when the proxy answers. The answer is dropped, the session
    ends with stdin, and the process exits 0 with no traceback (the host's log would keep it)."""
    stderr = tmp_path / "stderr.txt"
    with _stdio(_command("proxy", tiny_checkpoint), stderr) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdout.close()  # nobody reads the server's stdout any more
        proc.stdin.write(b'{"jsonrpc": "2.0", "id": 1, "method": "ping"}\n')
        proc.stdin.flush()
        proc.stdin.close()
        code = proc.wait(timeout=EXIT_WAIT_S)
        text = stderr.read_text(errors="replace")
        assert code == 0, text[-3000:]
        assert "Traceback" not in text, text[-3000:]


@pytest.mark.parametrize("tool", ["caption_image", "embed_image"])
def test_ctrl_c_while_a_call_waits_for_the_model_to_load(tiny_checkpoint: Path, tmp_path: Path, tool: str) -> None:
    """A real checkpoint can take minutes to load (more to download). Ctrl-C then ends the process at once, with
    a call waiting for the load: neither the wait (in the event loop for a caption, on the runtime's load lock in a
    thread for an embedding) nor the load keeps the process alive until the load is done."""
    stderr = tmp_path / "stderr.txt"
    with _stdio(_command("slow-load", tiny_checkpoint), stderr) as proc:
        assert proc.stdin is not None
        call = {"name": tool, "arguments": {"image": str(write_image(tmp_path / "a.png", 1))}}
        proc.stdin.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": call}).encode())
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        poll(
            lambda: "CALL waiting for the model" in stderr.read_text(errors="replace"),
            timeout_s=EXIT_WAIT_S,
            what="the call to wait for the model load",
        )
        _exits_on_ctrl_c(proc, stderr, "waiting for its model to load")
