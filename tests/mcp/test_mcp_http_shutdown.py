"""Stopping the HTTP server while calls are queued: what clients get and what the operator's log shows."""

from __future__ import annotations

import logging
import signal
import socket
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from _mcp_testlib import (
    WAIT_S,
    Gate,
    http_args,
    make_service,
    poll,
    python_process,
    ready_port,
    serving,
    write_image,
)

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


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=WAIT_S).close()
    except ConnectionRefusedError:
        return False
    return True


def test_a_second_ctrl_c_quits_at_once_without_a_traceback(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """Ctrl-C with a call running: the server stops listening and gives the call its grace. A second Ctrl-C then
    quits at once, with exit status 130 and one line saying so, not uvicorn's traceback."""
    from blip_tools.remote import RemoteService

    stderr = tmp_path / "stderr.txt"
    slow_load = str(Path(__file__).with_name("_slow_load_server.py"))  # the call waits for a load that never ends
    args = http_args(tiny_checkpoint, program=slow_load)
    with python_process(args, stderr, env={"SLOW_LOAD_S": "600"}, stdout=subprocess.DEVNULL) as proc:
        port = ready_port(proc, stderr)
        remote = RemoteService(f"http://127.0.0.1:{port}/mcp")
        image = str(write_image(tmp_path / "a.png", 1))

        def call() -> None:
            with suppress(BlipError):  # the server going away under the call is the expected end
                remote.caption(image)

        caller = threading.Thread(target=call, daemon=True)
        caller.start()
        poll(lambda: "CALL waiting for the model" in stderr.read_text(errors="replace"), what="the call to start")
        proc.send_signal(signal.SIGINT)
        poll(lambda: not _listening(port), what="the graceful shutdown to start (the port closed)")
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=WAIT_S)
        caller.join(WAIT_S)
        remote.close()
    text = stderr.read_text(errors="replace")
    assert code == 130, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "second Ctrl-C: quitting now" in text, text[-3000:]
