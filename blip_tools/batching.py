"""Dynamic batching: one worker thread owns the model and serves many callers through a bounded queue.

`DynamicBatcher` turns single requests into batched handler calls:

- Callers `submit(key, item)` from any thread (or an event loop, via `asyncio.wrap_future`) and get a plain
  `concurrent.futures.Future`. A full queue rejects at once with `Overloaded`; nothing ever blocks in `submit`.
- The worker forms the next batch from what queued while the last one ran. Only when it was idle (the queue
  was empty after its last batch) does it wait up to `max_wait_ms`, counted from the oldest request, for the
  batch to fill; or longer, for requests announced with `expect()` and still being prepared (a burst of
  callers decoding their images), up to the merge budget below. A batch holds requests with equal keys only
  (e.g. same task and decoding parameters).
- Merge window (`max_merge_wait_ms`, off by default here, 50 ms in the service): callers served by a batch
  usually come straight back. While they keep arriving, or for as long as their recent returns took, the next
  batch is held open for them (never longer than the last batch took), so groups of callers that would
  otherwise take turns merge into full batches.
- Cancelled requests and requests past their deadline are dropped before they run. A queued request fails
  with `RequestTimeout` at its deadline even while a long batch runs: a reaper thread, asleep until the
  earliest queued deadline, fails it then. A batch already running cannot be interrupted.
- If the handler raises, the batch is split in halves and each half retried, so only the guilty request
  fails. Out-of-memory errors also call `on_oom` and lower that key's batch size for a while.
- Every future is resolved: errors anywhere in the worker fail only the requests concerned, and if the worker
  thread ever stops, queued requests fail with `ServiceClosed` and `submit` refuses new ones.
- `weak_handler=True` holds a bound-method handler weakly: the batcher's threads then do not keep its object (a
  service and its model) alive, and once that object is garbage-collected the batcher drains and stops by itself.
"""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import math
import sys
import threading
import time
import weakref
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Generic, TypeVar

from blip_tools._ctrl_c import ctrl_c_deferred
from blip_tools.errors import BlipError, InferenceError, InvalidInput, Overloaded, RequestTimeout, ServiceClosed

logger = logging.getLogger(__name__)

ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

_MIN_RETRY_AFTER_S = 0.05
_MAX_RETRY_AFTER_S = 30.0
_DEFAULT_BATCH_S = 0.1
"""Assumed time per batch for the retry hint before any batch has run."""
_EMA_ALPHA = 0.2
_DEFAULT_OOM_COOLDOWN_S = 60.0
_IDLE_RECHECK_S = 1.0
"""The idle worker re-checks `_closing` this often: the owner's finalizer sets it without notifying (see
`_owner_gone`)."""


@dataclass(frozen=True)
class BatchEvent:
    """What happened in one handler call (a batch, or a retried part of one); passed to listeners."""

    key: Hashable
    """The batch key every request in the batch shares."""
    task: str
    """`key[0]` when the key is a tuple starting with a string, else `str(key)`."""
    size: int
    """Requests passed to the handler."""
    queue_wait_s: tuple[float, ...]
    """Per request: seconds from `submit` to the start of this handler call."""
    exec_s: float
    """Seconds the handler call took."""
    failed: int
    """Requests this call failed for good (per-item errors, a wrong result length, or a lone failure)."""
    retried: bool
    """This call re-ran part of a batch whose handler call raised."""
    split: bool = False
    """The handler raised and the batch is being re-run in halves (its requests are not failed yet)."""


@dataclass(frozen=True)
class BatcherStats:
    """A snapshot of a batcher's counters (all counts since it was created)."""

    requests: int
    """Requests accepted by `submit`."""
    batches: int
    """Handler calls, retried parts of batches included."""
    batch_size_histogram: dict[int, int]
    """Batch size -> number of handler calls of that size."""
    queue_depth: int
    """Requests waiting right now (not counting the batch that is running)."""
    rejected: int
    """Submits refused with `Overloaded`."""
    cancelled: int
    """Requests cancelled by their caller before they ran."""
    expired: int
    """Requests failed with `RequestTimeout` before they ran."""
    errors: int
    """Requests that ran (or were being assembled into a batch) and failed."""
    completed: int
    """Requests resolved with a result."""
    retries: int
    """Handler calls that re-ran part of a batch after the handler raised."""
    per_task: dict[str, tuple[int, int, int]]
    """Task -> (requests, batches, errors)."""
    dropped: int = 0
    """Requests failed with `ServiceClosed` because the batcher closed before they ran."""


@dataclass(eq=False)
class _Pending(Generic[ItemT, ResultT]):
    """One queued request: its key, payload, future and timing."""

    key: Hashable
    task: str
    item: ItemT
    future: concurrent.futures.Future[ResultT]
    enqueued: float
    deadline: float | None
    timeout_s: float | None


