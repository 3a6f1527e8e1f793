"""The preparation pool: at most `slots` jobs use the CPU at once, and a job that waits (a download, a model
load) lets the others go on, so one slow URL or a loading model never holds up other callers' images; a Ctrl-C
in a sync caller never leaves the pool wedged."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from _testlib import default_sigint, hold_retrieval_load, in_thread, png_bytes, poll

from blip_tools import Blip2Service, BlipSettings, _prepare
from blip_tools._prepare import PreparePool, blocking

WAIT_S = 10.0


class _Meter:
    """Counts jobs running at once (outside `blocking()`), and the most seen."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.now = 0
        self.most = 0
        self.done = 0

    def job(self, seconds: float = 0.05) -> Callable[[], None]:
        def run() -> None:
            with self._lock:
                self.now += 1
                self.most = max(self.most, self.now)
            time.sleep(seconds)  # a CPU job's duration; not marked as waiting
            with self._lock:
                self.now -= 1
                self.done += 1

        return run

    def wait_done(self, count: int) -> None:
        deadline = time.monotonic() + WAIT_S
        while self.done < count and time.monotonic() < deadline:
            time.sleep(0.01)
        assert self.done == count, f"{self.done} of {count} jobs ran within {WAIT_S} s"


def test_the_process_pool_has_one_slot_under_the_gil_and_one_per_cpu_without(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the GIL a second slot only adds a thread taking turns; a free-threaded Python runs one per CPU."""
    import sys

    monkeypatch.setattr(_prepare, "usable_cpus", lambda: 6)
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: True, raising=False)
    assert _prepare.pool_slots() == 1
    monkeypatch.setattr(sys, "_is_gil_enabled", lambda: False, raising=False)
    assert _prepare.pool_slots() == 6
    monkeypatch.delattr(sys, "_is_gil_enabled", raising=False)  # Python before 3.13: the GIL is always on
    assert _prepare.pool_slots() == 1


def test_at_most_slots_jobs_run_at_once_and_all_of_them_run() -> None:
    pool = PreparePool(2, "test-slots")
    meter = _Meter()
    for _ in range(8):
        pool.submit(meter.job())
    meter.wait_done(8)
    assert meter.most == 2


def test_a_job_waiting_in_blocking_lets_the_next_job_run_and_the_limit_holds_again_after() -> None:
    pool = PreparePool(1, "test-blocking")
    entered, release, finished = threading.Event(), threading.Event(), threading.Event()

    def waits() -> None:
        with blocking():
            entered.set()
            release.wait(WAIT_S)
        finished.set()

    pool.submit(waits)
    assert entered.wait(WAIT_S)
    meter = _Meter()
    pool.submit(meter.job(0.0))
    meter.wait_done(1)  # ran while the first job still waits
    assert not finished.is_set()
    release.set()
    assert finished.wait(WAIT_S)
    for _ in range(6):  # the thread that stood in for the waiting one does not stay as an extra slot
        pool.submit(meter.job())
    meter.wait_done(7)
    assert meter.most == 1


def test_max_threads_bounds_the_jobs_waiting_at_once() -> None:
    pool = PreparePool(1, "test-max", max_threads=2)
    release = threading.Event()
    waiting = threading.Semaphore(0)

    def waits() -> None:
        with blocking():
            waiting.release()
            release.wait(WAIT_S)

    pool.submit(waits)
    pool.submit(waits)
    assert waiting.acquire(timeout=WAIT_S) and waiting.acquire(timeout=WAIT_S)
    meter = _Meter()
    pool.submit(meter.job(0.0))
    time.sleep(0.3)
    assert meter.done == 0  # both threads wait: the third job waits for one of them
    release.set()
    meter.wait_done(1)


def test_blocking_outside_a_pool_thread_and_nested_does_nothing() -> None:
    with blocking(), blocking():
        pass
    pool = PreparePool(1, "test-nested")
    meter = _Meter()
    seen: list[int] = []

    def nested() -> None:
        with blocking():
            with blocking():
                pass
            seen.append(1)

    pool.submit(nested)
    for _ in range(4):
        pool.submit(meter.job())
    meter.wait_done(4)
    assert seen == [1] and meter.most == 1


# ---------------------------------------------------------------------------------------------- in the service


def test_a_slow_download_does_not_hold_up_other_callers_images(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    from blip_tools import _fetch

    started, release = threading.Event(), threading.Event()
    data = png_bytes(make_image(1))

    def slow_fetch(url: str, **kwargs: Any) -> bytes:
        started.set()
        release.wait(WAIT_S)
        return data

    monkeypatch.setattr(_fetch, "fetch_url", slow_fetch)
    with Blip2Service(settings.model_copy(update={"allow_urls": True})) as svc:
        svc.caption(make_image(2), max_new_tokens=3)  # the model is loaded
        thread, out = in_thread(lambda: svc.caption("https://example.com/a.png", max_new_tokens=3))
        assert started.wait(WAIT_S)
        began = time.monotonic()
        svc.caption(make_image(3), max_new_tokens=3)
        assert time.monotonic() - began < WAIT_S / 2
        assert thread.is_alive()  # the download still waits
        release.set()
        thread.join(WAIT_S)
        assert out and out[0].caption == svc.caption(make_image(1), max_new_tokens=3).caption


def test_a_model_loading_does_not_hold_up_callers_of_a_loaded_one(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool
) -> None:
    with Blip2Service(settings) as svc:
        svc.caption(make_image(1), max_new_tokens=3)
        loading, release = hold_retrieval_load(svc)
        thread, out = in_thread(lambda: svc.score(make_image(2), ["a photo"]))
        assert loading.wait(WAIT_S)
        began = time.monotonic()
        svc.caption(make_image(3), max_new_tokens=3)
        assert time.monotonic() - began < WAIT_S / 2
        release.set()
        thread.join(WAIT_S)
        assert out and out[0].best == "a photo"


def test_a_sync_call_made_on_a_preparation_thread_runs_there(
    service: Blip2Service, make_image: Callable[..., Any], one_slot: PreparePool
) -> None:
    """Waiting for the pool from its only thread would wait forever."""
    done = threading.Event()
    out: list[str] = []

    def job() -> None:
        out.append(service.caption(make_image(4), max_new_tokens=3).caption)
        done.set()

    _prepare.pool().submit(job)
    assert done.wait(WAIT_S)
    assert out == [service.caption(make_image(4), max_new_tokens=3).caption]


def test_sync_callers_errors_and_images_reach_them_from_the_pool(
    service: Blip2Service, make_image: Callable[..., Any], one_slot: PreparePool
) -> None:
    """The preparation moved to the pool; what a sync caller sees did not change."""
    from blip_tools import InvalidImage, InvalidInput

    with pytest.raises(InvalidImage, match="not found"):
        service.caption("/no/such/image.png")
    with pytest.raises(InvalidInput, match="max_new_tokens"):
        service.caption(make_image(5), max_new_tokens=0)
    result = service.answer(make_image(5), "what is it?", max_new_tokens=3)
    assert result.image.width == 48 and result.image.height == 40


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded")
def test_a_forked_child_gets_a_pool_of_its_own() -> None:
    """The parent's pool threads are not in the child: a job submitted there must still run."""
    import os

    ran = threading.Event()
    _prepare.pool().submit(ran.set)
    assert ran.wait(WAIT_S)  # the parent's pool has threads now
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if a job runs
        child_ran = threading.Event()
        _prepare.pool().submit(child_ran.set)
        os._exit(0 if child_ran.wait(5.0) else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_a_photos_decode_hash_and_resize_give_up_the_slot_and_a_small_images_do_not(
    service: Blip2Service, make_image: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Long GIL-free C work on a large image runs outside the slot limit, so photos are decoded several at a time;
    a small image's short C calls keep the slot (more threads would only take turns on the GIL)."""
    import contextlib
    import sys

    entered: list[str] = []

    def recording(*, waits: bool = True) -> contextlib.AbstractContextManager[None]:
        caller = sys._getframe(1)  # gil_free, or what waits (a model load)
        entered.append(sys._getframe(2).f_code.co_name if caller.f_code.co_name == "gil_free" else "wait")
        return contextlib.nullcontext()

    monkeypatch.setattr(_prepare, "blocking", recording)
    service.caption(png_bytes(make_image(6, (48, 40))), max_new_tokens=3)
    assert [name for name in entered if name != "wait"] == []
    big = make_image(7, (400, 300))
    assert big.width * big.height >= _prepare.GIL_FREE_PIXELS
    entered.clear()
    service.caption(png_bytes(big), max_new_tokens=3)
    # The decode, the pixel hash and the resize: one resize per loaded model (with the retrieval model loaded, a
    # caption also gets its image-text match); a model load that another test left to do may add a wait.
    steps = [name for name in entered if name != "wait"]
    assert set(steps) == {"_decode", "load_image", "pixels"}
    assert (steps.count("_decode"), steps.count("load_image")) == (1, 1)


# ---------------------------------------- Ctrl-C, and a pool whose every thread waits (helper-59)


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
    data = png_bytes(make_image(1))
    submits: list[Any] = []

    def slow_fetch(url: str, **kwargs: Any) -> bytes:
        started.set()
        release.wait(WAIT_S)
        return data

    monkeypatch.setattr(_fetch, "fetch_url", slow_fetch)
    with default_sigint():
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
        loading, release = hold_retrieval_load(svc, WAIT_S * 3)
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


_SUBMIT_FILES = frozenset({"_prepare.py", "_ctrl_c.py", "threading.py", "contextlib.py", "signal.py", "enum.py"})
"""Where `PreparePool.submit`'s Python runs: the pool, its Ctrl-C deferral, and the standard library it calls."""


def _ctrl_c_storm(call: Callable[[], Any], files: frozenset[str], *, seconds: float, every_s: float) -> int:
    """Call `call()` again and again for `seconds` while real Ctrl-Cs (SIGINT, every `every_s`) land whenever Python
    in one of `files` runs in the main thread; how many calls were interrupted."""
    armed = False

    def press_ctrl_c(signum: int, frame: Any) -> None:  # Ctrl-C only while the call's own Python runs
        # Not in other Python that runs meanwhile: an audit hook another test installed (tests/adversarial) or the
        # unraisable hook swallow an interrupt and report it, which pytest turns into a failure (seen under load).
        if armed and frame is not None and os.path.basename(frame.f_code.co_filename) in files:
            signal.raise_signal(signal.SIGINT)

    previous = signal.signal(signal.SIGALRM, press_ctrl_c), signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.setitimer(signal.ITIMER_REAL, every_s, every_s)
    interrupted = 0
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                armed = True
                call()
                armed = False
            except KeyboardInterrupt:
                armed = False
                interrupted += 1
    finally:
        armed = False
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    return interrupted


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
    interrupted = _ctrl_c_storm(lambda: pool.submit(lambda: None), _SUBMIT_FILES, seconds=1.0, every_s=0.00003)
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


# ---------------------------------------------------------------------------------------------- bursts


def _burst_service(settings: BlipSettings, prepare_s: float = 0.1) -> tuple[Blip2Service, list[int]]:
    """A service whose images take `prepare_s` each to preprocess (one at a time, on the one-slot pool), with a 1 ms
    idle window and a 5 s merge budget, its model loaded but no batch run yet; and the batch sizes it runs."""
    svc = Blip2Service(settings.model_copy(update={"max_wait_ms": 1.0, "max_merge_wait_ms": 5000.0}))
    svc.runtime.load_captioner()
    preprocess = svc.runtime.preprocess

    def slow_preprocess(*args: Any, **kwargs: Any) -> Any:
        time.sleep(prepare_s)
        return preprocess(*args, **kwargs)

    svc.runtime.preprocess = slow_preprocess  # type: ignore[method-assign]
    sizes: list[int] = []
    svc.add_listener(lambda event: sizes.append(event.size))
    return svc, sizes


def _at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run `calls` in threads that start together; their results (or exceptions), in order."""
    barrier = threading.Barrier(len(calls))
    out: list[Any] = [None] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        try:
            out[i] = calls[i]()
        except BaseException as exc:  # the test reads it
            out[i] = exc

    threads = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    return out


def test_a_burst_of_callers_fills_one_batch_while_their_images_are_prepared(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool
) -> None:
    """Eight callers at once: their images are prepared one after another (0.1 s each, far past the 1 ms window),
    and the worker waits for the ones still on their way instead of starting the model on the first alone."""
    svc, sizes = _burst_service(settings)
    with svc:
        images = [make_image(40 + i) for i in range(8)]
        out = _at_once([lambda image=image: svc.caption(image, max_new_tokens=3) for image in images])
        assert [r.caption for r in out] == [r.caption for r in svc.caption_batch(images, max_new_tokens=3)]
        assert sizes[0] == 8, sizes
        assert svc._batcher._expected == 0  # every announcement ended


def test_callers_that_fail_or_give_up_do_not_hold_up_a_burst(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool
) -> None:
    """A caller whose image cannot be read, or an async caller cancelled while its image waits for the pool, is no
    longer on its way: the others' batch goes out when they are in, not after the 5 s budget."""
    from blip_tools import InvalidImage

    svc, sizes = _burst_service(settings)
    with svc:
        began = time.monotonic()
        calls: list[Callable[[], Any]] = [
            lambda i=i: svc.caption(make_image(50 + i), max_new_tokens=3) for i in range(3)
        ]
        out = _at_once([*calls, lambda: svc.caption("/no/such/image.png")])
        assert time.monotonic() - began < 3.0
        assert isinstance(out[3], InvalidImage) and all(not isinstance(r, BaseException) for r in out[:3])
        poll(lambda: bool(sizes), 10.0, "the batch's listener")  # told just after the results go out
        assert sizes == [3]
        assert svc._batcher._expected == 0
    svc, sizes = _burst_service(settings)  # a fresh one: the budget is now capped by the tiny model's batch time
    with svc:

        async def two_and_one_cancelled() -> list[Any]:
            tasks = [asyncio.ensure_future(svc.acaption(make_image(60 + i), max_new_tokens=3)) for i in range(3)]
            await asyncio.sleep(0.005)  # all three announced; the third's image waits behind the first two
            tasks[2].cancel()
            return await asyncio.gather(*tasks, return_exceptions=True)

        began = time.monotonic()
        results = asyncio.run(two_and_one_cancelled())
        assert time.monotonic() - began < 3.0
        assert isinstance(results[2], asyncio.CancelledError)
        poll(lambda: bool(sizes), 10.0, "the batch's listener")  # told just after the results go out
        assert sizes == [2]
        assert svc._batcher._expected == 0


_CALL_FILES = _SUBMIT_FILES | {"service.py", "batching.py", "_base.py"}
"""Where a sync call's own Python runs in its caller's thread: the service, the batcher, the pool, the stdlib
(`concurrent/futures/_base.py` included)."""


@pytest.mark.skipif(
    not hasattr(signal, "setitimer") or threading.current_thread() is not threading.main_thread(),
    reason="needs interval timers and the main thread",
)
@pytest.mark.parametrize("batch", [False, True], ids=["caption", "caption_batch"])
def test_ctrl_c_landing_anywhere_in_a_sync_call_leaves_the_service_working(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool, batch: bool
) -> None:
    """A sync call announces its request to the batcher (`expect()`, which takes the batcher's lock) before handing
    its image to the pool, and `abandon()` withdraws it on Ctrl-C. An interrupt inside either left the batcher's
    lock held (every later call waited for good) or the request counted as on its way for good (every lone call
    then waited out the budget for it): seen within 14 calls of one Ctrl-C each. A batch call submits and waits
    in its caller's thread: an interrupt there must not leave the batcher's lock or a request's future held (the
    worker would wait on it for good). Real signals, raised only while the call's own Python runs in the main
    thread."""
    svc = Blip2Service(settings)
    svc.caption(make_image(1), max_new_tokens=3)  # loaded
    images = [make_image(2 + i) for i in range(6)]
    call = (
        (lambda: svc.caption_batch(images, max_new_tokens=3))
        if batch
        else (lambda: svc.caption(images[0], max_new_tokens=3))
    )
    interrupted = _ctrl_c_storm(call, _CALL_FILES, seconds=1.5, every_s=0.0001)
    try:
        assert interrupted > 0
        lock = svc._batcher._cond._lock  # type: ignore[attr-defined]
        assert lock.acquire(timeout=WAIT_S), "the batcher's lock was left held: every later call would wait forever"
        lock.release()
        deadline = time.monotonic() + WAIT_S  # the abandoned jobs end on the pool
        while svc._batcher._expected and time.monotonic() < deadline:
            time.sleep(0.01)
        assert svc._batcher._expected == 0, "a request stays counted as on its way"
        thread, out = in_thread(lambda: svc.caption_batch([make_image(9), make_image(10)], max_new_tokens=3))
        thread.join(WAIT_S)
        assert out and not isinstance(out[0], BaseException), out
    finally:
        svc.close(drain=False, timeout_s=WAIT_S)
