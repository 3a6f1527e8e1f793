"""The batcher's announcements (`expect()` / `unexpect()` / `submit(expected=True)`) as the service uses them.

A single call announces its request when it hands its image to the preparation pool; the announcement must end
exactly once (submitted, refused, withdrawn), on every path: else `DynamicBatcher._expected` stays above 0 and every
lone request at an idle worker waits out the budget for good (or it goes below 0). The services here have a 3 s
budget and no batch run yet (so the budget is not capped by a batch's time): a leak shows as a 3 s wait.
"""

from __future__ import annotations

import asyncio
import functools
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from _testlib import GatedRuntime, hold_retrieval_load, in_thread, png_bytes, poll

from blip_tools import Blip2Service, BlipSettings
from blip_tools._prepare import PreparePool
from blip_tools.batching import DynamicBatcher
from blip_tools.errors import BlipError, InvalidImage, InvalidInput, Overloaded, ServiceClosed

WAIT_S = 20.0
BUDGET_MS = 3000.0
"""The services' `max_merge_wait_ms`: how long a lone request waits for an announcement that never ends."""
LONE_S = 1.5
"""A lone request at an idle worker with nothing on its way goes out well within this (else: it waited the budget)."""


def expected(svc: Blip2Service) -> int:
    """The batcher's count of announced requests, read under its lock."""
    batcher = svc._batcher
    with batcher._cond:
        return batcher._expected


def settles_to_zero(svc: Blip2Service) -> None:
    """Wait (bounded) until every announcement has ended: pool jobs of abandoned calls end on their own."""
    poll(lambda: expected(svc) == 0, 10.0, f"the announcements to end (now {expected(svc)})")


class Spy:
    """Records the batcher's announcement calls and the lowest count seen after each (it must never go below 0)."""

    def __init__(self, batcher: DynamicBatcher[Any, Any]) -> None:
        self.batcher = batcher
        self.lock = threading.Lock()
        self.calls: list[str] = []
        self.lowest = 0
        expect, unexpect, submit = batcher.expect, batcher.unexpect, batcher.submit

        def note(what: str) -> None:
            with batcher._cond, self.lock:
                self.calls.append(what)
                self.lowest = min(self.lowest, batcher._expected)

        def spy_expect() -> None:
            expect()
            note("expect")

        def spy_unexpect() -> None:
            unexpect()
            note("unexpect")

        def spy_submit(*args: Any, **kwargs: Any) -> Any:
            try:
                return submit(*args, **kwargs)
            finally:
                note("submit-expected" if kwargs.get("expected") else "submit")

        batcher.expect = spy_expect  # type: ignore[method-assign]
        batcher.unexpect = spy_unexpect  # type: ignore[method-assign]
        batcher.submit = spy_submit  # type: ignore[method-assign]

    def count(self, what: str) -> int:
        with self.lock:
            return self.calls.count(what)


def _service(settings: BlipSettings, runtime: Any = None, **update: Any) -> Blip2Service:
    """A service with a 1 ms idle window and a `BUDGET_MS` budget for announced requests, captioner loaded."""
    merged: dict[str, Any] = {"max_wait_ms": 1.0, "max_merge_wait_ms": BUDGET_MS, **update}
    chosen = settings.model_copy(update=merged)
    svc = Blip2Service(chosen, runtime=runtime(chosen) if runtime is not None else None)
    svc.runtime.load_captioner()
    return svc


@pytest.fixture
def svc(settings: BlipSettings, one_slot: PreparePool) -> Iterator[Blip2Service]:
    service = _service(settings)
    yield service
    service.close(drain=False, timeout_s=WAIT_S)


