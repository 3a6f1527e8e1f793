"""DynamicBatcher and take_batch: coalescing, keys, wait window, errors, OOM, overload, cancel, deadlines, close.

No model here: handlers are plain Python functions, controlled with Events so nothing depends on timing luck.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import sys
import threading
import time
import types
from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import Any

import anyio
import pytest
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from blip_tools.batching import (
    BatchEvent,
    DynamicBatcher,
    _Pending,
    is_out_of_memory,
    take_batch,
)
from blip_tools.errors import (
    InferenceError,
    InvalidImage,
    InvalidInput,
    Overloaded,
    RequestTimeout,
    ServiceClosed,
)

WAIT_S = 10.0
"""Upper bound for anything that should happen 'soon'; tests normally finish in milliseconds."""


def wait_until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
    """Poll `predicate` until it holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.001)


class Handler:
    """A batch handler that records every call and can be held on a gate.

    `gate_calls` calls (counted from the first) wait on `gate`; `fn(key, item)` computes each result.
    """

    def __init__(self, fn: Callable[[Hashable, Any], Any] | None = None, *, gate_calls: int = 0) -> None:
        self.fn = fn or (lambda key, item: (key, item))
        self.calls: list[tuple[Hashable, list[Any]]] = []
        self.gate = threading.Event()
        self.gate_calls = gate_calls
        self.entered = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, key: Hashable, items: list[Any]) -> Sequence[Any]:
        with self._lock:
            self.calls.append((key, list(items)))
            number = len(self.calls)
        self.entered.set()
        if number <= self.gate_calls:
            assert self.gate.wait(WAIT_S), "test never opened the gate"
        return [self.fn(key, item) for item in items]

    @property
    def sizes(self) -> list[int]:
        with self._lock:
            return [len(items) for _, items in self.calls]

    @property
    def seen(self) -> list[Any]:
        with self._lock:
            return [item for _, items in self.calls for item in items]


@pytest.fixture
def make_batcher() -> Iterator[Callable[..., DynamicBatcher[Any, Any]]]:
    """Build batchers with test defaults; every one is closed (without draining) at teardown."""
    made: list[DynamicBatcher[Any, Any]] = []

    def make(handler: Callable[[Hashable, list[Any]], Sequence[Any]], **kwargs: Any) -> DynamicBatcher[Any, Any]:
        options: dict[str, Any] = {"max_batch_size": 8, "max_wait_ms": 0, "max_queue": 64}
        options.update(kwargs)
        batcher: DynamicBatcher[Any, Any] = DynamicBatcher(handler, **options)
        made.append(batcher)
        return batcher

    yield make
    for batcher in made:
        batcher.close(drain=False, timeout_s=WAIT_S)


def results(futures: Sequence[concurrent.futures.Future[Any]]) -> list[Any]:
    return [f.result(timeout=WAIT_S) for f in futures]


# ---------------------------------------------------------------------- take_batch (pure collation)


def _pending(key: Hashable, item: Any = None) -> _Pending[Any, Any]:
    return _Pending(
        key=key,
        task=str(key),
        item=item,
        future=concurrent.futures.Future(),
        enqueued=0.0,
        deadline=None,
        timeout_s=None,
    )


def test_take_batch_takes_oldest_key_in_arrival_order_and_keeps_the_rest_in_order() -> None:
    queue = collections.deque(_pending(k, i) for i, k in enumerate("ABAABCA"))
    batch = take_batch(queue, 3)
    assert [(p.key, p.item) for p in batch] == [("A", 0), ("A", 2), ("A", 3)]
    assert [(p.key, p.item) for p in queue] == [("B", 1), ("B", 4), ("C", 5), ("A", 6)]
    assert [(p.key, p.item) for p in take_batch(queue, 8)] == [("B", 1), ("B", 4)]
    assert [(p.key, p.item) for p in queue] == [("C", 5), ("A", 6)]


def test_take_batch_skips_cancelled_requests_and_leaves_them_in_place() -> None:
    queue = collections.deque(_pending("A", i) for i in range(4))
    assert queue[0].future.cancel() and queue[2].future.cancel()
    batch = take_batch(queue, 8)
    assert [p.item for p in batch] == [1, 3]
    assert [p.item for p in queue] == [0, 2]
    assert take_batch(queue, 8) == []
    assert len(queue) == 2


def test_take_batch_on_an_empty_queue_and_bad_size() -> None:
    assert take_batch(collections.deque(), 4) == []
    with pytest.raises(InvalidInput, match="max_batch_size must be an integer >= 1, got 0"):
        take_batch(collections.deque([_pending("A")]), 0)


class _EqRaises:
    def __hash__(self) -> int:
        return 1

    def __eq__(self, other: object) -> bool:
        raise RuntimeError("no comparing me")


def test_take_batch_treats_a_key_whose_eq_raises_as_unlike_the_others() -> None:
    evil = _EqRaises()
    queue = collections.deque([_pending("A", 0), _pending(evil, 1), _pending("A", 2), _pending(evil, 3)])
    assert [p.item for p in take_batch(queue, 8)] == [0, 2]
    # The same key object compares equal by identity, so it still batches with itself.
    assert [p.item for p in take_batch(queue, 8)] == [1, 3]