def is_out_of_memory(exc: BaseException) -> bool:
    """True for `torch.cuda.OutOfMemoryError`, any `MemoryError`, or a RuntimeError saying "out of memory".

    torch is not imported here: if it was never imported, no torch error can have been raised.
    """
    torch = sys.modules.get("torch")
    if torch is not None:
        for owner in (torch, getattr(torch, "cuda", None)):
            oom_type = getattr(owner, "OutOfMemoryError", None)
            if isinstance(oom_type, type) and isinstance(exc, oom_type):
                return True
    if isinstance(exc, MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def _same_key(a: Hashable, b: Hashable) -> bool:
    """Key equality that never raises: a key whose `__eq__` fails is treated as unlike any other key."""
    if a is b:
        return True
    try:
        return bool(a == b)
    except Exception:
        return False


def _task_of(key: Hashable) -> str:
    """The task name used in stats and events; never raises."""
    if isinstance(key, tuple) and key and isinstance(key[0], str):
        return key[0]
    try:
        return str(key)
    except Exception:
        return f"<{type(key).__name__}>"


def take_batch(
    pending: collections.deque[_Pending[ItemT, ResultT]], max_batch_size: int
) -> list[_Pending[ItemT, ResultT]]:
    """Remove and return the next batch: the oldest live request and the queued requests with an equal key.

    Requests are taken in arrival order, at most `max_batch_size` of them. Everything else, including
    requests whose future is already done (cancelled), stays in `pending` in its original order.
    """
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise InvalidInput(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
    head: _Pending[ItemT, ResultT] | None = None
    taken: list[_Pending[ItemT, ResultT]] = []
    kept: list[_Pending[ItemT, ResultT]] = []
    for request in pending:
        if len(taken) >= max_batch_size or request.future.done():
            kept.append(request)
        elif head is None:
            head = request
            taken.append(request)
        elif _same_key(head.key, request.key):
            taken.append(request)
        else:
            kept.append(request)
    if taken:
        pending.clear()
        pending.extend(kept)
    return taken


def _retry_after(exec_s_per_batch: float | None, queued: int, max_batch_size: int) -> float:
    """Seconds until the queue has likely room again: time per batch × batches ahead, clamped."""
    per_batch = _DEFAULT_BATCH_S if exec_s_per_batch is None else exec_s_per_batch
    batches_ahead = math.ceil(queued / max_batch_size) + 1
    return min(max(per_batch * batches_ahead, _MIN_RETRY_AFTER_S), _MAX_RETRY_AFTER_S)


def _as_request_error(exc: BaseException, *, oom: bool) -> BlipError:
    """What a single failed request raises: our own errors unchanged, anything else as InferenceError."""
    if isinstance(exc, BlipError):
        return exc
    if oom:
        message = (
            f"out of memory even for a single request: {type(exc).__name__}: {exc}; "
            "use smaller images, a smaller BLIP_MAX_BATCH_SIZE or a smaller BLIP_DTYPE"
        )
    else:
        message = f"inference failed: {type(exc).__name__}: {exc}"
    error = InferenceError(message)
    error.__cause__ = exc
    return error


def _check_submit(key: Hashable, timeout_s: float | None) -> None:
    """`InvalidInput` unless the key is hashable and `timeout_s` is None or a positive number of seconds."""
    if timeout_s is not None and (
        isinstance(timeout_s, bool)
        or not isinstance(timeout_s, int | float)
        or not math.isfinite(timeout_s)
        or timeout_s <= 0
    ):
        raise InvalidInput(f"timeout_s must be a positive number of seconds or None, got {timeout_s!r}")
    try:
        hash(key)
    except Exception as exc:
        raise InvalidInput(f"batch key must be hashable: {type(exc).__name__}: {exc}") from exc


def _check_positive_int(name: str, value: object) -> int:
    """Validate an integer >= 1 (bool refused) and return it."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInput(f"{name} must be an integer >= 1, got {value!r}")
    return value


class DynamicBatcher(Generic[ItemT, ResultT]):
    """Collect requests into batches and run them on one worker thread that owns the handler.

    Args:
        handler: `handler(key, items)` runs one batch and returns one result per item, in order. An element
            that is an exception fails only that request. It always runs on the worker thread.
        max_batch_size: most requests in one handler call.
        max_wait_ms: wait window, from the oldest request, used only when the worker was idle. While requests
            announced with `expect()` are still on their way, an idle worker's batch waits for them instead, up to
            `max_merge_wait_ms` (or `max_wait_ms`, if longer) from its oldest request, but no longer than the
            last batch took, and for no more than the queue has room for.
        max_queue: most requests waiting; one more raises `Overloaded` at once.
        name: shown in thread names, logs and error messages.
        is_oom: says whether a handler exception is an out-of-memory error.
        on_oom: called after an out-of-memory error, before retrying (e.g. `torch.cuda.empty_cache`).
        max_batch_size_for: lowers the batch size per key (e.g. beam search uses more memory). Called on the
            worker thread while the queue lock is held: keep it quick and do not submit from it.
        oom_cooldown_s: how long a batch size lowered after an out-of-memory error stays lowered.
        max_merge_wait_ms: after a batch, the callers it just served usually come straight back (agents, closed
            loops). While fewer have come back than the batch held and they keep arriving (gaps up to
            `max_wait_ms` or a tenth of the last batch's time, at least 1 ms), or for as long as recent closed-loop
            returns took per caller (x1.5), the next batch is held open for them, at most this long and never
            longer than the last batch took, so alternating cohorts merge into full batches. Also how long an
            idle worker's batch may wait for announced requests (`expect()`). 0 turns both off.
        weak_handler: `handler` is a bound method to hold through a `weakref.WeakMethod`, so the worker thread does
            not keep its object alive. Once that object is garbage-collected the batcher closes (draining: what
            is queued then fails with `ServiceClosed`, as the handler is gone) and its threads exit.
    """

    def __init__(
        self,
        handler: Callable[[Hashable, list[ItemT]], Sequence[ResultT | BaseException]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue: int,
        name: str = "blip-batcher",
        is_oom: Callable[[BaseException], bool] = is_out_of_memory,
        on_oom: Callable[[], None] | None = None,
        max_batch_size_for: Callable[[Hashable], int] | None = None,
        oom_cooldown_s: float = _DEFAULT_OOM_COOLDOWN_S,
        max_merge_wait_ms: float = 0.0,
        weak_handler: bool = False,
    ) -> None:
        if not callable(handler):
            raise InvalidInput(f"handler must be callable, got {handler!r}")
        owner = getattr(handler, "__self__", None)
        if weak_handler and (owner is None or not hasattr(handler, "__func__")):
            raise InvalidInput(f"weak_handler needs a bound method as handler, got {handler!r}")
        self._max_batch_size = _check_positive_int("max_batch_size", max_batch_size)
        self._max_queue = _check_positive_int("max_queue", max_queue)
        if (
            isinstance(max_wait_ms, bool)
            or not isinstance(max_wait_ms, int | float)
            or not math.isfinite(max_wait_ms)
            or max_wait_ms < 0
        ):
            raise InvalidInput(f"max_wait_ms must be a finite number >= 0, got {max_wait_ms!r}")
        if (
            isinstance(max_merge_wait_ms, bool)
            or not isinstance(max_merge_wait_ms, int | float)
            or not math.isfinite(max_merge_wait_ms)
            or max_merge_wait_ms < 0
        ):
            raise InvalidInput(f"max_merge_wait_ms must be a finite number >= 0, got {max_merge_wait_ms!r}")
        if isinstance(oom_cooldown_s, bool) or not isinstance(oom_cooldown_s, int | float) or not oom_cooldown_s >= 0:
            raise InvalidInput(f"oom_cooldown_s must be a number >= 0, got {oom_cooldown_s!r}")
        self._handler: Callable[[], Callable[[Hashable, list[ItemT]], Sequence[ResultT | BaseException]] | None]
        if weak_handler:
            try:
                self._handler = weakref.WeakMethod(handler)
            except TypeError as exc:  # an object without weak reference support (`__slots__`)
                raise InvalidInput(f"weak_handler needs an object that supports weak references: {exc}") from exc
        else:
            self._handler = lambda: handler
        self._max_wait_s = float(max_wait_ms) / 1000.0
        self._name = str(name)
        self._is_oom = is_oom
        self._on_oom = on_oom
        self._max_batch_size_for = max_batch_size_for
        self._oom_cooldown_s = float(oom_cooldown_s)
        self._merge_wait_s = float(max_merge_wait_ms) / 1000.0

        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        # The reaper fails queued requests at their deadline while the worker is busy; it shares the queue's lock
        # but has its own condition, so waking one never wakes the other.
        self._reaper_cv = threading.Condition(lock)
        self._reaper_asleep = False
        """Whether the reaper waits with no deadline to watch (a submit with a deadline must wake it)."""
        self._reaper_by = math.inf
        """When the reaper wakes next (a submit with an earlier deadline must wake it)."""
        self._worker_done = False
        self._pending: collections.deque[_Pending[ItemT, ResultT]] = collections.deque()
        self._closing = False
        self._close_called = False
        self._idle = True
        self._inflight: list[_Pending[ItemT, ResultT]] = []
        self._listeners: list[Callable[[BatchEvent], None]] = []
        self._oom_limits: dict[Hashable, tuple[int, float]] = {}
        self._ema_exec_s: float | None = None
        # Merge window state: callers served by the last batch, when it ended, how long it ran, arrivals since.
        self._returning = 0
        self._batch_start = 0.0
        self._last_end = 0.0
        self._last_exec_s = 0.0
        self._last_arrival = 0.0
        self._arrivals_since_end = 0
        self._delivered = False
        """Whether this batch's results have started going out (arrivals from then on are returning callers)."""
        self._delivery_start = 0.0
        self._delivered_batch_s = 0.0
        """How long the batch whose results went out last took to run."""
        # Closed-loop return time: seconds and callers of recent returns (each halved per return), summed; so
        # their ratio is the time per returning caller, weighted by how many came back. 0: not a closed loop.
        self._return_s = 0.0
        self._return_n = 0.0
        # While the worker holds a batch open (timed wait): the queue length that should wake it early. Submits
        # below it don't notify, so 32 arrivals cost one wake-up instead of 32 (deadlines are the reaper's job).
        self._wake_at_len: int | None = None
        self._expected = 0
        """Requests announced with `expect()` and not submitted yet (being prepared): a batch may wait for them."""

        self._requests = 0
        self._batches = 0
        self._histogram: dict[int, int] = {}
        self._rejected = 0
        self._cancelled = 0
        self._expired = 0
        self._errors = 0
        self._completed = 0
        self._retries = 0
        self._dropped = 0
        self._per_task: dict[str, list[int]] = {}

        self._thread = threading.Thread(target=self._worker_main, name=f"{self._name}-worker", daemon=True)
        self._thread.start()
        self._reaper = threading.Thread(target=self._reaper_main, name=f"{self._name}-reaper", daemon=True)
        self._reaper.start()
        if weak_handler:
            # Holds only a weak reference to the batcher; needs nothing at exit (the threads are daemons).
            weakref.finalize(owner, DynamicBatcher._owner_gone, weakref.ref(self)).atexit = False

    # ------------------------------------------------------------------ public API

    @property
    def name(self) -> str:
        """The name given at construction."""
        return self._name

    @property
    def max_batch_size(self) -> int:
        """Most requests in one handler call."""
        return self._max_batch_size

    @property
    def max_wait_ms(self) -> float:
        """The idle wait window in milliseconds."""
        return self._max_wait_s * 1000.0

    @property
    def max_queue(self) -> int:
        """Most requests that may wait."""
        return self._max_queue

    @property
    def queue_depth(self) -> int:
        """Requests waiting right now (cancelled ones count until the worker drops them)."""
        with ctrl_c_deferred(), self._cond:
            return len(self._pending)

    @property
    def closed(self) -> bool:
        """True once `close()` was called (or the worker stopped, or the handler's owner was collected)."""
        return self._closing

    @property
    def running(self) -> bool:
        """Whether the worker thread still runs (after `close()`: a batch outlasted its timeout)."""
        return self._thread.is_alive()

    @staticmethod
    def _owner_gone(ref: weakref.ref[DynamicBatcher[ItemT, ResultT]]) -> None:
        """The weak handler's object was collected: close (drain, then stop) like `close()`, without joining.

        A finalizer runs in whatever thread dropped the last reference, possibly the worker while it holds the
        queue's lock mid-update, or a thread inside `Condition.notify`: so it only sets flags (atomic under the
        GIL; every reader copes with `_closing` turning true at any time) and takes no lock and notifies nobody.
        The idle worker notices within `_IDLE_RECHECK_S`.
        """
        batcher = ref()
        if batcher is not None:
            batcher._close_called = True
            batcher._closing = True

    def expect(self) -> None:
        """Announce one request on its way (its input is being prepared); submit it with `expected=True`.

        An idle worker's batch that is not full waits for announced requests (of any key), at most
        `max_merge_wait_ms` (or `max_wait_ms`, if longer) from its oldest request, no longer than the last batch
        took, and for no more than the queue has room for: a burst of callers whose images are still being
        decoded then fills one batch, instead of the model starting on the first few and the rest waiting a
        whole batch for the next. `unexpect()` withdraws an announcement that will not be submitted.
        """
        with ctrl_c_deferred(), self._cond:
            self._expected += 1

    def unexpect(self) -> None:
        """Withdraw one `expect()`: that request will not be submitted (its preparation failed, its caller left)."""
        with ctrl_c_deferred(), self._cond:
            self._expected -= 1
            self._wake_holder_locked()

    def _wake_holder_locked(self) -> None:
        """A request the worker may be holding a batch open for will not come: let it look again."""
        if self._wake_at_len is not None:
            self._cond.notify()

    def submit(
        self, key: Hashable, item: ItemT, *, timeout_s: float | None = None, expected: bool = False
    ) -> concurrent.futures.Future[ResultT]:
        """Queue one request and return its future; never blocks.

        Args:
            key: requests with equal keys may share a batch; must be hashable.
            item: passed to the handler in the `items` list.
            timeout_s: the request fails with `RequestTimeout` if it has not started this many seconds after
                submit. None: no deadline.
            expected: the request was announced with `expect()`; this call ends the announcement, whether the
                request is queued or refused.

        Raises:
            Overloaded: the queue is full; `retry_after_s` says when to try again.
            ServiceClosed: `close()` was called or the worker stopped.
            InvalidInput: the key is not hashable or `timeout_s` is not a positive number.
        """
        try:
            _check_submit(key, timeout_s)
        except InvalidInput:
            if expected:
                self.unexpect()
            raise
        task = _task_of(key)
        future: concurrent.futures.Future[ResultT] = concurrent.futures.Future()
        expired: list[_Pending[ItemT, ResultT]] = []
        with ctrl_c_deferred():  # from a caller's main thread: a Ctrl-C must not leave the queue's lock held
            try:
                with self._cond:
                    if expected:
                        self._expected -= 1  # queued below (whose submit wakes the worker as usual) or refused
                    if self._closing or not self._thread.is_alive():
                        raise self._closed_error()
                    if len(self._pending) >= self._max_queue:
                        # Cancelled or expired requests must not hold slots a live request could use.
                        expired = self._prune_locked(time.monotonic())
                    if len(self._pending) >= self._max_queue:
                        self._rejected += 1
                        if expected:
                            self._wake_holder_locked()
                        retry_after_s = _retry_after(self._ema_exec_s, len(self._pending), self._max_batch_size)
                        raise Overloaded(
                            f"the request queue is full ({len(self._pending)} requests waiting, "
                            f"max_queue={self._max_queue}); retry after {retry_after_s:.2f} s "
                            "(or raise BLIP_MAX_QUEUE if the hardware keeps up)",
                            retry_after_s=retry_after_s,
                        )
                    now = time.monotonic()
                    self._pending.append(
                        _Pending(
                            key=key,
                            task=task,
                            item=item,
                            future=future,
                            enqueued=now,
                            deadline=None if timeout_s is None else now + float(timeout_s),
                            timeout_s=None if timeout_s is None else float(timeout_s),
                        )
                    )
                    self._requests += 1
                    self._task_counts(task)[0] += 1
                    self._last_arrival = now
                    self._arrivals_since_end += 1
                    if self._arrivals_since_end == self._returning:
                        self._learn_return_locked(now)
                    if self._wake_at_len is None or len(self._pending) >= self._wake_at_len:
                        self._cond.notify()
                    if timeout_s is not None and (self._reaper_asleep or now + timeout_s < self._reaper_by):
                        self._reaper_cv.notify()
            finally:
                self._fail_expired(expired)
        return future

    def close(self, *, drain: bool = True, timeout_s: float | None = 30.0) -> None:
        """Stop accepting requests and stop the worker; idempotent.

        Args:
            drain: True runs everything already queued first; False fails queued requests with
                `ServiceClosed` (a batch already running still finishes).
            timeout_s: longest wait for the worker. Requests still queued after it fail with `ServiceClosed`;
                a handler call that is still running cannot be interrupted and finishes on its own.
        """
        with ctrl_c_deferred():  # from the caller's thread: a Ctrl-C must not leave the queue's or a future's lock held
            with self._cond:
                self._closing = True
                self._close_called = True
                dropped = [] if drain else self._take_all_locked()
                self._cond.notify_all()
            self._drop(dropped, f"{self._name} was closed before this request ran")
        if threading.current_thread() is self._thread:
            return  # closed from inside the handler: the worker stops after this batch
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            with ctrl_c_deferred(), self._cond:
                leftovers = self._take_all_locked()
            logger.warning(
                "%s: worker still busy %.1f s after close(); failing %d queued requests",
                self._name,
                timeout_s if timeout_s is not None else float("nan"),
                len(leftovers),
            )
            self._drop(leftovers, f"{self._name} did not finish its queue within {timeout_s} s of close()")

    def stats(self) -> BatcherStats:
        """A consistent snapshot of the counters."""
        with ctrl_c_deferred(), self._cond:
            return BatcherStats(
                requests=self._requests,
                batches=self._batches,
                batch_size_histogram=dict(sorted(self._histogram.items())),
                queue_depth=len(self._pending),
                rejected=self._rejected,
                cancelled=self._cancelled,
                expired=self._expired,
                errors=self._errors,
                completed=self._completed,
                retries=self._retries,
                per_task={task: (c[0], c[1], c[2]) for task, c in self._per_task.items()},
                dropped=self._dropped,
            )

    def add_listener(self, fn: Callable[[BatchEvent], None]) -> None:
        """Call `fn(event)` on the worker thread after every handler call; its exceptions are logged."""
        if not callable(fn):
            raise InvalidInput(f"listener must be callable, got {fn!r}")
        with ctrl_c_deferred(), self._cond:
            self._listeners.append(fn)

    def __enter__(self) -> DynamicBatcher[ItemT, ResultT]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # ------------------------------------------------------------------ worker

    def _worker_main(self) -> None:
        """Thread body: serve until closed; whatever happens, leave no queued future unresolved."""
        try:
            self._serve()
        except BaseException:
            logger.critical("%s: worker stopped unexpectedly", self._name, exc_info=True)
        finally:
            with self._cond:
                self._closing = True
                self._worker_done = True
                self._reaper_cv.notify()
                leftovers = self._take_all_locked()
            self._drop(leftovers, f"{self._name} stopped before this request ran (see the log)")

    def _reaper_main(self) -> None:
        """Thread body: sleep until the earliest queued deadline, then fail what expired; stop with the worker.

        The worker also drops expired requests when it forms a batch; the reaper is what fails them on time
        while one long batch runs (or hangs), so a queued caller never waits past its deadline.
        """
        try:
            while True:
                with self._cond:
                    while True:
                        if self._worker_done:
                            return
                        now = time.monotonic()
                        earliest = min((r.deadline for r in self._pending if r.deadline is not None), default=math.inf)
                        if earliest < now:
                            expired = self._prune_locked(now)
                            if expired:
                                break
                            continue
                        self._reaper_asleep = earliest == math.inf
                        self._reaper_by = earliest
                        try:
                            self._reaper_cv.wait(None if self._reaper_asleep else earliest - now + 0.001)
                        finally:
                            self._reaper_asleep, self._reaper_by = False, math.inf
                self._fail_expired(expired)
                # Not kept while asleep: a request's future (its callbacks) may hold what the owner of a weak
                # handler is, and the reaper can sleep for good.
                del expired
        except BaseException:
            logger.critical("%s: deadline reaper stopped unexpectedly", self._name, exc_info=True)

    def _serve(self) -> None:
        """The loop: form a batch, run it, resolve its futures; errors fail only the requests concerned."""
        while True:
            self._inflight = []
            self._delivered = False
            ran = False
            try:
                if self._next_batch() is None:
                    return
                if self._inflight:
                    ran = True
                    self._batch_start = time.monotonic()
                    self._execute(self._inflight)
            except Exception as exc:
                logger.exception("%s: internal error while serving a batch", self._name)
                if not self._inflight:
                    self._inflight = self._pop_head()  # guarantee progress: the head request was concerned
                self._fail_unresolved(self._inflight, exc)
            finally:
                self._fail_unresolved(self._inflight, None)
            if ran:  # "idle" means the queue was empty when the last batch finished
                with self._cond:
                    self._idle = not self._pending
                    end = time.monotonic()
                    self._returning = len(self._inflight)
                    self._last_exec_s = end - self._batch_start
                    self._last_end = end
                    if not self._delivered:
                        self._arrivals_since_end = 0

    def _next_batch(self) -> bool | None:
        """Wait for work and move the next batch into `_inflight` (None: closed and drained).

        The batch is stored before anything else can fail, so the serve loop can always resolve it.
        """
        expired: list[_Pending[ItemT, ResultT]] = []
        bad_head: tuple[_Pending[ItemT, ResultT], Exception] | None = None
        try:
            with self._cond:
                while True:
                    while not self._pending and not self._closing:
                        self._cond.wait(_IDLE_RECHECK_S)  # timed: `_owner_gone` sets `_closing` without notifying
                    if not self._pending:
                        return None
                    now = time.monotonic()
                    expired = self._prune_locked(now)
                    if expired:
                        return True  # fail them now (outside the lock), then come back for a batch
                    if not self._pending:
                        continue  # everything queued was cancelled
                    head = self._pending[0]
                    try:
                        limit = self._limit_for(head.key, now)
                    except Exception as exc:
                        self._pending.popleft()
                        bad_head = (head, exc)
                        return True
                    until = self._merge_until_locked()
                    missing = limit - self._count_like(head, limit)
                    if until > now and missing > 0 and not self._closing:
                        # The callers the last batch served are coming back: hold the batch open for them.
                        wait_s = until - now
                        # Wake early when the batch could be full or every returning caller is back.
                        back = self._returning - self._arrivals_since_end
                        self._hold_open(wait_s, len(self._pending) + min(missing, max(back, 1)))
                        continue
                    # A burst at an idle worker, still being prepared: wait for as many as could join the batch
                    # and fit in the queue (more would be refused while the worker waits).
                    coming = min(missing, self._expected, self._max_queue - len(self._pending))
                    if self._idle and coming > 0 and not self._closing:
                        remaining = head.enqueued + max(self._max_wait_s, self._expect_budget_s()) - now
                        if remaining > 0:  # wake when they are here, or at the budget's end
                            self._hold_open(remaining, len(self._pending) + coming)
                            continue
                    if self._idle and self._max_wait_s > 0 and not self._closing:
                        remaining = head.enqueued + self._max_wait_s - now
                        if remaining > 0 and missing > 0:
                            # Wake when the batch could be full or at the window's end.
                            self._hold_open(remaining, len(self._pending) + missing)
                            continue
                    self._inflight = take_batch(self._pending, limit)
                    return True
        finally:
            self._fail_expired(expired)
            if bad_head is not None:
                request, error = bad_head
                logger.warning("%s: could not form a batch for a %r request: %r", self._name, request.task, error)
                self._fail_request(request, error, prefix="could not form a batch for this request")

    def _hold_open(self, wait_s: float, wake_at_len: int) -> None:
        """Wait (lock held) up to `wait_s`; a submit wakes us only once `wake_at_len` requests are queued."""
        self._wake_at_len = wake_at_len
        try:
            self._cond.wait(wait_s)
        finally:
            self._wake_at_len = None

    def _expect_budget_s(self) -> float:
        """How long a batch may wait, from its oldest request, for announced requests: `max_merge_wait_ms`, never
        longer than the last batch took (a batch split in two costs about one batch time)."""
        if self._last_exec_s > 0:
            return min(self._merge_wait_s, self._last_exec_s)
        return self._merge_wait_s

    def _merge_until_locked(self) -> float:
        """When the merge window ends (0: no window): returning callers keep arriving, capped by the budget."""
        if self._merge_wait_s <= 0 or self._arrivals_since_end >= self._returning:
            return 0.0
        cap = self._last_end + min(self._merge_wait_s, self._last_exec_s)
        # Returning callers decode and preprocess their next image first: allow gaps in proportion to the batch.
        gap = max(self._max_wait_s, 0.1 * self._last_exec_s, 0.001)
        until = max(self._last_end, self._last_arrival) + gap
        if self._return_n > 0:
            # A closed loop: expect its callers back about as long after delivery as recent returns took per caller.
            # Many callers preparing at once share the GIL and tend to finish together, after a lull longer than
            # `gap` that would otherwise split the batch (and a straggler batch costs nearly a full batch time).
            per_caller = self._return_s / self._return_n
            until = max(until, self._delivery_start + 1.5 * self._returning * per_caller)
        return min(cap, until)

    def _learn_return_locked(self, now: float) -> None:
        """Every caller the last batch served is back: remember how long that took if it looked like a closed loop.

        Callers of a closed loop come back within a fraction of a batch time; open-loop arrivals (new callers at
        some rate) take about a batch time to add up to a batch, so they never teach the worker to wait.
        """
        took = now - self._delivery_start
        if self._returning > 0 and took <= 0.5 * self._delivered_batch_s:
            self._return_s = 0.5 * self._return_s + took
            self._return_n = 0.5 * self._return_n + self._returning
        else:
            self._return_s = self._return_n = 0.0

    def _execute(self, batch: list[_Pending[ItemT, ResultT]]) -> None:
        """Mark the batch running (dropping cancelled and expired requests), then run it.

        A weak handler is resolved once here and held until the batch (retries included) is done.
        """
        handler = self._handler()
        if handler is None:  # its owner is gone: `_owner_gone` has closed the batcher (or is about to)
            self._drop(batch, f"{self._name} is closed: its owner was garbage-collected before this request ran")
            return
        live: list[_Pending[ItemT, ResultT]] = []
        now = time.monotonic()
        for request in batch:
            if not self._claim(request):
                continue
            if request.deadline is not None and now > request.deadline:
                self._expire(request, now)
                continue
            live.append(request)
        if live:
            self._run(handler, live[0].key, live, retried=False)

    def _run(
        self,
        handler: Callable[[Hashable, list[ItemT]], Sequence[ResultT | BaseException]],
        key: Hashable,
        batch: list[_Pending[ItemT, ResultT]],
        *,
        retried: bool,
    ) -> None:
        """One handler call; on an exception, split and retry so only the guilty request fails."""
        start = time.monotonic()
        waits = tuple(start - request.enqueued for request in batch)
        try:
            out = handler(key, [request.item for request in batch])
        except BaseException as exc:
            exec_s = time.monotonic() - start
            oom = self._safe_is_oom(exc)
            if oom:
                self._after_oom(key, len(batch))
            if len(batch) > 1:
                logger.info(
                    "%s: %s batch of %d raised %s; retrying in halves",
                    self._name,
                    batch[0].task,
                    len(batch),
                    type(exc).__name__,
                )
                self._notify(self._count(key, batch, waits, exec_s, failed=0, retried=retried, split=True))
                middle = len(batch) // 2
                self._run(handler, key, batch[:middle], retried=True)
                self._run(handler, key, batch[middle:], retried=True)
                return
            request = batch[0]
            event = self._count(key, batch, waits, exec_s, failed=1, retried=retried)  # before its caller hears
            self._start_delivery()
            self._set_exception(request, _as_request_error(exc, oom=oom))
            self._notify(event)
            return
        exec_s = time.monotonic() - start
        size = self._result_length(out)
        if size != len(batch):
            shown = "a non-sequence" if size is None else f"{size} results"
            event = self._count(key, batch, waits, exec_s, failed=len(batch), retried=retried)
            self._start_delivery()
            for request in batch:
                self._set_exception(
                    request,
                    InferenceError(
                        f"the batch handler returned {shown} for {len(batch)} requests "
                        "(it must return one result per request, in order); this is a bug in the handler"
                    ),
                )
            self._notify(event)
            return
        # Count the batch before resolving its futures, so a caller reading stats() right after its result (or its
        # error, on every path) already sees the batch that produced it. Listeners are told after delivery.
        failed = sum(1 for result in out if isinstance(result, BaseException))
        event = self._count(key, batch, waits, exec_s, failed=failed, retried=retried)
        self._start_delivery()
        for request, result in zip(batch, out, strict=True):
            if isinstance(result, BaseException):
                self._set_exception(request, _as_request_error(result, oom=False))
            else:
                self._set_result(request, result)
        self._notify(event)

    # ------------------------------------------------------------------ helpers

    def _start_delivery(self) -> None:
        """Start counting returning callers: called just before the first of a batch's futures is resolved.

        A caller can resubmit as soon as its future resolves, before the worker has finished with the batch
        (the other futures, listeners); counting only from the end of that work would miss such arrivals, and
        the worker would then hold the next batch open for callers that are already queued.
        """
        if not self._delivered:
            self._delivered = True
            with self._cond:
                self._arrivals_since_end = 0
                self._returning = len(self._inflight)
                self._delivery_start = time.monotonic()
                self._delivered_batch_s = self._delivery_start - self._batch_start

    def _closed_error(self) -> ServiceClosed:
        if self._close_called:
            return ServiceClosed(f"{self._name} is closed and accepts no more requests; create a new service")
        return ServiceClosed(
            f"{self._name} stopped unexpectedly (see the log) and accepts no more requests; create a new service"
        )

    def _task_counts(self, task: str) -> list[int]:
        counts = self._per_task.get(task)
        if counts is None:
            counts = self._per_task[task] = [0, 0, 0]
        return counts

    def _limit_for(self, key: Hashable, now: float) -> int:
        """The batch size limit for a key: global, per-key, and any lowered limit after out-of-memory."""
        limit = self._max_batch_size
        if self._max_batch_size_for is not None:
            value = self._max_batch_size_for(key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidInput(f"max_batch_size_for must return an integer >= 1, got {value!r}")
            limit = min(limit, value)
        if self._oom_limits:
            lowered = self._oom_limits.get(key)
            if lowered is not None:
                if now >= lowered[1]:
                    del self._oom_limits[key]
                    logger.info("%s: batch size for a %s key back to normal", self._name, _task_of(key))
                else:
                    limit = min(limit, lowered[0])
        return limit

    def _count_like(self, head: _Pending[ItemT, ResultT], limit: int) -> int:
        """Live queued requests with the head's key, counting no further than `limit`."""
        count = 0
        for request in self._pending:
            if not request.future.done() and _same_key(head.key, request.key):
                count += 1
                if count >= limit:
                    break
        return count

    def _prune_locked(self, now: float) -> list[_Pending[ItemT, ResultT]]:
        """Drop cancelled requests (counted) and remove expired ones, which are returned to be failed."""
        if not self._pending:
            return []
        kept: list[_Pending[ItemT, ResultT]] = []
        expired: list[_Pending[ItemT, ResultT]] = []
        for request in self._pending:
            if request.future.cancelled():
                request.future.set_running_or_notify_cancel()  # wakes `concurrent.futures.wait` callers
                self._cancelled += 1
            elif request.deadline is not None and now > request.deadline:
                expired.append(request)
            else:
                kept.append(request)
        if len(kept) != len(self._pending):
            self._pending.clear()
            self._pending.extend(kept)
        return expired

    def _claim(self, request: _Pending[ItemT, ResultT]) -> bool:
        """Mark a request's future running; False (and counted if cancelled) when it must not be touched."""
        try:
            running = request.future.set_running_or_notify_cancel()
        except RuntimeError:  # already resolved elsewhere; nothing left to do for it
            return False
        if not running:
            with self._cond:
                self._cancelled += 1
        return running

    def _fail_expired(self, expired: list[_Pending[ItemT, ResultT]]) -> None:
        """Fail requests past their deadline (called without the lock: future callbacks run here)."""
        now = time.monotonic()
        for request in expired:
            if not self._claim(request):
                continue
            self._expire(request, now)

    def _expire(self, request: _Pending[ItemT, ResultT], now: float) -> None:
        waited = now - request.enqueued
        with self._cond:
            self._expired += 1  # counted first, like every outcome: stats() read after the error must include it
        expired = self._set_raw_exception(
            request,
            RequestTimeout(
                f"the request waited {waited:.2f} s in the queue, past its {request.timeout_s} s deadline, "
                "and was dropped before it ran; the service is busy: retry later, or raise "
                "BLIP_REQUEST_TIMEOUT_S"
            ),
        )
        if not expired:
            with self._cond:
                self._expired -= 1

    def _pop_head(self) -> list[_Pending[ItemT, ResultT]]:
        with self._cond:
            return [self._pending.popleft()] if self._pending else []

    def _take_all_locked(self) -> list[_Pending[ItemT, ResultT]]:
        leftovers = list(self._pending)
        self._pending.clear()
        return leftovers

    def _drop(self, requests: list[_Pending[ItemT, ResultT]], message: str) -> None:
        """Fail requests that never ran with `ServiceClosed` (cancelled ones are only counted)."""
        for request in requests:
            if not self._claim(request):
                continue
            with self._cond:
                self._dropped += 1  # counted first, like every outcome
            if not self._set_raw_exception(request, ServiceClosed(message)):
                with self._cond:
                    self._dropped -= 1

    def _fail_request(self, request: _Pending[ItemT, ResultT], exc: BaseException, *, prefix: str) -> None:
        """Fail one request that could not run, counting it as an error."""
        if isinstance(exc, BlipError) and not isinstance(exc, InvalidInput):
            error: BlipError = exc
        else:
            error = InferenceError(f"{prefix}: {type(exc).__name__}: {exc}")
            error.__cause__ = exc
        self._set_exception(request, error)

    def _fail_unresolved(self, batch: list[_Pending[ItemT, ResultT]], exc: BaseException | None) -> None:
        """Fail whatever in `batch` is still unresolved after an internal error (no-op when all resolved)."""
        for request in batch:
            if request.future.done():
                continue
            cause = exc if exc is not None else RuntimeError("the worker stopped while running this request")
            self._fail_request(request, cause, prefix=f"internal error in {self._name}")

    def _set_raw_exception(self, request: _Pending[ItemT, ResultT], error: BaseException) -> bool:
        """Set an exception if the future is still open; True if it was set."""
        try:
            request.future.set_exception(error)
        except concurrent.futures.InvalidStateError:
            return False
        return True

    def _set_exception(self, request: _Pending[ItemT, ResultT], error: BaseException) -> int:
        """Fail a request that ran (or was being assembled) and count it as an error; returns 1 if set."""
        with self._cond:
            self._errors += 1  # counted first, like a result: stats() read after the error must include it
            counts = self._task_counts(request.task)
            counts[2] += 1
        if self._set_raw_exception(request, error):
            return 1
        with self._cond:
            self._errors -= 1
            counts[2] -= 1
        return 0

    def _set_result(self, request: _Pending[ItemT, ResultT], result: ResultT) -> None:
        with self._cond:
            self._completed += 1  # counted first: stats() read after the result must include it
        try:
            request.future.set_result(result)
        except concurrent.futures.InvalidStateError:
            with self._cond:
                self._completed -= 1

    @staticmethod
    def _result_length(out: object) -> int | None:
        if isinstance(out, str | bytes) or not isinstance(out, Sequence):
            return None
        return len(out)

    def _safe_is_oom(self, exc: BaseException) -> bool:
        try:
            return bool(self._is_oom(exc))
        except Exception:
            logger.exception("%s: is_oom raised; treating the error as not out-of-memory", self._name)
            return False

    def _after_oom(self, key: Hashable, size: int) -> None:
        """Free memory and remember a lower batch size for this key for `oom_cooldown_s`."""
        if self._on_oom is not None:
            try:
                self._on_oom()
            except Exception:
                logger.exception("%s: on_oom raised", self._name)
        lowered = max(1, size // 2)
        until = time.monotonic() + self._oom_cooldown_s
        try:
            with self._cond:
                previous = self._oom_limits.get(key)
                if previous is not None:
                    lowered = min(lowered, previous[0])
                self._oom_limits[key] = (lowered, until)
        except Exception:
            logger.exception("%s: could not record the lowered batch size", self._name)
            return
        logger.warning(
            "%s: out of memory with a %s batch of %d; using at most %d for the next %.0f s",
            self._name,
            _task_of(key),
            size,
            lowered,
            self._oom_cooldown_s,
        )

    def _count(
        self,
        key: Hashable,
        batch: list[_Pending[ItemT, ResultT]],
        waits: tuple[float, ...],
        exec_s: float,
        *,
        failed: int,
        retried: bool,
        split: bool = False,
    ) -> tuple[list[Callable[[BatchEvent], None]], BatchEvent] | None:
        """Count one handler call; returns the listeners and their event (None when nobody listens)."""
        task = batch[0].task
        size = len(batch)
        with self._cond:
            self._batches += 1
            self._histogram[size] = self._histogram.get(size, 0) + 1
            self._task_counts(task)[1] += 1
            if retried:
                self._retries += 1
            if not split:
                self._ema_exec_s = (
                    exec_s if self._ema_exec_s is None else (1 - _EMA_ALPHA) * self._ema_exec_s + _EMA_ALPHA * exec_s
                )
            listeners = list(self._listeners)
        if not listeners:
            return None
        return listeners, BatchEvent(
            key=key,
            task=task,
            size=size,
            queue_wait_s=waits,
            exec_s=exec_s,
            failed=failed,
            retried=retried,
            split=split,
        )

    def _notify(self, pending: tuple[list[Callable[[BatchEvent], None]], BatchEvent] | None) -> None:
        """Call each listener with the event; a listener that raises is logged and ignored."""
        if pending is None:
            return
        listeners, event = pending
        for listener in listeners:
            try:
                listener(event)
            except Exception:
                logger.exception("%s: batch listener %r raised; ignored", self._name, listener)


__all__ = ["BatchEvent", "BatcherStats", "DynamicBatcher", "is_out_of_memory", "take_batch"]