def _hold_preprocess(svc: Blip2Service) -> tuple[threading.Event, threading.Event]:
    """Make `svc`'s image preprocessing wait for `release`; `entered` is set once one waits."""
    entered, release = threading.Event(), threading.Event()
    preprocess = svc.runtime.preprocess

    def held(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(WAIT_S)
        return preprocess(*args, **kwargs)

    svc.runtime.preprocess = held  # type: ignore[method-assign]
    return entered, release


def _lone_call_is_prompt(svc: Blip2Service, image: Any) -> None:
    """A lone caption at the idle worker goes out at once: no announcement is left (the budget is 3 s)."""
    began = time.monotonic()
    svc.caption(image, max_new_tokens=2)
    took = time.monotonic() - began
    assert took < LONE_S, f"a lone caption took {took:.2f} s: it waited for an announced request that never came"


class _Abort(BaseException):
    """Not an `Exception`: like KeyboardInterrupt or SystemExit, but harmless to raise in a test."""


def _failing_calls(svc: Blip2Service, make_image: Callable[..., Any], tmp_path: Any) -> dict[str, Callable[[], Any]]:
    """Single sync calls that each fail, in or before their preparation."""
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    image = make_image(1)
    return {
        "missing file": lambda: svc.caption("/no/such/image.png"),
        "corrupt bytes": lambda: svc.caption(str(corrupt)),
        "corrupt raw bytes": lambda: svc.answer(b"not an image at all", "what?"),
        "bad params in prepare": lambda: svc.caption(image, max_new_tokens=0),
        "unknown param in prepare": lambda: svc.caption(image, no_such_option=1),
        "over the token limit": lambda: svc.caption(image, max_new_tokens=10_000),
        "too long for the positions": lambda: svc.caption(image, "a " * 2000, max_new_tokens=2),
        "prompt too long": lambda: svc.caption(image, "x" * 5000),
        "empty question": lambda: svc.answer(image, "  "),
        "score texts not a list (before prepare)": lambda: svc.score(image, None),  # type: ignore[arg-type]
        "score with no texts": lambda: svc.score(image, []),
        "score with too many texts": lambda: svc.score(image, ["a"] * 65),
        "score bad image": lambda: svc.score("/no/such/image.png", ["a"]),
        "locate empty text": lambda: svc.locate(image, " "),
        "locate bad image": lambda: svc.locate("/no/such/image.png", "a cat"),
        "url not allowed": lambda: svc.caption("https://example.com/a.png"),
    }


# ---------------------------------------------------------------------------------------------- every kind of call


def test_successful_single_calls_of_every_kind_end_their_announcement(
    svc: Blip2Service, make_image: Callable[..., Any]
) -> None:
    """Each single call announces once and its submit ends it: caption, answer, score, locate and the async twins."""
    spy = Spy(svc._batcher)
    image = make_image(1)
    svc.caption(image, max_new_tokens=2)
    svc.answer(image, "what?", max_new_tokens=2)
    svc.caption(image, max_new_tokens=2, do_sample=True, seed=3)  # a key of its own
    svc.score(image, ["a", "b"])
    svc.locate(image, "a thing")

    async def twins() -> None:
        await svc.acaption(image, max_new_tokens=2)
        await svc.aanswer(image, "what?", max_new_tokens=2)
        await svc.ascore(image, "a")
        await svc.alocate(image, "a thing")
        await svc.aembed_images([image])

    asyncio.run(twins())
    assert spy.count("submit-expected") == 10
    assert spy.count("expect") == 10 + spy.count("unexpect")  # (a model load may withdraw and renew one)
    assert spy.lowest == 0 and expected(svc) == 0


# ---------------------------------------------------------------------------------------------- failing preparations


def test_every_failing_sync_call_ends_its_announcement(
    svc: Blip2Service, make_image: Callable[..., Any], tmp_path: Any
) -> None:
    spy = Spy(svc._batcher)
    for name, call in _failing_calls(svc, make_image, tmp_path).items():
        with pytest.raises(BlipError):
            call()
            pytest.fail(f"{name}: did not fail")
        assert expected(svc) == 0, f"{name}: an announcement was left behind"
    assert spy.lowest == 0
    assert spy.count("submit-expected") == 0  # none of them got as far as the batcher
    assert spy.count("expect") == spy.count("unexpect")
    _lone_call_is_prompt(svc, make_image(2))


def test_every_failing_async_call_ends_its_announcement(
    svc: Blip2Service, make_image: Callable[..., Any], tmp_path: Any
) -> None:
    image = make_image(1)
    calls: dict[str, Callable[[], Any]] = {
        "missing file": lambda: svc.acaption("/no/such/image.png"),
        "bad params in prepare": lambda: svc.acaption(image, max_new_tokens=0),
        "too long for the positions": lambda: svc.acaption(image, "a " * 2000, max_new_tokens=2),
        "empty question": lambda: svc.aanswer(image, ""),
        "score with too many texts": lambda: svc.ascore(image, ["a"] * 65),
        "locate bad image": lambda: svc.alocate("/no/such/image.png", "a cat"),
        "aembed_images bad image": lambda: svc.aembed_images(["/no/such/image.png"]),
    }
    for name, call in calls.items():
        with pytest.raises(BlipError):
            asyncio.run(call())
            pytest.fail(f"{name}: did not fail")
        assert expected(svc) == 0, f"{name}: an announcement was left behind"
    _lone_call_is_prompt(svc, make_image(2))


def test_an_image_over_the_size_limits_ends_its_announcement(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool
) -> None:
    data = png_bytes(make_image(3, (64, 64)))
    for limits in ({"max_image_bytes": len(data) // 2}, {"max_image_pixels": 100}):
        svc = _service(settings, **limits)
        try:
            with pytest.raises(BlipError):
                svc.caption(data)
            with pytest.raises(BlipError):
                asyncio.run(svc.acaption(data))
            assert expected(svc) == 0, limits
        finally:
            svc.close(drain=False, timeout_s=WAIT_S)


@pytest.mark.parametrize("error", [_Abort, SystemExit, KeyboardInterrupt, RuntimeError])
def test_a_base_exception_raised_while_preparing_ends_the_announcement(
    svc: Blip2Service, make_image: Callable[..., Any], error: type[BaseException]
) -> None:
    """An interrupt-like error inside `prepare` (on the pool thread) reaches the caller, and the request is no
    longer counted as on its way."""

    def boom(*args: Any, **kwargs: Any) -> Any:
        raise error("raised while preparing")

    preprocess = svc.runtime.preprocess
    svc.runtime.preprocess = boom  # type: ignore[method-assign]
    with pytest.raises(error, match="raised while preparing"):
        svc.caption(make_image(1), max_new_tokens=2)
    assert expected(svc) == 0
    if error is _Abort or error is RuntimeError:  # an asyncio task re-raises KeyboardInterrupt/SystemExit at the loop
        with pytest.raises(error, match="raised while preparing"):
            asyncio.run(svc.acaption(make_image(1), max_new_tokens=2))
        assert expected(svc) == 0
    svc.runtime.preprocess = preprocess  # type: ignore[method-assign]
    _lone_call_is_prompt(svc, make_image(2))


def test_a_model_that_fails_to_load_while_preparing_ends_the_announcement(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool
) -> None:
    svc = Blip2Service(settings.model_copy(update={"max_wait_ms": 1.0, "max_merge_wait_ms": BUDGET_MS}))
    try:

        def refuse() -> Any:
            raise RuntimeError("simulated load failure")

        svc.runtime._load_retrieval = refuse  # type: ignore[method-assign]
        with pytest.raises(Exception, match="simulated load failure"):
            svc.score(make_image(1), ["a photo"])
        with pytest.raises(Exception, match="simulated load failure"):
            asyncio.run(svc.alocate(make_image(1), "a photo"))
        assert expected(svc) == 0
        svc.runtime.load_captioner()  # not inside the timed call below
        _lone_call_is_prompt(svc, make_image(2))
    finally:
        svc.close(drain=False, timeout_s=WAIT_S)


def test_a_pool_that_cannot_take_the_job_ends_the_announcement(
    svc: Blip2Service, make_image: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from blip_tools import service as service_module

    def refuse(fn: Callable[[], None]) -> None:
        raise RuntimeError("blip-prepare: could not start a preparation thread")

    monkeypatch.setattr(service_module, "_prepare_in_thread", refuse)
    with pytest.raises(RuntimeError, match="could not start"):
        svc.caption(make_image(1), max_new_tokens=2)
    with pytest.raises(RuntimeError, match="could not start"):
        asyncio.run(svc.acaption(make_image(1), max_new_tokens=2))
    assert expected(svc) == 0


# ------------------------------------------------------------------------------------ paths that never announce


def test_calls_prepared_in_their_own_thread_never_announce(
    svc: Blip2Service, make_image: Callable[..., Any], one_slot: PreparePool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stalled pool, or a call made on a pool thread, prepares in the caller's thread: it neither announces nor
    ends an announcement (a `submit(expected=True)` there would drive the count below 0)."""
    spy = Spy(svc._batcher)
    done = threading.Event()
    out: list[Any] = []

    def on_the_pool() -> None:
        try:
            out.append(svc.caption(make_image(1), max_new_tokens=2))
            with pytest.raises(InvalidImage):
                svc.caption("/no/such/image.png")
        except BaseException as exc:  # the test reads it
            out.append(exc)
        finally:
            done.set()

    one_slot.submit(on_the_pool)
    assert done.wait(WAIT_S)
    assert len(out) == 1 and not isinstance(out[0], BaseException), out
    monkeypatch.setattr(PreparePool, "stalled", lambda self: True)
    svc.caption(make_image(2), max_new_tokens=2)
    with pytest.raises(InvalidInput):
        svc.caption(make_image(2), max_new_tokens=0)
    assert spy.count("expect") == spy.count("unexpect") == spy.count("submit-expected") == 0
    assert spy.count("submit") == 2
    assert spy.lowest == 0 and expected(svc) == 0


def test_batch_calls_do_not_announce_and_their_async_twins_end_every_announcement(
    svc: Blip2Service, make_image: Callable[..., Any]
) -> None:
    """`_run_many` prepares a chunk, then submits it at once: nothing to announce. The async batch calls are
    single calls gathered, each announced and ended, also when one fails and the others are cancelled."""
    spy = Spy(svc._batcher)
    images = [make_image(10 + i) for i in range(3)]
    svc.caption_batch(images, max_new_tokens=2)
    svc.answer_batch(images, ["what?"] * 3, max_new_tokens=2)
    svc.embed_images(images)
    svc.embed_texts(["a", "b"])
    out: list[Any] = svc.caption_batch([images[0], "/no/such/image.png"], max_new_tokens=2, return_exceptions=True)
    assert isinstance(out[1], InvalidImage)
    assert spy.count("expect") == spy.count("submit-expected") == spy.count("unexpect") == 0
    asyncio.run(svc.aembed_texts(["a", "b"]))
    assert spy.count("expect") == 0

    bad = [*images, "/no/such/image.png", *images]
    with pytest.raises(InvalidImage):
        asyncio.run(svc.acaption_batch(bad, max_new_tokens=2))
    settles_to_zero(svc)
    out = asyncio.run(svc.aanswer_batch(bad, ["what?"] * len(bad), max_new_tokens=2, return_exceptions=True))
    assert isinstance(out[3], InvalidImage) and sum(isinstance(r, BaseException) for r in out) == 1
    out = asyncio.run(svc.aembed_images(bad, return_exceptions=True))
    assert isinstance(out[3], InvalidImage)
    settles_to_zero(svc)
    assert spy.count("expect") == spy.count("submit-expected") + spy.count("unexpect")
    assert spy.lowest == 0


# ---------------------------------------------------------------------------------------------- closing, overload


def test_a_service_closed_while_a_request_is_prepared_ends_its_announcement(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool
) -> None:
    for use_async in (False, True):
        svc = _service(settings)
        entered, release = _hold_preprocess(svc)

        def call(svc: Blip2Service = svc, use_async: bool = use_async) -> Any:
            if use_async:
                return asyncio.run(svc.acaption(make_image(1), max_new_tokens=2))
            return svc.caption(make_image(1), max_new_tokens=2)

        thread, out = in_thread(call)
        assert entered.wait(WAIT_S)
        assert expected(svc) == 1
        svc.close(timeout_s=WAIT_S)
        release.set()
        thread.join(WAIT_S)
        assert out and isinstance(out[0], ServiceClosed), out
        assert expected(svc) == 0
        with pytest.raises(ServiceClosed):  # closed before it started: refused when its image is ready
            svc.caption(make_image(1), max_new_tokens=2)
        with pytest.raises(ServiceClosed):
            asyncio.run(svc.ascore(make_image(1), ["a"]))
        assert expected(svc) == 0


def test_close_racing_many_callers_leaves_no_announcement(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool
) -> None:
    svc = _service(settings)
    images = [make_image(20 + i) for i in range(4)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def caller(i: int) -> None:
        while not stop.is_set():
            try:
                svc.caption(images[i], max_new_tokens=2)
            except ServiceClosed:
                return
            except BaseException as exc:  # the test reads it
                errors.append(exc)
                return

    threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(4)]
    for thread in threads:
        thread.start()
    time.sleep(0.3)
    svc.close(timeout_s=WAIT_S)
    for thread in threads:
        thread.join(WAIT_S)
    stop.set()
    assert not errors, errors
    assert not any(thread.is_alive() for thread in threads)
    assert expected(svc) == 0


def test_an_overloaded_refusal_of_an_announced_request_ends_it(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool
) -> None:
    svc = _service(settings, runtime=GatedRuntime, max_queue=1, max_batch_size=1)
    runtime: GatedRuntime = svc.runtime  # type: ignore[assignment]
    try:
        runtime.gate.clear()
        running, running_out = in_thread(lambda: svc.caption(make_image(1), max_new_tokens=2))
        assert runtime.entered.wait(WAIT_S)
        queued, queued_out = in_thread(lambda: svc.caption(make_image(2), max_new_tokens=2))
        poll(lambda: svc._batcher.queue_depth == 1, WAIT_S, "the second request to queue")
        with pytest.raises(Overloaded):
            svc.caption(make_image(3), max_new_tokens=2)
        with pytest.raises(Overloaded):
            asyncio.run(svc.aanswer(make_image(3), "what?", max_new_tokens=2))
        assert expected(svc) == 0
        runtime.gate.set()
        running.join(WAIT_S)
        queued.join(WAIT_S)
        assert running_out and queued_out and not isinstance(running_out[0], BaseException)
        assert not isinstance(queued_out[0], BaseException)
    finally:
        runtime.gate.set()
        svc.close(drain=False, timeout_s=WAIT_S)


# ---------------------------------------------------------------------------------------------- abandoning


def test_an_async_call_cancelled_before_while_and_after_its_image_is_prepared(
    settings: BlipSettings, make_image: Callable[..., Any], one_slot: PreparePool
) -> None:
    svc = _service(settings, runtime=GatedRuntime)
    runtime: GatedRuntime = svc.runtime  # type: ignore[assignment]
    try:

        async def scenario() -> None:
            # Before: the task never ran, so nothing was announced.
            task: asyncio.Future[Any] = asyncio.ensure_future(svc.acaption(make_image(1), max_new_tokens=2))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert expected(svc) == 0
            # While: its image waits in preprocessing; the announcement ends at the cancel, not when the image is done.
            entered, release = _hold_preprocess(svc)
            task = asyncio.ensure_future(svc.ascore(make_image(2), ["a"]))
            await asyncio.to_thread(entered.wait, WAIT_S)
            assert expected(svc) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert expected(svc) == 0
            release.set()
            await asyncio.sleep(0.2)  # the pool thread finds the request abandoned and submits nothing
            assert expected(svc) == 0 and svc._batcher.stats().requests == 0
            # After: submitted and running (or queued); cancelling it ends nothing twice.
            runtime.gate.clear()
            task = asyncio.ensure_future(svc.acaption(make_image(3), max_new_tokens=2))
            await asyncio.to_thread(runtime.entered.wait, WAIT_S)
            queued = asyncio.ensure_future(svc.acaption(make_image(4), max_new_tokens=2))
            while svc._batcher.queue_depth == 0:
                await asyncio.sleep(0.01)
            queued.cancel()
            task.cancel()
            runtime.gate.set()
            await asyncio.gather(task, queued, return_exceptions=True)
            assert expected(svc) == 0

        asyncio.run(scenario())
        _lone_call_is_prompt(svc, make_image(5))
    finally:
        runtime.gate.set()
        svc.close(drain=False, timeout_s=WAIT_S)


def test_abandon_racing_the_pool_thread_ends_each_announcement_exactly_once(
    svc: Blip2Service, make_image: Callable[..., Any]
) -> None:
    """`abandon()` from the caller against `run()` on the pool thread, at random moments around the submit: the
    count never goes below 0, ends at 0, and each request settles at most once (exactly once once submitted)."""
    key, payload, info = svc._prepare_generation("caption", make_image(1), None, None, {"max_new_tokens": 2})[:3]
    spy = Spy(svc._batcher)
    rng = random.Random(7)
    settled: list[list[Any]] = []
    for _ in range(150):
        delay = rng.uniform(0.0, 0.002)
        calls: list[Any] = []
        settled.append(calls)

        def prepare(delay: float = delay) -> tuple[Any, Any, Any]:
            time.sleep(delay)
            return key, payload, info

        def settle(exc: BaseException | None, value: Any, calls: list[Any] = calls) -> None:
            calls.append(exc if exc is not None else value)

        abandon = svc._start_request(prepare, settle)
        time.sleep(rng.uniform(0.0, 0.003))
        abandon()
        if rng.random() < 0.3:
            abandon()  # a second abandon changes nothing
    settles_to_zero(svc)
    poll(lambda: svc._batcher.queue_depth == 0, WAIT_S, "the queue to drain")
    submitted = spy.count("submit-expected")
    poll(lambda: sum(len(calls) for calls in settled) >= submitted, WAIT_S, "every submitted request to settle")
    assert spy.lowest == 0
    assert all(len(calls) <= 1 for calls in settled)
    assert spy.count("expect") == 150 == submitted + spy.count("unexpect")
    assert sum(len(calls) for calls in settled) == submitted  # each submitted request settled once
    _lone_call_is_prompt(svc, make_image(2))


def test_many_async_callers_cancelled_at_random_moments_leave_no_announcement(
    svc: Blip2Service, make_image: Callable[..., Any]
) -> None:
    preprocess = svc.runtime.preprocess

    def slow(*args: Any, **kwargs: Any) -> Any:
        time.sleep(0.003)
        return preprocess(*args, **kwargs)

    svc.runtime.preprocess = slow  # type: ignore[method-assign]
    images = [make_image(30 + i) for i in range(6)]
    rng = random.Random(11)

    async def burst() -> list[Any]:
        tasks = [asyncio.ensure_future(svc.acaption(images[i % 6], max_new_tokens=2)) for i in range(40)]
        for task in tasks:
            if rng.random() < 0.6:
                asyncio.get_running_loop().call_later(rng.uniform(0.0, 0.05), task.cancel)
        return await asyncio.gather(*tasks, return_exceptions=True)

    for _ in range(3):
        out = asyncio.run(burst())
        assert all(isinstance(r, asyncio.CancelledError | BlipError) or hasattr(r, "caption") for r in out), out
        settles_to_zero(svc)
    svc.runtime.preprocess = preprocess  # type: ignore[method-assign]
    _lone_call_is_prompt(svc, make_image(2))


# ---------------------------------------------------------------------------------------------- wrong waits


@pytest.mark.parametrize("stuck_in", ["download", "model load"])
def test_a_lone_request_does_not_wait_for_a_request_stuck_in_a_blocking_wait(
    settings: BlipSettings,
    make_image: Callable[..., Any],
    one_slot: PreparePool,
    monkeypatch: pytest.MonkeyPatch,
    stuck_in: str,
) -> None:
    """A request whose image is being downloaded, or whose model is loading (`score` loads the retrieval model in
    its preparation), is not announced while it waits, seconds to minutes: else every lone request at an idle worker
    would wait out the budget for it, although it cannot come (nor join a caption batch, for `score`). In the
    service that was up to min(50 ms, the last batch's time) per request; here the 3 s budget would show it."""
    from blip_tools import _fetch

    data = png_bytes(make_image(1))
    svc = _service(settings, allow_urls=True)
    if stuck_in == "download":
        started, release = threading.Event(), threading.Event()

        def slow_fetch(url: str, **kwargs: Any) -> bytes:
            started.set()
            release.wait(WAIT_S)
            return data

        monkeypatch.setattr(_fetch, "fetch_url", slow_fetch)
        stuck: Callable[[], Any] = functools.partial(svc.caption, "https://example.com/a.png", max_new_tokens=2)
    else:
        started, release = hold_retrieval_load(svc)
        stuck = functools.partial(svc.score, data, ["a photo"])
    try:
        thread, out = in_thread(stuck)
        assert started.wait(WAIT_S)
        try:
            _lone_call_is_prompt(svc, make_image(2))
        finally:
            release.set()
            thread.join(WAIT_S)
        assert out and not isinstance(out[0], BaseException), out
        assert expected(svc) == 0
    finally:
        svc.close(drain=False, timeout_s=WAIT_S)
