"""One model per machine: stdio proxies and a LangChain remote toolkit against one `blip-mcp` HTTP daemon.

The daemon runs in this process (uvicorn in a thread, tiny checkpoint, token required); the proxies are real
`python -m mcp_server --connect URL` subprocesses. The daemon batches up to 4 requests and waits up to a second
for them when idle, so requests from different clients that arrive together deterministically share a batch.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from _testlib import free_port, in_thread, record_mcp_requests

from blip_tools import BlipSettings
from blip_tools.errors import (
    BlipError,
    IndexReadOnly,
    InvalidImage,
    InvalidInput,
    ModelNotAvailable,
    Overloaded,
    PathNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    ServiceClosed,
)
from blip_tools.remote import (
    _CLOSE_GRACE_S,
    RemoteService,
    default_service,
    error_from_text,
    is_loopback_url,
    normalize_url,
    plan_chunks,
    prepare_image,
)

pytestmark = pytest.mark.anyio

TOKEN = "remote-test-token-0123456789"
MAX_BATCH = 4


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    return "asyncio"


class Daemon:
    """`blip-mcp --transport http` in a thread: stoppable and restartable on the same port, same service."""

    def __init__(self, settings: BlipSettings, *, service: Any = None, max_body_bytes: int | None = None) -> None:
        from blip_tools import Blip2Service

        self.owns_service = service is None
        self.service = Blip2Service(settings).start() if service is None else service
        self.max_body_bytes = max_body_bytes
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/mcp"
        self._server: Any = None
        self._thread: threading.Thread | None = None
        self.graceful_shutdown_s = 5.0
        """uvicorn's `timeout_graceful_shutdown`: how long stop() lets calls in flight finish."""

    def start(self) -> None:
        import uvicorn

        from mcp_server import create_server
        from mcp_server.http import HttpConfig, build_http_app, uvicorn_config

        config = HttpConfig(port=self.port, token=TOKEN, max_body_bytes=self.max_body_bytes)
        app = build_http_app(create_server(self.service), config)
        self._server = uvicorn.Server(uvicorn_config(app, config, timeout_graceful_shutdown=self.graceful_shutdown_s))
        self._thread = threading.Thread(target=self._server.run, name="test-daemon", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            assert self._thread.is_alive(), "the daemon thread died while starting"
            assert time.monotonic() < deadline, "the daemon did not start within 30 s"
            time.sleep(0.02)

    def stop(self) -> None:
        assert self._server is not None and self._thread is not None
        self._server.should_exit = True
        self._thread.join(30)
        assert not self._thread.is_alive(), "the daemon did not stop within 30 s"

    def close(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self.stop()
        if self.owns_service:
            self.service.close()


@pytest.fixture(scope="module")
def shared_dir(tmp_path_factory: pytest.TempPathFactory, make_image_module: Callable[..., Any]) -> Path:
    """Images the daemon may read (its only allowed directory)."""
    folder = tmp_path_factory.mktemp("daemon_images")
    for i in range(8):
        make_image_module(300 + i).save(folder / f"img{i}.png")
    return folder


@pytest.fixture(scope="module")
def private_dir(tmp_path_factory: pytest.TempPathFactory, make_image_module: Callable[..., Any]) -> Path:
    """Images only the client side may read (outside the daemon's allowed directory)."""
    folder = tmp_path_factory.mktemp("client_images")
    make_image_module(400).save(folder / "mine.png")
    return folder


@pytest.fixture(scope="module")
def make_image_module() -> Callable[..., Any]:
    import numpy as np
    from PIL import Image

    def make(seed: int, size: tuple[int, int] = (48, 40)) -> Any:
        rng = np.random.default_rng(seed)
        return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")

    return make


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint: Path, shared_dir: Path) -> Iterator[Daemon]:
    from blip_tools.testing import tiny_settings_kwargs

    settings = BlipSettings(
        **tiny_settings_kwargs(tiny_checkpoint),
        max_batch_size=MAX_BATCH,
        max_wait_ms=1000.0,
        allowed_dirs=[shared_dir],
    )
    d = Daemon(settings)
    d.start()
    yield d
    d.close()


SMALL_IMAGE_BYTES = 100_000
"""`max_image_bytes` of the `small_daemon`: its request body limit fits one such image as base64, no more."""


@pytest.fixture(scope="module")
def small_daemon(daemon: Daemon) -> Iterator[Daemon]:
    """A second endpoint on the same service whose body limit is sized for one image of SMALL_IMAGE_BYTES."""
    from mcp_server.http import body_limit_for

    limit = body_limit_for(BlipSettings(max_image_bytes=SMALL_IMAGE_BYTES))
    d = Daemon(daemon.service.settings, service=daemon.service, max_body_bytes=limit)
    d.start()
    yield d
    d.close()


@pytest.fixture(scope="module")
def noise_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Noise PNGs that hardly compress: `n0..n7` of about 47 KB (two fit one request of the `small_daemon`) and
    `big`, about 330 KB: within the default image limit, but as base64 above the `small_daemon`'s body limit."""
    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("noise")
    rng = np.random.default_rng(7)
    for i in range(8):
        Image.fromarray(rng.integers(0, 256, size=(120, 130, 3), dtype=np.uint8), "RGB").save(folder / f"n{i}.png")
    Image.fromarray(rng.integers(0, 256, size=(330, 330, 3), dtype=np.uint8), "RGB").save(folder / "big.png")
    return folder


@pytest.fixture(scope="module")
def remote(daemon: Daemon) -> Iterator[RemoteService]:
    service = RemoteService(daemon.url, token=TOKEN, settings=BlipSettings())
    yield service
    service.close()


@contextmanager
def _stalled_model(daemon: Daemon, let_through: int = 0) -> Iterator[threading.Event]:
    """Hold the daemon's caption/answer batches on the model until the block ends, so a call stays in flight.

    The first `let_through` batches run as usual. Yields an event that is set once a held batch reached the model.
    """
    runtime = daemon.service.runtime
    entered, release = threading.Event(), threading.Event()
    original = runtime.generate
    passed = [0]

    def held(*args: Any, **kwargs: Any) -> Any:
        if passed[0] < let_through:
            passed[0] += 1
            return original(*args, **kwargs)
        entered.set()
        release.wait(60)
        return original(*args, **kwargs)

    runtime.generate = held  # type: ignore[method-assign]
    try:
        yield entered
    finally:
        release.set()
        del runtime.generate  # the class's method again


@contextmanager
def _submitted(daemon: Daemon) -> Iterator[list[concurrent.futures.Future[Any]]]:
    """Record the future of every request the daemon's service queues on its batcher until the block ends."""
    service = daemon.service
    original = service._submit
    futures: list[concurrent.futures.Future[Any]] = []

    def recording(key: Any, payload: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future = original(key, payload, **kwargs)
        futures.append(future)  # from the service's preparation threads: list.append is atomic
        return future

    service._submit = recording  # type: ignore[method-assign]
    try:
        yield futures
    finally:
        del service._submit  # the class's method again


def _proxy_params(url: str, *extra: str) -> Any:
    from mcp.client.stdio import StdioServerParameters

    env = {**os.environ, "BLIP_TOKEN": TOKEN, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_server", "--connect", url, "--log-level", "WARNING", *extra],
        env=env,
    )


@asynccontextmanager
async def _proxies(url: str, count: int, *extra: str) -> AsyncIterator[list[Any]]:
    from mcp import Client

    # One deadline around the whole block (start-up, the test's calls, shutdown): nothing here can hang.
    with anyio.fail_after(180):
        async with AsyncExitStack() as stack:
            clients = []
            for _ in range(count):
                clients.append(await stack.enter_async_context(Client(_proxy_params(url, *extra))))
            yield clients


def _proxy_pids() -> list[int]:
    """Our `--connect` child processes (Linux /proc), to check they never loaded torch."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if b"--connect" in cmdline and int(stat[1]) == os.getpid():
            pids.append(int(entry.name))
    return pids


# ---------------------------------------------------------------------------------------------- the daemon shared
async def test_two_proxies_and_a_langchain_toolkit_share_one_model_and_its_batches(
    daemon: Daemon, remote: RemoteService, shared_dir: Path, service: Any
) -> None:
    from blip_tools.langchain.toolkit import Blip2Toolkit

    toolkit = Blip2Toolkit(service=remote)
    caption_tool = next(t for t in toolkit.get_tools() if t.name == "caption_image")
    paths = [str(shared_dir / f"img{i}.png") for i in range(MAX_BATCH)]
    async with _proxies(daemon.url, 2) as (proxy_a, proxy_b):
        if Path("/proc").is_dir():
            pids = _proxy_pids()
            assert len(pids) == 2
            for pid in pids:
                assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text(), "a proxy loaded torch"
        before = daemon.service.stats()
        results: dict[str, Any] = {}

        async def via_proxy(name: str, client: Any, path: str) -> None:
            results[name] = await client.call_tool("caption_image", {"image": path})

        async def via_langchain(name: str, path: str, sync: bool) -> None:
            call = {"name": "caption_image", "args": {"image": path}, "id": name, "type": "tool_call"}
            if sync:
                results[name] = await anyio.to_thread.run_sync(caption_tool.invoke, call)
            else:
                results[name] = await caption_tool.ainvoke(call)

        with anyio.fail_after(60):
            async with anyio.create_task_group() as tg:
                tg.start_soon(via_proxy, "a", proxy_a, paths[0])
                tg.start_soon(via_proxy, "b", proxy_b, paths[1])
                tg.start_soon(via_langchain, "lc_sync", paths[2], True)
                tg.start_soon(via_langchain, "lc_async", paths[3], False)
        after = daemon.service.stats()

    # One model, loaded once by the daemon, served all four clients.
    assert after.models_loaded == 1
    assert (await remote.amodel_info()).model == daemon.service.settings.model
    # The four requests from three processes and two LangChain calls ran as ONE batch of four.
    assert after.batch_size_histogram.get(MAX_BATCH, 0) == before.batch_size_histogram.get(MAX_BATCH, 0) + 1
    assert after.requests - before.requests == MAX_BATCH
    for name in ("a", "b"):
        assert results[name].is_error is False
        assert results[name].structured_content["timing"]["batch_size"] == MAX_BATCH
    for name in ("lc_sync", "lc_async"):
        assert results[name].artifact.timing.batch_size == MAX_BATCH
    # Results equal in-process results (greedy float32: batched == one by one).
    local = [service.caption(p) for p in paths]
    assert results["a"].structured_content["caption"] == local[0].caption
    assert results["b"].structured_content["caption"] == local[1].caption
    assert results["lc_sync"].artifact.caption == local[2].caption
    assert results["lc_async"].artifact.caption == local[3].caption
    assert results["a"].structured_content["image"]["sha256"] == local[0].image.sha256


async def test_remote_service_results_equal_in_process_results(
    remote: RemoteService, shared_dir: Path, service: Any
) -> None:
    path = str(shared_dir / "img5.png")
    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            out: dict[str, Any] = {}

            async def run(name: str, coro: Any) -> None:
                out[name] = await coro

            tg.start_soon(run, "answer", remote.aanswer(path, "what color is the car?"))
            tg.start_soon(run, "score", remote.ascore(path, ["a dog", "a red car"]))
            tg.start_soon(run, "image", remote.aembed_images([path]))
            tg.start_soon(run, "text", remote.aembed_texts(["a dog", "a red car"]))
    assert out["answer"].answer == service.answer(path, "what color is the car?").answer
    local_score = service.score(path, ["a dog", "a red car"])
    assert out["score"].best == local_score.best
    for got, want in zip(out["score"].scores, local_score.scores, strict=True):
        assert got.itm_probability == pytest.approx(want.itm_probability, abs=1e-5)
        assert got.itc == pytest.approx(want.itc, abs=1e-5)
    assert out["image"][0].vector == pytest.approx(service.embed_images([path])[0].vector, abs=1e-5)
    local_texts = service.embed_texts(["a dog", "a red car"])
    for got, want in zip(out["text"], local_texts, strict=True):
        assert got.vector == pytest.approx(want.vector, abs=1e-5)


def test_caption_batch_reports_progress_and_isolates_a_bad_image(remote: RemoteService, shared_dir: Path) -> None:
    images = [str(shared_dir / "img6.png"), str(shared_dir / "missing.png"), str(shared_dir / "img7.png")]
    seen: list[tuple[int, int]] = []
    results = remote.caption_batch(images, return_exceptions=True, on_progress=lambda d, t: seen.append((d, t)))
    assert [type(r).__name__ for r in results] == ["CaptionResult", "InvalidImage", "CaptionResult"]
    assert seen and seen[-1] == (3, 3)
    assert results[0].image.source.endswith("img6.png")  # type: ignore[union-attr]
    with pytest.raises(InvalidImage, match="not found"):
        remote.caption_batch(images)


def test_errors_come_back_typed(remote: RemoteService, shared_dir: Path, private_dir: Path) -> None:
    with pytest.raises(InvalidInput, match="num_beams"):
        remote.caption(str(shared_dir / "img0.png"), num_beams=99)  # checked here, before any call
    with pytest.raises(InvalidInput, match="top_k"):
        remote.caption(str(shared_dir / "img0.png"), top_k=5)  # the tool does not take it: said plainly
    with pytest.raises(InvalidImage, match="not a recognised image"):
        remote.caption("data:image/png;base64,AAAA")
    # On loopback the daemon reads paths itself, so its allowed_dirs apply and come back as PathNotAllowed,
    # saying whose setting refused it and how to send the bytes instead.
    with pytest.raises(PathNotAllowed, match=r"blip-mcp daemon at .* its own BLIP_ALLOWED_DIRS.*send_files='always'"):
        remote.caption(str(private_dir / "mine.png"))
    (refused,) = remote.caption_batch([str(private_dir / "mine.png")], return_exceptions=True)
    assert isinstance(refused, PathNotAllowed) and "its own BLIP_ALLOWED_DIRS" in str(refused)


def test_send_files_always_reads_the_file_here(daemon: Daemon, private_dir: Path) -> None:
    path = private_dir / "mine.png"
    with RemoteService(daemon.url, token=TOKEN, settings=BlipSettings(), send_files="always") as sender:
        assert sender.sends_data
        result = sender.caption(path, max_new_tokens=5)
    assert result.image.source == str(path)  # the caller's path, not "data URI (... bytes)"
    # ... but this side's own allowed_dirs still apply to what it reads.
    restricted = BlipSettings(allowed_dirs=[daemon.service.settings.allowed_dirs[0]])
    with (
        RemoteService(daemon.url, token=TOKEN, settings=restricted, send_files="always") as sender,
        pytest.raises(PathNotAllowed),
    ):
        sender.caption(path)


def test_a_dropped_remote_service_is_collected_and_its_loop_thread_ends(daemon: Daemon, shared_dir: Path) -> None:
    """A `RemoteService` dropped without `close()` (a notebook cell run again) leaves no thread behind: its private
    event-loop thread used to run for the rest of the process, one per dropped service."""
    import gc
    import weakref

    before = set(threading.enumerate())
    service = RemoteService(daemon.url, token=TOKEN, settings=BlipSettings())
    assert service.caption(shared_dir / "img0.png", max_new_tokens=3).caption
    (thread,) = [t for t in threading.enumerate() if t not in before and t.name == "blip-remote-loop"]
    ref = weakref.ref(service)
    del service
    gc.collect()
    assert ref() is None
    thread.join(10)
    assert not thread.is_alive(), "the dropped RemoteService's loop thread is still running"


def test_allowed_dirs_here_apply_to_a_loopback_daemon(daemon: Daemon, shared_dir: Path, private_dir: Path) -> None:
    """With `allowed_dirs` on this side, `auto` reads files here even for a loopback daemon, so they apply: a path
    outside them was sent unchecked, and the daemon (which may read it) captioned it."""
    mine = BlipSettings(allowed_dirs=[private_dir])
    with RemoteService(daemon.url, token=TOKEN, settings=mine) as limited:
        assert limited.sends_data
        assert limited.caption(private_dir / "mine.png", max_new_tokens=3).image.source == str(private_dir / "mine.png")
        with pytest.raises(PathNotAllowed):
            limited.caption(shared_dir / "img0.png", max_new_tokens=3)
    with RemoteService(daemon.url, token=TOKEN, settings=BlipSettings()) as open_side:
        assert not open_side.sends_data  # no allowed_dirs here: paths go to the loopback daemon, as before


def test_wrong_token_is_a_clear_error(daemon: Daemon) -> None:
    with RemoteService(daemon.url, token="wrong-token-0123456789") as bad, pytest.raises(BlipError, match="token"):
        bad.model_info()


async def test_proxy_relays_structured_content_progress_and_cancellation(daemon: Daemon, shared_dir: Path) -> None:
    images = [str(shared_dir / f"img{i % 8}.png") for i in range(48)]
    async with _proxies(daemon.url, 1, "--send-files", "always") as (proxy,):
        tools = await proxy.list_tools()
        assert {"caption_image", "caption_images", "score_image_text", "locate_in_image"} <= {
            t.name for t in tools.tools
        }
        progress: list[float] = []

        async def on_progress(value: float, total: float | None, message: str | None) -> None:
            progress.append(value)

        with anyio.fail_after(60):
            result = await proxy.call_tool(
                "caption_images",
                {"images": [*images[:3], str(shared_dir / "nope.png")], "max_new_tokens": 4},
                progress_callback=on_progress,
            )
        assert result.is_error is False
        items = result.structured_content["items"]
        assert [i["ok"] for i in items] == [True, True, True, False]
        assert items[0]["image"] == images[0]  # sent as data, named by its path again
        assert items[0]["result"]["image"]["source"] == images[0]
        assert "[invalid_image]" in items[3]["error"]
        # Relayed as the daemon captions (the last notification may trail the result, so no "== 3").
        assert progress and progress == sorted(progress) and max(progress) <= 3
        stats = await proxy.read_resource("blip://stats")
        assert '"models_loaded": 1' in stats.contents[0].text or '"models_loaded": 2' in stats.contents[0].text

        # Cancel at the first progress while requests wait in the daemon's queue: they must be dropped there and the
        # rest of the 48 never sent. The daemon's second batch is held on the model so that what is queued stays
        # queued until the cancellation arrives. Unheld, the test raced: the daemon keeps 8 requests of a call in
        # flight, takes the 4 queued ones into its next batch the moment one ends, and queues the next ones only once
        # their images are decoded; on a loaded machine the cancellation could arrive while all of them were still
        # decoding, so the call stopped with nothing queued and `cancelled` never rose.
        before = daemon.service.stats()
        dropped: list[concurrent.futures.Future[Any]] = []
        with _submitted(daemon) as futures, _stalled_model(daemon, let_through=1) as held:

            def queued() -> list[concurrent.futures.Future[Any]]:
                return [f for f in list(futures) if not f.running() and not f.done()]

            with anyio.CancelScope() as scope:

                async def cancel_on_progress(value: float, total: float | None, message: str | None) -> None:
                    if scope.cancel_called:
                        return
                    with anyio.fail_after(30):
                        while not (held.is_set() and queued()):  # the worker blocked: the queue can only grow
                            await anyio.sleep(0.01)
                    dropped[:] = queued()
                    scope.cancel()

                with anyio.fail_after(60):
                    await proxy.call_tool(
                        "caption_images", {"images": images, "max_new_tokens": 30}, progress_callback=cancel_on_progress
                    )
            assert scope.cancelled_caught and dropped
            with anyio.fail_after(30):  # through the proxy to the daemon, which cancels what its call queued
                while not all(f.cancelled() for f in dropped):
                    await anyio.sleep(0.02)
        with anyio.fail_after(30):  # released: the worker drops the cancelled requests instead of running them
            while daemon.service.stats().cancelled < before.cancelled + len(dropped):
                await anyio.sleep(0.02)
        assert daemon.service.stats().requests - before.requests < len(images)


async def test_daemon_down_gives_a_clear_error_and_the_proxy_recovers(
    daemon: Daemon, remote: RemoteService, shared_dir: Path
) -> None:
    path = str(shared_dir / "img0.png")
    async with _proxies(daemon.url, 1) as (proxy,):
        daemon.stop()
        try:
            with anyio.fail_after(20):
                down = await proxy.call_tool("caption_image", {"image": path})
            assert down.is_error
            text = down.content[0].text
            assert text.startswith("[model_not_available]") and daemon.url in text and "blip-mcp" in text
            with anyio.fail_after(20):
                listed = await proxy.list_tools()  # a host listing tools now still gets them
            assert "caption_image" in {t.name for t in listed.tools}
            with anyio.fail_after(20), pytest.raises(ModelNotAvailable, match="unreachable"):
                await remote.acaption(path)
        finally:
            daemon.start()
        with anyio.fail_after(30):
            back = await proxy.call_tool("caption_image", {"image": path})
        assert back.is_error is False and back.structured_content["caption"]
        assert (await remote.acaption(path)).caption == back.structured_content["caption"]


# ---------------------------------------------------------------------------------------------- units
@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("Error executing tool caption_image: [invalid_image] Image file not found: /x.png.", InvalidImage),
        ("[path_not_allowed] outside the allowed directories", PathNotAllowed),
        ("[model_not_available] no checkpoint", ModelNotAvailable),
        ("[index_read_only] The image index /x.sqlite is read-only", IndexReadOnly),
        ("Error executing tool answer_question: 1 validation error for answer_questionArguments", InvalidInput),
        ("[something_new] a future error", BlipError),
        ("plain text", BlipError),
    ],
)
def test_error_from_text_rebuilds_the_type(text: str, kind: type[BlipError]) -> None:
    error = error_from_text(text)
    assert type(error) is kind
    assert "Error executing tool" not in str(error) and not str(error).startswith("[")


def test_overloaded_keeps_its_retry_hint() -> None:
    error = error_from_text("[overloaded] The queue is full (256 waiting). Retry after 2.5 s.")
    assert isinstance(error, Overloaded) and error.retry_after_s == 2.5


def test_urls_and_loopback() -> None:
    assert normalize_url("http://127.0.0.1:8765") == "http://127.0.0.1:8765/mcp"
    assert normalize_url("https://gpu-box:9000/blip/mcp") == "https://gpu-box:9000/blip/mcp"
    with pytest.raises(InvalidInput):
        normalize_url("gpu-box:8765")
    assert is_loopback_url("http://localhost:1/mcp") and is_loopback_url("http://[::1]:1/mcp")
    assert is_loopback_url("http://127.0.0.2:1/mcp")
    assert not is_loopback_url("http://10.0.0.5:1/mcp") and not is_loopback_url("http://gpu-box:1/mcp")


def test_prepare_image_sends_paths_or_data(tmp_path: Path, make_image: Callable[..., Any], monkeypatch: Any) -> None:
    make_image(1).save(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    settings = BlipSettings()
    assert prepare_image("a.png", settings, send_data=False) == (str(tmp_path / "a.png"), None)  # made absolute
    wire, label = prepare_image("a.png", settings, send_data=True)
    assert wire.startswith("data:image/png;base64,") and label == "a.png"
    assert prepare_image("data:image/png;base64,AAAA", settings, send_data=True)[0] == "data:image/png;base64,AAAA"
    assert prepare_image(make_image(2), settings, send_data=False)[0].startswith("data:image/png;base64,")
    with pytest.raises(InvalidImage, match="not found"):
        prepare_image("missing.png", settings, send_data=True)


def test_daemon_not_running_fails_fast() -> None:
    with RemoteService(f"http://127.0.0.1:{free_port()}", connect_timeout_s=2.0) as nowhere:
        started = time.monotonic()
        with pytest.raises(ModelNotAvailable, match=r"unreachable.*blip-mcp --transport http"):
            nowhere.caption("data:image/png;base64,AAAA")
        assert time.monotonic() - started < 15


def test_a_loop_thread_that_cannot_start_leaves_the_client_usable(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread the system refuses (its limit) must not leave a loop recorded that no thread runs: every later call
    would wait on it for good, and close() would fail."""
    start = threading.Thread.start

    def refused(self: threading.Thread) -> None:
        if self.name == "blip-remote-loop":
            raise RuntimeError("can't start new thread")
        start(self)

    with RemoteService(f"http://127.0.0.1:{free_port()}", connect_timeout_s=2.0) as nowhere:
        monkeypatch.setattr(threading.Thread, "start", refused)
        with pytest.raises(RuntimeError, match="can't start new thread"):
            nowhere.caption("data:image/png;base64,AAAA")
        monkeypatch.undo()
        thread, out = in_thread(lambda: nowhere.caption("data:image/png;base64,AAAA"))
        thread.join(20)
        assert not thread.is_alive(), "the next call waits on a loop that no thread runs"
        assert out and isinstance(out[0], ModelNotAvailable), out


def test_default_service_follows_blip_remote_url(daemon: Daemon) -> None:
    chosen = default_service(BlipSettings(remote_url=daemon.url, token=TOKEN))
    assert isinstance(chosen, RemoteService) and chosen.url == daemon.url
    assert default_service(BlipSettings(remote_url=daemon.url, token=TOKEN)) is chosen
    chosen.close()


def test_remote_service_defaults_to_blip_token_and_blip_remote_send_files(
    daemon: Daemon, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`RemoteService(url)` takes what it is not given from the settings, as the README's snippet and the 401 message
    ("pass its token (BLIP_TOKEN, ...)") say: BLIP_TOKEN reaches a daemon that needs it; arguments still win."""
    monkeypatch.setenv("BLIP_TOKEN", TOKEN)
    monkeypatch.setenv("BLIP_REMOTE_SEND_FILES", "always")
    with RemoteService(daemon.url) as client:
        assert client.send_files == "always"
        assert client.caption(shared_dir / "img0.png", max_new_tokens=2).caption is not None  # not HTTP 401
    with RemoteService(daemon.url, token="another-token-0123456789", send_files="never") as client:
        assert client.send_files == "never"
        with pytest.raises(BlipError, match="HTTP 401"):
            client.caption(shared_dir / "img0.png", max_new_tokens=2)
    with RemoteService(daemon.url, settings=BlipSettings(token=None, remote_send_files="never")) as client:
        assert (client.daemon.token, client.send_files) == (None, "never")  # given settings, not the environment


def test_shared_service_is_remote_when_blip_remote_url_is_set(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every interface built on `Blip2Service.shared()` (LangChain tools, loader, embeddings) uses the daemon."""
    from blip_tools import Blip2Service
    from blip_tools.remote import RemoteService

    monkeypatch.setenv("BLIP_REMOTE_URL", "http://127.0.0.1:9/mcp")
    monkeypatch.setenv("BLIP_REMOTE_SEND_FILES", "always")
    previous = Blip2Service._shared
    Blip2Service.set_shared(None)
    try:
        shared = Blip2Service.shared()
        assert isinstance(shared, RemoteService)
        assert shared is Blip2Service.shared()
        assert shared.settings.remote_send_files == "always"
    finally:
        Blip2Service.set_shared(previous)


async def test_locate_attaches_the_image_so_the_overlay_and_the_langchain_tool_work(
    daemon: Daemon, remote: RemoteService, shared_dir: Path
) -> None:
    """The daemon sends the heatmap grid only; the client draws the overlay on the image it sent (or read)."""
    import io

    from PIL import Image

    from blip_tools.langchain import Blip2Toolkit

    path = str(shared_dir / "img2.png")
    size = Image.open(path).size

    def overlay_size(png: bytes) -> tuple[int, int]:
        return Image.open(io.BytesIO(png)).size

    assert overlay_size(remote.locate(path, "a dog").overlay_png()) == size  # loopback: a path was sent
    with anyio.fail_after(60):
        assert overlay_size((await remote.alocate(path, "a dog")).overlay_png()) == size
    with RemoteService(daemon.url, token=TOKEN, settings=BlipSettings(), send_files="always") as sender:
        assert overlay_size(sender.locate(path, "a dog").overlay_png()) == size  # the bytes read here
        assert overlay_size(sender.locate(Image.open(path), "a dog").overlay_png()) == size  # a PIL image

    tool = {t.name: t for t in Blip2Toolkit(service=remote).get_tools()}["locate_in_image"]
    call = {"type": "tool_call", "id": "1", "name": "locate_in_image", "args": {"image": path, "text": "a dog"}}
    message = tool.invoke(call)
    assert message.status == "success", message.content
    assert [block["type"] for block in message.content] == ["text", "image"]
    with anyio.fail_after(60):
        message = await tool.ainvoke(call)
    assert message.status == "success", message.content


def test_locate_decodes_the_image_only_when_the_overlay_is_asked_for(
    daemon: Daemon, shared_dir: Path, make_image_module: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A daemon's LocateResult has its box and heatmap without a decode here; `overlay_png()` decodes the image once,
    also after the service is closed, and says why when that image is not the one the daemon saw."""
    import io

    from PIL import Image

    from blip_tools import images
    from blip_tools.errors import InferenceError

    decoded: list[Any] = []
    load_image = images.load_image

    def counting(ref: Any, settings: Any) -> Any:
        decoded.append(ref)
        return load_image(ref, settings)

    monkeypatch.setattr(images, "load_image", counting)  # this side's decodes only: the daemon's service bound its own
    path = shared_dir / "img4.png"
    with RemoteService(daemon.url, token=TOKEN, settings=BlipSettings(), send_files="always") as client:
        result = client.locate(path, "a dog")
        client.locate(Image.open(path), "a dog")
    assert decoded == []
    assert result.heatmap.shape == (40, 48) and 0.0 <= result.heatmap.min() <= result.heatmap.max() <= 1.0
    assert Image.open(io.BytesIO(result.overlay_png())).size == (48, 40)
    assert Image.open(io.BytesIO(result.overlay_png(max_side=24))).size == (24, 20)
    assert len(decoded) == 1 and str(decoded[0]).startswith("data:image/png;base64,")  # the bytes sent, not re-read
    rebuilt = type(result).model_validate_json(result.model_dump_json())  # JSON carries the grid: same heatmap
    assert rebuilt.heatmap == pytest.approx(result.heatmap)

    changing = shared_dir / "changing.png"  # on loopback the daemon reads the path, and so does the overlay, later
    make_image_module(600).save(changing)
    try:
        with RemoteService(daemon.url, token=TOKEN, settings=BlipSettings()) as client:
            result = client.locate(changing, "a dog")
        make_image_module(601, size=(30, 20)).save(changing)
        with pytest.raises(InferenceError, match=r"saw the image at 48x40, this side decodes it at 30x20"):
            result.overlay_png()
    finally:
        changing.unlink()


def test_loader_through_the_daemon_skips_only_image_errors(daemon: Daemon, shared_dir: Path, private_dir: Path) -> None:
    """`Blip2ImageLoader(on_error="skip")` behaves as on a local service: image errors skip, call errors raise."""
    from blip_tools.errors import ServiceClosed
    from blip_tools.langchain import Blip2ImageLoader
    from blip_tools.params import GenerationParams

    files = [shared_dir / "img0.png", private_dir / "mine.png", shared_dir / "img1.png"]  # the daemon refuses one
    with RemoteService(daemon.url, token=TOKEN, settings=BlipSettings()) as client:
        docs = Blip2ImageLoader(files, on_error="skip", questions="What is it?", service=client).load()
        assert [Path(d.metadata["source"]).name for d in docs] == ["img0.png", "img1.png"]
        assert list(docs[0].metadata["answers"]) == ["What is it?"]
        too_long = GenerationParams(max_new_tokens=daemon.service.settings.max_new_tokens_limit + 1)
        with pytest.raises(InvalidInput, match="max_new_tokens"):
            Blip2ImageLoader(files, on_error="skip", params=too_long, service=client).load()
    with pytest.raises(ServiceClosed):
        Blip2ImageLoader(files, on_error="skip", service=client).load()


def test_cli_caption_and_ask_use_the_daemon_at_blip_remote_url(
    daemon: Daemon, shared_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`BLIP_REMOTE_URL` sends `blip-tools caption`/`ask` to the daemon: its counters move, no model loads here."""
    import json

    from blip_tools import Blip2Service
    from blip_tools.cli import main

    monkeypatch.setenv("BLIP_REMOTE_URL", daemon.url)
    monkeypatch.setenv("BLIP_TOKEN", TOKEN)
    monkeypatch.setenv("BLIP_MODEL", "/no/model/here")  # loading a model here would fail
    path = str(shared_dir / "img3.png")
    before = daemon.service.stats().requests
    previous = Blip2Service._shared
    try:
        assert main(["caption", path, "--max-new-tokens", "3", "--json"]) == 0
        caption = json.loads(capsys.readouterr().out)
        assert caption["caption"] == daemon.service.caption(path, max_new_tokens=3).caption
        assert main(["ask", path, "what is it?", "--max-new-tokens", "3"]) == 0
        assert capsys.readouterr().out.strip() == daemon.service.answer(path, "what is it?", max_new_tokens=3).answer
        assert daemon.service.stats().requests >= before + 4  # two from the CLI, two for the comparison

        assert main(["caption", path, "--model", "/elsewhere"]) == 2  # a local-model flag is a usage error
        err = capsys.readouterr().err
        assert err.startswith("error: --model configures a model loaded here") and "--local" in err
        assert main(["caption", path, "--local"]) != 0  # --local loads here: the bad BLIP_MODEL says so
        assert "/no/model/here" in capsys.readouterr().err
    finally:
        Blip2Service.set_shared(previous)


# ------------------------------------------------------------------------------------- collections via the daemon
@pytest.fixture
def cli_env(daemon: Daemon, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`BLIP_REMOTE_URL` at the daemon, no loadable model here, an index file of the test's own; yields the index."""
    from blip_tools import Blip2Service

    index = tmp_path / "index.sqlite"
    monkeypatch.setenv("BLIP_REMOTE_URL", daemon.url)
    monkeypatch.setenv("BLIP_TOKEN", TOKEN)
    monkeypatch.setenv("BLIP_MODEL", "/no/model/here")  # loading a model here would fail
    monkeypatch.setenv("BLIP_RETRIEVAL_MODEL", "/no/retrieval/model/here")
    monkeypatch.setenv("BLIP_INDEX_PATH", str(index))
    for name in ("BLIP_ALLOWED_DIRS", "BLIP_REMOTE_SEND_FILES"):
        monkeypatch.delenv(name, raising=False)
    previous = Blip2Service._shared
    yield index
    Blip2Service.set_shared(previous)


@pytest.fixture
def photos(tmp_path: Path, make_image_module: Callable[..., Any]) -> Path:
    """Three images outside the daemon's allowed directory: it can embed them only if it is sent their bytes."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        make_image_module(500 + i).save(folder / f"p{i}.png")
    return folder


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from blip_tools.cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def _index_models(index: Path) -> set[tuple[str, str | None]]:
    import sqlite3

    with contextlib.closing(sqlite3.connect(index)) as conn:
        return set(conn.execute("SELECT DISTINCT model, caption_model FROM images WHERE embedding IS NOT NULL"))


def test_cli_collection_commands_use_the_daemon_and_record_its_model(
    daemon: Daemon, cli_env: Path, photos: Path, shared_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`index`, `search`, `duplicates` and `locate` run on the daemon's model (none loads here); the index records
    the daemon's checkpoints with its vectors, and the files reach the daemon as data (outside its allowed dirs)."""
    import json

    from PIL import Image

    before = daemon.service.stats().requests
    code, out, err = _cli(capsys, "index", str(photos), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert (report["embedded"], report["captioned"], report["failed"], report["indexed"]) == (3, 3, 0, 3)
    served = daemon.service.settings
    assert _index_models(cli_env) == {(served.retrieval_model, served.model)}
    assert daemon.service.stats().requests > before

    code, out, err = _cli(capsys, "search", "a photo", "--rerank", "--json")
    assert code == 0, err
    hits = json.loads(out)["hits"]
    assert sorted(Path(h["path"]).name for h in hits) == ["p0.png", "p1.png", "p2.png"]
    assert all(h["itm_probability"] is not None for h in hits)  # re-ranked by the daemon, the files sent as data
    assert "note:" not in err
    code, out, err = _cli(capsys, "search", "--image", str(photos / "p1.png"), "-k", "1", "--json")
    assert code == 0, err
    assert Path(json.loads(out)["hits"][0]["path"]).name == "p1.png"
    code, out, err = _cli(capsys, "duplicates", "--threshold", "0.9999", "--json")
    assert (code, json.loads(out), err) == (0, [], "")

    overlay = photos.parent / "overlay.png"
    image = shared_dir / "img2.png"  # locate sends a loopback daemon the path, as caption does
    code, out, err = _cli(capsys, "locate", str(image), "a dog", "-o", str(overlay), "--json")
    assert code == 0, err
    assert json.loads(out)["image"]["source"] == str(image)
    assert Image.open(overlay).size == Image.open(image).size

    code, _, err = _cli(capsys, "search", "a photo", "--retrieval-model", "/elsewhere")
    assert code == 2 and err.startswith("error: --retrieval-model configures a model loaded here") and "--local" in err


def test_cli_index_keeps_the_daemons_vectors_apart_from_a_local_models(
    daemon: Daemon, cli_env: Path, photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Vectors of the daemon's model and of another one loaded with --local never mix: each side sees the other's
    rows as stale (left out of search, re-embedded by its next index run) and says so."""
    import json

    served = daemon.service.settings
    other = tmp_path / "other-retrieval"
    # The same weights in another folder: another checkpoint to the index (a symlink would be the same folder).
    shutil.copytree(served.retrieval_model, other)
    local = ("--local", "--model", served.model, "--retrieval-model", str(other))

    code, out, err = _cli(capsys, "index", str(photos), "--no-captions", "--json", *local)
    assert code == 0, err
    assert _index_models(cli_env) == {(str(other), None)}

    code, out, err = _cli(capsys, "search", "a photo", "--json")  # through the daemon
    assert code == 0, err
    assert json.loads(out)["hits"] == []
    assert "note: 3 indexed image(s) were embedded with another retrieval model than" in err
    assert served.retrieval_model in err

    code, out, err = _cli(capsys, "index", str(photos), "--no-captions", "--json")  # re-embedded by the daemon
    assert code == 0, err
    assert json.loads(out)["embedded"] == 3
    assert _index_models(cli_env) == {(served.retrieval_model, None)}
    code, out, err = _cli(capsys, "duplicates", "--json", *local)
    assert code == 0 and "note: 3 indexed image(s)" in err and str(other) in err


def test_cli_collection_commands_with_the_daemon_down_fail_clearly(
    cli_env: Path, photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Daemon down: every collection command exits 2 with the unreachable message, as `caption` does; no index
    file is created."""
    down = f"http://127.0.0.1:{free_port()}/mcp"
    monkeypatch.setenv("BLIP_REMOTE_URL", down)
    image = str(photos / "p0.png")
    for argv in (
        ["caption", image],
        ["index", str(photos)],
        ["search", "a dog"],
        ["duplicates"],
        ["locate", image, "a dog", "-o", str(photos.parent / "o.png")],
    ):
        code, out, err = _cli(capsys, *argv)
        assert code == 2, argv
        assert err.startswith(f"error: The blip-mcp daemon at {down} is unreachable") and "--transport http" in err
        assert out == ""
    assert not cli_env.exists()


def test_cli_send_files_with_collection_commands(
    daemon: Daemon, cli_env: Path, photos: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`locate` follows BLIP_REMOTE_SEND_FILES as `caption` does: paths to a loopback daemon (which may refuse them),
    data to any other. The index commands send data under `auto`, paths only under `never`."""
    import argparse

    import blip_tools.remote
    from blip_tools.cli._common import service_from_args

    image = str(photos / "p0.png")
    code, _, err = _cli(capsys, "locate", image, "a dog")
    assert code == 2 and "allowed" in err  # loopback: the daemon read the path, outside its allowed dirs
    monkeypatch.setattr(blip_tools.remote, "is_loopback_url", lambda url: False)  # a daemon on another machine
    code, out, err = _cli(capsys, "locate", image, "a dog")
    assert code == 0 and "matches best around pixel" in out, err

    def send_files(**options: Any) -> str:
        args = argparse.Namespace(local=False)
        with service_from_args(args, remote=True, **options) as service:
            assert isinstance(service, RemoteService)
            return service.send_files

    assert send_files() == "auto"
    assert send_files(files_read_here=True) == "always"
    monkeypatch.setenv("BLIP_REMOTE_SEND_FILES", "never")
    assert send_files(files_read_here=True) == "never"


def test_start_takes_the_daemons_model_names_and_refuses_another_models_vectors(
    daemon: Daemon, shared_dir: Path
) -> None:
    """After start() the service's settings name the daemon's checkpoints (what an ImageIndex records); an embedding
    from another retrieval model (a daemon restarted with one) is an error, not a vector to mix in."""
    served = daemon.service.settings
    with RemoteService(daemon.url, token=TOKEN, settings=BlipSettings(retrieval_model="local/guess")) as client:
        assert client.settings.retrieval_model == "local/guess"
        client.embed_texts(["a dog"])  # before start(): nothing to compare with
        assert client.start() is client
        assert (client.settings.model, client.settings.retrieval_model) == (served.model, served.retrieval_model)
        assert client.embed_texts(["a dog"])[0].model == served.retrieval_model
        client._retrieval_model = "an/older-model"  # as if the daemon had been restarted with another model since
        with pytest.raises(ModelNotAvailable, match=r"now embeds with .* not 'an/older-model'"):
            client.embed_texts(["a dog"])
        (result,) = client.embed_images([shared_dir / "img0.png"], return_exceptions=True)
        assert isinstance(result, ModelNotAvailable)


def test_an_index_on_an_unstarted_client_records_the_daemons_model(
    daemon: Daemon, shared_dir: Path, tmp_path: Path
) -> None:
    """`ImageIndex(service=RemoteService(url))` without `start()` still tags its rows with the daemon's model."""
    from blip_tools.index import ImageIndex

    served = daemon.service.settings
    with RemoteService(daemon.url, token=TOKEN, settings=BlipSettings(retrieval_model="local/guess")) as client:
        assert not client.started
        with ImageIndex(tmp_path / "index.db", service=client) as index:
            assert client.started and index.settings.retrieval_model == served.retrieval_model
            index.index(shared_dir, captions=False)
            rows = index._conn().execute("SELECT DISTINCT model FROM images WHERE embedding IS NOT NULL").fetchall()
            assert [row[0] for row in rows] == [served.retrieval_model]
            assert index.stats().images > 0 and index.stats().stale == 0
            assert index.search("a dog", top_k=1).hits


def test_concurrent_first_calls_list_the_daemons_tools_once(daemon: Daemon, shared_dir: Path) -> None:
    """A fresh client's first wave of concurrent calls shares one listing (and discovery) of the daemon's tools."""
    import asyncio

    with RemoteService(daemon.url, token=TOKEN, settings=BlipSettings()) as client:
        listings = 0
        list_tools = client.daemon.list_tools

        async def counting() -> Any:
            nonlocal listings
            listings += 1
            return await list_tools()

        client.daemon.list_tools = counting  # type: ignore[method-assign]

        async def wave() -> list[Any]:
            path = str(shared_dir / "img0.png")
            return await asyncio.gather(*(client.acaption(path, max_new_tokens=3) for _ in range(8)))

        results = asyncio.run(wave())
        assert len(results) == 8 and all(r.caption is not None for r in results)
        assert listings == 1


def test_a_tool_call_is_one_http_request(daemon: Daemon, shared_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the tools are listed, a call sends only `tools/call`: the SDK no longer lists the tools again in each
    fresh connection to check the result (behind Ray Serve's queue limits that second request could be refused
    after the daemon had done the work, losing the result)."""
    sent = record_mcp_requests(monkeypatch)
    path = str(shared_dir / "img0.png")
    with RemoteService(daemon.url, token=TOKEN, settings=BlipSettings()) as client:
        assert client.caption(path).caption is not None  # a first call lists the tools, on its own connection
        assert sent.count("tools/list") == 1 and sent[-1] == "tools/call"
        sent.clear()
        client.caption(path, max_new_tokens=3)
        client.answer(path, "what is it?")
        assert len(client.caption_batch([path, path])) == 2
        client.embed_texts(["a dog"])
    assert sent == ["tools/call"] * 4


def test_a_result_of_another_shape_is_a_typed_error(remote: RemoteService, shared_dir: Path, monkeypatch: Any) -> None:
    """A daemon whose results this client cannot parse (another blip-tools version) gives a `BlipError` naming the
    tool and the field, not pydantic's ValidationError (the SDK no longer checks results against the schema)."""
    original = remote._call

    async def renamed(tool: str, arguments: dict[str, Any], progress: Any = None) -> dict[str, Any]:
        content = await original(tool, arguments, progress)
        content["text_of_caption"] = content.pop("caption")
        return content

    monkeypatch.setattr(remote, "_call", renamed)
    with pytest.raises(BlipError, match=r"caption_image tool returned a result this client cannot read \(caption"):
        remote.caption(str(shared_dir / "img0.png"))


# ---------------------------------------------------------------------------------------------- close and restarts
def test_close_ends_a_sync_call_in_flight_with_service_closed(daemon: Daemon, shared_dir: Path) -> None:
    """close() from another thread ends a call that is waiting on the daemon at once, typed; later calls too."""
    path = str(shared_dir / "img0.png")
    client = RemoteService(daemon.url, token=TOKEN, settings=BlipSettings())
    outcome: dict[str, BaseException] = {}

    def call() -> None:
        try:
            client.caption(path)
        except BaseException as exc:
            outcome["error"] = exc

    with _stalled_model(daemon) as entered:
        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        assert entered.wait(30), "the call never reached the daemon's model"
        started = time.monotonic()
        client.close()
        worker.join(10)
        assert not worker.is_alive(), "the caller still waits after close()"
        # Well under close()'s grace: the call ended by its cancellation, not by close() giving up on it.
        assert time.monotonic() - started < _CLOSE_GRACE_S / 2
    assert isinstance(outcome.get("error"), ServiceClosed), outcome
    with pytest.raises(ServiceClosed):
        client.caption(path)
    with pytest.raises(ServiceClosed):
        client.stats()


async def test_close_ends_async_calls_in_flight_with_service_closed(daemon: Daemon, shared_dir: Path) -> None:
    """Calls awaited in the caller's own event loop end with ServiceClosed too, not CancelledError."""
    path = str(shared_dir / "img1.png")
    client = RemoteService(daemon.url, token=TOKEN, settings=BlipSettings())
    errors: list[BaseException] = []

    async def call() -> None:
        try:
            await client.acaption(path)
        except BlipError as exc:
            errors.append(exc)

    with _stalled_model(daemon) as entered, anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            tg.start_soon(call)
            tg.start_soon(call)
            assert await anyio.to_thread.run_sync(entered.wait, 20), "no call reached the daemon's model"
            await anyio.to_thread.run_sync(client.close)
    assert [type(e) for e in errors] == [ServiceClosed, ServiceClosed]
    with anyio.fail_after(10), pytest.raises(ServiceClosed):
        await client.acaption(path)


# ---------------------------------------------------------------------------------------------- batches of data
def _sha256s(service: Any, paths: list[Path]) -> list[str]:
    return [service.caption(p.read_bytes(), max_new_tokens=3).image.sha256 for p in paths]


def test_caption_batch_of_data_is_split_to_fit_the_daemons_body_limit(small_daemon: Daemon, noise_dir: Path) -> None:
    """send_files=always (what auto does for a remote daemon): 8 images, each within the limit, together above
    the daemon's body limit, go in requests that fit it, and come back in order."""
    from mcp_server.http import body_limit_for

    paths = [noise_dir / f"n{i}.png" for i in range(8)]
    sizes = [p.stat().st_size for p in paths]
    assert max(sizes) < SMALL_IMAGE_BYTES and sum(sizes) * 4 / 3 > body_limit_for(
        BlipSettings(max_image_bytes=SMALL_IMAGE_BYTES)
    ), "the test needs a batch that only fits in parts"
    seen: list[tuple[int, int]] = []
    client_settings = BlipSettings(max_image_bytes=SMALL_IMAGE_BYTES)
    with RemoteService(small_daemon.url, token=TOKEN, settings=client_settings, send_files="always") as client:
        results = client.caption_batch(paths, max_new_tokens=3, on_progress=lambda d, t: seen.append((d, t)))
    assert all(not isinstance(r, BlipError) for r in results), results
    assert [r.image.source for r in results] == [str(p) for p in paths]  # type: ignore[union-attr]
    assert [r.image.sha256 for r in results] == _sha256s(small_daemon.service, paths)  # type: ignore[union-attr]
    assert seen and seen[-1] == (8, 8) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_a_batch_refused_as_too_large_is_split_and_only_the_oversized_image_fails(
    small_daemon: Daemon, noise_dir: Path
) -> None:
    """The client's own limit is higher than the daemon's: a refused request is halved down to the one image that
    cannot fit, which fails in place; the others are captioned, in order."""
    paths = [noise_dir / f"n{i}.png" for i in range(8)]
    paths.insert(3, noise_dir / "big.png")
    with RemoteService(small_daemon.url, token=TOKEN, settings=BlipSettings(), send_files="always") as client:
        results = client.caption_batch(paths, max_new_tokens=3, return_exceptions=True)
        assert [isinstance(r, PayloadTooLarge) for r in results] == [False] * 3 + [True] + [False] * 5
        assert not any(isinstance(r, BlipError) for r in results[:3] + results[4:])
        assert "HTTP 413" in str(results[3])
        good = [p for p in paths if p.name != "big.png"]
        got = [r.image.sha256 for r in results if not isinstance(r, BlipError)]
        assert got == _sha256s(small_daemon.service, good)
        with pytest.raises(PayloadTooLarge):
            client.caption_batch(paths, max_new_tokens=3)


async def test_proxy_caption_images_of_data_fits_the_daemons_body_limit(small_daemon: Daemon, noise_dir: Path) -> None:
    """The `--connect` proxy splits caption_images the same way (one implementation): all but the oversized image
    are captioned, each named by its own path, with progress over the whole list."""
    paths = [str(noise_dir / f"n{i}.png") for i in range(8)]
    paths.insert(5, str(noise_dir / "big.png"))
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)
        assert total == len(paths)

    async with _proxies(small_daemon.url, 1, "--send-files", "always") as (proxy,):
        with anyio.fail_after(120):
            result = await proxy.call_tool(
                "caption_images", {"images": paths, "max_new_tokens": 3}, progress_callback=on_progress
            )
    assert result.is_error is False, result.content
    items = result.structured_content["items"]
    assert [i["ok"] for i in items] == [True] * 5 + [False] + [True] * 3
    assert [i["image"] for i in items] == paths
    assert items[5]["error"].startswith("[payload_too_large]")
    assert [i["result"]["image"]["source"] for i in items if i["ok"]] == [p for p in paths if "big" not in p]
    assert result.structured_content["succeeded"] == 8 and result.structured_content["failed"] == 1
    assert "Captioned 8 of 9 images (1 failed)" in result.content[0].text
    assert "data:" not in result.content[0].text
    assert progress and progress == sorted(progress) and progress[-1] == len(paths)


def test_plan_chunks_fits_the_budget_and_the_count_in_order() -> None:
    assert plan_chunks([], 100) == []
    assert plan_chunks([40, 40, 40, 40], 100) == [(0, 2), (2, 4)]  # 2 x (40 + 8) fit, a third does not
    assert plan_chunks([10] * 5, 10_000, max_count=2) == [(0, 2), (2, 4), (4, 5)]
    assert plan_chunks([10, 500, 10], 100) == [(0, 1), (1, 2), (2, 3)]  # an oversized item goes alone
    with pytest.raises(InvalidInput, match="budget"):
        plan_chunks([1], 0)


@pytest.mark.parametrize("batch", [False, True], ids=["caption", "caption_batch"])
def test_a_daemon_stopped_during_a_call_gives_the_typed_retry_error(
    daemon: Daemon, shared_dir: Path, batch: bool
) -> None:
    """SIGTERM (uvicorn's graceful shutdown, cut short here) during a call: the caller gets ModelNotAvailable with
    a retry hint, as when the daemon is killed, not a bare error about an error response. A single call gets
    uvicorn's shutdown 500; a batch, whose progress stream had started, gets a stream that ends without a response."""
    stopping = Daemon(daemon.service.settings, service=daemon.service)
    stopping.graceful_shutdown_s = 0.5
    stopping.start()
    outcome: dict[str, BaseException] = {}
    client = RemoteService(stopping.url, token=TOKEN, settings=BlipSettings())

    def call() -> None:
        try:
            if batch:
                client.caption_batch([shared_dir / f"img{i}.png" for i in range(MAX_BATCH + 2)], max_new_tokens=3)
            else:
                client.caption(str(shared_dir / "img2.png"))
        except BaseException as exc:
            outcome["error"] = exc

    try:
        with _stalled_model(daemon, let_through=1 if batch else 0) as entered:
            worker = threading.Thread(target=call, daemon=True)
            worker.start()
            assert entered.wait(30), "the call never reached the daemon's model"
            stopping.stop()  # what SIGTERM does: should_exit, then cancel what is still running after the grace
            worker.join(30)
            assert not worker.is_alive()
    finally:
        client.close()
        stopping.close()
    error = outcome.get("error")
    assert isinstance(error, ModelNotAvailable), repr(error)
    assert "Retry" in str(error) and stopping.url in str(error)


@contextmanager
def _image_limit(daemon: Daemon, max_image_bytes: int) -> Iterator[None]:
    """The daemon refuses images over `max_image_bytes` one by one, while its request body limit stays as it was."""
    settings = daemon.service.settings
    daemon.service.settings = settings.model_copy(update={"max_image_bytes": max_image_bytes})
    try:
        yield
    finally:
        daemon.service.settings = settings


def test_an_image_the_daemon_refuses_alone_is_not_taken_for_a_refused_request(
    daemon: Daemon, shared_dir: Path, noise_dir: Path
) -> None:
    """An image over the daemon's max_image_bytes in a request within its body limit fails in its place: the request
    is not halved and sent again (images captioned twice), and progress counts each image once, up to the total."""
    paths = [shared_dir / "img0.png", shared_dir / "img1.png", noise_dir / "n0.png", shared_dir / "img2.png"]
    assert all(p.stat().st_size < 20_000 for p in paths if p.parent == shared_dir)
    assert (noise_dir / "n0.png").stat().st_size > 20_000
    sent: list[int] = []
    progress: list[tuple[int, int]] = []
    client = RemoteService(daemon.url, token=TOKEN, settings=BlipSettings(), send_files="always")
    original = client.daemon.call_tool

    async def spy(name: str, arguments: Any = None, **kwargs: Any) -> Any:
        if name == "caption_images":
            sent.append(len(arguments["images"]))
        return await original(name, arguments, **kwargs)

    client.daemon.call_tool = spy  # type: ignore[method-assign]
    with client, _image_limit(daemon, 20_000):
        with pytest.raises(PayloadTooLarge) as raised:
            client.caption_batch(paths, max_new_tokens=3, on_progress=lambda d, t: progress.append((d, t)))
        assert "HTTP 413" not in str(raised.value)
        assert sent == [4], "the request was sent again after an image was refused alone"
        assert all(d <= t == 4 for d, t in progress), progress

        sent.clear()
        progress.clear()
        results = client.caption_batch(
            paths, max_new_tokens=3, return_exceptions=True, on_progress=lambda d, t: progress.append((d, t))
        )
    assert sent == [4]
    assert [type(r).__name__ for r in results] == ["CaptionResult"] * 2 + ["PayloadTooLarge", "CaptionResult"]
    assert [d for d, _ in progress] == sorted(d for d, _ in progress) and progress[-1] == (4, 4), progress


def test_add_listener_is_unavailable_with_a_hint_and_the_with_block_closes() -> None:
    """No local batcher: add_listener says to poll stats() (no AttributeError), and `with` gives the RemoteService."""
    from blip_tools.errors import CapabilityUnavailable

    with RemoteService(f"http://127.0.0.1:{free_port()}/mcp", settings=BlipSettings()) as client:
        assert isinstance(client, RemoteService)
        with pytest.raises(CapabilityUnavailable, match=r"poll RemoteService\.stats\(\)"):
            client.add_listener(print)
    assert client.closed


@contextmanager
def _answering(status: int, body: bytes, headers: dict[str, str]) -> Iterator[str]:
    """An HTTP server that answers every request with this status, body and headers; yields its MCP URL."""
    import uvicorn

    async def app(scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        raw = [(k.encode(), v.encode()) for k, v in headers.items()]
        await send({"type": "http.response.start", "status": status, "headers": raw})
        await send({"type": "http.response.body", "body": body})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the test server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}/mcp"
    finally:
        server.should_exit = True
        thread.join(10)


_RPC_500 = b'{"jsonrpc":"2.0","id":"server-error","error":{"code":-32603,"message":"Error handling POST request"}}'


@pytest.mark.parametrize(
    ("status", "body", "headers", "kind", "words"),
    [
        (500, _RPC_500, {"content-type": "application/json"}, BlipError, "internal error (HTTP 500): Error handling"),
        (500, b"Internal Server Error", {"content-type": "text/plain"}, BlipError, "internal error (HTTP 500)"),
        (504, b"Gateway Timeout", {"content-type": "text/plain"}, RequestTimeout, "HTTP 504"),
        (502, b"Bad Gateway", {"content-type": "text/plain"}, ModelNotAvailable, "HTTP 502"),
        (
            500,
            b"Internal Server Error",
            {"content-type": "text/plain; charset=utf-8", "connection": "close"},
            ModelNotAvailable,
            "may have stopped or restarted",
        ),
    ],
)
def test_http_errors_keep_the_daemons_explanation(
    status: int, body: bytes, headers: dict[str, str], kind: type[BlipError], words: str
) -> None:
    """A 500 from a live daemon (the SDK's JSON-RPC error, a crash in a route) says what the daemon said, not that
    the connection was lost; only uvicorn's 500 of a daemon shutting down (plain text, connection: close) does.
    A 504 is a timeout."""
    with (
        _answering(status, body, headers) as url,
        RemoteService(url, settings=BlipSettings()) as client,
        pytest.raises(BlipError) as raised,
    ):
        client.stats()
    assert type(raised.value) is kind, repr(raised.value)
    assert words in str(raised.value)
    if kind is not ModelNotAvailable:
        assert "restarted" not in str(raised.value)


def _loop_of(client: RemoteService) -> tuple[Any, threading.Thread]:
    loop, thread = client._loop, client._thread
    assert loop is not None and thread is not None, "no sync call ran yet"
    return loop, thread


def test_close_closes_the_private_loop(remote: RemoteService, daemon: Daemon) -> None:
    """close() ends the loop thread and closes its loop (no 'unclosed event loop'); a second close() is harmless."""
    client = RemoteService(daemon.url, token=TOKEN, settings=BlipSettings())
    client.stats()
    loop, thread = _loop_of(client)
    client.close()
    assert not thread.is_alive() and loop.is_closed()
    client.close()
    with pytest.raises(ServiceClosed):
        client.stats()


def test_close_from_a_progress_callback_ends_the_batch_and_the_loop(
    daemon: Daemon, shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """close() inside caption_batch's on_progress (it runs on the loop thread): the caller gets ServiceClosed at once,
    on_progress is not called again, and the loop ends with nothing pending and no unretrieved task error."""
    import asyncio
    import gc

    client = RemoteService(daemon.url, token=TOKEN, settings=BlipSettings())
    client.stats()
    loop, thread = _loop_of(client)
    calls: list[int] = []

    def on_progress(done: int, total: int) -> None:
        calls.append(done)
        if len(calls) == 1:
            client.close()
            client.close()  # twice, from inside the callback

    paths = [shared_dir / f"img{i}.png" for i in range(8)]
    started = time.monotonic()
    with pytest.raises(ServiceClosed):
        client.caption_batch(paths * 2, max_new_tokens=3, return_exceptions=True, on_progress=on_progress)
    assert time.monotonic() - started < 30
    thread.join(_CLOSE_GRACE_S)
    assert not thread.is_alive() and loop.is_closed()
    assert len(calls) == 1, calls
    assert not [t for t in asyncio.all_tasks(loop) if not t.done()]
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        gc.collect()
    assert "never retrieved" not in caplog.text


def test_close_races_new_calls_from_other_threads(daemon: Daemon, shared_dir: Path) -> None:
    """close() from several threads while others start calls: every call ends promptly, in a result or
    ServiceClosed, and the loop ends closed."""
    client = RemoteService(daemon.url, token=TOKEN, settings=BlipSettings())
    client.stats()
    loop, thread = _loop_of(client)
    outcomes: list[BaseException | str] = []

    def call() -> None:
        try:
            client.stats()
            outcomes.append("ok")
        except BaseException as exc:
            outcomes.append(exc)

    workers = [threading.Thread(target=call) for _ in range(6)] + [
        threading.Thread(target=client.close) for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(_CLOSE_GRACE_S)
        assert not worker.is_alive()
    thread.join(_CLOSE_GRACE_S)
    assert loop.is_closed()
    assert len(outcomes) == 6 and all(o == "ok" or isinstance(o, ServiceClosed) for o in outcomes), outcomes


async def test_batches_on_a_closed_service_raise_service_closed_once(daemon: Daemon, shared_dir: Path) -> None:
    """return_exceptions=True keeps per-image errors, not the service's own state: after close() every batch path
    raises ServiceClosed once, as the local Blip2Service does."""
    client = RemoteService(daemon.url, token=TOKEN, settings=BlipSettings())
    client.close()
    paths = [shared_dir / "img0.png", shared_dir / "img1.png"]
    with anyio.fail_after(30):
        with pytest.raises(ServiceClosed):
            await client.aembed_images(paths, return_exceptions=True)
        with pytest.raises(ServiceClosed):
            await client.aanswer_batch(paths, ["what?", "where?"], return_exceptions=True)
        with pytest.raises(ServiceClosed):
            await client.acaption_batch(paths, return_exceptions=True)
    with pytest.raises(ServiceClosed):
        client.embed_images(paths, return_exceptions=True)


def test_a_503_in_front_of_the_daemon_keeps_its_retry_after() -> None:
    """Ray Serve or a reverse proxy at capacity says when to come back; that used to become 'Retry shortly.' and 1 s."""
    import email.utils
    import time

    from blip_tools.errors import Overloaded
    from blip_tools.remote import _retry_after_header, _status_error

    assert _retry_after_header({"retry-after": "7"}) == 7.0
    assert _retry_after_header({"retry-after": " 2.5 "}) == 2.5
    soon = email.utils.formatdate(time.time() + 30, usegmt=True)  # the HTTP-date form
    assert 25.0 <= (_retry_after_header({"retry-after": soon}) or 0.0) <= 31.0
    for absent in ({}, {"retry-after": ""}, {"retry-after": "soon"}, {"retry-after": "nan"}):
        assert _retry_after_header(absent) is None
    assert _retry_after_header({"retry-after": "-3"}) == 0.0
    error = _status_error(503, "http://h/mcp", retry_after=7.0)
    assert isinstance(error, Overloaded) and error.retry_after_s == 7.0 and str(error).endswith("Retry after 7.0 s.")
    plain = _status_error(429, "http://h/mcp")
    assert isinstance(plain, Overloaded) and plain.retry_after_s == 1.0 and str(plain).endswith("Retry after 1.0 s.")


def test_files_that_are_not_images_are_never_uploaded(tmp_path: Path) -> None:
    """A prompt-injected call could name any readable file; sending 'data' must not mean sending a private key."""
    from PIL import Image

    from blip_tools.errors import InvalidImage
    from blip_tools.settings import BlipSettings

    key = tmp_path / "id_ed25519"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n")
    settings = BlipSettings()
    for ref in (str(key), key.as_uri(), key):
        with pytest.raises(InvalidImage, match=r"not an image file.*not sent"):
            prepare_image(ref, settings, send_data=True)
    assert prepare_image(str(key), settings, send_data=False) == (str(key), None)  # a path: the daemon decides
    picture = tmp_path / "ok.png"
    Image.new("RGB", (8, 8)).save(picture)
    wire, label = prepare_image(str(picture), settings, send_data=True)
    assert wire.startswith("data:image/png;base64,") and label == str(picture)


def test_a_token_over_plain_http_to_another_host_is_warned_about(caplog: pytest.LogCaptureFixture) -> None:
    from blip_tools.remote import DaemonClient

    with caplog.at_level(logging.WARNING, logger="blip_tools.remote"):
        DaemonClient("http://127.0.0.1:8765/mcp", token=TOKEN)
        DaemonClient("http://gpu-box:8765/mcp")
        DaemonClient("https://gpu-box/mcp", token=TOKEN)
        assert not caplog.records
        DaemonClient("http://gpu-box:8765/mcp", token=TOKEN)
    assert [r.getMessage().split(" is sent")[0] for r in caplog.records] == ["the token for http://gpu-box:8765/mcp"]
