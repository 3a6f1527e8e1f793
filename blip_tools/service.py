"""`Blip2Service`: the one model owner per process. Typed requests → DynamicBatcher → runtime → typed results.

A process-wide pool sized to the CPUs (`_prepare`) decodes and preprocesses the images of single calls, sync and
async alike, and batch calls' images in the caller's thread (so a bad image fails alone and CPU work overlaps the
model); one worker thread runs batches. Sync methods block the calling thread; async twins await without blocking
the event loop, and cancelling the awaiting task cancels the queued request.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import functools
import logging
import queue
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar, cast

from . import _prepare
from ._ctrl_c import ctrl_c_deferred
from .batching import BatchEvent, DynamicBatcher
from .errors import BlipError, InferenceError, InvalidInput, Overloaded, ServiceClosed
from .grounding import LocateResult, build_locate_result, gradcam_batch
from .images import ImageInput, LoadedImage, load_image
from .params import GenerationParams
from .results import (
    AnswerResult,
    CaptionResult,
    EmbeddingResult,
    GeneratedText,
    ImageInfo,
    ModelInfo,
    ScoreResult,
    ServiceStats,
    TaskStats,
    TextScore,
    Timing,
)
from .runtime import VQA_TEMPLATE, Blip2Runtime, GenerationItem, ImageItem, check_prompt
from .settings import BlipSettings

if TYPE_CHECKING:
    from .index import ImageIndex

logger = logging.getLogger(__name__)

T = TypeVar("T")
_CLOSED = "The blip-tools service is closed; create a new one or restart the server."


class _Mailbox:
    """Calls posted to one event loop from other threads, run in one loop wake-up per burst.

    A batch resolves its requests one after another on the model's worker thread: with `call_soon_threadsafe`
    per request, 32 asyncio callers cost 32 wake-ups of their loop; here the first post wakes it and the rest
    join the same drain.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = weakref.ref(loop)  # the mailbox must not keep its loop alive (it is looked up by loop)
        self._lock = threading.Lock()
        self._items: list[tuple[Callable[..., None], tuple[Any, ...]]] = []

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        """Run `fn(*args)` on the loop soon; `RuntimeError` if the loop is closed or gone."""
        with self._lock:
            self._items.append((fn, args))
            if len(self._items) > 1:
                return  # a drain is already on its way
        loop = self._loop()
        try:
            if loop is None:
                raise RuntimeError("the event loop is gone")
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:
            with self._lock:
                self._items.clear()
            raise

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for fn, args in items:
            try:
                fn(*args)
            except Exception:  # one caller's callback must not stop the others'
                logger.exception("blip-tools: a result callback failed on the event loop")


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Mailbox] = weakref.WeakKeyDictionary()
_mailboxes_lock = threading.Lock()


def _mailbox(loop: asyncio.AbstractEventLoop) -> _Mailbox:
    """The loop's mailbox, made on first use."""
    box = _mailboxes.get(loop)
    if box is None:
        with _mailboxes_lock:
            box = _mailboxes.get(loop)
            if box is None:
                box = _mailboxes[loop] = _Mailbox(loop)
    return box


def _prepare_in_thread(fn: Callable[[], None]) -> None:
    """Run `fn` on the process-wide preparation pool (`blip_tools._prepare`).

    Not `loop.run_in_executor`: its asyncio future would wake the event loop once more per request, only to
    record that `fn` returned (`fn` reports to the loop itself).
    """
    _prepare.pool().submit(fn)


def _settle(waiter: asyncio.Future[Any], exc: BaseException | None, value: Any) -> None:
    """On the loop: resolve `waiter` with `exc` or `value`, unless its task was cancelled meanwhile."""
    if waiter.done():
        return
    if exc is not None:
        waiter.set_exception(exc)
    else:
        waiter.set_result(value)


async def _in_prepare_thread(fn: Callable[[], T]) -> T:
    """`await asyncio.to_thread(fn)`, on the prepare pool: for work that may wait for a model to load."""
    loop = asyncio.get_running_loop()
    mailbox = _mailbox(loop)
    waiter: asyncio.Future[T] = loop.create_future()

    def run() -> None:
        try:
            value, exc = fn(), None
        except BaseException as error:
            value, exc = None, error
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
            mailbox.post(_settle, waiter, exc, value)

    _prepare_in_thread(run)
    return await waiter


ProgressFn = Callable[[int, int], Any]

CAPTION, ANSWER, EMBED_IMAGE, EMBED_TEXT, SCORE = "caption", "answer", "embed_image", "embed_text", "score"
LOCATE = "locate"


@dataclass
class _Request:
    """What travels through the batcher: the payload plus when it was submitted."""

    payload: Any
    submitted: float


@dataclass
class _Outcome:
    """A handler's result for one request with its timing."""

    value: Any
    queue_ms: float
    inference_ms: float
    batch_size: int


def _as_list(values: object, what: str) -> list[Any]:
    """A batch call's list argument as a list: None, a string, a mapping or a number is `InvalidInput`."""
    if isinstance(values, str | bytes | bytearray) or not isinstance(values, Sequence):
        raise InvalidInput(f"{what} must be a list, got {type(values).__name__}")
    return list(values)


