"""Ctrl-C (`KeyboardInterrupt` in the main thread) outside the already audited core (batching, _prepare, service).

CPython raises a pending Ctrl-C only at some points of the bytecode: at the start of a Python function and right
after a call returns (also a call into C: `conn.execute`, `os.stat`, `fcntl.flock`), never between two plain
instructions. So each test lands its interrupt where a real one can land: a patched call raises `KeyboardInterrupt`
as it returns or as a Python function starts, and one test presses a real Ctrl-C (SIGINT) while SQLite waits.
Each test asks what matters in a long-lived process (a notebook, a REPL): does the next call still work, and is
nothing left held (a lock, a write transaction, a file lock) that would make it, or another process, wait or fail.
"""

from __future__ import annotations

import contextlib
import inspect
import signal
import sqlite3
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from _testlib import WAIT_S, default_sigint, free_port, in_thread

from blip_tools import Blip2Service, BlipSettings
from blip_tools.errors import BlipError, ModelNotAvailable
from blip_tools.index import ImageIndex
from blip_tools.runtime import Blip2Runtime

_WRITE_CODE = ImageIndex._write.__wrapped__.__code__  # type: ignore[attr-defined]
"""The code of the generator behind `ImageIndex._write` (the write transaction of every index write)."""


def _line_of(code: types.CodeType, text: str) -> int:
    """The line number of the first source line of `code` that contains `text`."""
    lines, first = inspect.getsourcelines(code)
    for offset, line in enumerate(lines):
        if text in line:
            return first + offset
    raise AssertionError(f"{text!r} is no longer in {code.co_name}")