# No deadline: the default 200 ms is wall clock, and a loaded 2-core CI machine that stalls this process for a moment
# (hypothesis leaves out only its garbage collections) can fail it as "Flaky"; its speed is not what it tests.
@hsettings(deadline=None)
@given(keys=st.lists(st.sampled_from("abc"), max_size=30), size=st.integers(1, 10))
def test_take_batch_properties(keys: list[str], size: int) -> None:
    queue = collections.deque(_pending(k, i) for i, k in enumerate(keys))
    batch = take_batch(queue, size)
    if not keys:
        assert batch == []
        return
    assert 1 <= len(batch) <= size
    assert batch[0].item == 0
    assert all(p.key == keys[0] for p in batch)
    assert [p.item for p in batch] == sorted(p.item for p in batch)
    # Nothing lost, nothing duplicated, the rest in its original order.
    assert sorted(p.item for p in [*batch, *queue]) == list(range(len(keys)))
    assert [p.item for p in queue] == sorted(p.item for p in queue)
    # Taken greedily: every same-key request left behind would not have fitted.
    if len(batch) < size:
        assert all(p.key != keys[0] for p in queue)


# ---------------------------------------------------------------------- construction and validation


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1, got 0"),
        ({"max_batch_size": 2.5}, "max_batch_size must be an integer >= 1, got 2.5"),
        ({"max_queue": 0}, "max_queue must be an integer >= 1, got 0"),
        ({"max_wait_ms": -1}, "max_wait_ms must be a finite number >= 0, got -1"),
        ({"max_wait_ms": float("nan")}, "max_wait_ms must be a finite number >= 0, got nan"),
    ],
)
def test_constructor_rejects_bad_values_with_the_value_in_the_message(kwargs: dict[str, Any], message: str) -> None:
    options: dict[str, Any] = {"max_batch_size": 4, "max_wait_ms": 0, "max_queue": 4, **kwargs}
    with pytest.raises(InvalidInput, match=message):
        DynamicBatcher(Handler(), **options)


