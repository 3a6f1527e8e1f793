"""Helpers shared by the test folders (importable as `_testlib`: pytest puts `tests/` on the path for its
conftest): bounded polling and a uvicorn server on a thread."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

WAIT_S = 60.0


def poll(predicate: Callable[[], bool], timeout_s: float = WAIT_S, what: str = "condition") -> None:
    """Wait (bounded) until `predicate()` holds, from a thread."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.005)


@contextmanager
def serving(server: Any) -> Iterator[int]:
    """Run a `uvicorn.Server` on a thread for the block (stopping it after); yields the loopback port it bound."""
    thread = threading.Thread(target=server.run, name="uvicorn-test", daemon=True)
    thread.start()
    poll(lambda: server.started or not thread.is_alive(), what="uvicorn to start")
    assert server.started, "uvicorn failed to start"
    try:
        yield server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(timeout=30)
