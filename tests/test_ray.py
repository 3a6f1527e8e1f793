"""Scale-out on Ray Serve: a local Ray instance on CPU, two replicas of the tiny checkpoint.

Requests spread over both replicas and batch inside each; beyond `max_queued_requests` callers get
`Overloaded`; the same deployment speaks MCP over Ray's HTTP proxy, so `RemoteService` (and the stdio proxy)
can target it. One Ray instance and one deployment serve the whole module.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from _testlib import free_port, local_ray_serve, record_mcp_requests  # noqa: E402

from blip_tools import BlipSettings  # noqa: E402
from blip_tools.errors import InvalidImage, ModelNotAvailable, Overloaded  # noqa: E402
from blip_tools.ray_serve import RayServeClient, RayServeConfig, build_app, map_ray_error  # noqa: E402
from blip_tools.remote import RemoteService  # noqa: E402

MAX_ONGOING = 8
MAX_QUEUED = 16


@pytest.fixture(scope="module")
def ray_app(tiny_checkpoint: Path) -> Iterator[dict[str, Any]]:
    """Ray on 2 CPUs, Serve's HTTP proxy on a free loopback port, 2 replicas of the tiny checkpoint."""
    from blip_tools.testing import tiny_settings_kwargs

    with local_ray_serve() as port:
        settings = BlipSettings(**tiny_settings_kwargs(tiny_checkpoint), max_wait_ms=50.0)
        config = RayServeConfig(
            num_replicas=2,
            num_cpus=0.5,
            max_ongoing_requests=MAX_ONGOING,
            max_queued_requests=MAX_QUEUED,
        )
        handle = serve.run(build_app(settings, config), name=config.name, route_prefix="/")
        yield {"handle": handle, "url": f"http://127.0.0.1:{port}/mcp"}


@pytest.fixture
def image() -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(7).integers(0, 256, size=(40, 48, 3), dtype=np.uint8), "RGB")


def test_requests_spread_over_both_replicas_and_batch_within_each(
    ray_app: dict[str, Any], image: Any, service: Any
) -> None:
    handle = ray_app["handle"]

    async def burst() -> list[dict[str, Any]]:
        calls = [handle.caption.remote(image, None, max_new_tokens=8) for _ in range(2 * MAX_ONGOING)]
        return list(await asyncio.wait_for(asyncio.gather(*calls), timeout=120))

    replies = asyncio.run(burst())
    by_replica: dict[str, list[int]] = {}
    for reply in replies:
        by_replica.setdefault(reply["replica"], []).append(reply["result"]["timing"]["batch_size"])
    assert len(by_replica) == 2, f"all requests went to {list(by_replica)}"
    assert len({r["pid"] for r in replies}) == 2  # two processes, two model copies
    for replica, sizes in by_replica.items():
        assert max(sizes) > 1, f"replica {replica} never batched: {sizes}"
    expected = service.caption(image, max_new_tokens=8).caption
    assert {r["result"]["caption"] for r in replies} == {expected}


def test_overload_beyond_the_queue_gives_overloaded(ray_app: dict[str, Any], image: Any) -> None:
    client = RayServeClient(ray_app["handle"])
    total = 2 * (2 * MAX_ONGOING + MAX_QUEUED)

    async def flood() -> list[Any]:
        calls = [client.acaption(image, max_new_tokens=30) for _ in range(total)]
        return list(await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=120))

    outcomes = asyncio.run(flood())
    rejected = [o for o in outcomes if isinstance(o, Overloaded)]
    served = [o for o in outcomes if not isinstance(o, BaseException)]
    assert rejected, "no request was refused beyond the queue"
    assert len(served) >= MAX_QUEUED, f"only {len(served)} served: the first max_queued_requests always get in"
    assert len(rejected) + len(served) == total  # nothing else went wrong
    assert "retry" in str(rejected[0]).lower() and rejected[0].retry_after_s > 0


def test_remote_service_speaks_mcp_to_the_ray_deployment(ray_app: dict[str, Any], image: Any, service: Any) -> None:
    with RemoteService(ray_app["url"]) as remote:
        assert remote.model_info().model == service.settings.model
        assert remote.caption(image, max_new_tokens=8).caption == service.caption(image, max_new_tokens=8).caption
        assert remote.stats().models_loaded >= 1


