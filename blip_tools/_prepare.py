"""The process-wide preparation threads: image decoding and preprocessing for every single call, off the worker.

One job at a time holds the GIL-bound part of a preparation (one per usable CPU on a free-threaded Python).
Callers that each prepared in their own thread (32 of them, on 2 cores) took turns on the GIL at every C call
that releases it (PIL, numpy, hashlib), each turn a context switch: a small image took 2.7x as long to prepare
as in one thread. A job about to wait (a URL fetch, a model load) enters `blocking()`, which lets another thread
take the next job meanwhile, so a slow download never holds up other callers' images; so does the long,
GIL-free C work on a large image (`gil_free`: decoding, hashing and resizing a photo), so photos are still
decoded several at a time.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import logging
import os
import sys
import threading
from collections.abc import Callable, Iterator

from ._ctrl_c import ctrl_c_deferred

logger = logging.getLogger(__name__)

_MAX_THREADS = 32
"""Most threads, those waiting in `blocking()` included: at most this many URL fetches run at once."""

_local = threading.local()


class PreparePool:
    """Daemon threads that run at most `slots` jobs at once, not counting jobs waiting in `blocking()`.

    Daemon threads: work waiting in the pool never holds up the end of the process (a model load can take
    minutes; `ThreadPoolExecutor` joins its threads at exit, so Ctrl-C during a load waited for it). A thread
    goes on to the next queued job itself, so a burst of jobs costs no hand-over between threads.
    """

    def __init__(self, slots: int, name: str, max_threads: int = _MAX_THREADS) -> None:
        self._slots = max(1, slots)
        self._max_threads = max(self._slots, max_threads)
        self._name = name
        self._cond = threading.Condition(threading.Lock())
        self._jobs: collections.deque[Callable[[], None]] = collections.deque()
        self._running = 0
        """Threads holding a slot: running a job outside `blocking()`, or woken to take one."""
        self._idle = 0
        """Threads parked with no slot, waiting to be given one."""
        self._threads = 0

    @property
    def slots(self) -> int:
        """Jobs that may run at once outside `blocking()`."""
        return self._slots

    def submit(self, fn: Callable[[], None]) -> None:
        """Run `fn()` on a pool thread, in a copy of the caller's context; its exceptions are logged."""
        job = functools.partial(contextvars.copy_context().run, fn)
        with ctrl_c_deferred(), self._cond:
            self._jobs.append(job)
            started = self._wake_locked()
            if started is None and self._threads == 0:  # no thread at all will ever run it
                self._jobs.pop()
                raise RuntimeError(f"{self._name}: could not start a preparation thread")

    def _wake_locked(self) -> bool | None:
        """Give a free slot to a parked or new thread if a job waits (True: done; None: a thread would not start)."""
        if not self._jobs or self._running >= self._slots:
            return False
        if self._idle:
            self._idle -= 1
            self._running += 1
            self._cond.notify()
            return True
        if self._threads >= self._max_threads:
            return False
        self._threads += 1
        self._running += 1
        try:
            threading.Thread(target=self._work, name=f"{self._name}_{self._threads - 1}", daemon=True).start()
        except RuntimeError:  # the system's thread limit: the queued jobs wait for the threads there are
            self._threads -= 1
            self._running -= 1
            logger.warning("%s: could not start another thread", self._name, exc_info=True)
            return None
        return True

    def stalled(self) -> bool:
        """Whether a job submitted now would wait for one in `blocking()`: every thread may wait there, none may start.

        Read without the lock: a hint for a sync caller, which then prepares in its own thread.
        """
        return self._running < self._slots and not self._idle and self._threads >= self._max_threads

    def _work(self) -> None:
        _local.pool = self
        with self._cond:
            while True:  # here this thread holds a slot
                if self._jobs and self._running <= self._slots:
                    job = self._jobs.popleft()
                    self._cond.release()
                    try:
                        job()
                    except BaseException:
                        logger.exception("blip-tools: a preparation job failed")
                    finally:
                        del job  # not kept while parked: it may hold a private service that is otherwise dropped
                        self._cond.acquire()
                    continue
                self._running -= 1  # nothing to do, or over the limit since a job came back from `blocking()`
                self._idle += 1
                self._cond.wait()  # `_wake_locked` gives the slot back before it notifies

    def _block(self) -> None:
        with self._cond:
            self._running -= 1
            self._wake_locked()

    def _unblock(self) -> None:
        with self._cond:
            self._running += 1  # may go over `slots` until this job ends: the job finishes, then the thread parks


