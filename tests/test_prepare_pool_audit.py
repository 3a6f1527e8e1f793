"""Audit of the preparation pool (b7f2b82): Ctrl-C in a sync caller, and a pool whose every thread waits.

The first test passes on b7f2b82 and is kept as a guard (nothing else covers a sync call interrupted while its image
is prepared on the pool); the two others fail there.
"""

from __future__ import annotations

import io
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from blip_tools import Blip2Service, BlipSettings, _prepare
from blip_tools._prepare import PreparePool

WAIT_S = 10.0


@pytest.fixture
def one_slot(monkeypatch: pytest.MonkeyPatch) -> Iterator[PreparePool]:
    pool = PreparePool(1, "blip-prepare-audit")
    monkeypatch.setattr(_prepare, "_pool", pool)
    yield pool


def _png(image: Any) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _interrupt_main_when(event: threading.Event) -> threading.Thread:
    main = threading.main_thread().ident
    assert main is not None

    def fire() -> None:
        if event.wait(WAIT_S):
            time.sleep(0.05)
            signal.pthread_kill(main, signal.SIGINT)

    t = threading.Thread(target=fire, daemon=True)
    t.start()
    return t


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(), reason="needs the main thread")
def test_ctrl_c_while_a_sync_call_waits_on_a_download_abandons_it_and_leaves_the_pool_usable(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C (a real SIGINT to the main thread) while the pool downloads the image: the caller gets
    `KeyboardInterrupt` at once, the request is never submitted, and the pool's books come back to rest."""
    from blip_tools import _fetch

    started, release = threading.Event(), threading.Event()
    data = _png(make_image(1))
    submits: list[Any] = []

    def slow_fetch(url: str, **kwargs: Any) -> bytes:
        started.set()
        release.wait(WAIT_S)
        return data

    monkeypatch.setattr(_fetch, "fetch_url", slow_fetch)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with Blip2Service(settings.model_copy(update={"allow_urls": True})) as svc:
            svc.caption(make_image(2), max_new_tokens=3)
            submit = svc._batcher.submit
            svc._batcher.submit = lambda *a, **k: submits.append(a) or submit(*a, **k)  # type: ignore[method-assign]
            _interrupt_main_when(started)
            with pytest.raises(KeyboardInterrupt):
                svc.caption("https://example.com/a.png", max_new_tokens=3)
            release.set()
            assert svc.caption(make_image(3), max_new_tokens=3).caption is not None
            deadline = time.monotonic() + WAIT_S
            while (one_slot._running or one_slot._jobs) and time.monotonic() < deadline:
                time.sleep(0.01)
            assert (one_slot._running, len(one_slot._jobs)) == (0, 0)
            assert len(submits) == 1, "the abandoned request must never be submitted"
    finally:
        release.set()
        signal.signal(signal.SIGINT, previous)


def test_callers_of_a_loaded_model_are_not_held_up_by_many_callers_waiting_for_another_load(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool
) -> None:
    """The commit's promise ("a loading model never holds up other callers") with a burst of waiters.

    Before the change each sync caller prepared in its own thread: a caption never waited for the retrieval model's
    load. Now every score caller waiting for that load sits on one of the pool's 32 threads, inside `blocking()`;
    with 32 of them, the caption's preparation has no thread until the load ends (minutes for a real checkpoint).
    """
    with Blip2Service(settings) as svc:
        svc.caption(make_image(1), max_new_tokens=3)
        loading, release = threading.Event(), threading.Event()
        load = svc.runtime._load_retrieval

        def slow_load() -> Any:
            loading.set()
            release.wait(WAIT_S * 3)
            return load()

        svc.runtime._load_retrieval = slow_load  # type: ignore[method-assign]
        waiters = [
            threading.Thread(target=svc.score, args=(make_image(2), ["a photo"]), daemon=True)
            for _ in range(_prepare._MAX_THREADS)
        ]
        for t in waiters:
            t.start()
        try:
            assert loading.wait(WAIT_S)
            deadline = time.monotonic() + WAIT_S
            while one_slot._threads < _prepare._MAX_THREADS and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)
            out: list[Any] = []
            caller = threading.Thread(target=lambda: out.append(svc.caption(make_image(3), max_new_tokens=3)))
            caller.start()
            caller.join(WAIT_S)
            held_up = caller.is_alive()
        finally:
            release.set()
            for t in waiters:
                t.join(WAIT_S)
        assert not held_up, "a caption of the loaded captioner waited for the retrieval model's load"


@pytest.mark.skipif(
    not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread(),
    reason="needs interval timers and the main thread",
)
def test_ctrl_c_landing_while_a_caller_hands_a_job_to_the_pool_does_not_wedge_it() -> None:
    """Sync calls now submit from the caller's thread: in a script, REPL or notebook that is the main thread, where
    Ctrl-C raises `KeyboardInterrupt` at whatever bytecode runs. `submit` runs Python code with the pool's books open
    (`Condition.__enter__`/`__exit__` and `notify` are Python; so are `Thread.__init__`/`start`): an interrupt there
    leaves the condition's lock held for good, or a slot counted to a thread that was never started or woken, and
    every later call of the process (sync or async) waits forever. The old pool's `with self._lock:` on a C lock
    and `SimpleQueue.put` had no such window. Real signals, raised only while `submit` runs."""
    pool = PreparePool(1, "audit-ctrl-c")
    armed = False

    def press_ctrl_c(signum: int, frame: Any) -> None:  # Ctrl-C only while `submit` runs
        if armed:
            signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGALRM, press_ctrl_c), signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.setitimer(signal.ITIMER_REAL, 0.00003, 0.00003)
    interrupted = 0
    try:
        end = time.monotonic() + 1.0
        while time.monotonic() < end:
            try:
                armed = True
                pool.submit(lambda: None)
                armed = False
            except KeyboardInterrupt:
                armed = False
                interrupted += 1
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert interrupted > 0
    lock = pool._cond._lock  # type: ignore[attr-defined]
    assert lock.acquire(timeout=WAIT_S), "the pool's lock was left held: every later call would wait forever"
    lock.release()
    ran = threading.Event()
    pool.submit(ran.set)
    assert ran.wait(WAIT_S), (
        f"a job submitted after the interrupts never ran (running {pool._running}, idle {pool._idle}, "
        f"threads {pool._threads}, queued {len(pool._jobs)})"
    )
