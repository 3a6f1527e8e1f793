"""A private service nobody holds any more is garbage-collected: its model freed, its worker threads stopped.

Every request in flight when the last reference goes is still resolved, and `close()` works as before.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
import time
import weakref
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import pytest
from _testlib import GatedRuntime

from blip_tools import Blip2Service, BlipSettings, InvalidInput, ServiceClosed
from blip_tools.batching import DynamicBatcher
from blip_tools.index import ImageIndex

JOIN_S = 10.0


def _threads(svc: Blip2Service) -> tuple[threading.Thread, threading.Thread]:
    """The service's batcher threads (the worker and the deadline reaper)."""
    return svc._batcher._thread, svc._batcher._reaper


def _assert_collected(ref: weakref.ref[Any], what: str) -> None:
    """`ref` dies within `JOIN_S` (a thread that just handed back a result may still hold it for a moment)."""
    deadline = time.monotonic() + JOIN_S
    while ref() is not None and time.monotonic() < deadline:
        gc.collect()
        if ref() is not None:
            time.sleep(0.02)
    obj = ref()
    if obj is not None:
        holders = [type(r).__name__ for r in gc.get_referrers(obj)]
        del obj
        pytest.fail(f"{what} was not collected; held by {holders}")


def _assert_stopped(threads: tuple[threading.Thread, ...]) -> None:
    for thread in threads:
        thread.join(JOIN_S)
        assert not thread.is_alive(), f"{thread.name} still runs {JOIN_S} s after its service was dropped"


def _gated(settings: BlipSettings) -> tuple[Blip2Service, GatedRuntime]:
    s = settings.model_copy(update={"max_batch_size": 8, "max_wait_ms": 0.0})
    runtime = GatedRuntime(s)
    return Blip2Service(s, runtime=runtime).start(), runtime


def test_a_dropped_private_service_is_collected_with_its_model_and_threads(
    settings: BlipSettings, make_image: Callable[..., Any]
) -> None:
    svc = Blip2Service(settings)
    assert svc.caption(make_image(1), max_new_tokens=4).caption is not None
    assert asyncio.run(svc.acaption(make_image(2), max_new_tokens=4)).caption is not None  # the prepare pool
    assert len(svc.embed_texts(["a red car"])[0].vector) > 0
    service, threads = weakref.ref(svc), _threads(svc)
    captioner = weakref.ref(svc.runtime.load_captioner().model)
    retrieval = weakref.ref(svc.runtime.load_retrieval().model)
    del svc

    _assert_collected(service, "the dropped service")
    _assert_stopped(threads)
    _assert_collected(captioner, "the dropped service's captioner")
    _assert_collected(retrieval, "the dropped service's retrieval model")


def test_a_dropped_service_frees_its_model_without_a_full_collection(
    settings: BlipSettings, make_image: Callable[..., Any]
) -> None:
    """In a notebook a service is old when it is dropped: its objects sit in the collector's oldest generation,
    which is walked only now and then. Nothing may tie the model into a reference cycle (a prompt cache holding the
    runtime's bound method did): dropping the service frees it at once, with only young collections running."""
    svc = Blip2Service(settings)
    assert svc.caption(make_image(1), max_new_tokens=4).caption is not None
    captioner = weakref.ref(svc.runtime.load_captioner().model)
    runtime = weakref.ref(svc.runtime)
    gc.collect()  # everything alive now is in the oldest generation
    del svc
    deadline = time.monotonic() + JOIN_S
    while captioner() is not None and time.monotonic() < deadline:
        gc.collect(1)  # young collections only, as a running program makes them
        time.sleep(0.02)
    assert runtime() is None, "the dropped service's runtime waits for a full garbage collection"
    assert captioner() is None, "the dropped service's model waits for a full garbage collection"


def test_close_frees_the_models_while_the_service_is_still_held(
    settings: BlipSettings, make_image: Callable[..., Any]
) -> None:
    """`close()` lets the models go at a known moment, though a name still holds the closed service (a notebook
    variable, a `with` block's); a runtime passed in by the caller is the caller's and stays loaded."""
    with Blip2Service(settings) as svc:
        assert svc.caption(make_image(1), max_new_tokens=4).caption is not None
        assert len(svc.embed_texts(["a red car"])[0].vector) > 0
        captioner = weakref.ref(svc.runtime.load_captioner().model)
        retrieval = weakref.ref(svc.runtime.load_retrieval().model)
    assert not svc.runtime.loaded() and not svc.runtime.loaded(retrieval=True)
    _assert_collected(captioner, "a closed service's captioner")
    _assert_collected(retrieval, "a closed service's retrieval model")
    with pytest.raises(ServiceClosed):
        svc.caption(make_image(1), max_new_tokens=4)

    from blip_tools.runtime import Blip2Runtime

    runtime = Blip2Runtime(settings)
    with Blip2Service(settings, runtime=runtime) as borrowed:
        assert borrowed.caption(make_image(2), max_new_tokens=4).caption is not None
    assert runtime.loaded()