def _other_writer_blocked(path: Path) -> bool:
    """Whether another connection (another process, as far as SQLite can tell) cannot start a write now."""
    other = sqlite3.connect(path, timeout=0.3, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        other.execute("ROLLBACK")
        return False
    except sqlite3.OperationalError:
        return True
    finally:
        other.close()


class _InterruptedAfterBegin:
    """A connection whose next `BEGIN IMMEDIATE` succeeds and then raises `KeyboardInterrupt`: what CPython does with a
    Ctrl-C that arrives while that statement runs (it is raised as the call returns)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self.fired = False

    def execute(self, sql: str, *args: Any) -> Any:
        out = self._conn.execute(sql, *args)
        if sql == "BEGIN IMMEDIATE" and not self.fired:
            self.fired = True
            raise KeyboardInterrupt
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


@pytest.fixture
def index(tmp_path: Path, service: Blip2Service) -> Iterator[ImageIndex]:
    idx = ImageIndex(tmp_path / "db" / "index.sqlite", service=service)
    yield idx
    idx.close()


def _next_run_works(index: ImageIndex, folder: Path) -> None:
    """The next index run of the folder completes (in this thread, on the connection the interrupted run used)."""
    try:
        report = index.index(folder, captions=False)
    except BlipError as exc:
        raise AssertionError(f"the next index run after the Ctrl-C failed: {type(exc).__name__}: {exc}") from exc
    assert report.complete and report.indexed == 6, report


# ---------------------------------------------------------------------------------------------- the image index


def test_ctrl_c_as_an_index_write_begins_leaves_no_write_transaction_open(index: ImageIndex, image_dir: Path) -> None:
    """`_write` runs `BEGIN IMMEDIATE` before its `try`: a Ctrl-C that arrives while SQLite runs it is raised as the
    call returns, outside both the `except sqlite3.Error` and the `try` that rolls back. The transaction stays open
    on the thread's connection for good: it holds the index's write lock (other processes and threads wait 30 s and
    get IndexBusy) and every later write in this thread fails ("cannot start a transaction within a transaction"),
    which `_db_failure` reports as IndexDamaged, telling the user to delete a sound index."""
    real = index._conn()
    proxy = _InterruptedAfterBegin(real)
    index._local.conn = proxy
    try:
        with pytest.raises(KeyboardInterrupt):
            index.index(image_dir, captions=False)
    finally:
        index._local.conn = real
    assert proxy.fired
    assert not index._run_lock.locked()
    assert not real.in_transaction, "the interrupted write left its transaction open (and the write lock held)"
    assert not _other_writer_blocked(index.path), "another process can no longer write to the index"
    _next_run_works(index, image_dir)


@pytest.mark.skipif(
    not hasattr(signal, "pthread_kill") or threading.current_thread() is not threading.main_thread(),
    reason="needs pthread_kill and the main thread",
)
def test_a_real_ctrl_c_while_an_index_run_waits_for_another_writer_leaves_the_index_writable(
    index: ImageIndex, image_dir: Path
) -> None:
    """The same as a user meets it: another process writes to the index (it indexes too), this run's first write
    waits for it in SQLite's busy handler (up to 30 s), and Ctrl-C is pressed then. The SIGINT is raised as soon as
    `BEGIN IMMEDIATE` returns: the window is the whole wait, not a few instructions."""
    begin_line = _line_of(_WRITE_CODE, 'conn.execute("BEGIN IMMEDIATE")')
    main = threading.main_thread().ident
    assert main is not None
    holder = sqlite3.connect(index.path, isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # the other writer
    pressed = threading.Event()

    def press_ctrl_c_while_waiting() -> None:
        try:
            deadline = time.monotonic() + WAIT_S
            while time.monotonic() < deadline:
                frame = sys._current_frames().get(main)
                if frame is not None and frame.f_code is _WRITE_CODE and frame.f_lineno == begin_line:
                    time.sleep(0.05)  # inside SQLite's busy wait
                    signal.pthread_kill(main, signal.SIGINT)
                    pressed.set()
                    time.sleep(0.1)
                    return
                time.sleep(0.001)
        finally:
            holder.execute("ROLLBACK")  # the other writer is done: the waiting BEGIN IMMEDIATE now succeeds

    with default_sigint():
        presser = threading.Thread(target=press_ctrl_c_while_waiting, daemon=True)
        presser.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                index.index(image_dir, captions=False)
        finally:
            presser.join(WAIT_S)
            holder.close()
    assert pressed.is_set(), "the run never waited in BEGIN IMMEDIATE"
    conn = index._conn()
    assert not conn.in_transaction, "the interrupted write left its transaction open (and the write lock held)"
    assert not _other_writer_blocked(index.path), "another process can no longer write to the index"
    _next_run_works(index, image_dir)


def test_ctrl_c_in_the_model_call_of_an_index_run_keeps_what_was_saved(
    index: ImageIndex, image_dir: Path, service: Blip2Service, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The common case: Ctrl-C while the model embeds a chunk. The chunks before it stay committed, nothing is held,
    and the next run resumes with the rest."""
    real = service.embed_images
    calls = 0

    def embed_then_ctrl_c(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(service, "embed_images", embed_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        index.index(image_dir, captions=False, chunk_size=2)
    monkeypatch.undo()
    assert not index._run_lock.locked() and not index._conn().in_transaction
    assert not _other_writer_blocked(index.path)
    report = index.index(image_dir, captions=False, chunk_size=2)
    assert (report.embedded, report.unchanged, report.indexed) == (4, 2, 6)


def test_ctrl_c_in_the_progress_callback_stops_the_run_once_its_chunk_is_saved(
    index: ImageIndex, image_dir: Path
) -> None:
    """A Ctrl-C that lands in the caller's progress callback (a tqdm bar in the CLI) is held until the chunk is
    committed, then raised; the next run resumes."""

    def progress(done: int, total: int) -> None:
        if done >= 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        index.index(image_dir, captions=False, chunk_size=2, on_progress=progress)
    assert not index._run_lock.locked() and not index._conn().in_transaction
    report = index.index(image_dir, captions=False, chunk_size=2)
    assert (report.embedded, report.unchanged, report.indexed) == (4, 2, 6)


# ---------------------------------------------------------------------------------------------- the model runtime


def test_ctrl_c_during_a_model_load_lets_the_next_call_load_it(settings: BlipSettings) -> None:
    """Ctrl-C during a load (seconds to minutes: a common moment for it) is raised inside `_load_once`'s `try`: the
    attempt counts as ended, the lock is free, and the next call loads. (The step before that `try`,
    `counts[0] += 1`, holds no point where CPython raises a pending Ctrl-C.)"""
    runtime = Blip2Runtime(settings)

    def interrupted() -> Any:
        raise KeyboardInterrupt

    loaded = object()

    def works() -> Any:
        runtime._retrieval = loaded  # type: ignore[assignment]
        return loaded

    runtime._load_retrieval = interrupted  # type: ignore[method-assign]
    with pytest.raises(KeyboardInterrupt):
        runtime.load_retrieval()
    assert runtime._attempts["retrieval"] == [1, 1]
    assert runtime._lock.acquire(timeout=1.0)
    runtime._lock.release()
    runtime._load_retrieval = works  # type: ignore[method-assign]
    assert runtime.load_retrieval() is loaded


# ---------------------------------------------------------------------------------------------- the daemon's client


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_ctrl_c_as_a_remote_service_starts_its_loop_thread_leaves_it_usable() -> None:
    """`RemoteService._sync` stores the new event loop in `self._loop` before its thread exists and starts: a Ctrl-C
    that lands in `Thread.__init__` or `Thread.start` (Python code, run on the first call) leaves a loop that no
    thread runs, and every later call schedules its work there and waits for it forever (`future.result()` has no
    timeout). `close()` then fails too: it joins a thread that was never started."""
    from blip_tools.remote import RemoteService

    svc = RemoteService(f"http://127.0.0.1:{free_port()}", connect_timeout_s=2.0, read_timeout_s=5.0)
    sync_code = RemoteService._sync.__code__
    start_code = threading.Thread.start.__code__
    fired: list[bool] = []

    def press_ctrl_c_as_start_begins(frame: types.FrameType, event: str, arg: Any) -> None:
        back = frame.f_back
        if event == "call" and not fired and frame.f_code is start_code and back and back.f_code is sync_code:
            fired.append(True)
            # A real SIGINT, so code that defers Ctrl-C (`ctrl_c_deferred`) can; otherwise it is raised right here,
            # as `start` begins, where CPython raises one that arrives then.
            signal.raise_signal(signal.SIGINT)

    previous = sys.gettrace()
    with default_sigint():
        sys.settrace(press_ctrl_c_as_start_begins)
        try:
            with pytest.raises(KeyboardInterrupt):
                svc.model_info()
        finally:
            sys.settrace(previous)
    assert fired
    try:
        thread, out = in_thread(svc.model_info)  # no daemon there: it must fail fast, with ModelNotAvailable
        thread.join(20.0)
        assert not thread.is_alive(), "the next call waits forever on a loop that no thread runs"
        assert out and isinstance(out[0], ModelNotAvailable), out
    finally:
        with contextlib.suppress(RuntimeError):  # "cannot join thread before it is started", on the current code
            svc.close(timeout_s=2.0)


# ---------------------------------------------------------------------------------------------- fine-tuning


def _needs_flock() -> None:
    from blip_tools.finetune import lock

    if lock.fcntl is None:
        pytest.skip("no flock on this platform")


def _ctrl_c(*args: Any, **kwargs: Any) -> Any:
    raise KeyboardInterrupt


def test_ctrl_c_as_a_finetune_run_locks_its_folder_leaves_it_unlocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_lock` takes the `flock` and then, outside any `try` that closes the descriptor, checks the file and writes
    `PID HOST` into it (os.fstat, os.stat, ftruncate, write, gethostname: a Ctrl-C is raised as any of them
    returns). The descriptor, and the lock on it, then stay open until the process ends: in a notebook every later
    run into that folder fails with "Another fine-tuning run ... is using the output folder"."""
    _needs_flock()
    from blip_tools.finetune import lock as lock_module

    out = tmp_path / "run"
    monkeypatch.setattr(lock_module, "socket", types.SimpleNamespace(gethostname=_ctrl_c))
    with pytest.raises(KeyboardInterrupt):
        lock_module.RunLock.acquire(out)
    monkeypatch.undo()
    assert not lock_module.held_elsewhere(out), "the interrupted acquire left the folder locked"
    lock_module.RunLock.acquire(out).release()


def test_ctrl_c_as_a_finetune_run_unlocks_its_folder_still_unlocks_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`release()` takes the descriptor off the lock object first, then deletes the lock file (`_same_file`: two
    stats, `unlink`), and only then closes it: a Ctrl-C in between (a second Ctrl-C while a run stops) leaks it,
    and the folder stays locked until the process ends."""
    _needs_flock()
    from blip_tools.finetune import lock as lock_module

    out = tmp_path / "run"
    run_lock = lock_module.RunLock.acquire(out)
    monkeypatch.setattr(lock_module, "_same_file", _ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        run_lock.release()
    monkeypatch.undo()
    assert not lock_module.held_elsewhere(out), "the interrupted release left the folder locked"
    lock_module.RunLock.acquire(out).release()