def test_over_http_a_tool_call_is_one_request(
    ray_app: dict[str, Any], image: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ray's limits count HTTP requests: a call that needs two can be refused after its work is done."""
    with RemoteService(ray_app["url"]) as remote:
        remote.caption(image, max_new_tokens=4)  # the first call may negotiate and list the tools' parameters
        sent = record_mcp_requests(monkeypatch)
        remote.caption(image, max_new_tokens=4)
    assert sent == ["tools/call"]


def test_back_pressure_maps_to_overloaded() -> None:
    from ray.serve.exceptions import BackPressureError

    error = map_ray_error(BackPressureError(num_queued_requests=16, max_queued_requests=16))
    assert isinstance(error, Overloaded) and "replicas" in str(error)
    assert map_ray_error(ValueError("unrelated")) is None


def test_a_session_based_mcp_client_works_across_replicas(ray_app: dict[str, Any], image: Any, service: Any) -> None:
    """A standard 2025-era streamable-HTTP client (initialize, then requests in its session) against two replicas:
    Ray sends its requests to either one, and every request is answered (no "404 Session not found")."""
    import io

    import anyio
    from mcp import Client

    from blip_tools.remote import data_uri

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    progress: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append(value)

    async def session() -> tuple[list[set[str]], Any, Any]:
        with anyio.fail_after(120):
            async with Client(ray_app["url"], mode="legacy") as client:
                listed = [{t.name for t in (await client.list_tools()).tools} for _ in range(12)]
                caption = await client.call_tool("caption_image", {"image": data_uri(buffer.getvalue())})
                batch = await client.call_tool(
                    "caption_images",
                    {"images": [data_uri(buffer.getvalue())] * 3, "max_new_tokens": 4},
                    progress_callback=on_progress,
                )
                return listed, caption, batch

    listed, caption, batch = anyio.run(session)
    assert all("caption_image" in names for names in listed)
    assert caption.is_error is False, caption.content
    assert caption.structured_content["caption"] == service.caption(image).caption
    assert batch.is_error is False and batch.structured_content["succeeded"] == 3
    assert progress and max(progress) <= 3  # progress still reaches a session-based client


def test_a_checkpoint_that_does_not_load_fails_the_deploy_with_model_not_available(
    ray_app: dict[str, Any], tmp_path: Path
) -> None:
    """A bad `--model` path: once Ray gives up on the replica, `run` raises the replica's `ModelNotAvailable`
    (not Serve's bare "Deploying application ... failed" RuntimeError), with the path in its message, and removes
    the failed app it created (no `DEPLOY_FAILED` left in `serve status`); the other app keeps running."""
    from blip_tools.ray_serve import run

    config = RayServeConfig(num_cpus=0.25, name="broken", route_prefix="/broken", max_constructor_retries=1)
    try:
        with pytest.raises(ModelNotAvailable, match="nope") as caught:
            run(BlipSettings(model=str(tmp_path / "nope")), config)
        assert "broken" in str(caught.value) and "Could not load" in str(caught.value)
        applications = serve.status().applications
        assert "broken" not in applications, applications["broken"].status
        assert applications["blip"].status == "RUNNING"
    finally:
        if "broken" in serve.status().applications:
            serve.delete("broken")


def _fake_serve(monkeypatch: pytest.MonkeyPatch, before: dict[str, str], error: BaseException) -> list[str]:
    """`run` against a Serve whose `serve.run` raises `error`, with apps `before` (name → status) already there."""
    from types import SimpleNamespace

    calls: list[str] = []

    def failing_run(*args: Any, **kwargs: Any) -> None:
        calls.append(f"serve.run:{kwargs['name']}")
        raise error

    apps = {name: SimpleNamespace(status=status, deployments={}, message="") for name, status in before.items()}
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(serve, "run", failing_run)
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications=apps))
    monkeypatch.setattr(serve, "delete", lambda name, *a, **k: calls.append(f"serve.delete:{name}"))
    return calls


@pytest.mark.parametrize(
    ("before", "error", "deleted"),
    [
        ({"other": "RUNNING"}, RuntimeError("Deploying application blip failed"), True),
        ({"blip": "DEPLOY_FAILED"}, RuntimeError("Deploying application blip failed"), True),
        ({}, KeyboardInterrupt(), True),  # Ctrl-C while the replicas start
        ({"blip": "RUNNING"}, RuntimeError("Deploying application blip failed"), False),  # someone's serving app
    ],
)
def test_a_failed_deploy_removes_only_the_app_it_created(
    monkeypatch: pytest.MonkeyPatch, before: dict[str, str], error: BaseException, deleted: bool
) -> None:
    """`run` deletes the app its failed deploy left behind, never another app, and never an app of the same name
    that was serving before it (a failed upgrade of someone's app stays for its owner to see)."""
    from blip_tools.ray_serve import run

    calls = _fake_serve(monkeypatch, before, error)
    with pytest.raises(ModelNotAvailable if isinstance(error, RuntimeError) else KeyboardInterrupt):
        run(BlipSettings(model="m"), RayServeConfig())
    assert calls == ["serve.run:blip", "serve.delete:blip"] if deleted else ["serve.run:blip"]


