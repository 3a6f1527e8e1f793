"""Overload end to end: a host calls through the real stdio proxy (`blip-mcp --connect`, a subprocess) into a daemon
whose one-slot queue is full, gets the daemon's `[overloaded]` tool error with its retry hint, and both the proxy
and the daemon keep serving afterwards (the call that held the slot finishes too). A server at capacity in front of
the daemon (HTTP 503 with Retry-After) gives the same numeric hint: the header's seconds."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import pytest
from _mcp_testlib import REPO, TOKEN, Gate, apoll, make_service, serving

from blip_tools.remote import error_from_text

pytestmark = pytest.mark.anyio

_RETRY_HINT = re.compile(r"retry after ([0-9]+(?:\.[0-9]+)?) s", re.IGNORECASE)


@dataclass
class _Daemon:
    url: str
    service: Any
    gate: Gate


@pytest.fixture(scope="module")
def busy_daemon(tiny_checkpoint: Path) -> Iterator[_Daemon]:
    """`blip-mcp --transport http` in a thread on a private service with a one-slot queue and a gated model."""
    import uvicorn

    from mcp_server import create_server
    from mcp_server.http import HttpConfig, build_http_app, uvicorn_config

    service = make_service(tiny_checkpoint, max_queue=1, max_batch_size=1, max_wait_ms=0.0)
    gate = Gate(service)
    config = HttpConfig(host="127.0.0.1", port=0, token=TOKEN)
    try:
        with serving(uvicorn.Server(uvicorn_config(build_http_app(create_server(service), config), config))) as port:
            yield _Daemon(f"http://127.0.0.1:{port}/mcp", service, gate)
    finally:
        service.close()


def _proxy(url: str) -> Any:
    from mcp.client.stdio import StdioServerParameters

    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP_")}
    env.update(BLIP_TOKEN=TOKEN, PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_server", "--connect", url, "--log-level", "WARNING"], env=env
    )


def _text(result: Any) -> str:
    return "\n".join(getattr(block, "text", "") for block in result.content)


async def test_an_overloaded_daemon_gives_a_retry_hint_through_the_proxy_and_both_keep_serving(
    busy_daemon: _Daemon, mcp_images: list[str]
) -> None:
    from mcp import Client

    daemon, service = busy_daemon, busy_daemon.service
    before = service.stats()
    queued: dict[str, Any] = {}
    with anyio.fail_after(180):
        async with Client(_proxy(daemon.url)) as host:
            assert "caption_image" in {t.name for t in (await host.list_tools()).tools}
            with daemon.gate.holding(mcp_images[0]):  # the worker is busy on a blocker...

                async def fill_the_queue() -> None:
                    queued["result"] = await host.call_tool("caption_image", {"image": mcp_images[1]})

                async with anyio.create_task_group() as tg:
                    tg.start_soon(fill_the_queue)
                    await apoll(lambda: service.stats().queue_depth >= 1)  # ...and this call holds the one slot
                    refused = await host.call_tool("caption_image", {"image": mcp_images[2]})
                    assert service.stats().rejected == before.rejected + 1
                    daemon.gate.release()  # the blocker and the queued call run; the task group waits for it
            assert refused.is_error, refused
            text = _text(refused)
            assert text.startswith("[overloaded] "), text
            hint = _RETRY_HINT.search(text)
            assert hint is not None, text
            parsed = error_from_text(text)  # what RemoteService makes of it: the same hint, typed
            assert parsed.code == "overloaded" and parsed.retry_after_s == float(hint.group(1))  # type: ignore[attr-defined]
            assert queued["result"].is_error is False, _text(queued["result"])
            # Both keep serving: the same proxy, a fresh call, a full queue no more.
            again = await host.call_tool("caption_image", {"image": mcp_images[2]})
            assert again.is_error is False, _text(again)
            assert again.structured_content["caption"]
            stats = await host.read_resource("blip://stats")
            assert '"queue_depth":0' in stats.contents[0].text.replace(" ", "")  # type: ignore[union-attr]
    assert service.stats().queue_depth == 0


@pytest.fixture
def answering_503() -> Iterator[str]:
    """A server in front of the daemon (Ray Serve, a reverse proxy) that is at capacity: 503 with Retry-After: 7."""
    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"retry-after", b"7"), (b"content-type", b"text/plain")]
        await send({"type": "http.response.start", "status": 503, "headers": headers})
        await send({"type": "http.response.body", "body": b"Service Unavailable"})

    with serving(
        uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="off"))
    ) as port:
        yield f"http://127.0.0.1:{port}/mcp"


async def test_a_server_at_capacity_in_front_of_the_daemon_gives_the_numeric_retry_hint(answering_503: str) -> None:
    from mcp import Client

    from blip_tools.settings import BlipSettings
    from mcp_server.proxy import create_proxy

    with anyio.fail_after(60):
        async with Client(create_proxy(answering_503, settings=BlipSettings())) as host:
            refused = await host.call_tool("caption_image", {"image": "/nonexistent/x.png"})
    text = _text(refused)
    assert refused.is_error and text.startswith("[overloaded] "), text
    assert "Retry after 7.0 s." in text, text