def _score_texts(texts: object) -> list[str]:
    """`score`'s texts: one string or a list of them."""
    return [texts] if isinstance(texts, str) else _as_list(texts, "texts")


def _check_pairs(images: Sequence[ImageInput], questions: Sequence[str]) -> None:
    if len(images) != len(questions):
        raise InvalidInput(f"answer_batch needs as many questions as images, got {len(questions)} and {len(images)}")


class Blip2Service:
    """The shared BLIP-2 service: captioning, VQA, embeddings and ITM scores, dynamically batched.

    Use `Blip2Service.shared()` for the process-wide instance, or `Blip2Service(settings)` for a private one.
    A private service nobody references any more is garbage-collected with its model, and its worker threads
    stop; `close()` stops it at a known time.
    """

    _shared: ClassVar[Blip2Service | None] = None
    _shared_lock: ClassVar[threading.Lock] = threading.Lock()
    _image_index: ImageIndex | None = None
    """The index `ImageIndex.for_service` made for this service; it lives as long as the service does."""

    def __init__(self, settings: BlipSettings | None = None, *, runtime: Blip2Runtime | None = None) -> None:
        self.settings = settings if settings is not None else BlipSettings()
        self.runtime = runtime if runtime is not None else Blip2Runtime(self.settings)
        self._owns_runtime = runtime is None  # close() unloads only a runtime this service made
        self._started_at = time.monotonic()
        # A weak handler: the worker thread must not keep this service (and its model) alive. Once the service is
        # garbage-collected its batcher stops by itself; `close()` remains the way to stop it at a known time.
        self._batcher: DynamicBatcher[_Request, _Outcome] = DynamicBatcher(
            self._handle,
            max_batch_size=self.settings.max_batch_size,
            max_wait_ms=self.settings.max_wait_ms,
            max_merge_wait_ms=self.settings.max_merge_wait_ms,
            max_queue=self.settings.max_queue,
            name="blip-model-worker",
            on_oom=self.runtime.empty_cache,
            weak_handler=True,
        )

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def shared(cls) -> Blip2Service:
        """The process-wide service, created on first use from `BlipSettings()` (thread-safe).

        With `BLIP_REMOTE_URL` set it is a `RemoteService` that forwards to that shared daemon, so every
        interface built on `shared()` uses the daemon's model instead of loading its own.
        """
        with cls._shared_lock:
            if cls._shared is None or cls._shared.closed:
                settings = BlipSettings()
                if settings.remote_url:
                    from .remote import RemoteService

                    cls._shared = RemoteService(
                        settings.remote_url,
                        token=settings.token,
                        settings=settings,
                        send_files=settings.remote_send_files,
                    )
                else:
                    cls._shared = cls(settings)
            return cls._shared

    @classmethod
    def set_shared(cls, service: Blip2Service | None) -> None:
        """Install (or clear, with None) the process-wide service, e.g. one built from CLI flags."""
        with cls._shared_lock:
            cls._shared = service

    def start(self) -> Blip2Service:
        """Load the captioner now instead of on the first request. Returns self."""
        self.runtime.load_captioner()
        return self

    @property
    def closed(self) -> bool:
        return self._batcher.closed

    def close(self, drain: bool = True, timeout_s: float | None = 30.0) -> None:
        """Stop accepting requests; with `drain`, finish the queued ones first. Every future is resolved.

        Then the models are let go (unless the runtime was passed in): their memory is freed now, even while
        something still holds the closed service (a notebook variable, a `with` block's name).
        """
        self._batcher.close(drain=drain, timeout_s=timeout_s)
        with Blip2Service._shared_lock:
            if Blip2Service._shared is self:
                Blip2Service._shared = None
        if self._owns_runtime and not self._batcher.running:
            self.runtime.unload()

    def __enter__(self) -> Blip2Service:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_listener(self, fn: Callable[[BatchEvent], None]) -> None:
        """Call `fn(BatchEvent)` after every batch (metrics, dashboards)."""
        self._batcher.add_listener(fn)

    # ------------------------------------------------------------------ the worker side
    def _handle(self, key: Hashable, requests: list[_Request]) -> list[_Outcome | BaseException]:
        """Run one batch of same-key requests on the model (worker thread only)."""
        task = key[0] if isinstance(key, tuple) else key
        start = time.monotonic()
        values: Sequence[Any]
        payloads = [r.payload for r in requests]
        if task in (CAPTION, ANSWER):
            values = self.runtime.generate(payloads, key[1])  # type: ignore[index]
        elif task == EMBED_IMAGE:
            values = self._embed_images_batch(payloads)
        elif task == EMBED_TEXT:
            vectors = self.runtime.text_embeddings(payloads)
            values = [vectors[i] for i in range(len(payloads))]
        elif task == SCORE:
            values = self._score_batch(payloads)
        elif task == LOCATE:
            values = gradcam_batch(self.runtime, [p[0] for p in payloads], [p[1] for p in payloads])
        else:  # pragma: no cover - keys are built in this module
            raise InferenceError(f"unknown task {task!r}")
        done = time.monotonic()
        inference_ms = (done - start) * 1000.0
        return [
            v
            if isinstance(v, BaseException)
            else _Outcome(v, (start - r.submitted) * 1000.0, inference_ms, len(requests))
            for r, v in zip(requests, values, strict=True)
        ]

    def _embed_images_batch(self, items: list[ImageItem]) -> list[Any]:
        query = self.runtime.image_query_embeddings(items)
        pooled = self.runtime.pool_queries(query)
        return [(pooled[i], query[i]) for i in range(len(items))]

    def _score_batch(self, payloads: list[tuple[ImageItem, list[str]]]) -> list[Any]:
        import torch

        images = [p[0] for p in payloads]
        query = self.runtime.image_query_embeddings(images)
        all_texts = [t for _, texts in payloads for t in texts]
        text_vecs = self.runtime.text_embeddings(all_texts)
        pair_images = [img for img, texts in payloads for _ in texts]
        itm = self.runtime.itm(pair_images, all_texts)
        out: list[Any] = []
        offset = 0
        for i, (_, texts) in enumerate(payloads):
            t = text_vecs[offset : offset + len(texts)]
            itc = torch.einsum("qd,td->tq", query[i], t).max(dim=1).values.tolist()
            out.append(list(zip(texts, itc, itm[offset : offset + len(texts)], strict=True)))
            offset += len(texts)
        return out

    # ------------------------------------------------------------------ caller side helpers
    def _load(self, image: ImageInput) -> LoadedImage:
        return load_image(image, self.settings)

    def _image_item(self, image: ImageInput, *, retrieval: bool) -> tuple[ImageItem, ImageInfo]:
        loaded = self._load(image)
        item = self.runtime.preprocess(loaded.image, loaded.sha256, retrieval=retrieval)
        return item, loaded.info

    def _check_open(self) -> None:
        """Raise `ServiceClosed` once `close()` has been called."""
        if self.closed:
            raise ServiceClosed(_CLOSED)

    def _submit(self, key: Hashable, payload: Any, *, expected: bool = False) -> concurrent.futures.Future[_Outcome]:
        """Queue one request; `expected`: it was announced with the batcher's `expect()`, which this call ends."""
        try:
            self._check_open()
        except ServiceClosed:
            if expected:
                self._batcher.unexpect()
            raise
        return self._batcher.submit(
            key, _Request(payload, time.monotonic()), timeout_s=self.settings.request_timeout_s, expected=expected
        )

    def _open_call(self, count: int, *, retrieval: bool = False) -> None:
        """What a batch call checks once, before any per-item work: the service is open and its model loads.

        So a closed service or a model that cannot load fails the call once, not once per image.
        """
        self._check_open()
        if count and not self.runtime.loaded(retrieval=retrieval):
            (self.runtime.load_retrieval if retrieval else self.runtime.load_captioner)()

    async def _aopen_call(self, count: int, *, retrieval: bool = False) -> None:
        """`_open_call` for the async twins: a model still to load loads off the event loop."""
        self._check_open()
        if count and not self.runtime.loaded(retrieval=retrieval):
            await _in_prepare_thread(self.runtime.load_retrieval if retrieval else self.runtime.load_captioner)

    @staticmethod
    def _wait(future: concurrent.futures.Future[_Outcome]) -> _Outcome:
        try:
            return future.result()
        except concurrent.futures.CancelledError as exc:
            raise BlipError("The request was cancelled before it ran.") from exc

    def _start_request(
        self,
        prepare: Callable[[], tuple[Hashable, Any, T]],
        settle: Callable[[BaseException | None, tuple[_Outcome, T] | None], None],
    ) -> Callable[[], None]:
        """Run `prepare` on the preparation pool, submit its request from there, and `settle` once with the outcome.

        `settle(exc, None)` or `settle(None, (outcome, extra))`, where extra is `prepare`'s third value (image
        info); it is called from a pool thread or the model's worker, and exactly once unless the request is
        abandoned before it was submitted. The thread submits as soon as its image is ready (with 32 asyncio
        callers, waiting for their task to resume first filled batches of 29-30 instead of 31), and the caller
        wakes once per request, when its result is ready. Until it is submitted or given up, the request is
        announced to the batcher (`expect()`), so an idle worker waits for a burst still being prepared instead of
        starting on its first request alone; not while `prepare` waits on a download or a model load. Returns
        `abandon()`: the request is cancelled if it was submitted, and never submitted if it was not.
        """
        lock = threading.Lock()
        submitted: list[concurrent.futures.Future[_Outcome]] = []
        abandoned = False
        announced = False  # to the batcher, until submitted or given up: ended exactly once, under `lock`

        def withdraw() -> None:  # `lock` held
            nonlocal announced
            if announced:
                announced = False
                self._batcher.unexpect()

        def deliver(extra: T, future: concurrent.futures.Future[_Outcome]) -> None:  # when the batch is done
            try:
                # Not `self._wait`: the future keeps this callback, and must not keep the service alive.
                outcome = Blip2Service._wait(future)  # done already: maps a cancelled request as the sync calls do
            except BaseException as exc:
                settle(exc, None)
            else:
                settle(None, (outcome, extra))

        def on_wait() -> Callable[[], None] | None:  # `prepare` waits (a download, a model load): not coming soon
            with lock:
                if not announced:
                    return None
                withdraw()
            return renew

        def renew() -> None:  # that wait is over: the request is on its way again, unless abandoned meanwhile
            nonlocal announced
            with lock:
                if not abandoned and not announced:
                    self._batcher.expect()
                    announced = True

        def run() -> None:  # on a pool thread
            nonlocal announced
            _prepare.set_wait_hook(on_wait)
            try:
                key, payload, extra = prepare()
                with lock:
                    if abandoned:
                        return
                    expected, announced = announced, False  # `_submit` ends the announcement, whatever happens
                    future = self._submit(key, payload, expected=expected)
                    submitted.append(future)
            except BaseException as exc:  # bad input, overload, a closed service: the caller gets it
                with lock:
                    withdraw()
                settle(exc, None)
                return
            finally:
                _prepare.set_wait_hook(None)
            future.add_done_callback(functools.partial(deliver, extra))

        def abandon() -> None:
            nonlocal abandoned
            with ctrl_c_deferred():  # a second Ctrl-C must not leave a lock held or the count wrong
                with lock:
                    abandoned = True
                    withdraw()
                for future in submitted:
                    future.cancel()

        try:
            # A Ctrl-C in the middle would leave the batcher's lock held (every later call would wait for good), or
            # the request counted as on its way for good: it is raised once the books are closed.
            with ctrl_c_deferred():
                self._batcher.expect()
                announced = True
                _prepare_in_thread(run)
        except BaseException:  # that Ctrl-C
            abandon()
            raise
        return abandon

    def _request(self, prepare: Callable[[], tuple[Hashable, Any, T]]) -> tuple[_Outcome, T]:
        """A sync call: prepare on the pool (see `_prepare`), submit, and wait for the outcome and `prepare`'s extra."""
        # On a pool thread, waiting for the pool could wait forever; with every pool thread waiting on a download or a
        # model load, a caller of a loaded model would wait for them: prepare here, as before the pool.
        if _prepare.in_pool_thread() or _prepare.pool().stalled():
            key, payload, extra = prepare()
            return self._wait(self._submit(key, payload)), extra
        done = threading.Lock()  # held until settled: lighter than a Future's condition, for one waiter
        done.acquire()
        box: list[Any] = []

        def settle(exc: BaseException | None, value: tuple[_Outcome, T] | None) -> None:
            box.append((exc, value))
            done.release()

        abandon = self._start_request(prepare, settle)
        try:
            done.acquire()
        except BaseException:  # Ctrl-C while waiting
            abandon()
            raise
        exc, value = box[0]
        if exc is not None:
            raise exc
        return cast(tuple[_Outcome, T], value)

    async def _arequest(self, prepare: Callable[[], tuple[Hashable, Any, T]]) -> tuple[_Outcome, T]:
        """The async `_request`: the outcome reaches the loop through its mailbox, one wake-up per batch.

        If this task is cancelled meanwhile, the request is abandoned. The waiter is always settled, unless the
        task has gone.
        """
        loop = asyncio.get_running_loop()
        mailbox = _mailbox(loop)
        waiter: asyncio.Future[tuple[_Outcome, T]] = loop.create_future()

        def settle(exc: BaseException | None, value: tuple[_Outcome, T] | None) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is waiting any more
                mailbox.post(_settle, waiter, exc, value)

        abandon = self._start_request(prepare, settle)
        try:
            return await waiter
        except asyncio.CancelledError:
            abandon()
            raise

    @staticmethod
    async def _await(future: concurrent.futures.Future[_Outcome]) -> _Outcome:
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.cancel()
            raise

    @staticmethod
    def _timing(outcome: _Outcome, began: float) -> Timing:
        return Timing(
            queue_ms=round(outcome.queue_ms, 3),
            inference_ms=round(outcome.inference_ms, 3),
            total_ms=round((time.monotonic() - began) * 1000.0, 3),
            batch_size=outcome.batch_size,
        )

    # ------------------------------------------------------------------ caption / answer
    def _generation_params(self, params: GenerationParams | None, gen: dict[str, Any]) -> GenerationParams:
        """Validated decoding parameters within this service's limits (`InvalidInput` otherwise)."""
        p = GenerationParams.from_kwargs(params, **gen)
        if p.max_new_tokens > self.settings.max_new_tokens_limit:
            raise InvalidInput(
                f"max_new_tokens must be <= {self.settings.max_new_tokens_limit} (BLIP_MAX_NEW_TOKENS_LIMIT), "
                f"got {p.max_new_tokens}"
            )
        return p

    def _prepare_generation(
        self, task: str, image: ImageInput, text: str | None, params: GenerationParams | None, gen: dict[str, Any]
    ) -> tuple[Hashable, GenerationItem, ImageInfo, GenerationParams]:
        p = self._generation_params(params, gen)
        check_prompt(text, "question" if task == ANSWER else "prompt")
        if task == ANSWER:
            if not text or not text.strip():
                raise InvalidInput("question must be a non-empty string, e.g. 'What color is the car?'")
            prompt: str | None = VQA_TEMPLATE.format(question=text.strip())
        else:
            prompt = text
        item, info = self._image_item(image, retrieval=False)
        gen_item = GenerationItem(image=item, prompt_ids=self.runtime.encode_prompt(prompt))
        self.runtime.check_length(gen_item.prompt_ids, p.max_new_tokens)
        # Seeded sampling runs alone so the same seed gives the same text whatever else is queued.
        key: Hashable = (task, p, object()) if (p.do_sample and p.seed is not None) else (task, p)
        return key, gen_item, info, p

    @staticmethod
    def _caption_result(outcome: _Outcome, info: ImageInfo, prompt: str | None, began: float) -> CaptionResult:
        texts: list[GeneratedText] = outcome.value
        return CaptionResult(
            caption=texts[0].text,
            captions=texts,
            prompt=prompt,
            image=info,
            timing=Blip2Service._timing(outcome, began),
        )

    @staticmethod
    def _answer_result(outcome: _Outcome, info: ImageInfo, question: str, began: float) -> AnswerResult:
        texts: list[GeneratedText] = outcome.value
        return AnswerResult(
            answer=texts[0].text,
            answers=texts,
            question=question,
            image=info,
            timing=Blip2Service._timing(outcome, began),
        )

    def caption(
        self, image: ImageInput, prompt: str | None = None, *, params: GenerationParams | None = None, **gen: Any
    ) -> CaptionResult:
        """Caption one image; with `prompt`, continue that text (prompted captioning)."""
        began = time.monotonic()
        outcome, info = self._request(lambda: self._prepare_generation(CAPTION, image, prompt, params, gen)[:3])
        return self._caption_result(outcome, info, prompt, began)

    async def acaption(
        self, image: ImageInput, prompt: str | None = None, *, params: GenerationParams | None = None, **gen: Any
    ) -> CaptionResult:
        """Async `caption`: decoding runs in a thread, the model call is awaited."""
        began = time.monotonic()
        outcome, info = await self._arequest(lambda: self._prepare_generation(CAPTION, image, prompt, params, gen)[:3])
        return self._caption_result(outcome, info, prompt, began)

    def answer(
        self, image: ImageInput, question: str, *, params: GenerationParams | None = None, **gen: Any
    ) -> AnswerResult:
        """Answer a question about one image (prompt `Question: {q} Answer:`)."""
        began = time.monotonic()
        outcome, info = self._request(lambda: self._prepare_generation(ANSWER, image, question, params, gen)[:3])
        return self._answer_result(outcome, info, question, began)

    async def aanswer(
        self, image: ImageInput, question: str, *, params: GenerationParams | None = None, **gen: Any
    ) -> AnswerResult:
        """Async `answer`."""
        began = time.monotonic()
        outcome, info = await self._arequest(lambda: self._prepare_generation(ANSWER, image, question, params, gen)[:3])
        return self._answer_result(outcome, info, question, began)

    # ------------------------------------------------------------------ batch forms
    def _run_many(
        self,
        count: int,
        prepare: Callable[[int], tuple[Hashable, Any, Any]],
        finish: Callable[[int, _Outcome, Any], T],
        return_exceptions: bool,
        on_progress: ProgressFn | None,
    ) -> list[T | BlipError]:
        """Submit `count` requests with a bounded window (backing off on Overloaded), collect in order.

        Items are prepared a batch's worth at a time and then submitted together, so the worker finds a full
        batch instead of starting on the first few while the rest are still being decoded. Outcomes come back
        through a queue that the futures' callbacks fill, so the caller's thread waits on a C lock only: a Ctrl-C
        there cannot leave a future's lock held, which `concurrent.futures.wait` could (the worker then waited for
        it for good), nor break a `threading.Condition` midway (a `RuntimeError` instead of the interrupt).
        """
        results: list[T | BlipError | None] = [None] * count
        window = self._batch_window()
        chunk = max(1, self.settings.max_batch_size)
        pending: dict[concurrent.futures.Future[_Outcome], tuple[int, Any]] = {}
        prepared: collections.deque[tuple[int, Hashable, Any, Any]] = collections.deque()
        outcomes: queue.SimpleQueue[tuple[concurrent.futures.Future[_Outcome], _Outcome | BaseException]]
        outcomes = queue.SimpleQueue()
        done_count = 0
        next_index = 0
        deadline = time.monotonic() + self.settings.request_timeout_s

        def arrived(future: concurrent.futures.Future[_Outcome]) -> None:  # on the worker (or here, if done already)
            try:
                outcomes.put((future, Blip2Service._wait(future)))
            except BaseException as exc:
                outcomes.put((future, exc))

        def record(index: int, value: T | BlipError) -> None:
            nonlocal done_count
            results[index] = value
            done_count += 1
            if on_progress is not None:
                on_progress(done_count, count)

        try:
            while next_index < count or prepared or pending:
                while next_index < count and len(prepared) + len(pending) < window and len(prepared) < chunk:
                    index = next_index
                    next_index += 1
                    try:
                        prepared.append((index, *prepare(index)))
                    except BlipError as exc:
                        if not return_exceptions:
                            raise
                        record(index, exc)
                while prepared:
                    index, key, payload, meta = prepared[0]
                    try:
                        with ctrl_c_deferred():  # the future's lock is taken here too
                            future = self._submit(key, payload)
                            pending[future] = (index, meta)
                            future.add_done_callback(arrived)
                    except Overloaded as exc:
                        if pending:
                            break  # wait for some of ours to finish, then retry
                        if time.monotonic() + exc.retry_after_s > deadline:
                            raise
                        time.sleep(min(exc.retry_after_s, 0.5))
                        continue
                    except BlipError as exc:
                        if not return_exceptions:
                            raise
                        record(index, exc)
                    prepared.popleft()
                if not pending:
                    continue
                finished = []
                if not (next_index < count and not prepared and len(pending) < window):
                    finished.append(outcomes.get())  # else there is room in the window: prepare more meanwhile
                with contextlib.suppress(queue.Empty):
                    while True:
                        finished.append(outcomes.get_nowait())
                for fut, outcome in finished:
                    index, meta = pending.pop(fut)
                    try:
                        if isinstance(outcome, BaseException):
                            raise outcome
                        record(index, finish(index, outcome, meta))
                    except BlipError as exc:
                        if not return_exceptions:
                            raise
                        record(index, exc)
                if finished:
                    deadline = time.monotonic() + self.settings.request_timeout_s
        except BaseException:
            with ctrl_c_deferred():
                for fut in pending:  # a failure or an interrupted caller: nobody will collect these any more
                    fut.cancel()
            raise
        return [r for r in results if r is not None]

    def caption_batch(
        self,
        images: Sequence[ImageInput],
        prompt: str | None = None,
        *,
        params: GenerationParams | None = None,
        return_exceptions: bool = False,
        on_progress: ProgressFn | None = None,
        **gen: Any,
    ) -> list[CaptionResult | BlipError]:
        """Caption many images (batched); with `return_exceptions`, a bad image yields its error in place.

        Bad parameters, a bad prompt or a model that cannot load fail the whole call at once, whatever
        `return_exceptions` says.
        """
        images = _as_list(images, "images")
        params, gen = self._generation_params(params, gen), {}
        check_prompt(prompt)
        self._open_call(len(images))
        if images:
            self.runtime.encode_prompt(prompt)  # a prompt over the token limit fails the call, not each image
        began = time.monotonic()

        def prepare(i: int) -> tuple[Hashable, Any, Any]:
            key, item, info, _ = self._prepare_generation(CAPTION, images[i], prompt, params, gen)
            return key, item, info

        return self._run_many(
            len(images),
            prepare,
            lambda i, o, info: self._caption_result(o, info, prompt, began),
            return_exceptions,
            on_progress,
        )

    def answer_batch(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str],
        *,
        params: GenerationParams | None = None,
        return_exceptions: bool = False,
        on_progress: ProgressFn | None = None,
        **gen: Any,
    ) -> list[AnswerResult | BlipError]:
        """Answer `questions[i]` about `images[i]` for every pair (batched); bad parameters fail the whole call."""
        images, questions = _as_list(images, "images"), _as_list(questions, "questions")
        _check_pairs(images, questions)
        params, gen = self._generation_params(params, gen), {}
        self._open_call(len(images))
        began = time.monotonic()

        def prepare(i: int) -> tuple[Hashable, Any, Any]:
            key, item, info, _ = self._prepare_generation(ANSWER, images[i], questions[i], params, gen)
            return key, item, info

        return self._run_many(
            len(images),
            prepare,
            lambda i, o, info: self._answer_result(o, info, questions[i], began),
            return_exceptions,
            on_progress,
        )

    async def acaption_batch(
        self,
        images: Sequence[ImageInput],
        prompt: str | None = None,
        *,
        params: GenerationParams | None = None,
        return_exceptions: bool = False,
        on_progress: ProgressFn | None = None,
        **gen: Any,
    ) -> list[CaptionResult | BlipError]:
        """Async `caption_batch`; `on_progress` may be a plain function or a coroutine function."""
        images = _as_list(images, "images")
        params, gen = self._generation_params(params, gen), {}
        check_prompt(prompt)
        await self._aopen_call(len(images))
        if images:
            self.runtime.encode_prompt(prompt)  # a prompt over the token limit fails the call, not each image
        return await self._gather(
            [lambda img=img: self.acaption(img, prompt, params=params, **gen) for img in images],  # type: ignore[misc]
            return_exceptions,
            on_progress,
        )

    async def aanswer_batch(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str],
        *,
        params: GenerationParams | None = None,
        return_exceptions: bool = False,
        on_progress: ProgressFn | None = None,
        **gen: Any,
    ) -> list[AnswerResult | BlipError]:
        """Async `answer_batch`."""
        images, questions = _as_list(images, "images"), _as_list(questions, "questions")
        _check_pairs(images, questions)
        params, gen = self._generation_params(params, gen), {}
        await self._aopen_call(len(images))
        return await self._gather(
            [
                lambda img=img, q=q: self.aanswer(img, q, params=params, **gen)  # type: ignore[misc]
                for img, q in zip(images, questions, strict=True)
            ],
            return_exceptions,
            on_progress,
        )

    def _batch_window(self) -> int:
        """How many requests of one batch call may be in flight at once."""
        return max(2 * self.settings.max_batch_size, 1)

    async def _gather(
        self,
        calls: Sequence[Callable[[], Awaitable[T]]],
        return_exceptions: bool,
        on_progress: ProgressFn | None,
    ) -> list[T | BlipError]:
        """Run calls with a bounded window, retrying on Overloaded, reporting progress as each finishes."""
        window = asyncio.Semaphore(self._batch_window())
        total = len(calls)
        done = 0

        async def one(call: Callable[[], Awaitable[T]]) -> T | BlipError:
            nonlocal done
            async with window:
                deadline = time.monotonic() + self.settings.request_timeout_s
                while True:
                    try:
                        value: T | BlipError = await call()
                        break
                    except Overloaded as exc:
                        if time.monotonic() + exc.retry_after_s > deadline:
                            if not return_exceptions:
                                raise
                            value = exc
                            break
                        await asyncio.sleep(min(exc.retry_after_s, 0.5))
                    except BlipError as exc:
                        if not return_exceptions:
                            raise
                        value = exc
                        break
            done += 1
            if on_progress is not None:
                maybe = on_progress(done, total)
                if asyncio.iscoroutine(maybe):
                    await maybe
            return value

        tasks = [asyncio.ensure_future(one(c)) for c in calls]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    # ------------------------------------------------------------------ embeddings and scores
    def _embedding_result(self, outcome: _Outcome, info: ImageInfo, include_query_vectors: bool) -> EmbeddingResult:
        pooled, query = outcome.value
        vector = pooled.tolist()
        return EmbeddingResult(
            kind="image",
            vector=vector,
            dim=len(vector),
            model=self.settings.retrieval_model,
            image=info,
            query_vectors=query.tolist() if include_query_vectors else None,
        )

    def _prepare_embed_image(self, image: ImageInput) -> tuple[Hashable, Any, Any]:
        item, info = self._image_item(image, retrieval=True)
        return (EMBED_IMAGE,), item, info

    def embed_images(
        self,
        images: Sequence[ImageInput],
        *,
        include_query_vectors: bool = False,
        return_exceptions: bool = False,
        on_progress: ProgressFn | None = None,
    ) -> list[EmbeddingResult | BlipError]:
        """L2-normalised image embeddings in the space shared with `embed_texts` (retrieval model)."""
        images = _as_list(images, "images")
        self._open_call(len(images), retrieval=True)
        return self._run_many(
            len(images),
            lambda i: self._prepare_embed_image(images[i]),
            lambda i, o, info: self._embedding_result(o, info, include_query_vectors),
            return_exceptions,
            on_progress,
        )

    async def aembed_images(
        self,
        images: Sequence[ImageInput],
        *,
        include_query_vectors: bool = False,
        return_exceptions: bool = False,
        on_progress: ProgressFn | None = None,
    ) -> list[EmbeddingResult | BlipError]:
        """Async `embed_images`."""
        images = _as_list(images, "images")
        await self._aopen_call(len(images), retrieval=True)

        async def one(image: ImageInput) -> EmbeddingResult:
            outcome, info = await self._arequest(lambda: self._prepare_embed_image(image))
            return self._embedding_result(outcome, info, include_query_vectors)

        return await self._gather(
            [lambda img=img: one(img) for img in images],  # type: ignore[misc]
            return_exceptions,
            on_progress,
        )

    def _prepare_texts(self, texts: Iterable[str]) -> tuple[list[str], list[str]]:
        """The texts as given (a list) and as the retrieval model gets them; loads that model."""
        if isinstance(texts, str | bytes) or not isinstance(texts, Iterable):
            raise InvalidInput(f"embed_texts takes a list of strings, not {type(texts).__name__}")
        given = list(texts)
        self.runtime.load_retrieval()
        return given, self.runtime.tokenize_texts(given)

    def _text_result(self, outcome: _Outcome, text: str) -> EmbeddingResult:
        vector = outcome.value.tolist()
        return EmbeddingResult(
            kind="text", vector=vector, dim=len(vector), model=self.settings.retrieval_model, text=text
        )

    def embed_texts(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        """L2-normalised text embeddings in the space shared with `embed_images`."""
        given, clean = self._prepare_texts(texts)
        results = self._run_many(
            len(clean),
            lambda i: ((EMBED_TEXT,), clean[i], None),
            lambda i, o, _: self._text_result(o, given[i]),
            False,
            None,
        )
        return cast(list[EmbeddingResult], results)  # without return_exceptions, a failure raises

    async def aembed_texts(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        """Async `embed_texts`."""
        given, clean = await _in_prepare_thread(functools.partial(self._prepare_texts, texts))

        async def one(i: int) -> EmbeddingResult:
            return self._text_result(await self._await(self._submit((EMBED_TEXT,), clean[i])), given[i])

        if len(clean) == 1:  # a query: one request needs no window (and fails like any single call)
            return [await one(0)]
        results = await self._gather([functools.partial(one, i) for i in range(len(clean))], False, None)
        return cast(list[EmbeddingResult], results)

    def _prepare_score(self, image: ImageInput, texts: Sequence[str]) -> tuple[Hashable, Any, ImageInfo]:
        """`texts` is already a list (`_score_texts`)."""
        if not texts:
            raise InvalidInput("score needs at least one text to compare with the image")
        if len(texts) > 64:
            raise InvalidInput(f"score takes at most 64 texts per call, got {len(texts)}")
        _, clean = self._prepare_texts(texts)
        item, info = self._image_item(image, retrieval=True)
        return (SCORE,), (item, clean), info

    def _score_result(self, outcome: _Outcome, texts: Sequence[str], info: ImageInfo, began: float) -> ScoreResult:
        scores = [
            TextScore(text=text, itc=float(itc), itm_probability=float(p))
            for text, (_, itc, p) in zip(texts, outcome.value, strict=True)
        ]
        best = max(scores, key=lambda s: s.itm_probability).text
        return ScoreResult(scores=scores, best=best, image=info, timing=self._timing(outcome, began))

    def score(self, image: ImageInput, texts: Sequence[str]) -> ScoreResult:
        """How well each text matches the image: ITC cosine similarity and ITM probability."""
        began = time.monotonic()
        texts = _score_texts(texts)
        outcome, info = self._request(lambda: self._prepare_score(image, texts))
        return self._score_result(outcome, texts, info, began)

    async def ascore(self, image: ImageInput, texts: Sequence[str]) -> ScoreResult:
        """Async `score`."""
        began = time.monotonic()
        texts = _score_texts(texts)
        outcome, info = await self._arequest(lambda: self._prepare_score(image, texts))
        return self._score_result(outcome, texts, info, began)

    # ------------------------------------------------------------------ introspection
    def stats(self) -> ServiceStats:
        """Counters: requests, batches, batch-size histogram, queue depth, rejections, cache hits, errors."""
        b = self._batcher.stats()
        rt = self.runtime
        return ServiceStats(
            requests=b.requests,
            batches=b.batches,
            batch_size_histogram=dict(b.batch_size_histogram),
            queue_depth=b.queue_depth,
            rejected=b.rejected,
            cancelled=b.cancelled,
            expired=b.expired,
            errors=b.errors,
            completed=b.completed,
            retries=b.retries,
            cache_hits=rt.feature_cache.hits + rt.retrieval_cache.hits,
            cache_misses=rt.feature_cache.misses + rt.retrieval_cache.misses,
            prefix_cache_hits=getattr(rt, "prefix_cache_hits", 0),
            prefix_cache_misses=getattr(rt, "prefix_cache_misses", 0),
            graph_batches=decoder.batches if (decoder := getattr(rt, "decoder", None)) else 0,
            graphs_captured=decoder.captured if decoder else 0,
            graph_error=decoder.graph_error if decoder else None,
            per_task={k: TaskStats(requests=v[0], batches=v[1], errors=v[2]) for k, v in b.per_task.items()},
            models_loaded=rt.models_loaded,
            model_load_s=round(rt.model_load_s, 3),
            uptime_s=round(time.monotonic() - self._started_at, 3),
        )

    def model_info(self) -> ModelInfo:
        """Which checkpoints, device and dtype the service runs, what it can do, and its limits."""
        s = self.settings
        return ModelInfo(
            model=s.model,
            retrieval_model=s.retrieval_model,
            retrieval_loaded=self.runtime.retrieval_loaded,
            device=self.runtime.device,
            dtype=str(self.runtime.dtype).replace("torch.", ""),
            capabilities=["caption", "prompted_caption", "answer", "embed_image", "embed_text", "score", "locate"],
            limits={
                "max_batch_size": s.max_batch_size,
                "max_wait_ms": s.max_wait_ms,
                "max_queue": s.max_queue,
                "request_timeout_s": s.request_timeout_s,
                "max_image_bytes": s.max_image_bytes,
                "max_image_pixels": s.max_image_pixels,
                "max_new_tokens": s.max_new_tokens_limit,
                "allow_urls": s.allow_urls,
            },
            num_query_tokens=self.runtime.num_query_tokens,
        )

    # ------------------------------------------------------------------ grounding (ITM Grad-CAM)
    def _prepare_locate(self, image: ImageInput, text: str) -> tuple[Hashable, Any, LoadedImage]:
        if not isinstance(text, str) or not text.strip():
            raise InvalidInput("locate needs a non-empty text to find in the image, e.g. 'a red car'")
        _, (clean,) = self._prepare_texts([text])
        loaded = self._load(image)
        item = self.runtime.preprocess(loaded.image, loaded.sha256, retrieval=True)
        return (LOCATE,), (item, clean), loaded

    @staticmethod
    def _locate_result(outcome: _Outcome, loaded: LoadedImage, text: str, began: float) -> LocateResult:
        grid, probability, layer = outcome.value
        timing = Blip2Service._timing(outcome, began)
        return build_locate_result(loaded.image, loaded.info, text, grid, probability, layer, timing)

    def locate(self, image: ImageInput, text: str) -> LocateResult:
        """Where `text` matches in the image: ITM Grad-CAM heatmap (image size, [0, 1]), peak and box."""
        began = time.monotonic()
        outcome, loaded = self._request(lambda: self._prepare_locate(image, text))
        return self._locate_result(outcome, loaded, text, began)

    async def alocate(self, image: ImageInput, text: str) -> LocateResult:
        """Async `locate`."""
        began = time.monotonic()
        outcome, loaded = await self._arequest(lambda: self._prepare_locate(image, text))
        return await asyncio.to_thread(self._locate_result, outcome, loaded, text, began)
