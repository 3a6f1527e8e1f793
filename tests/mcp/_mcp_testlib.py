"""Helpers for the MCP server tests (imported by conftest and the test modules): images, bounded polling,
a gate that holds the model worker, and the handles of the loopback HTTP server and the raw stdio subprocess."""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _testlib import WAIT_S as WAIT_S  # shared; re-exported for the tests here
from _testlib import poll as poll
from _testlib import python_process as python_process
from _testlib import serving as serving
from _testlib import tiny_model_args

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-token-0123456789abcdef"
#: The HTTP server's image limit: small, so a body just over the derived limit is cheap to send.
HTTP_MAX_IMAGE_BYTES = 300_000


_READY = re.compile(rb"blip-mcp HTTP ready on \S+:(\d+)/mcp")


def http_args(tiny_checkpoint: Path, *, port: int = 0, program: str | None = None) -> list[str]:
    """`python` arguments for `blip-mcp --transport http` on the tiny checkpoint (or `program`, a wrapper of it)."""
    start = ["-m", "mcp_server"] if program is None else [program]
    return [*start, "--transport", "http", "--port", str(port), *tiny_model_args(tiny_checkpoint)]


def ready_port(proc: subprocess.Popen[bytes], stderr: Path) -> int:
    """Wait for a `blip-mcp --transport http` process to log that it is ready; the port that line names."""
    poll(lambda: bool(_READY.search(stderr.read_bytes())) or proc.poll() is not None, what="the HTTP ready line")
    found = _READY.search(stderr.read_bytes())
    assert found, f"no ready line; exit status {proc.poll()}; stderr:\n{stderr.read_text(errors='replace')[-3000:]}"
    port = int(found.group(1))
    assert port != 0, "the ready line names port 0, not the port bound: it came before the socket listened"
    return port


def write_image(path: Path, seed: int, size: tuple[int, int] = (48, 40)) -> Path:
    """A distinct random RGB PNG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB").save(path)
    return path


async def apoll(predicate: Callable[[], bool], what: str = "condition") -> None:
    """Wait until `predicate()` holds, from async code (callers bound it with anyio.fail_after)."""
    import anyio

    while not predicate():
        await anyio.sleep(0.005)


class Gate:
    """Holds the model worker inside `runtime.generate` while closed, so requests queue deterministically."""

    def __init__(self, service: Any) -> None:
        self.service = service
        self._generate = service.runtime.generate
        self._open = threading.Event()
        self._open.set()
        self.entered = threading.Event()
        service.runtime.generate = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        if not self._open.wait(timeout=WAIT_S):
            raise RuntimeError("the test gate was never opened")
        return self._generate(*args, **kwargs)

    def release(self) -> None:
        """Open the gate (the worker runs on)."""
        self._open.set()

    @contextmanager
    def holding(self, image: str) -> Iterator[threading.Thread]:
        """Close the gate and start one blocker caption that occupies the worker; open on exit."""
        self._open.clear()
        self.entered.clear()
        blocker = threading.Thread(target=self.service.caption, args=(image,), daemon=True)
        blocker.start()
        try:
            if not self.entered.wait(timeout=WAIT_S):
                raise AssertionError("the blocker never reached the model")
            yield blocker
        finally:
            self.release()
            blocker.join(timeout=WAIT_S)


@contextmanager
def watching_cancellations(service: Any) -> Iterator[threading.Event]:
    """Set the yielded event when a server-side `acaption` is cancelled (the handler saw the client's cancel)."""
    import asyncio

    seen = threading.Event()
    original = service.acaption

    async def acaption(*args: Any, **kwargs: Any) -> Any:
        try:
            return await original(*args, **kwargs)
        except asyncio.CancelledError:
            seen.set()
            raise

    service.acaption = acaption
    try:
        yield seen
    finally:
        del service.acaption


def make_service(tiny_checkpoint: Path, **overrides: Any) -> Any:
    """A private started service on the tiny checkpoint (not the shared session one)."""
    from blip_tools import Blip2Service, BlipSettings
    from blip_tools.testing import tiny_settings_kwargs

    return Blip2Service(BlipSettings(**{**tiny_settings_kwargs(tiny_checkpoint), **overrides})).start()


@dataclass
class HttpServer:
    """A running loopback HTTP server and what tests need to talk to it."""

    base: str
    port: int
    token: str
    service: Any
    gate: Gate
    server: Any
    body_limit: int

    @property
    def url(self) -> str:
        return f"{self.base}/mcp"

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}


@dataclass
class RawStdio:
    """A `blip-mcp` stdio subprocess spoken to in raw JSON-RPC lines; every stdout line is recorded."""

    proc: subprocess.Popen[bytes]
    stderr_path: Path
    lines: list[bytes] = field(default_factory=list)
    _inbox: queue.Queue[bytes | None] = field(default_factory=queue.Queue)
    _next_id: int = 1000

    def start_reader(self) -> None:
        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                self._inbox.put(line)
            self._inbox.put(None)

        threading.Thread(target=read, name="stdio-reader", daemon=True).start()

    def send_raw(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(data if data.endswith(b"\n") else data + b"\n")
        self.proc.stdin.flush()

    def send(self, message: dict[str, Any]) -> None:
        self.send_raw(json.dumps(message).encode())

    def receive(self, timeout_s: float = WAIT_S) -> dict[str, Any]:
        """The next message from stdout (bounded wait)."""
        try:
            line = self._inbox.get(timeout=timeout_s)
        except queue.Empty:
            raise AssertionError(f"no message from the stdio server within {timeout_s}s") from None
        if line is None:
            raise AssertionError(f"the stdio server closed stdout; stderr:\n{self.stderr_tail()}")
        return json.loads(line)

    def receive_for(self, request_id: Any, timeout_s: float = WAIT_S) -> dict[str, Any]:
        """The response to `request_id`, skipping notifications (and failing on any other response)."""
        deadline = time.monotonic() + timeout_s
        while True:
            message = self.receive(max(0.1, deadline - time.monotonic()))
            if "id" not in message:
                continue
            assert message["id"] == request_id, f"expected a response to {request_id!r}, got {message}"
            return message

    def request(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self._next_id, "method": method}
        if params is not None:
            message["params"] = params
        self.send(message)
        return self.receive_for(self._next_id)

    def stderr_tail(self, n: int = 4000) -> str:
        return self.stderr_path.read_text(errors="replace")[-n:]
