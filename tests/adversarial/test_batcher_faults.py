"""Batcher fault injection: floods, cancellation storms, assembly errors, bad handlers, worker death, shutdown.

These are the bugs serving systems have shipped: a loop stuck after cancellations, one assembly error hanging
every later request, a crashed batch leaving its callers waiting forever. Every test checks that every future
resolves (bounded waits, nothing hangs) and that the batcher keeps serving afterwards.
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import pytest

import blip_tools.batching as batching
from blip_tools.batching import DynamicBatcher
from blip_tools.errors import BlipError, InferenceError, InvalidInput, Overloaded, RequestTimeout, ServiceClosed

WAIT_S = 20.0


def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


def all_resolved(futures: Sequence[concurrent.futures.Future[Any]]) -> None:
    """Every future finishes within the bound; none hangs."""
    _, not_done = concurrent.futures.wait(futures, timeout=WAIT_S)
    assert not not_done, f"{len(not_done)} futures never resolved"


class Gate:
    """Holds the first handler call until opened, so tests can fill the queue deterministically."""

    def __init__(self) -> None:
        self.opened = threading.Event()
        self.entered = threading.Event()
        self._first = True
        self._lock = threading.Lock()

    def hold_first_call(self) -> None:
        with self._lock:
            first, self._first = self._first, False
        if first:
            self.entered.set()
            assert self.opened.wait(WAIT_S), "test never opened the gate"


@pytest.fixture
def made() -> Iterator[list[DynamicBatcher[Any, Any]]]:
    """Batchers a test builds; all closed without draining at teardown."""
    batchers: list[DynamicBatcher[Any, Any]] = []
    yield batchers
    for batcher in batchers:
        batcher.close(drain=False, timeout_s=WAIT_S)


def build(made: list[DynamicBatcher[Any, Any]], handler: Any, **kwargs: Any) -> DynamicBatcher[Any, Any]:
    options: dict[str, Any] = {"max_batch_size": 8, "max_wait_ms": 0, "max_queue": 64}
    options.update(kwargs)
    batcher: DynamicBatcher[Any, Any] = DynamicBatcher(handler, **options)
    made.append(batcher)
    return batcher


def echo(key: Hashable, items: list[Any]) -> list[Any]:
    return list(items)


# ---------------------------------------------------------------------- floods


def test_thousand_concurrent_submits_against_a_queue_of_64(made: list[DynamicBatcher[Any, Any]]) -> None:
    gate = Gate()
    seen: list[int] = []

    def handler(key: Hashable, items: list[int]) -> list[int]:
        gate.hold_first_call()
        seen.extend(items)
        return [i * 3 for i in items]

    batcher = build(made, handler, max_queue=64)
    blocker = batcher.submit("k", -1)
    assert gate.entered.wait(WAIT_S)
    barrier = threading.Barrier(20)
    accepted: dict[int, concurrent.futures.Future[int]] = {}
    rejected: list[Overloaded] = []
    lock = threading.Lock()

    def caller(offset: int) -> None:
        barrier.wait(WAIT_S)
        for i in range(offset, 1000, 20):
            try:
                future = batcher.submit(f"key{i % 3}", i)
            except Overloaded as exc:
                with lock:
                    rejected.append(exc)
            else:
                with lock:
                    accepted[i] = future

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(20)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    submit_s = time.monotonic() - start
    assert len(accepted) + len(rejected) == 1000
    assert len(accepted) == 64  # the worker is held, so exactly the queue's capacity got in
    assert all(exc.retry_after_s > 0 for exc in rejected)
    assert submit_s < 10  # rejection never blocks
    gate.opened.set()
    all_resolved([blocker, *accepted.values()])
    assert {i: f.result(0) for i, f in accepted.items()} == {i: i * 3 for i in accepted}
    assert sorted(seen) == sorted([-1, *accepted])
    stats = batcher.stats()
    assert stats.rejected == len(rejected)
    assert stats.requests == stats.completed == 65
    assert batcher.submit("k", 5).result(WAIT_S) == 15


def test_free_running_flood_with_random_faults_resolves_every_future(made: list[DynamicBatcher[Any, Any]]) -> None:
    rng = random.Random(1234)
    poisoned = set(rng.sample(range(1000), 25))
    item_errors = set(rng.sample(range(1000), 25)) - poisoned

    def handler(key: Hashable, items: list[int]) -> list[Any]:
        if len(items) > 6:
            raise RuntimeError("CUDA out of memory (simulated)")
        if poisoned.intersection(items):
            raise ValueError(f"poisoned batch {sorted(poisoned.intersection(items))}")
        return [ValueError(f"item {i}") if i in item_errors else i for i in items]

    batcher = build(made, handler, max_queue=128, max_batch_size=16, oom_cooldown_s=0.01)
    futures: dict[int, concurrent.futures.Future[int]] = {}
    cancelled: set[int] = set()
    rejected = 0
    lock = threading.Lock()

    def caller(offset: int) -> None:
        nonlocal rejected
        local = random.Random(offset)
        for i in range(offset, 1000, 8):
            while True:
                try:
                    future = batcher.submit(("task", i % 4), i, timeout_s=WAIT_S)
                    break
                except Overloaded:
                    with lock:
                        rejected += 1
                    time.sleep(0.0005)
            if local.random() < 0.1 and future.cancel():
                with lock:
                    cancelled.add(i)
            with lock:
                futures[i] = future

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S * 2)
    assert len(futures) == 1000
    all_resolved(list(futures.values()))
    for i, future in futures.items():
        if i in cancelled:
            assert future.cancelled()
        elif i in poisoned:
            with pytest.raises(InferenceError, match="ValueError: poisoned"):
                future.result(0)
        elif i in item_errors:
            with pytest.raises(InferenceError, match=f"ValueError: item {i}"):
                future.result(0)
        else:
            assert future.result(0) == i

    def counted() -> int:
        s = batcher.stats()
        return s.completed + s.errors + s.cancelled + s.expired

    # Every outcome is counted before its future resolves, but a cancelled request only when the worker drops it
    # from the queue (after the batch before it): wait until every request is counted.
    wait_until(lambda: counted() >= 1000)
    stats = batcher.stats()
    assert stats.requests == 1000
    assert stats.cancelled == len(cancelled)
    assert stats.completed + stats.errors + stats.cancelled + stats.expired == 1000
    assert stats.rejected == rejected
    assert stats.retries > 0


# ---------------------------------------------------------------------- cancellation storms


def test_random_cancellations_then_a_normal_request_succeeds(made: list[DynamicBatcher[Any, Any]]) -> None:
    gate = Gate()
    seen: list[int] = []

    def handler(key: Hashable, items: list[int]) -> list[int]:
        gate.hold_first_call()
        seen.extend(items)
        return items

    batcher = build(made, handler, max_queue=200, max_wait_ms=2)
    blocker = batcher.submit("k", -1)
    assert gate.entered.wait(WAIT_S)
    futures = [batcher.submit(("k", i % 2), i) for i in range(199)]
    rng = random.Random(7)
    cancelled = {i for i in rng.sample(range(199), 120) if futures[i].cancel()}
    assert len(cancelled) == 120
    # Cancelled requests free their slots even before the worker gets to them.
    extra = batcher.submit("k", 1000)
    gate.opened.set()
    all_resolved([blocker, extra, *futures])
    assert not cancelled.intersection(seen)
    assert sorted(seen) == sorted({-1, 1000, *range(199)} - cancelled)
    assert batcher.submit("k", 5).result(WAIT_S) == 5
    assert batcher.stats().cancelled == 120


def test_cancelling_everything_queued_leaves_the_batcher_serving(
    made: list[DynamicBatcher[Any, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="blip_tools.batching")
    gate = Gate()

    def handler(key: Hashable, items: list[int]) -> list[int]:
        gate.hold_first_call()
        return items

    batcher = build(made, handler, max_queue=32, max_wait_ms=5)
    blocker = batcher.submit("k", -1)
    assert gate.entered.wait(WAIT_S)
    futures = [batcher.submit("k", i) for i in range(32)]
    assert all(f.cancel() for f in futures)
    gate.opened.set()
    assert blocker.result(WAIT_S) == -1
    wait_until(lambda: batcher.stats().cancelled == 32)
    assert batcher.submit("k", 1).result(WAIT_S) == 1
    assert caplog.records == []  # an emptied queue is normal, not an internal error


# ---------------------------------------------------------------------- errors while assembling a batch


class EqRaises:
    """A key that hashes fine but whose comparison raises."""

    def __hash__(self) -> int:
        return 42

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("comparison exploded")


class HashRaises:
    def __hash__(self) -> int:
        raise TypeError("no hashing")


def test_key_that_cannot_be_hashed_is_rejected_at_submit(made: list[DynamicBatcher[Any, Any]]) -> None:
    batcher = build(made, echo)
    with pytest.raises(InvalidInput, match="batch key must be hashable: TypeError: no hashing"):
        batcher.submit(HashRaises(), 1)
    assert batcher.submit("k", 2).result(WAIT_S) == 2


def test_key_whose_eq_raises_is_served_alone_and_others_unaffected(made: list[DynamicBatcher[Any, Any]]) -> None:
    gate = Gate()
    calls: list[tuple[Hashable, list[int]]] = []

    def handler(key: Hashable, items: list[int]) -> list[int]:
        gate.hold_first_call()
        calls.append((key, list(items)))
        return items

    batcher = build(made, handler)
    blocker = batcher.submit("k", -1)
    assert gate.entered.wait(WAIT_S)
    evil_a, evil_b = EqRaises(), EqRaises()
    futures = [batcher.submit("k", 0), batcher.submit(evil_a, 1), batcher.submit("k", 2), batcher.submit(evil_b, 3)]
    gate.opened.set()
    all_resolved([blocker, *futures])
    assert [f.result(0) for f in futures] == [0, 1, 2, 3]
    assert [items for _, items in calls] == [[-1], [0, 2], [1], [3]]


def test_max_batch_size_for_raising_fails_only_its_own_requests(made: list[DynamicBatcher[Any, Any]]) -> None:
    def size_for(key: Hashable) -> int:
        if key == "evil":
            raise LookupError("no size for evil")
        if key == "zero":
            return 0
        return 8

    gate = Gate()

    def handler(key: Hashable, items: list[int]) -> list[int]:
        gate.hold_first_call()
        return items

    batcher = build(made, handler, max_batch_size_for=size_for)
    blocker = batcher.submit("good", -1)
    assert gate.entered.wait(WAIT_S)
    futures = {i: batcher.submit(("good", "evil", "zero")[i % 3], i) for i in range(12)}
    gate.opened.set()
    all_resolved([blocker, *futures.values()])
    for i, future in futures.items():
        if i % 3 == 0:
            assert future.result(0) == i
        elif i % 3 == 1:
            with pytest.raises(InferenceError, match=r"could not form a batch.*LookupError: no size for evil"):
                future.result(0)
        else:
            with pytest.raises(InferenceError, match="max_batch_size_for must return an integer >= 1, got 0"):
                future.result(0)
    assert batcher.submit("good", 99).result(WAIT_S) == 99
    assert batcher.stats().errors == 8


def test_an_internal_error_in_batch_assembly_fails_the_head_request_and_the_loop_goes_on(
    made: list[DynamicBatcher[Any, Any]], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    real_take_batch = batching.take_batch
    failures = [1]

    def flaky_take_batch(pending: Any, max_batch_size: int) -> Any:
        if failures:
            failures.pop()
            raise RuntimeError("assembly bug")
        return real_take_batch(pending, max_batch_size)

    monkeypatch.setattr(batching, "take_batch", flaky_take_batch)
    batcher = build(made, echo)
    with (
        caplog.at_level(logging.ERROR, logger="blip_tools.batching"),
        pytest.raises(InferenceError, match=r"internal error.*RuntimeError: assembly bug"),
    ):
        batcher.submit("k", 1).result(WAIT_S)
    assert "internal error while serving a batch" in caplog.text
    assert batcher.submit("k", 2).result(WAIT_S) == 2


def test_request_cancelled_after_assembly_is_still_skipped(
    made: list[DynamicBatcher[Any, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller may cancel between batch assembly and the handler call; the request must still not run."""
    real_take_batch = batching.take_batch

    def take_then_cancel(pending: Any, max_batch_size: int) -> Any:
        batch = real_take_batch(pending, max_batch_size)
        for request in batch:
            if request.item % 2:
                assert request.future.cancel()
        return batch

    monkeypatch.setattr(batching, "take_batch", take_then_cancel)
    seen: list[int] = []

    def handler(key: Hashable, items: list[int]) -> list[int]:
        seen.extend(items)
        return items

    batcher = build(made, handler, max_wait_ms=50)
    futures = [batcher.submit("k", i) for i in range(6)]
    all_resolved(futures)
    assert [f.cancelled() for f in futures] == [False, True] * 3
    assert sorted(seen) == [0, 2, 4]
    # Counted when the worker claims its batch, just after cancelling them: if the six split, the last batch may hold
    # only a cancelled one, done (for all_resolved) before it is counted.
    wait_until(lambda: batcher.stats().cancelled >= 3)
    assert batcher.stats().cancelled == 3


