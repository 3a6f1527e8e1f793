"""The MCP server over streamable HTTP on loopback: shared batching across sessions, security checks,
the body limit, cancellation and /healthz. One uvicorn server (in a thread) serves the whole module."""

from __future__ import annotations

import base64
import json
import signal
import socket
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import httpx
import httpx2
import pytest
from _mcp_testlib import (
    HTTP_MAX_IMAGE_BYTES,
    WAIT_S,
    HttpServer,
    apoll,
    http_args,
    python_process,
    ready_port,
    watching_cancellations,
    write_image,
)
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from blip_tools.results import CaptionResult, ServiceStats

pytestmark = pytest.mark.anyio

INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}},
}
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}


@asynccontextmanager
async def mcp_client(srv: HttpServer) -> AsyncIterator[Client]:
    """An SDK client over streamable HTTP with the server's token."""
    async with (
        httpx2.AsyncClient(headers=srv.headers(), timeout=httpx2.Timeout(60.0)) as http,
        Client(streamable_http_client(srv.url, http_client=http)) as client,
    ):
        yield client


def stats(srv: HttpServer) -> ServiceStats:
    return srv.service.stats()


async def test_healthz_needs_no_token(http_server: HttpServer) -> None:
    async with httpx.AsyncClient() as http:
        r = await http.get(f"{http_server.base}/healthz", timeout=30)
    assert r.status_code == 200
    assert r.json()["status"] == "ok"


async def test_three_sessions_share_one_model_and_batch_together(
    http_server: HttpServer, mcp_images: list[str]
) -> None:
    srv = http_server
    before = stats(srv)
    loaded_before = before.models_loaded
    results: dict[int, CaptionResult] = {}

    async def call(i: int) -> None:
        async with mcp_client(srv) as client:
            r = await client.call_tool("caption_image", {"image": mcp_images[i + 1]})
            assert not r.is_error, r.content
            results[i] = CaptionResult.model_validate(r.structured_content)

    with anyio.fail_after(120):
        with srv.gate.holding(mcp_images[0]):
            async with anyio.create_task_group() as tg:
                for i in range(3):
                    tg.start_soon(call, i)
                # All three requests wait in one queue while the worker is held...
                await apoll(lambda: stats(srv).queue_depth >= 3)
                # ...and the gate opens when the `holding` block ends, after the task group: open it now.
                srv.gate.release()
    after = stats(srv)
    assert after.models_loaded == loaded_before, "a session loaded its own model"
    grown = {
        size: after.batch_size_histogram.get(size, 0) - before.batch_size_histogram.get(size, 0)
        for size in after.batch_size_histogram
    }
    assert grown.get(3, 0) >= 1, f"the three sessions were not batched together: {grown}"
    assert all(r.timing.batch_size == 3 for r in results.values())
    # Batched results equal one-by-one results (greedy, float32).
    for i, result in results.items():
        assert result.caption == srv.service.caption(mcp_images[i + 1]).caption
    # And blip://stats over HTTP shows the batch too.
    with anyio.fail_after(60):
        async with mcp_client(srv) as client:
            resource = await client.read_resource("blip://stats")
    remote = ServiceStats.model_validate_json(resource.contents[0].text)  # type: ignore[union-attr]
    assert max(remote.batch_size_histogram) >= 3


async def test_token_required(http_server: HttpServer) -> None:
    async with httpx.AsyncClient(base_url=http_server.base, timeout=30) as http:
        missing = await http.post("/mcp", json=INIT, headers=ACCEPT)
        wrong = await http.post("/mcp", json=INIT, headers={**ACCEPT, "Authorization": "Bearer wrong-token-xxxxxxxx"})
        right = await http.post("/mcp", json=INIT, headers={**ACCEPT, **http_server.headers()})
    assert missing.status_code == 401
    assert "Bearer" in missing.headers["www-authenticate"]
    assert wrong.status_code == 401
    assert right.status_code == 200
    # The SDK client without the token is refused as well.
    with anyio.fail_after(30), pytest.raises(Exception):  # noqa: B017 - the SDK wraps the 401 differently per version
        async with Client(http_server.url) as client:
            await client.list_tools()