def test_a_dropped_toolkit_or_embeddings_frees_its_private_service(
    settings: BlipSettings, make_image: Callable[..., Any], tmp_path: Path
) -> None:
    from blip_tools.langchain import Blip2Embeddings, Blip2Toolkit

    s = settings.model_copy(update={"index_path": tmp_path / "index.sqlite"})
    image = tmp_path / "a.png"
    make_image(3).save(image)

    toolkit = Blip2Toolkit(settings=s)
    tools = {tool.name: tool for tool in toolkit.get_tools()}
    assert "Caption" in str(tools["caption_image"].invoke({"image": str(image), "max_new_tokens": 4}))
    tools["search_images"].invoke({"query": "a red car"})  # the index `ImageIndex.for_service` keeps per service
    asyncio.run(tools["answer_question"].ainvoke({"image": str(image), "question": "what?", "max_new_tokens": 4}))
    service, threads = weakref.ref(toolkit.service), _threads(toolkit.service)
    model = weakref.ref(toolkit.service.runtime.load_captioner().model)
    del toolkit, tools
    _assert_collected(service, "the service of a dropped Blip2Toolkit(settings=...)")
    _assert_stopped(threads)
    _assert_collected(model, "the model of a dropped Blip2Toolkit(settings=...)")

    embeddings = Blip2Embeddings(settings=s)
    assert len(embeddings.embed_query("a red car")) > 0
    assert len(embeddings.embed_documents(["a", "b"])) == 2
    assert len(asyncio.run(embeddings.aembed_query("a dog"))) > 0
    assert embeddings.service is not None
    service, threads = weakref.ref(embeddings.service), _threads(embeddings.service)
    model = weakref.ref(embeddings.service.runtime.load_retrieval().model)
    del embeddings
    _assert_collected(service, "the service of a dropped Blip2Embeddings(settings=...)")
    _assert_stopped(threads)
    _assert_collected(model, "the model of a dropped Blip2Embeddings(settings=...)")


def test_a_caller_still_waiting_keeps_the_service_until_its_result(
    settings: BlipSettings, make_image: Callable[..., Any]
) -> None:
    svc, runtime = _gated(settings)
    runtime.gate.clear()
    results: list[Any] = []
    image = make_image(4)
    caller = threading.Thread(target=lambda s: results.append(s.caption(image, max_new_tokens=4)), args=(svc,))
    caller.start()
    assert runtime.entered.wait(timeout=10)
    service, threads = weakref.ref(svc), _threads(svc)
    del svc
    gc.collect()
    assert service() is not None, "a caller still waits on the service: it must stay"
    assert all(thread.is_alive() for thread in threads)

    runtime.gate.set()
    caller.join(JOIN_S)
    assert not caller.is_alive() and len(results) == 1 and results[0].caption is not None
    _assert_collected(service, "the service once its last caller returned")
    _assert_stopped(threads)


def test_an_async_caller_cancelled_after_dropping_its_service_leaves_nothing_hanging(
    settings: BlipSettings, make_image: Callable[..., Any]
) -> None:
    svc, runtime = _gated(settings)
    batcher = svc._batcher
    futures: list[concurrent.futures.Future[Any]] = []
    submit = batcher.submit

    def recording(*args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future = submit(*args, **kwargs)
        futures.append(future)
        return future

    batcher.submit = recording  # type: ignore[method-assign]
    runtime.gate.clear()

    async def scenario(svc: Blip2Service) -> None:
        running = asyncio.create_task(svc.acaption(make_image(5), max_new_tokens=4))
        while not runtime.entered.is_set():
            await asyncio.sleep(0.005)
        queued = asyncio.create_task(svc.acaption(make_image(6), max_new_tokens=4))
        deadline = time.monotonic() + 10
        while batcher.queue_depth < 1:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.005)
        running.cancel()
        queued.cancel()
        outcomes = await asyncio.gather(running, queued, return_exceptions=True)
        assert all(isinstance(o, asyncio.CancelledError) for o in outcomes)

    asyncio.run(scenario(svc))  # the loop is closed: the running request's result has nowhere to go
    service, threads = weakref.ref(svc), _threads(svc)
    del svc
    gc.collect()
    assert service() is not None, "the worker runs a batch of this service: it must stay until the batch ends"

    runtime.gate.set()
    _assert_stopped(threads)
    _assert_collected(service, "the service once its last batch ended")
    assert len(futures) == 2 and all(f.done() for f in futures), "every request must be resolved"
    assert futures[1].cancelled() and futures[0].result().value is not None
    stats = batcher.stats()
    assert (stats.completed, stats.cancelled, stats.queue_depth) == (1, 1, 0)
    assert batcher.closed
    with pytest.raises(ServiceClosed):
        batcher.submit(("caption",), object())