def test_request_expiring_after_assembly_is_still_dropped(
    made: list[DynamicBatcher[Any, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A deadline may pass between batch assembly and the handler call; the request must still not run."""
    real_take_batch = batching.take_batch

    def take_then_expire(pending: Any, max_batch_size: int) -> Any:
        batch = real_take_batch(pending, max_batch_size)
        for request in batch:
            if request.item % 2:
                request.deadline = time.monotonic() - 1.0  # as if the clock had moved on
        return batch

    monkeypatch.setattr(batching, "take_batch", take_then_expire)
    seen: list[int] = []

    def handler(key: Hashable, items: list[int]) -> list[int]:
        seen.extend(items)
        return items

    batcher = build(made, handler, max_wait_ms=50)
    futures = [batcher.submit("k", i, timeout_s=WAIT_S) for i in range(6)]
    all_resolved(futures)
    assert [isinstance(f.exception(0), RequestTimeout) for f in futures] == [False, True] * 3
    assert sorted(seen) == [0, 2, 4]
    assert batcher.stats().expired == 3


def test_raising_listener_is_logged_and_ignored(
    made: list[DynamicBatcher[Any, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    batcher = build(made, echo)

    def listener(event: Any) -> None:
        raise ZeroDivisionError("metrics bug")

    batcher.add_listener(listener)
    with caplog.at_level(logging.ERROR, logger="blip_tools.batching"):
        assert [batcher.submit("k", i).result(WAIT_S) for i in range(3)] == [0, 1, 2]
    assert "metrics bug" in caplog.text


def test_raising_is_oom_and_on_oom_do_not_break_recovery(made: list[DynamicBatcher[Any, Any]]) -> None:
    gate = Gate()

    def handler(key: Hashable, items: list[int]) -> list[int]:
        gate.hold_first_call()
        if len(items) > 1:
            raise RuntimeError("CUDA out of memory")
        return items

    def bad_is_oom(exc: BaseException) -> bool:
        raise ValueError("is_oom bug")

    def bad_on_oom() -> None:
        raise ValueError("on_oom bug")

    for kwargs in ({"is_oom": bad_is_oom}, {"on_oom": bad_on_oom}):
        gate = Gate()
        batcher = build(made, handler, **kwargs)
        blocker = batcher.submit("k", -1)
        assert gate.entered.wait(WAIT_S)
        futures = [batcher.submit("k", i) for i in range(5)]
        gate.opened.set()
        all_resolved([blocker, *futures])
        assert [f.result(0) for f in futures] == list(range(5))


# ---------------------------------------------------------------------- bad handler results


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (lambda items: items[:-1], "returned 2 results for 3 requests"),
        (lambda items: [*items, 0], "returned 4 results for 3 requests"),
        (lambda items: None, "returned a non-sequence for 3 requests"),
        (lambda items: (i for i in items), "returned a non-sequence for 3 requests"),
        (lambda items: "abc", "returned a non-sequence for 3 requests"),
    ],
)
def test_wrong_result_shape_fails_the_batch_and_the_next_one_works(
    made: list[DynamicBatcher[Any, Any]], result: Callable[[list[int]], Any], message: str
) -> None:
    gate = Gate()

    def handler(key: Hashable, items: list[int]) -> Any:
        gate.hold_first_call()
        return items if key == "ok" else result(items)

    batcher = build(made, handler)
    blocker = batcher.submit("ok", -1)
    assert gate.entered.wait(WAIT_S)
    futures = [batcher.submit("bad", i) for i in range(3)]
    gate.opened.set()
    all_resolved([blocker, *futures])
    for future in futures:
        with pytest.raises(InferenceError, match=message):
            future.result(0)
    assert batcher.submit("ok", 7).result(WAIT_S) == 7


def test_handler_raising_base_exception_is_contained(made: list[DynamicBatcher[Any, Any]]) -> None:
    def handler(key: Hashable, items: list[int]) -> list[int]:
        if 3 in items:
            raise SystemExit("handler tried to exit")
        return items

    batcher = build(made, handler, max_wait_ms=50)
    futures = [batcher.submit("k", i) for i in range(6)]
    all_resolved(futures)
    with pytest.raises(InferenceError, match="SystemExit: handler tried to exit"):
        futures[3].result(0)
    assert [f.result(0) for i, f in enumerate(futures) if i != 3] == [0, 1, 2, 4, 5]
    assert batcher.submit("k", 9).result(WAIT_S) == 9


# ---------------------------------------------------------------------- deadlines under load


def test_deadlines_under_a_slow_worker(made: list[DynamicBatcher[Any, Any]]) -> None:
    gate = Gate()

    def handler(key: Hashable, items: list[int]) -> list[int]:
        gate.hold_first_call()
        return items

    batcher = build(made, handler, max_queue=100)
    blocker = batcher.submit("k", -1)
    assert gate.entered.wait(WAIT_S)
    submitted = time.monotonic()
    short = [batcher.submit("k", i, timeout_s=0.02) for i in range(50)]
    long = [batcher.submit("k", i, timeout_s=WAIT_S) for i in range(50, 100)]
    wait_until(lambda: time.monotonic() > submitted + 0.03)
    gate.opened.set()
    all_resolved([blocker, *short, *long])
    for future in short:
        with pytest.raises(RequestTimeout):
            future.result(0)
    assert [f.result(0) for f in long] == list(range(50, 100))
    stats = batcher.stats()
    assert stats.expired == 50
    assert stats.errors == 0


# ---------------------------------------------------------------------- worker death and shutdown


class WorkerKiller(BaseException):
    """Something the serve loop does not catch, to exercise the last line of defence."""


def test_worker_death_fails_everything_and_refuses_new_requests(
    made: list[DynamicBatcher[Any, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    gate = Gate()

    def handler(key: Hashable, items: list[int]) -> list[int]:
        gate.hold_first_call()
        return items

    batcher = build(made, handler)
    blocker = batcher.submit("k", -1)
    assert gate.entered.wait(WAIT_S)
    queued_a = [batcher.submit("a", i) for i in range(3)]
    queued_b = [batcher.submit("b", i) for i in range(3)]

    def killer(batch: Any) -> None:
        raise WorkerKiller("simulated crash")

    batcher._execute = killer  # type: ignore[method-assign]
    with caplog.at_level(logging.CRITICAL, logger="blip_tools.batching"):
        gate.opened.set()
        assert blocker.result(WAIT_S) == -1
        all_resolved(queued_a + queued_b)
    assert "worker stopped unexpectedly" in caplog.text
    for future in queued_a + queued_b:
        assert isinstance(future.exception(0), BlipError)
    for future in queued_b:  # never started: the batcher stopped before them
        with pytest.raises(ServiceClosed, match="stopped"):
            future.result(0)
    assert batcher.closed
    with pytest.raises(ServiceClosed, match="stopped unexpectedly"):
        batcher.submit("k", 1)
    batcher.close(timeout_s=WAIT_S)


@pytest.mark.parametrize("drain", [True, False])
def test_shutdown_under_load_resolves_every_future(made: list[DynamicBatcher[Any, Any]], drain: bool) -> None:
    def handler(key: Hashable, items: list[int]) -> list[int]:
        return [i + 1 for i in items]

    batcher = build(made, handler, max_queue=32, max_wait_ms=1)
    futures: list[tuple[int, concurrent.futures.Future[int]]] = []
    refused_after_close: list[int] = []
    lock = threading.Lock()
    started = threading.Barrier(7)

    def caller(offset: int) -> None:
        started.wait(WAIT_S)
        i = offset
        while True:
            i += 6
            try:
                future = batcher.submit(("t", i % 2), i)
            except Overloaded:
                time.sleep(0.0005)
                continue
            except ServiceClosed:
                with lock:
                    refused_after_close.append(offset)
                return
            with lock:
                futures.append((i, future))

    threads = [threading.Thread(target=caller, args=(n,)) for n in range(6)]
    for t in threads:
        t.start()
    started.wait(WAIT_S)
    wait_until(lambda: len(futures) >= 300)
    batcher.close(drain=drain, timeout_s=WAIT_S)
    for t in threads:
        t.join(WAIT_S)
    assert not any(t.is_alive() for t in threads)
    assert sorted(refused_after_close) == list(range(6))  # every submitter saw ServiceClosed and stopped
    all_resolved([f for _, f in futures])
    for i, future in futures:
        if drain:
            assert future.result(0) == i + 1
        else:
            exc = future.exception(0)
            assert exc is None or isinstance(exc, ServiceClosed)
            if exc is None:
                assert future.result(0) == i + 1
    stats = batcher.stats()
    assert stats.requests == len(futures)
    assert stats.completed + stats.dropped == len(futures)
    assert stats.queue_depth == 0
    with pytest.raises(ServiceClosed):
        batcher.submit("t", 0)