_pool: PreparePool | None = None
_pool_lock = threading.Lock()


def _forget_pool() -> None:
    """In a forked child: the parent's pool threads do not exist there, so the next job makes a new pool."""
    global _pool, _pool_lock, _local
    _pool = None
    _pool_lock = threading.Lock()
    _local = threading.local()  # forked from a pool thread: this thread is not one of the new pool's


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pool)


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask where the platform has one)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def pool_slots() -> int:
    """Slots of the process's pool: 1 while the GIL is on, one per usable CPU on a free-threaded Python.

    Under the GIL the Python of two preparations cannot run at once, and a second slot only adds a thread taking
    turns with the first (and with the callers and the model's worker) at every C call; the long GIL-free work on
    an image gives its slot up anyway (`gil_free`). 32 callers on 2 CPUs, one slot against two (with `gil_free`
    from 40,000 pixels against 100,000): tiny-model B1 threads 0.88-0.91x offline against 0.85-0.87x and asyncio
    0.93-0.96x against 0.93, 1920x1080 JPEGs 87-92 images/s against 82-89, 320x240 and 240x180 level.
    """
    gil_enabled: Callable[[], bool] | None = getattr(sys, "_is_gil_enabled", None)
    return 1 if gil_enabled is None or gil_enabled() else usable_cpus()


def pool() -> PreparePool:
    """The process's preparation pool, made on first use."""
    global _pool
    current = _pool
    if current is None:
        with _pool_lock:
            if _pool is None:
                _pool = PreparePool(pool_slots(), "blip-prepare")
            current = _pool
    return current


def in_pool_thread() -> bool:
    """Whether this thread is one of a preparation pool's (a sync call made there must not wait on the pool)."""
    return getattr(_local, "pool", None) is not None


GIL_FREE_PIXELS = 40_000
"""From this many pixels up, decoding, hashing and resizing an image run mostly without the GIL (`gil_free`)."""


def gil_free(pixels: int) -> contextlib.AbstractContextManager[None]:
    """`blocking()` around work on an image of `pixels` pixels, if it is large enough to run mostly without the GIL.

    A photo's decode, hash and resize are long C calls that release the GIL: with its slot given up meanwhile,
    several images are decoded at once while the next job's Python runs. A small image's C calls are short, and
    it keeps its slot (more threads only take turns). 32 callers on 2 CPUs, 1920x1080 JPEGs: 52 images/s with one
    slot and without this, 87-92 with it (78-85 with a thread per caller, before the pool). From 100,000 pixels
    up, one slot left 320x240 JPEGs (76,800 pixels) 10 % behind two; from 40,000 they are level.
    """
    return blocking(waits=False) if pixels >= GIL_FREE_PIXELS else contextlib.nullcontext()


WaitHook = Callable[[], Callable[[], None] | None]
"""Called as a job's wait starts; what it returns is called as the wait ends."""


def set_wait_hook(hook: WaitHook | None) -> None:
    """This pool thread's current job tells `hook` when it waits (`blocking()`, not `gil_free`); None clears it.

    The service withdraws the job's request from the batcher's announced requests meanwhile: a request whose image
    is downloading, or whose model is loading, is not coming soon, and a batch must not wait for it.
    """
    _local.wait_hook = hook


@contextlib.contextmanager
def blocking(*, waits: bool = True) -> Iterator[None]:
    """Mark a wait (network, a model load) inside a preparation job: another job may use the CPU meanwhile.

    `waits=False`: GIL-free work on the CPU (`gil_free`), which ends soon; the job's wait hook is not told. Outside
    a pool thread, and when nested, it does nothing.
    """
    owner: PreparePool | None = getattr(_local, "pool", None)
    if owner is None or getattr(_local, "blocked", False):
        yield
        return
    hook: WaitHook | None = getattr(_local, "wait_hook", None) if waits else None
    resume = hook() if hook is not None else None
    _local.blocked = True
    owner._block()
    try:
        yield
    finally:
        owner._unblock()
        _local.blocked = False
        if resume is not None:
            resume()
