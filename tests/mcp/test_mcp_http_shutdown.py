"""Stopping the HTTP server while calls are queued: what clients get and what the operator's log shows."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from _mcp_testlib import WAIT_S, Gate, make_service, poll, serving, write_image

from blip_tools.errors import BlipError, ModelNotAvailable


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextmanager
def _uvicorn_log() -> Iterator[_Records]:
    """Records of uvicorn's error log (it does not propagate to the root logger, so caplog cannot see them).

    Enter it after building the `uvicorn.Config`, which replaces the handlers of uvicorn's loggers.
    """
    handler = _Records()
    log = logging.getLogger("uvicorn.error")
    log.addHandler(handler)
    try:
        yield handler
    finally:
        log.removeHandler(handler)


def test_calls_cut_by_the_graceful_shutdown_get_an_error_and_log_one_line(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Calls still queued when the grace runs out get `ModelNotAvailable` ("connection lost"), and the log says
    once how many were cut instead of a traceback per call."""
    import uvicorn

    from blip_tools.remote import RemoteService
    from mcp_server import create_server
    from mcp_server.http import HttpConfig, build_http_app, uvicorn_config

    image = str(write_image(tmp_path / "a.png", 1))
    service = make_service(tiny_checkpoint, max_batch_size=1)
    gate = Gate(service)
    config = HttpConfig(host="127.0.0.1", port=0)
    server = uvicorn.Server(uvicorn_config(build_http_app(create_server(service), config), config))
    server.config.timeout_graceful_shutdown = 0.5  # as SIGTERM with calls running past the 5 s grace, sooner
    outcomes: list[BaseException | str] = []
    try:
        with _uvicorn_log() as uvicorn_log, serving(server) as port, gate.holding(image):
            remote = RemoteService(f"http://127.0.0.1:{port}/mcp")

            def call(seed: int) -> None:
                try:
                    outcomes.append(remote.caption(image, seed=seed).caption)
                except BlipError as exc:
                    outcomes.append(exc)

            callers = [threading.Thread(target=call, args=(seed,), daemon=True) for seed in range(3)]
            for caller in callers:
                caller.start()
            poll(lambda: service.stats().queue_depth >= 3, what="three calls queued behind the held batch")
            server.should_exit = True  # what SIGTERM does
            for caller in callers:
                caller.join(WAIT_S)
            remote.close()
    finally:
        service.close(drain=False)
    assert len(outcomes) == 3
    assert all(isinstance(o, ModelNotAvailable) and "lost during the call" in str(o) for o in outcomes), outcomes
    cut = [r for r in uvicorn_log.records if "timeout graceful shutdown exceeded" in r.getMessage()]
    assert len(cut) == 1, [r.getMessage() for r in uvicorn_log.records]
    tracebacks = [r for r in uvicorn_log.records if r.exc_info]
    assert not tracebacks, [r.getMessage() for r in tracebacks]