async def test_host_and_origin_checks(http_server: HttpServer) -> None:
    auth = {**ACCEPT, **http_server.headers()}
    async with httpx.AsyncClient(base_url=http_server.base, timeout=30) as http:
        bad_host = await http.post("/mcp", json=INIT, headers={**auth, "Host": "evil.example:80"})
        bad_origin = await http.post("/mcp", json=INIT, headers={**auth, "Origin": "http://evil.example"})
        good_origin = await http.post(
            "/mcp", json=INIT, headers={**auth, "Origin": f"http://localhost:{http_server.port}"}
        )
        health_bad_host = await http.get("/healthz", headers={"Host": "evil.example"})
    assert bad_host.status_code == 421
    assert bad_origin.status_code == 403
    assert good_origin.status_code == 200
    assert health_bad_host.status_code == 421


async def test_body_limit_fits_one_max_size_base64_image(http_server: HttpServer, tmp_path: Path) -> None:
    srv = http_server
    # The derived limit: one base64 image of max_image_bytes plus 256 KiB of envelope.
    assert srv.body_limit == 4 * ((HTTP_MAX_IMAGE_BYTES + 2) // 3) + 256 * 1024
    # A PNG just under max_image_bytes, sent as a data URI, fits and is captioned.
    path = write_image(tmp_path / "big.png", 7, size=(300, 300))
    data = path.read_bytes()
    assert 0.8 * HTTP_MAX_IMAGE_BYTES < len(data) <= HTTP_MAX_IMAGE_BYTES, len(data)
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    with anyio.fail_after(60):
        async with mcp_client(srv) as client:
            r = await client.call_tool("caption_image", {"image": uri})
    assert not r.is_error, r.content
    assert r.structured_content is not None
    assert r.structured_content["image"]["width"] == 300
    # A body over the limit is refused with 413 before it is parsed (with and without Content-Length).
    over = json.dumps({**INIT, "padding": "x" * srv.body_limit}).encode()
    async with httpx.AsyncClient(base_url=srv.base, timeout=60) as http:
        sized = await http.post("/mcp", content=over, headers={**ACCEPT, **srv.headers()})

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(over), 65536):
                yield over[i : i + 65536]

        chunked = await http.post("/mcp", content=chunks(), headers={**ACCEPT, **srv.headers()})
    assert sized.status_code == 413
    assert chunked.status_code == 413


async def test_cancelling_a_call_cancels_the_queued_request_and_server_keeps_serving(
    http_server: HttpServer, mcp_images: list[str]
) -> None:
    srv = http_server
    before = stats(srv)
    with anyio.fail_after(90), watching_cancellations(srv.service) as handler_cancelled:
        async with mcp_client(srv) as client:
            with srv.gate.holding(mcp_images[0]):
                with anyio.CancelScope() as scope:

                    async def cancel_when_queued() -> None:
                        await apoll(lambda: stats(srv).queue_depth >= 1)
                        scope.cancel()

                    async with anyio.create_task_group() as tg:
                        tg.start_soon(cancel_when_queued)
                        await client.call_tool("caption_image", {"image": mcp_images[2]})
                assert scope.cancelled_caught
                # The client's cancel (closing the request's HTTP stream) cancels the server-side handler...
                await apoll(handler_cancelled.is_set)
            # ...and once the worker is free, the batcher drops the cancelled request instead of running it.
            await apoll(lambda: stats(srv).cancelled > before.cancelled)
            after = stats(srv)
            assert after.completed == before.completed + 1  # only the blocker ran
            # Still serving, on the same session.
            r = await client.call_tool("caption_image", {"image": mcp_images[3]})
            assert not r.is_error, r.content
    assert stats(srv).queue_depth == 0


# ------------------------------------------------------------------------------------------ config, no server
def test_security_settings_follow_the_bind_address() -> None:
    from mcp_server.http import security_settings_for

    loop = security_settings_for("127.0.0.1")
    assert {"127.0.0.1:*", "localhost:*", "[::1]:*"} <= set(loop.allowed_hosts)
    assert "http://localhost:*" in loop.allowed_origins
    assert not any("0.0.0.0" in h for h in loop.allowed_hosts)
    specific = security_settings_for("192.0.2.7", extra_hosts=["blip.example"])
    assert {"192.0.2.7:*", "blip.example:*"} <= set(specific.allowed_hosts)
    assert "localhost:*" not in specific.allowed_hosts
    assert "https://blip.example:*" in specific.allowed_origins
    v6 = security_settings_for("::1")
    assert "[::1]:*" in v6.allowed_hosts
    assert security_settings_for("0.0.0.0").enable_dns_rebinding_protection