class _Owner:
    """Owns a batcher with a weak handler, as the service does; the handler waits for `gate`."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.batcher: DynamicBatcher[int, int] = DynamicBatcher(
            self.handle, max_batch_size=1, max_wait_ms=0.0, max_queue=8, weak_handler=True
        )

    def handle(self, key: Hashable, items: list[int]) -> list[int]:
        self.entered.set()
        assert self.gate.wait(timeout=30)
        return [item * 10 for item in items]


def test_requests_queued_when_the_owner_goes_fail_with_service_closed() -> None:
    owner = _Owner()
    batcher, gate = owner.batcher, owner.gate
    first = batcher.submit("k", 1)
    assert owner.entered.wait(timeout=10)
    queued = [batcher.submit("k", i) for i in (2, 3, 4)]
    owner_ref = weakref.ref(owner)
    threads = (batcher._thread, batcher._reaper)
    del owner
    gc.collect()
    assert owner_ref() is not None, "the running batch holds its handler's owner"

    gate.set()  # the owner goes when the worker lets go of it, in the worker thread, between two batches
    assert first.result(timeout=JOIN_S) == 10
    for future in queued:
        with pytest.raises(ServiceClosed):
            future.result(timeout=JOIN_S)
    _assert_stopped(threads)
    assert owner_ref() is None
    assert batcher.closed and batcher.stats().dropped == 3
    with pytest.raises(ServiceClosed):
        batcher.submit("k", 5)


def test_weak_handler_needs_a_bound_method() -> None:
    with pytest.raises(InvalidInput, match="bound method"):
        DynamicBatcher(lambda key, items: items, max_batch_size=1, max_wait_ms=0.0, max_queue=1, weak_handler=True)


def test_creating_and_dropping_services_does_not_grow_the_thread_count(
    settings: BlipSettings, make_image: Callable[..., Any]
) -> None:
    image = make_image(7)

    def use_once() -> None:
        svc = Blip2Service(settings)
        assert svc.caption(image, max_new_tokens=2).caption is not None

    use_once()  # anything made once per process (thread pools) is made now
    gc.collect()
    baseline = threading.active_count()
    for _ in range(4):
        use_once()
    deadline = time.monotonic() + JOIN_S
    while True:
        gc.collect()
        count = threading.active_count()
        if count <= baseline or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert count <= baseline, f"{count - baseline} more threads after 4 dropped services: {threading.enumerate()}"


def test_close_still_stops_at_once_and_a_closed_service_is_then_collected(
    settings: BlipSettings, make_image: Callable[..., Any], tmp_path: Path
) -> None:
    previous = Blip2Service._shared
    svc = Blip2Service(settings.model_copy(update={"index_path": tmp_path / "index.sqlite"}))
    try:
        Blip2Service.set_shared(svc)
        service, threads = weakref.ref(svc), _threads(svc)
        assert ImageIndex.for_service(svc) is ImageIndex.for_service(svc)
        assert asyncio.run(svc.acaption(make_image(8), max_new_tokens=4)).caption is not None
        model = weakref.ref(svc.runtime.load_captioner().model)
        del svc
        gc.collect()
        shared = service()
        assert shared is not None and shared is Blip2Service.shared(), "the process-wide service is held"
        assert shared.caption(make_image(9), max_new_tokens=2).caption is not None

        shared.close()
        assert shared.closed
        threads[0].join(0)  # close() returned: the worker has already stopped
        assert not threads[0].is_alive()
        with pytest.raises(ServiceClosed):
            shared.caption(make_image(10))
        assert Blip2Service._shared is not shared
        del shared
        _assert_collected(service, "a closed and dropped service")
        _assert_stopped(threads)
        _assert_collected(model, "the model of a closed and dropped service")
    finally:
        Blip2Service.set_shared(previous)