def test_an_error_raised_in_a_replica_reaches_the_caller_as_itself(ray_app: dict[str, Any]) -> None:
    client = RayServeClient(ray_app["handle"])
    with pytest.raises(InvalidImage) as caught:
        asyncio.run(asyncio.wait_for(client.acaption("/nonexistent/x.png"), timeout=60))
    assert type(caught.value) is InvalidImage  # not Ray's RayTaskError(InvalidImage) wrapper
    assert "ServeReplica" not in str(caught.value) and "Traceback" not in str(caught.value)


def test_a_replica_killed_mid_call_gives_model_not_available(ray_app: dict[str, Any], image: Any) -> None:
    """SIGKILL (the OOM killer, a crash) of a replica while it serves calls: those calls fail with a typed,
    retryable error instead of Ray's ActorDiedError; the others are served. Runs last: it costs a replica."""
    import os
    import signal

    import anyio

    client = RayServeClient(ray_app["handle"])

    async def scenario() -> tuple[list[Any], int]:
        with anyio.fail_after(90):
            calls: list[asyncio.Future[Any]] = []
            while True:  # until some replica reports calls in flight: that one is the victim
                if all(call.done() for call in calls):  # a round can end before a stats call reaches its replica
                    calls += [
                        asyncio.ensure_future(client.acaption(image, max_new_tokens=200, min_new_tokens=200))
                        for _ in range(6)
                    ]
                stats = await client.astats()
                in_flight = stats.requests - stats.completed - stats.errors - stats.cancelled - stats.expired
                if in_flight > 0 and client.last_replica is not None:
                    victim = int(client.last_replica["pid"])
                    break
                await asyncio.sleep(0.05)
            os.kill(victim, signal.SIGKILL)
            return list(await asyncio.gather(*calls, return_exceptions=True)), victim

    outcomes, victim = asyncio.run(scenario())
    lost = [o for o in outcomes if isinstance(o, BaseException)]
    assert lost, f"no call was in flight on the killed replica {victim}"
    assert all(isinstance(o, ModelNotAvailable) for o in lost), [type(o) for o in lost]
    assert "retry" in str(lost[0]).lower()


def _fake_cluster(monkeypatch: pytest.MonkeyPatch, proxy: tuple[str, int] | None = ("127.0.0.1", 8000)) -> list[str]:
    """Ray and Serve calls of `serve-ray` recorded instead of made; signal handlers fire as they are installed.

    `proxy` is where Serve says its HTTP proxy listens; `run` records the `RayServeConfig` it was given as
    `run:<host>:<port>`."""
    import signal

    import blip_tools.ray_serve

    calls: list[str] = []
    monkeypatch.setattr(ray, "init", lambda *a, **k: calls.append("ray.init"))
    monkeypatch.setattr(ray, "shutdown", lambda *a, **k: calls.append("ray.shutdown"))
    monkeypatch.setattr(serve, "start", lambda *a, **k: calls.append("serve.start"))
    monkeypatch.setattr(serve, "shutdown", lambda *a, **k: calls.append("serve.shutdown"))
    monkeypatch.setattr(serve, "delete", lambda name, *a, **k: calls.append(f"serve.delete:{name}"))
    monkeypatch.setattr(blip_tools.ray_serve, "proxy_address", lambda: proxy)
    monkeypatch.setattr(
        blip_tools.ray_serve, "run", lambda s, config: calls.append(f"run:{config.http_host}:{config.http_port}")
    )

    def instant_signal(signum: int, handler: Any) -> Any:  # as if Ctrl-C came right after the handler was set
        if callable(handler):
            handler(signum, None)
        return signal.SIG_DFL

    monkeypatch.setattr(signal, "signal", instant_signal)
    return calls


def test_ctrl_c_on_a_shared_cluster_removes_only_this_app(monkeypatch: pytest.MonkeyPatch) -> None:
    """With --address, Ctrl-C deletes this app; `serve.shutdown()` would take every other team's Serve app down."""
    from blip_tools.cli import main

    calls = _fake_cluster(monkeypatch)
    assert main(["serve-ray", "--address", "auto", "--model", "m", "--name", "blip-team"]) == 0
    assert "serve.delete:blip-team" in calls and "serve.shutdown" not in calls
    assert calls[-1] == "ray.shutdown"

    calls.clear()  # a local instance (no --address) is ours: all of it goes
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve-ray", "--model", "m"]) == 0
    assert "serve.shutdown" in calls and calls[-1] == "ray.shutdown"