def test_body_limit_default_fits_one_20_mb_image() -> None:
    from blip_tools import BlipSettings
    from mcp_server.http import body_limit_for

    limit = body_limit_for(BlipSettings())
    assert limit == 26_666_668 + 262_144
    assert len(base64.b64encode(b"x" * 20_000_000)) < limit


@pytest.mark.parametrize(
    ("host", "token", "ok"),
    [
        ("127.0.0.1", None, True),
        ("::1", None, True),
        ("localhost", None, True),
        ("0.0.0.0", None, False),
        ("192.0.2.7", None, False),
        ("0.0.0.0", "x" * 32, True),
        ("127.0.0.1", "short", False),
    ],
)
def test_http_config_refuses_unsafe_binds(host: str, token: str | None, ok: bool) -> None:
    from blip_tools.errors import InvalidInput
    from mcp_server.http import HttpConfig

    config = HttpConfig(host=host, token=token)
    if ok:
        config.check()
    else:
        with pytest.raises(InvalidInput):
            config.check()


def test_cli_refuses_a_public_bind_without_a_token() -> None:
    import os
    import subprocess
    import sys

    from _mcp_testlib import REPO

    env = {k: v for k, v in os.environ.items() if k != "BLIP_TOKEN"}
    proc = subprocess.run(
        [sys.executable, "-m", "mcp_server", "--transport", "http", "--host", "0.0.0.0", "--model", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 2
    assert "without a token" in proc.stderr
    assert proc.stdout == ""


def test_the_ready_line_comes_once_the_port_listens_and_names_it(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`blip-mcp --transport http --port 0` says it is ready only once its socket listens, with the port it got:
    a client that connects as soon as it reads the line is answered. Ctrl-C then stops it (130)."""
    stderr = tmp_path / "stderr.txt"
    with python_process(http_args(tiny_checkpoint, port=0), stderr, stdout=subprocess.DEVNULL) as proc:
        port = ready_port(proc, stderr)  # not 0: the port the system picked
        response = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=WAIT_S)  # no retry: it must answer now
        assert response.status_code in (200, 503), response.text  # ok, or the model still loading
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT_S) == 130
    assert "Traceback" not in stderr.read_text(errors="replace")


def test_a_port_in_use_exits_3_before_loading_anything_and_never_says_ready(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """Another server on the port: exit status 3 with a message that says so and how to check it, and no "ready"
    (nor console URL) line first. The socket is bound before the app starts, so the model does not start loading."""
    stderr = tmp_path / "stderr.txt"
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with python_process(http_args(tiny_checkpoint, port=port), stderr, stdout=subprocess.DEVNULL) as proc:
            code = proc.wait(timeout=WAIT_S)
    text = stderr.read_text(errors="replace")
    assert code == 3, text[-3000:]
    for said_too_soon in ("HTTP ready", f"http://127.0.0.1:{port}/ui", "starting the BLIP-2 service", "Traceback"):
        assert said_too_soon not in text, text[-3000:]
    assert f"cannot listen on 127.0.0.1:{port}: address already in use" in text, text[-3000:]
    assert f"curl http://127.0.0.1:{port}/healthz" in text, text[-3000:]


def test_addresses_in_log_lines_are_written_as_urls_write_them() -> None:
    """An IPv6 host is bracketed where blip-mcp prints host:port, so the line can be pasted into a URL."""
    import errno

    from mcp_server.http import HttpConfig, _cannot_listen, authority

    assert authority("::1", 8765) == "[::1]:8765"
    assert authority("[::1]", 8765) == "[::1]:8765"
    assert authority("127.0.0.1", 8765) == "127.0.0.1:8765"
    text = _cannot_listen(HttpConfig(host="::1", port=8765), OSError(errno.EADDRINUSE, "Address in use"))
    assert text.startswith("cannot listen on [::1]:8765: address already in use")
    assert "curl http://[::1]:8765/" in text
