"""Bounds on session-based MCP clients over HTTP: at most `max_sessions` open sessions (one more gets 503, clients
without sessions are unaffected), and a session with nothing in flight for `session_idle_timeout_s` is forgotten,
which frees its slot; a session in use is kept."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import pytest
from _mcp_testlib import REPO, TOKEN, WAIT_S, serving

from blip_tools.errors import InvalidInput

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "leaky", "version": "0"}},
}
IDLE_S = 1.5
MAX_SESSIONS = 2


@pytest.fixture
def bounded_server(service: Any) -> Iterator[str]:
    """The HTTP app on the shared tiny service with a short session idle timeout and room for two sessions."""
    import uvicorn

    from mcp_server import create_server
    from mcp_server.http import HttpConfig, build_http_app, uvicorn_config

    config = HttpConfig(port=0, token=TOKEN, session_idle_timeout_s=IDLE_S, max_sessions=MAX_SESSIONS)
    with serving(uvicorn.Server(uvicorn_config(build_http_app(create_server(service), config), config))) as port:
        yield f"http://127.0.0.1:{port}"


def _open(http: httpx.Client) -> httpx.Response:
    """An `initialize` without a session ID: opens a session when there is room."""
    return http.post("/mcp", json=INIT, headers={**ACCEPT, **AUTH})


def _session(http: httpx.Client) -> dict[str, str]:
    r = _open(http)
    assert r.status_code == 200, r.text
    headers = {**ACCEPT, **AUTH, "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
    assert http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers).is_success
    return headers


def _tools_list(http: httpx.Client, headers: dict[str, str]) -> int:
    return http.post("/mcp", json={"jsonrpc": "2.0", "id": 9, "method": "tools/list"}, headers=headers).status_code


def test_sessions_are_bounded_and_idle_ones_are_forgotten(bounded_server: str) -> None:
    from blip_tools.remote import DaemonClient

    with httpx.Client(base_url=bounded_server, timeout=30) as http:
        kept, leaked = _session(http), _session(http)  # a client that never closes `leaked`
        full = _open(http)
        assert full.status_code == 503 and "Too many open sessions" in full.text
        assert "mcp-session-id" not in full.headers
        # Clients that hold no session (`RemoteService`, `blip-mcp --connect`) are served all the same.
        tools = anyio.run(DaemonClient(f"{bounded_server}/mcp", token=TOKEN).list_tools)
        assert "caption_image" in {tool.name for tool in tools}
        # `kept` stays in use (a request at least every IDLE_S / 5); `leaked` goes idle and is forgotten.
        deadline = time.monotonic() + WAIT_S
        while (fresh := _open(http)).status_code == 503:
            assert time.monotonic() < deadline, "the idle session was never forgotten"
            assert _tools_list(http, kept) == 200
            time.sleep(IDLE_S / 5)  # the pace of a client in use, not a wait for the condition
        assert fresh.status_code == 200, fresh.text
        assert _tools_list(http, leaked) == 404  # its ID is gone: the client would start a new session
        assert _tools_list(http, kept) == 200
        body = json.loads(full.text)
        assert body["error"]["message"] == "Too many open sessions"


@pytest.mark.parametrize(
    ("options", "ok"),
    [
        ({}, True),
        ({"session_idle_timeout_s": 0.5, "max_sessions": 1}, True),
        ({"session_idle_timeout_s": 0}, False),
        ({"session_idle_timeout_s": float("inf")}, False),
        ({"session_idle_timeout_s": float("nan")}, False),
        ({"max_sessions": 0}, False),
        ({"max_sessions": True}, False),
    ],
)
def test_http_config_checks_the_session_bounds(options: dict[str, Any], ok: bool) -> None:
    from mcp_server.http import DEFAULT_MAX_SESSIONS, DEFAULT_SESSION_IDLE_TIMEOUT_S, HttpConfig

    config = HttpConfig(**options)
    if ok:
        config.check()
        assert (config.session_idle_timeout_s, config.max_sessions) != (None, None)
        if not options:
            assert (config.session_idle_timeout_s, config.max_sessions) == (600.0, 1000)
            assert (DEFAULT_SESSION_IDLE_TIMEOUT_S, DEFAULT_MAX_SESSIONS) == (600.0, 1000)
    else:
        with pytest.raises(InvalidInput, match=next(iter(options))):
            config.check()


def test_cli_refuses_a_bad_session_bound_before_loading_anything() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP_")}
    proc = subprocess.run(
        [sys.executable, "-m", "mcp_server", "--transport", "http", "--max-sessions", "0", "--model", "/nonexistent"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert "max_sessions must be an integer >= 1, got 0" in proc.stderr