def test_serve_ray_gives_a_local_proxy_time_to_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Ray instance serve-ray starts gets 20 s proxy readiness checks (Ray's 5 s killed a proxy that took 21 s on
    a busy host); a cluster it joins, or a value the user set, is left as it is."""
    from blip_tools.cli import main

    _fake_cluster(monkeypatch)
    seen: list[str | None] = []
    monkeypatch.setattr(
        ray, "init", lambda *a, **k: seen.append(os.environ.get("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"))
    )
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "")  # recorded, so what serve-ray sets is undone
    monkeypatch.delenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S")
    assert main(["serve-ray", "--address", "auto", "--model", "m"]) == 0
    assert main(["serve-ray", "--model", "m"]) == 0
    monkeypatch.setenv("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "7")
    assert main(["serve-ray", "--model", "m"]) == 0
    assert seen == [None, "20", "7"]


def test_a_failed_deploy_still_shuts_down_what_serve_ray_started(monkeypatch: pytest.MonkeyPatch) -> None:
    import blip_tools.ray_serve
    from blip_tools.cli import main

    calls = _fake_cluster(monkeypatch)

    def failing_run(*args: Any, **kwargs: Any) -> None:
        raise ModelNotAvailable("Could not load the BLIP-2 checkpoint 'm'")

    monkeypatch.setattr(blip_tools.ray_serve, "run", failing_run)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve-ray", "--model", "m"]) == 2  # `error: ...`, no traceback
    assert "serve.shutdown" in calls and calls[-1] == "ray.shutdown"

    calls.clear()  # on a shared cluster `run` removed its failed app; an app of that name it did not deploy stays
    assert main(["serve-ray", "--address", "auto", "--model", "m"]) == 2
    assert not [c for c in calls if c.startswith(("serve.delete", "serve.shutdown"))]
    assert calls[-1] == "ray.shutdown"


def test_serve_ray_prints_the_port_serve_really_uses(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attached to a Serve instance already running on another port, `--port` is ignored by Serve: the endpoint
    printed (and the replicas' config) carry the port really in use, and a note says why."""
    from blip_tools.cli import main

    calls = _fake_cluster(monkeypatch, proxy=("127.0.0.1", 8123))
    assert main(["serve-ray", "--address", "auto", "--model", "m", "--port", "8000", "--detach"]) == 0
    err = capsys.readouterr().err
    assert "MCP endpoint: http://127.0.0.1:8123/mcp" in err and ":8000" not in err.replace("--port", "")
    assert "already running" in err and "127.0.0.1:8123" in err
    assert "run:127.0.0.1:8123" in calls


def test_serve_ray_refuses_an_existing_open_proxy_without_a_token(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--host 127.0.0.1` passes the token rule, but the running Serve listens on every interface: the app would
    be open to the network without a token, so serve-ray refuses before deploying."""
    from blip_tools.cli import main

    monkeypatch.delenv("BLIP_TOKEN", raising=False)
    calls = _fake_cluster(monkeypatch, proxy=("0.0.0.0", 8000))
    assert main(["serve-ray", "--address", "auto", "--model", "m"]) == 2
    assert "0.0.0.0:8000" in capsys.readouterr().err
    assert not [c for c in calls if c.startswith(("run", "serve.delete"))]


def test_serve_ray_brackets_an_ipv6_host_in_its_endpoint(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from blip_tools.cli import main

    _fake_cluster(monkeypatch, proxy=("::1", 8000))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["serve-ray", "--model", "m", "--host", "::1", "--route-prefix", "/blip"]) == 0
    err = capsys.readouterr().err
    assert "MCP endpoint: http://[::1]:8000/blip/mcp" in err
    assert "blip-mcp --connect http://[::1]:8000/blip/mcp" in err
    assert "already running" not in err


def test_proxy_address_reads_the_running_serve_instance(ray_app: dict[str, Any]) -> None:
    """The address Serve really uses, also after a `serve.start` asking for another port (serve-ray attached)."""
    from urllib.parse import urlsplit

    from blip_tools.ray_serve import proxy_address

    port = urlsplit(ray_app["url"]).port
    assert proxy_address() == ("127.0.0.1", port)
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})  # attached: Serve ignores the new port
    assert proxy_address() == ("127.0.0.1", port)