def test_submit_rejects_bad_timeout_and_unhashable_key(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    batcher = make_batcher(Handler())
    with pytest.raises(InvalidInput, match="timeout_s must be a positive number"):
        batcher.submit("k", 1, timeout_s=0)
    with pytest.raises(InvalidInput, match="batch key must be hashable"):
        batcher.submit(["not", "hashable"], 1)
    assert batcher.stats().requests == 0


# ---------------------------------------------------------------------- coalescing and keys


def test_concurrent_submits_coalesce_into_few_batches(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    handler = Handler(lambda key, item: item * 10, gate_calls=1)
    batcher = make_batcher(handler, max_batch_size=8)
    first = batcher.submit("k", -1)
    assert handler.entered.wait(WAIT_S)
    barrier = threading.Barrier(16)
    futures: dict[int, concurrent.futures.Future[Any]] = {}

    def caller(i: int) -> None:
        barrier.wait(WAIT_S)
        futures[i] = batcher.submit("k", i)

    threads = [threading.Thread(target=caller, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert batcher.queue_depth == 16
    handler.gate.set()
    assert first.result(WAIT_S) == -10
    assert {i: f.result(WAIT_S) for i, f in futures.items()} == {i: i * 10 for i in range(16)}
    later = handler.sizes[1:]
    assert later == [8, 8]  # formed from what queued while the first batch ran
    stats = batcher.stats()
    assert stats.batches == 3 < 16
    assert stats.batch_size_histogram == {1: 1, 8: 2}


def test_keys_never_mix_and_arrival_order_is_kept(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    handler = Handler(lambda key, item: f"{key}:{item}", gate_calls=1)
    batcher = make_batcher(handler, max_batch_size=4)
    blocker = batcher.submit(("caption", "greedy"), "warm")
    assert handler.entered.wait(WAIT_S)
    keys = [("caption", "greedy"), ("caption", "beam"), ("vqa", "greedy"), "embed"]
    futures = [(keys[i % 4], i, batcher.submit(keys[i % 4], i)) for i in range(20)]
    handler.gate.set()
    blocker.result(WAIT_S)
    for key, i, future in futures:
        assert future.result(WAIT_S) == f"{key}:{i}"
    for key, items in handler.calls[1:]:
        assert len(items) <= 4
        assert all(keys[item % 4] == key for item in items)
        assert items == sorted(items)
    # The oldest request goes first, so keys are served round-robin by age, not starved.
    assert [key for key, _ in handler.calls[1:5]] == keys
    assert batcher.stats().per_task == {
        "caption": (11, 5, 0),
        "vqa": (5, 2, 0),
        "embed": (5, 2, 0),
    }


def test_max_batch_size_for_lowers_the_size_per_key(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    handler = Handler(gate_calls=1)
    batcher = make_batcher(handler, max_batch_size=8, max_batch_size_for=lambda key: 2 if key == "beam" else 100)
    blocker = batcher.submit("greedy", 0)
    assert handler.entered.wait(WAIT_S)
    futures = [batcher.submit("beam", i) for i in range(5)] + [batcher.submit("greedy", i) for i in range(10)]
    handler.gate.set()
    results([blocker, *futures])
    sizes = {key: [len(items) for k, items in handler.calls[1:] if k == key] for key in ("beam", "greedy")}
    assert sizes == {"beam": [2, 2, 1], "greedy": [8, 2]}


# ---------------------------------------------------------------------- wait window


def test_wait_window_when_idle_gathers_requests_counted_from_the_oldest(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    handler = Handler()
    batcher = make_batcher(handler, max_wait_ms=400)
    start = time.monotonic()
    a = batcher.submit("k", 1)
    b = batcher.submit("k", 2)
    assert results([a, b]) == [("k", 1), ("k", 2)]
    assert handler.sizes == [2]
    assert time.monotonic() - start >= 0.39  # the window was honoured, not skipped


def test_wait_window_ends_as_soon_as_the_batch_is_full(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    handler = Handler()
    batcher = make_batcher(handler, max_batch_size=2, max_wait_ms=1000)
    start = time.monotonic()
    futures = [batcher.submit("k", i) for i in range(2)]
    results(futures)
    assert handler.sizes == [2]
    assert time.monotonic() - start < 0.9


def test_no_wait_window_while_busy(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    handler = Handler(gate_calls=1)
    # "first" fills its batch alone (limit 1), so it runs at once and holds the worker busy.
    batcher = make_batcher(handler, max_wait_ms=1000, max_batch_size_for=lambda key: 1 if key == "first" else 8)
    blocker = batcher.submit("first", 0)
    assert handler.entered.wait(WAIT_S)
    queued = [batcher.submit("k", i) for i in range(3)]
    handler.gate.set()
    released = time.monotonic()
    results([blocker, *queued])
    # A 3-request batch, not full, run immediately: the worker was not idle when it formed it.
    assert handler.sizes == [1, 3]
    assert time.monotonic() - released < 0.9


def test_zero_wait_window_runs_a_lone_request_at_once(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    handler = Handler()
    batcher = make_batcher(handler, max_wait_ms=0)
    assert batcher.submit("k", 7).result(WAIT_S) == ("k", 7)
    assert handler.sizes == [1]


# ---------------------------------------------------------------------- errors, bisection, OOM


def test_per_item_exception_fails_only_that_request(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    bad_image = InvalidImage("not an image")

    def fn(key: Hashable, item: int) -> Any:
        if item == 3:
            return ValueError("bad item")
        if item == 5:
            return bad_image
        return item

    handler = Handler(fn, gate_calls=1)
    batcher = make_batcher(handler)
    blocker = batcher.submit("k", 0)
    assert handler.entered.wait(WAIT_S)
    futures = [batcher.submit("k", i) for i in range(1, 8)]
    handler.gate.set()
    blocker.result(WAIT_S)
    for i, future in zip(range(1, 8), futures, strict=True):
        if i == 3:
            with pytest.raises(InferenceError, match="ValueError: bad item") as info:
                future.result(WAIT_S)
            assert isinstance(info.value.__cause__, ValueError)
        elif i == 5:
            with pytest.raises(InvalidImage) as image_info:
                future.result(WAIT_S)
            assert image_info.value is bad_image  # our own errors pass through unchanged
        else:
            assert future.result(WAIT_S) == i
    stats = batcher.stats()
    assert (stats.errors, stats.completed, stats.retries) == (2, 6, 0)


def test_raising_handler_is_bisected_so_only_the_poisoned_request_fails(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    gate = threading.Event()
    calls: list[list[int]] = []

    def handler(key: Hashable, items: list[int]) -> list[int]:
        calls.append(list(items))
        if items == [0]:
            assert gate.wait(WAIT_S)
        if 13 in items:
            raise KeyError("poison")
        if 15 in items:
            raise InvalidImage("cannot decode image 15")
        return [i + 100 for i in items]

    batcher = make_batcher(handler, max_batch_size=8)
    blocker = batcher.submit("k", 0)
    wait_until(lambda: bool(calls))
    futures = {i: batcher.submit("k", i) for i in range(10, 18)}
    gate.set()
    blocker.result(WAIT_S)
    for i, future in futures.items():
        if i == 13:
            with pytest.raises(InferenceError, match="KeyError: 'poison'") as info:
                future.result(WAIT_S)
            assert isinstance(info.value.__cause__, KeyError)
        elif i == 15:
            with pytest.raises(InvalidImage, match="cannot decode image 15"):
                future.result(WAIT_S)
        else:
            assert future.result(WAIT_S) == i + 100
    assert [10, 11, 12, 13, 14, 15, 16, 17] in calls
    assert [13] in calls and [15] in calls
    stats = batcher.stats()
    assert stats.errors == 2
    assert stats.completed == 7
    assert stats.retries > 0
    assert stats.retries == stats.batches - 2  # every call after the first two re-ran part of the 8-batch


def test_simulated_oom_halves_retries_and_remembers_a_smaller_batch(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    gate = threading.Event()
    calls: list[int] = []
    freed: list[int] = []

    def handler(key: Hashable, items: list[int]) -> list[int]:
        calls.append(len(items))
        if items == [-1]:
            assert gate.wait(WAIT_S)
        if len(items) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [i * 2 for i in items]

    batcher = make_batcher(handler, max_batch_size=8, on_oom=lambda: freed.append(1))

    def round_of_eight() -> list[int]:
        gate.clear()
        calls.clear()
        blocker = batcher.submit("k", -1)
        wait_until(lambda: bool(calls))
        futures = [batcher.submit("k", i) for i in range(8)]
        gate.set()
        blocker.result(WAIT_S)
        assert results(futures) == [i * 2 for i in range(8)]
        return calls[1:]

    first = round_of_eight()
    assert first[0] == 8 and max(first[1:]) <= 4
    assert len(freed) == 3  # 8 → 4 → OOM again, 4 → 2 ×2: one on_oom per OOM
    assert batcher.stats().errors == 0
    # The lowered size is remembered for this key: the next round does not run out of memory again.
    second = round_of_eight()
    assert max(second) <= 2
    assert len(freed) == 3


def test_oom_on_a_single_request_becomes_inference_error_with_a_hint(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    def handler(key: Hashable, items: list[int]) -> list[int]:
        raise MemoryError()

    batcher = make_batcher(handler)
    with pytest.raises(InferenceError, match=r"out of memory.*BLIP_MAX_BATCH_SIZE"):
        batcher.submit("k", 1).result(WAIT_S)


def test_is_out_of_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    assert is_out_of_memory(RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"))
    assert is_out_of_memory(RuntimeError("MPS backend out of memory"))
    assert is_out_of_memory(MemoryError())
    assert not is_out_of_memory(RuntimeError("shape mismatch"))
    assert not is_out_of_memory(ValueError("out of memory"))
    if "torch" in sys.modules:  # the real class, without paying for a torch import here
        assert is_out_of_memory(sys.modules["torch"].cuda.OutOfMemoryError("boom"))

    # torch's own OOM type is recognised by class, whatever its message; torch itself is never imported.
    class FakeOutOfMemoryError(RuntimeError):
        pass

    fake_torch = types.ModuleType("torch")
    fake_torch.cuda = types.SimpleNamespace(OutOfMemoryError=FakeOutOfMemoryError)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "torch", fake_torch)
    assert is_out_of_memory(FakeOutOfMemoryError("allocation failed"))
    monkeypatch.delitem(sys.modules, "torch")
    assert not is_out_of_memory(FakeOutOfMemoryError("allocation failed"))


def test_wrong_result_length_fails_the_whole_batch(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    handler = Handler(gate_calls=1)
    batcher = make_batcher(lambda key, items: handler(key, items)[:-1] if len(items) > 1 else handler(key, items))
    blocker = batcher.submit("k", 0)
    assert handler.entered.wait(WAIT_S)
    futures = [batcher.submit("k", i) for i in range(3)]
    handler.gate.set()
    blocker.result(WAIT_S)
    for future in futures:
        with pytest.raises(InferenceError, match="returned 2 results for 3 requests"):
            future.result(WAIT_S)
    assert batcher.submit("k", 9).result(WAIT_S) == ("k", 9)
    assert batcher.stats().errors == 3


# ---------------------------------------------------------------------- overload, cancellation, deadlines


def test_full_queue_rejects_at_once_with_a_retry_hint(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    handler = Handler(gate_calls=1)
    batcher = make_batcher(handler, max_queue=4)
    blocker = batcher.submit("k", 0)
    assert handler.entered.wait(WAIT_S)
    queued = [batcher.submit("k", i) for i in range(1, 5)]
    assert batcher.queue_depth == 4
    start = time.perf_counter()
    with pytest.raises(Overloaded, match=r"queue is full .*retry after [0-9.]+ s") as info:
        batcher.submit("k", 5)
    # "At once": blocking would wait for the held batch (WAIT_S). Not 0.1 s: one full garbage collection in a process
    # with torch loaded takes about 0.3 s on 2 slow cores.
    assert time.perf_counter() - start < 1.0
    assert 0 < info.value.retry_after_s <= 30
    # A cancelled request gives its slot back at once.
    assert queued[0].cancel()
    replacement = batcher.submit("k", 6)
    handler.gate.set()
    assert results([blocker, *queued[1:], replacement]) == [("k", i) for i in (0, 2, 3, 4, 6)]
    stats = batcher.stats()
    assert (stats.rejected, stats.cancelled, stats.requests) == (1, 1, 6)


def test_cancelled_queued_requests_never_reach_the_handler(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    handler = Handler(gate_calls=1)
    batcher = make_batcher(handler)
    blocker = batcher.submit("k", 0)
    assert handler.entered.wait(WAIT_S)
    futures = [batcher.submit("k", i) for i in range(1, 7)]
    assert futures[1].cancel() and futures[3].cancel()
    handler.gate.set()
    blocker.result(WAIT_S)
    assert [f.result(WAIT_S) for i, f in enumerate(futures) if i not in (1, 3)] == [("k", i) for i in (1, 3, 5, 6)]
    assert futures[1].cancelled() and futures[3].cancelled()
    assert 2 not in handler.seen and 4 not in handler.seen
    assert batcher.stats().cancelled == 2


def test_expired_requests_fail_with_request_timeout_before_running(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    handler = Handler(gate_calls=1)
    batcher = make_batcher(handler)
    blocker = batcher.submit("k", 0)
    assert handler.entered.wait(WAIT_S)
    submitted = time.monotonic()
    doomed = batcher.submit("k", 1, timeout_s=0.05)
    fine = batcher.submit("k", 2, timeout_s=60)
    wait_until(lambda: time.monotonic() > submitted + 0.06)
    handler.gate.set()
    blocker.result(WAIT_S)
    with pytest.raises(RequestTimeout, match=r"waited [0-9.]+ s.*BLIP_REQUEST_TIMEOUT_S"):
        doomed.result(WAIT_S)
    assert fine.result(WAIT_S) == ("k", 2)
    assert 1 not in handler.seen
    assert batcher.stats().expired == 1


def test_deadline_is_enforced_during_a_long_wait_window(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    handler = Handler()
    batcher = make_batcher(handler, max_wait_ms=5000)
    start = time.monotonic()
    future = batcher.submit("k", 1, timeout_s=0.05)
    with pytest.raises(RequestTimeout):
        future.result(WAIT_S)
    assert time.monotonic() - start < 2.0
    assert handler.calls == []


def test_an_earlier_deadline_wakes_a_worker_holding_a_batch_open(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    """Submits skip waking the worker during a window, except when they bring a deadline it would miss."""
    handler = Handler()
    batcher = make_batcher(handler, max_wait_ms=5000)
    start = time.monotonic()
    patient = batcher.submit("k", 1)
    wait_until(lambda: batcher.queue_depth == 1)
    time.sleep(0.05)  # the worker is now in its 5 s window
    hurried = batcher.submit("k", 2, timeout_s=0.05)
    with pytest.raises(RequestTimeout):
        hurried.result(WAIT_S)
    assert time.monotonic() - start < 2.0
    patient.cancel()


def test_a_queued_request_fails_at_its_deadline_while_a_long_batch_runs(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    """The reaper fails a queued request on time; it does not wait for the running batch to end."""
    handler = Handler(gate_calls=1)
    batcher = make_batcher(handler)
    blocker = batcher.submit("k", 0)
    assert handler.entered.wait(WAIT_S)
    patient = batcher.submit("k", 1, timeout_s=60)  # the reaper now sleeps until this one's deadline...
    wait_until(lambda: batcher._reaper_by < float("inf"))
    start = time.monotonic()
    hurried = batcher.submit("k", 2, timeout_s=0.05)  # ...and an earlier deadline must wake it
    with pytest.raises(RequestTimeout, match="waited"):
        hurried.result(WAIT_S)
    assert time.monotonic() - start < 2.0
    assert not blocker.done() and not patient.done()  # the long batch still runs; the patient one still waits
    assert batcher.stats().expired == 1
    handler.gate.set()
    assert results([blocker, patient]) == [("k", 0), ("k", 1)]
    assert 2 not in handler.seen


def test_the_reaper_wakes_for_the_first_deadline_after_an_empty_queue(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    handler = Handler(gate_calls=1)
    batcher = make_batcher(handler)
    blocker = batcher.submit("k", 0)  # no deadline: the reaper has nothing to watch
    assert handler.entered.wait(WAIT_S)
    wait_until(lambda: batcher._reaper_asleep)
    doomed = batcher.submit("k", 1, timeout_s=0.05)
    with pytest.raises(RequestTimeout):
        doomed.result(WAIT_S)
    assert not blocker.done()
    handler.gate.set()
    assert blocker.result(WAIT_S) == ("k", 0)


def test_the_reaper_stops_with_the_worker(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    batcher = make_batcher(Handler())
    assert batcher.submit("k", 1, timeout_s=30).result(WAIT_S) == ("k", 1)
    batcher.close()
    batcher._reaper.join(WAIT_S)
    assert not batcher._reaper.is_alive()


# ---------------------------------------------------------------------- close


def test_close_drain_runs_everything_queued(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    handler = Handler(gate_calls=1)
    batcher = make_batcher(handler, max_batch_size=4)
    futures = [batcher.submit("k", 0)]
    assert handler.entered.wait(WAIT_S)
    futures += [batcher.submit("k" if i % 2 else "j", i) for i in range(1, 10)]
    closer = threading.Thread(target=batcher.close, kwargs={"drain": True})
    closer.start()
    wait_until(lambda: batcher.closed)
    with pytest.raises(ServiceClosed, match="closed and accepts no more requests"):
        batcher.submit("k", 99)
    handler.gate.set()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert [f.result(0) for f in futures] == [("k" if i % 2 else "j", i) if i else ("k", 0) for i in range(10)]
    batcher.close()  # idempotent
    batcher.close(drain=False)


def test_close_without_drain_fails_queued_requests(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    handler = Handler(gate_calls=1)
    batcher = make_batcher(handler)
    running = batcher.submit("k", 0)
    assert handler.entered.wait(WAIT_S)
    queued = [batcher.submit("k", i) for i in range(1, 6)]
    closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
    closer.start()
    wait_until(lambda: all(f.done() for f in queued))
    for future in queued:
        with pytest.raises(ServiceClosed):
            future.result(0)
    handler.gate.set()
    closer.join(WAIT_S)
    assert running.result(0) == ("k", 0)  # a batch already running still finishes
    assert handler.seen == [0]
    assert batcher.stats().dropped == 5
    with pytest.raises(ServiceClosed):
        batcher.submit("k", 1)


def test_close_timeout_fails_what_is_still_queued(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    handler = Handler(gate_calls=1)
    batcher = make_batcher(handler)
    running = batcher.submit("k", 0)
    assert handler.entered.wait(WAIT_S)
    queued = [batcher.submit("k", i) for i in range(1, 4)]
    start = time.monotonic()
    batcher.close(drain=True, timeout_s=0.1)
    assert time.monotonic() - start < 5
    for future in queued:
        with pytest.raises(ServiceClosed, match="did not finish its queue"):
            future.result(0)
    handler.gate.set()
    assert running.result(WAIT_S) == ("k", 0)


def test_close_from_inside_the_handler_does_not_deadlock() -> None:
    holder: list[DynamicBatcher[Any, Any]] = []
    all_submitted = threading.Event()

    def handler(key: Hashable, items: list[int]) -> list[int]:
        if 0 in items:
            assert all_submitted.wait(WAIT_S)
            holder[0].close()  # on the worker thread: must return, not join itself
        return items

    batcher: DynamicBatcher[Any, Any] = DynamicBatcher(handler, max_batch_size=1, max_wait_ms=0, max_queue=8)
    holder.append(batcher)
    futures = [batcher.submit("k", i) for i in range(3)]
    all_submitted.set()
    assert results(futures) == [0, 1, 2]  # close() drains what was queued
    assert batcher.closed
    batcher.close(timeout_s=WAIT_S)


def test_context_manager_closes_and_drains() -> None:
    handler = Handler()
    with DynamicBatcher(handler, max_batch_size=4, max_wait_ms=0, max_queue=8) as batcher:
        future = batcher.submit("k", 1)
    assert batcher.closed
    assert future.result(0) == ("k", 1)


# ---------------------------------------------------------------------- stats and listeners


def test_stats_listeners_and_a_raising_listener(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    def fn(key: Hashable, item: int) -> Any:
        return ValueError("odd") if item == 3 else item

    handler = Handler(fn, gate_calls=1)
    batcher = make_batcher(handler, max_batch_size=4)
    events: list[BatchEvent] = []

    def broken_listener(event: BatchEvent) -> None:
        raise RuntimeError("listener bug")

    batcher.add_listener(broken_listener)
    batcher.add_listener(events.append)
    with caplog.at_level(logging.ERROR, logger="blip_tools.batching"):
        blocker = batcher.submit(("caption", 1), 0)
        assert handler.entered.wait(WAIT_S)
        futures = [batcher.submit(("caption", 1), i) for i in range(1, 6)]
        futures.append(batcher.submit("embed", 6))
        handler.gate.set()
        for future in [blocker, *futures]:
            future.exception(WAIT_S)
        wait_until(lambda: len(events) == 4)
    assert "listener bug" in caplog.text
    assert [(e.task, e.size, e.failed, e.retried) for e in events] == [
        ("caption", 1, 0, False),
        ("caption", 4, 1, False),
        ("caption", 1, 0, False),
        ("embed", 1, 0, False),
    ]
    assert events[1].key == ("caption", 1)
    assert len(events[1].queue_wait_s) == 4 and all(w >= 0 for w in events[1].queue_wait_s)
    assert all(e.exec_s >= 0 for e in events)
    stats = batcher.stats()
    assert stats.requests == 7
    assert stats.batches == 4
    assert stats.batch_size_histogram == {1: 3, 4: 1}
    assert (stats.completed, stats.errors, stats.rejected, stats.cancelled, stats.expired) == (6, 1, 0, 0, 0)
    assert stats.queue_depth == 0
    assert stats.per_task == {"caption": (6, 3, 1), "embed": (1, 1, 0)}


def test_a_caller_reading_stats_as_its_request_resolves_sees_its_outcome_counted(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    """Every outcome (result, per-item error, a lone failure, a wrong-length batch, expiry, a drop at close) is in
    `stats()` before the future resolves: a done callback, which runs as it resolves, sees it counted."""

    def on_resolve(batcher: DynamicBatcher[Any, Any], future: concurrent.futures.Future[Any]) -> list[Any]:
        seen: list[Any] = []
        future.add_done_callback(lambda _: seen.append(batcher.stats()))
        return seen

    def fn(key: Hashable, item: Any) -> Any:
        if item == "boom":
            raise RuntimeError("the handler failed")
        return ValueError("bad item") if item == "bad" else item

    handler = Handler(fn, gate_calls=1)
    batcher = make_batcher(handler)
    blocker = batcher.submit("k", 0)
    assert handler.entered.wait(WAIT_S)
    good, bad = batcher.submit("k", 1), batcher.submit("k", "bad")
    late = batcher.submit("k", 2, timeout_s=0.05)
    seen = [on_resolve(batcher, f) for f in (good, bad, late)]
    wait_until(late.done)  # the reaper fails it while the worker is held
    handler.gate.set()
    results([blocker, good])
    wait_until(bad.done)
    (late_stats,), (good_stats,), (bad_stats,) = seen[2], seen[0], seen[1]
    assert late_stats.expired == 1
    assert (good_stats.completed, good_stats.batches) == (2, 2)
    assert (bad_stats.errors, bad_stats.batches, bad_stats.per_task["k"][2]) == (1, 2, 1)

    lone = on_resolve(batcher, boom := batcher.submit("k", "boom"))
    wait_until(boom.done)
    assert (lone[0].errors, lone[0].batches) == (2, 3)

    short = make_batcher(lambda key, items: [])
    wrong = on_resolve(short, truncated := short.submit("k", 1))
    wait_until(truncated.done)
    assert (wrong[0].errors, wrong[0].batches) == (1, 1)

    held = Handler(gate_calls=1)
    closing = make_batcher(held)
    running = closing.submit("k", 0)
    assert held.entered.wait(WAIT_S)
    dropped = on_resolve(closing, queued := closing.submit("k", 1))
    closer = threading.Thread(target=closing.close, kwargs={"drain": False})
    closer.start()
    wait_until(queued.done)
    held.gate.set()
    closer.join(WAIT_S)
    assert running.result(0) == ("k", 0)
    assert dropped[0].dropped == 1


# ---------------------------------------------------------------------- asyncio callers


async def test_asyncio_callers_share_batches(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    handler = Handler(lambda key, item: item + 1, gate_calls=1)
    batcher = make_batcher(handler, max_batch_size=8)

    async def call(i: int) -> int:
        result: int = await asyncio.wrap_future(batcher.submit("k", i))
        return result

    with anyio.fail_after(WAIT_S):
        blocker = asyncio.ensure_future(call(-1))
        while not handler.entered.is_set():
            await asyncio.sleep(0.001)
        tasks = [asyncio.ensure_future(call(i)) for i in range(16)]
        cancelled_task = asyncio.ensure_future(call(100))
        while batcher.queue_depth < 17:
            await asyncio.sleep(0.001)
        cancelled_task.cancel()  # cancelling the awaiting task cancels the queued request
        with pytest.raises(asyncio.CancelledError):
            await cancelled_task
        handler.gate.set()
        assert await blocker == 0
        assert await asyncio.gather(*tasks) == [i + 1 for i in range(16)]
    assert 100 not in handler.seen
    assert handler.sizes[1:] == [8, 8]
    assert batcher.stats().cancelled == 1


# ---------------------------------------------------------------------------------------------- merge window


def _closed_loop_batch_sizes(merge_ms: float, callers: int = 8, rounds: int = 8) -> list[int]:
    """Callers that resubmit as soon as they get a result, against a handler that takes 10 ms per batch.

    Half the callers start only once the first batch is running, so the callers form two cohorts: without a
    merge window they alternate (one queues while the other runs) for the whole run.
    """
    sizes: list[int] = []
    first_batch_running = threading.Event()

    def handler(key: Hashable, items: list[Any]) -> list[Any]:
        sizes.append(len(items))
        first_batch_running.set()
        time.sleep(0.01)  # stands in for the model's time on the batch
        return items

    batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
        handler, max_batch_size=callers, max_wait_ms=5, max_queue=64, max_merge_wait_ms=merge_ms
    )

    def caller(i: int) -> None:
        if i >= callers // 2:
            assert first_batch_running.wait(timeout=10)
        for r in range(rounds):
            assert batcher.submit("k", (i, r)).result(timeout=30) == (i, r)

    with concurrent.futures.ThreadPoolExecutor(callers) as pool:
        futures = [pool.submit(caller, i) for i in range(callers)]
        for f in futures:
            f.result(timeout=60)
    batcher.close()
    return sizes


def test_merge_window_lets_alternating_cohorts_merge() -> None:
    merged = _closed_loop_batch_sizes(merge_ms=500)
    assert sum(merged) == 64
    # Cohorts merged into full batches. Not 6 full ones: on a machine loaded 4x over, the callers' threads start and
    # come back late at first, and the first batches went out partial ([2, 5, 7, 8, 8, 8, ...]: 11 batches, 5 full).
    # Alternating cohorts (below) make 14 or more batches with at most one full.
    assert len(merged) <= 11 and merged.count(8) >= 4, merged
    alternating = _closed_loop_batch_sizes(merge_ms=0)
    assert sum(alternating) == 64
    assert len(alternating) >= 14, alternating  # the old rule: two cohorts of 4 take turns


def _timed_closed_loop(
    callers: int,
    rounds: int,
    *,
    batch_s: float,
    max_wait_ms: float,
    think_s: Callable[[int, int], float] = lambda caller, round_: 0.0,
) -> tuple[list[int], float]:
    """`callers` threads start together and each submit `rounds` requests, one after another (waiting
    `think_s(caller, round)` first), against a handler that takes `batch_s` per batch: (batch sizes, seconds)."""
    sizes: list[int] = []

    def handler(key: Hashable, items: list[Any]) -> list[Any]:
        sizes.append(len(items))
        time.sleep(batch_s)
        return items

    batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
        handler, max_batch_size=callers, max_wait_ms=max_wait_ms, max_queue=64, max_merge_wait_ms=5000
    )
    barrier = threading.Barrier(callers)

    def caller(i: int) -> None:
        barrier.wait()
        for r in range(rounds):
            if think_s(i, r):
                time.sleep(think_s(i, r))
            assert batcher.submit("k", (i, r)).result(timeout=30) == (i, r)

    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(callers) as pool:
        for f in [pool.submit(caller, i) for i in range(callers)]:
            f.result(timeout=60)
    elapsed = time.monotonic() - start
    batcher.close()
    return sizes, elapsed


def test_a_merge_window_closes_when_every_returning_caller_is_back() -> None:
    """The worker holds a batch open for returning callers, but wakes the moment the last one is back.

    Each batch takes 0.4 s, so each hold may last up to 0.4 s: 4 callers x 5 rounds take about 2 s when the
    batch starts as soon as the 4th caller returns, and about 4 s if the worker waited out every hold.
    """
    sizes, elapsed = _timed_closed_loop(4, 5, batch_s=0.4, max_wait_ms=2000)
    assert sizes == [4] * 5
    assert elapsed < 3.0, elapsed


def test_callers_back_before_the_worker_finishes_a_batch_still_count_as_back() -> None:
    """A caller can resubmit while the worker is still busy with the batch that served it (resolving the other
    futures, calling listeners). Such arrivals must count as returning callers: the worker once reset its count
    after that work, forgot them, and held the next batch open for callers that were already queued (here 4 of
    4 back, in a batch that could hold 8) until the merge window ran out, 0.3 s a batch.
    """
    events: list[BatchEvent] = []

    def handler(key: Hashable, items: list[Any]) -> list[Any]:
        time.sleep(0.3)
        return items

    def slow_listener(event: BatchEvent) -> None:
        events.append(event)
        time.sleep(0.05)  # the callers it served resubmit meanwhile

    batcher: DynamicBatcher[Any, Any] = DynamicBatcher(
        handler, max_batch_size=8, max_wait_ms=2000, max_queue=64, max_merge_wait_ms=5000
    )
    batcher.add_listener(slow_listener)
    barrier = threading.Barrier(4)

    def caller(i: int) -> None:
        barrier.wait()
        for r in range(4):
            assert batcher.submit("k", (i, r)).result(timeout=30) == (i, r)

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        for f in [pool.submit(caller, i) for i in range(4)]:
            f.result(timeout=60)
    batcher.close()
    assert [e.size for e in events] == [4] * 4
    # Later batches start once the listener returns (~0.05 s after their requests queued), not 0.3 s later.
    waits = [max(e.queue_wait_s) for e in events[1:]]
    assert max(waits) < 0.2, waits


def test_the_merge_window_learns_how_long_closed_loop_callers_take_to_come_back() -> None:
    """After a lull longer than the gap between arrivals, the worker used to start a batch with the first caller
    back alone, every round: batches of 8, 1, 8, 1, ... It now learns from the returns it has seen how long its
    callers take (per caller, weighted by how many came back) and keeps the batch open that long: one split, the
    first time, while it has seen no return yet.
    """
    # 8 callers: one comes back at once, the other 7 only after a lull of 0.1 s, longer than the gap the worker
    # allows between arrivals (0.04 s, a tenth of the 0.4 s batch).
    sizes, _ = _timed_closed_loop(8, 8, batch_s=0.4, max_wait_ms=5, think_s=lambda i, r: 0.1 if i and r else 0.0)
    assert sum(sizes) == 64
    assert sizes.count(1) <= 2, sizes


def test_merge_window_must_be_a_number() -> None:
    with pytest.raises(InvalidInput, match="max_merge_wait_ms"):
        DynamicBatcher(lambda k, items: items, max_batch_size=2, max_wait_ms=0, max_queue=4, max_merge_wait_ms=-1)


# ---------------------------------------------------------------------- announced requests (expect)


def test_an_idle_batch_waits_for_announced_requests_that_trickle_in(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    """Four requests announced at once and submitted 50 ms apart (their images still being prepared) make one
    batch, which starts as soon as the last one is in; unannounced, each goes out alone after the 1 ms window."""
    for announce, expected_sizes in ((True, [4]), (False, [1, 1, 1, 1])):
        handler = Handler()
        batcher = make_batcher(handler, max_wait_ms=1, max_merge_wait_ms=5000)
        if announce:
            for _ in range(4):
                batcher.expect()
        futures = []
        for i in range(4):
            time.sleep(0.05)
            futures.append(batcher.submit("k", i, expected=announce))
        last = time.monotonic()
        assert results(futures) == [("k", i) for i in range(4)]
        assert time.monotonic() - last < 2.0  # not the 5 s budget
        assert handler.sizes == expected_sizes


def test_the_wait_for_announced_requests_is_bounded(make_batcher: Callable[..., DynamicBatcher[Any, Any]]) -> None:
    """An announced request that never comes holds a batch `max_merge_wait_ms` at most, and once a batch has run,
    no longer than that batch took."""

    def handler(key: Hashable, items: list[Any]) -> list[Any]:
        time.sleep(0.05)
        return items

    batcher = make_batcher(handler, max_wait_ms=0, max_merge_wait_ms=300)
    batcher.expect()  # never submitted
    began = time.monotonic()
    assert batcher.submit("k", 1).result(WAIT_S) == 1
    assert 0.29 <= time.monotonic() - began < 0.29 + 2.0  # the 0.3 s budget, counted from the request
    began = time.monotonic()
    assert batcher.submit("k", 2).result(WAIT_S) == 2
    # Now capped by the last batch's 0.05 s: ~0.1 s with this batch's own 0.05 s, far from 0.35 s.
    assert time.monotonic() - began < 0.25


def test_a_withdrawn_or_refused_announcement_ends_the_wait(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    handler = Handler()
    batcher = make_batcher(handler, max_wait_ms=0, max_merge_wait_ms=5000)
    for _ in range(3):
        batcher.expect()
    first = batcher.submit("k", 1, expected=True)  # held open for the two others
    time.sleep(0.1)
    assert not first.done()
    batcher.unexpect()  # one will not come after all
    with pytest.raises(InvalidInput):
        batcher.submit("k", 2, timeout_s=-1, expected=True)  # nor the other: refused, which ends it too
    assert first.result(2.0) == ("k", 1)
    # A full queue's refusal ends an announcement too.
    gate_handler = Handler(gate_calls=1)
    batcher = make_batcher(gate_handler, max_wait_ms=0, max_queue=1)
    running = batcher.submit("k", 0)
    assert gate_handler.entered.wait(WAIT_S)
    queued = batcher.submit("k", 1)  # the queue is full
    batcher.expect()
    with pytest.raises(Overloaded):
        batcher.submit("k", 2, expected=True)
    assert batcher._expected == 0
    gate_handler.gate.set()
    assert results([running, queued]) == [("k", 0), ("k", 1)]


def test_a_busy_worker_does_not_wait_for_announced_requests(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    """Only an idle worker's batch waits for a burst still being prepared: a request that queued while a batch
    ran goes out when it ends, even if it came just before the end and more are announced."""
    handler = Handler(gate_calls=1)
    batcher = make_batcher(
        handler, max_wait_ms=0, max_merge_wait_ms=5000, max_batch_size_for=lambda k: 1 if k == "first" else 8
    )
    blocker = batcher.submit("first", 0)
    assert handler.entered.wait(WAIT_S)
    time.sleep(0.5)  # a long batch, so the wait budget (the last batch's time) would be long
    batcher.expect()  # never submitted
    queued = batcher.submit("k", 1)
    handler.gate.set()
    released = time.monotonic()
    assert results([blocker, queued]) == [("first", 0), ("k", 1)]
    assert time.monotonic() - released < 0.3  # ~0.5 s if it waited for the announced request


def test_an_idle_batch_waits_only_for_announced_requests_the_queue_has_room_for(
    make_batcher: Callable[..., DynamicBatcher[Any, Any]],
) -> None:
    """With a queue shorter than a batch, announced requests past its room would be refused while the worker
    waited for them: it waits for no more than fit."""
    handler = Handler()
    batcher = make_batcher(handler, max_wait_ms=0, max_merge_wait_ms=5000, max_queue=2)
    for _ in range(3):
        batcher.expect()
    began = time.monotonic()
    futures = [batcher.submit("k", i, expected=True) for i in range(2)]  # the queue is now full
    assert results(futures) == [("k", 0), ("k", 1)]
    assert time.monotonic() - began < 2.0  # not the 5 s budget: the third could never be queued
    assert handler.sizes == [2]
    batcher.unexpect()
