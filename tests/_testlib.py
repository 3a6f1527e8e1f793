"""Helpers shared by the test folders (importable as `_testlib`: pytest puts `tests/` on the path for its
conftest): bounded polling, a uvicorn server on a thread, a command's process started as from a terminal, the CLI run
in-process, a free port, a call run on a thread, PNG bytes, a model load held back and a runtime whose model calls
can be held."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from blip_tools.runtime import Blip2Runtime

WAIT_S = 60.0
ROOT = Path(__file__).resolve().parents[1]


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


def tiny_model_args(tiny_checkpoint: Path) -> list[str]:
    """The command-line options that point `blip-mcp` / `blip-tools` at the tiny checkpoint, on the CPU."""
    from blip_tools.testing import tiny_settings_kwargs

    kw = tiny_settings_kwargs(tiny_checkpoint)
    return ["--model", kw["model"], "--retrieval-model", kw["retrieval_model"], "--device", "cpu"]


@contextmanager
def default_sigint() -> Iterator[None]:
    """Python's own Ctrl-C handler (`KeyboardInterrupt`) for the block, whatever the test runner installed."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def sigint_as_in_a_terminal() -> None:
    """`preexec_fn` that puts SIGINT back to its default, as a command started from a terminal has it.

    A run started in the background by a script (`cmd &`, as CI runners may start pytest) inherits SIGINT ignored,
    and Python then installs no Ctrl-C handler in the child.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextmanager
def python_process(
    args: list[str], stderr: Path, *, env: Mapping[str, str] | None = None, stdout: int = subprocess.PIPE
) -> Iterator[subprocess.Popen[bytes]]:
    """`python ARGS` run from the checkout as from a terminal (Ctrl-C works), without the caller's `BLIP_*`
    settings (`env` adds variables); stdin is a pipe, stderr goes to the file `stderr`. Killed if still running after
    the block."""
    child_env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP_")}
    child_env["PYTHONPATH"] = str(ROOT) + os.pathsep + child_env.get("PYTHONPATH", "")
    child_env.update(env or {})
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=err,
            cwd=ROOT,
            env=child_env,
            preexec_fn=sigint_as_in_a_terminal,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=WAIT_S)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                with suppress(BrokenPipeError):  # unsent input to a process that is gone
                    stream.close()


def record_mcp_requests(monkeypatch: Any) -> list[str]:
    """From now on, the JSON-RPC method of every HTTP request an MCP client sends (the HTTP verb for a bodiless one)."""
    import json

    import httpx2

    sent: list[str] = []
    original = httpx2.AsyncClient.send

    async def recording(self: Any, request: Any, *args: Any, **kwargs: Any) -> Any:
        sent.append(json.loads(request.content).get("method", "?") if request.content else request.method)
        return await original(self, request, *args, **kwargs)

    monkeypatch.setattr(httpx2.AsyncClient, "send", recording)
    return sent


def free_port() -> int:
    """A loopback TCP port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def local_ray_serve() -> Iterator[int]:
    """Ray on 2 CPUs with Serve's HTTP proxy on a free loopback port (yielded); Serve and Ray shut down after.

    Started as `serve-ray` starts a local instance: 20 s readiness checks for the proxy (Ray's 5 s, three times,
    killed a proxy that took 21 s to start on a loaded 2-core machine, and serve.start() failed). Ray's processes
    read the variable from the environment `ray.init` starts them with.
    """
    import ray
    from ray import serve

    from blip_tools.cli.ray import _PROXY_READY_ENV, _PROXY_READY_S

    previous = os.environ.get(_PROXY_READY_ENV)
    os.environ[_PROXY_READY_ENV] = _PROXY_READY_S
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        port = free_port()
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            yield port
        finally:
            serve.shutdown()
            ray.shutdown()
    finally:
        if previous is None:
            os.environ.pop(_PROXY_READY_ENV, None)
        else:
            os.environ[_PROXY_READY_ENV] = previous


def run_cli(capsys: Any, *argv: str) -> tuple[int, str, str]:
    """`blip-tools ARGV` in this process: (exit status, stdout, stderr); a traceback on stderr fails the test."""
    from blip_tools.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The environment a user's shell has: no `BLIP_*` but `extra`, and no TRANSFORMERS_VERBOSITY (conftest sets
    it for this process)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP_") and k != "TRANSFORMERS_VERBOSITY"}
    return {**env, **extra}


def in_thread(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run `fn` on a daemon thread; the list gets its result, or what it raised, once the thread ends."""
    out: list[Any] = []

    def run() -> None:
        try:
            out.append(fn())
        except BaseException as exc:  # the test reads it
            out.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, out


def png_bytes(image: Any) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def hold_retrieval_load(svc: Any, hold_s: float = WAIT_S) -> tuple[threading.Event, threading.Event]:
    """Make `svc`'s retrieval model load wait for `release` (at most `hold_s`); `loading` is set once it waits."""
    loading, release = threading.Event(), threading.Event()
    load = svc.runtime._load_retrieval

    def slow_load() -> Any:
        loading.set()
        release.wait(hold_s)
        return load()

    svc.runtime._load_retrieval = slow_load
    return loading, release


class GatedRuntime(Blip2Runtime):
    """A real runtime whose `generate()` waits for `gate` (set: runs at once), so a batch can be held running.

    `entered` is set once a batch reached it, `seen` has each batch's size; `poison` (a prompt) makes a batch
    holding it fail, `oom_above` (a size) makes larger batches fail as out of memory.
    """

    def __init__(self, settings: Any) -> None:
        super().__init__(settings)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.seen: list[int] = []
        self.poison: str | None = None
        self.oom_above: int | None = None

    def generate(self, items: Any, params: Any) -> Any:
        self.entered.set()
        assert self.gate.wait(timeout=30)
        self.seen.append(len(items))
        if self.oom_above is not None and len(items) > self.oom_above:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        if self.poison is not None:
            poison_ids = self.encode_prompt(self.poison)
            if any(it.prompt_ids == poison_ids for it in items):
                raise ValueError("simulated failure on one input")
        return super().generate(items, params)
