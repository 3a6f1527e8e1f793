"""Adversarial MCP transport traffic: malformed JSON-RPC over HTTP and stdio, Host/Origin and token variants,
oversize bodies and mid-call disconnects. After each abuse the server must still answer a good request."""

from __future__ import annotations

import json
import socket
from typing import Any

import anyio
import httpx
import pytest
from _mcp_testlib import TOKEN, HttpServer, RawStdio, apoll
from mcp.types import jsonrpc_message_adapter

ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "adv", "version": "0"}},
}
PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND = -32700, -32600, -32601

#: (label, raw line) pairs that are not valid JSON-RPC messages, with the id an answer must carry.
MALFORMED: list[tuple[str, bytes, int, Any]] = [
    ("garbage", b"garbage {{{ not json", PARSE_ERROR, None),
    ("invalid utf-8", b"\xff\xfe\xfd\x00\x01", PARSE_ERROR, None),
    ("deep nesting", b"[" * 100_000, PARSE_ERROR, None),
    ("json scalar", b"42", INVALID_REQUEST, None),
    ("batch array", b'[{"jsonrpc":"2.0","id":5,"method":"tools/list"}]', INVALID_REQUEST, None),
    ("missing method", b'{"jsonrpc":"2.0","id":6,"params":{}}', INVALID_REQUEST, 6),
    ("params not an object", b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":"x"}', INVALID_REQUEST, 7),
    ("method not a string", b'{"jsonrpc":"2.0","id":8,"method":123}', INVALID_REQUEST, 8),
    ("wrong jsonrpc version", b'{"jsonrpc":"1.0","id":9,"method":"tools/list"}', INVALID_REQUEST, 9),
    ("fractional id", b'{"jsonrpc":"2.0","id":1.5,"method":"tools/list"}', INVALID_REQUEST, None),
    ("empty object", b"{}", INVALID_REQUEST, None),
]


# ============================================================================================ stdio
def good_tools_list(stdio: RawStdio) -> None:
    assert "tools" in stdio.request("tools/list")["result"]


@pytest.mark.parametrize(("label", "line", "code", "request_id"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_stdio_malformed_lines_get_error_answers(
    stdio_server: RawStdio, label: str, line: bytes, code: int, request_id: Any
) -> None:
    stdio_server.send_raw(line)
    answer = stdio_server.receive()
    assert answer["error"]["code"] == code, (label, answer)
    assert answer["id"] == request_id
    good_tools_list(stdio_server)


def test_stdio_odd_but_valid_traffic(stdio_server: RawStdio) -> None:
    huge = 10**30
    stdio_server.send({"jsonrpc": "2.0", "id": huge, "method": "tools/list"})
    assert stdio_server.receive_for(huge)["result"]["tools"]
    long_id = "x" * 50_000
    stdio_server.send({"jsonrpc": "2.0", "id": long_id, "method": "tools/list"})
    assert stdio_server.receive_for(long_id)["result"]["tools"]
    # Unknown method: a JSON-RPC error from the SDK.
    stdio_server.send({"jsonrpc": "2.0", "id": "u", "method": "no/such/method"})
    assert stdio_server.receive_for("u")["error"]["code"] == METHOD_NOT_FOUND
    # Unknown tool: an error (result or protocol), never silence.
    stdio_server.send(
        {"jsonrpc": "2.0", "id": "t", "method": "tools/call", "params": {"name": "rm_rf", "arguments": {}}}
    )
    unknown_tool = stdio_server.receive_for("t")
    assert unknown_tool.get("error") or unknown_tool["result"]["isError"]
    # Notifications are never answered, even malformed ones; a stray response is ignored.
    stdio_server.send_raw(b'{"jsonrpc":"2.0","method":"notifications/cancelled","params":"nope"}')
    stdio_server.send_raw(b'{"jsonrpc":"2.0","method":"notifications/whatever"}')
    stdio_server.send_raw(b'{"jsonrpc":"2.0","id":424242,"result":{}}')
    stdio_server.send_raw(b"   ")
    good_tools_list(stdio_server)  # fails if any of the above produced an answer
    # Wrong argument types for a tool: a tool error result.
    bad_args = stdio_server.request("tools/call", {"name": "caption_image", "arguments": {"image": 12}})
    assert bad_args["result"]["isError"] is True
    for line in stdio_server.lines:
        jsonrpc_message_adapter.validate_json(line)


# ============================================================================================ HTTP
def sse_or_json(response: httpx.Response) -> dict[str, Any]:
    """The JSON-RPC message in a streamable-HTTP response body (JSON or a single SSE event)."""
    text = response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        data = [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]
        return json.loads(data[-1])
    return json.loads(text)


def open_session(http: httpx.Client, srv: HttpServer) -> dict[str, str]:
    """Initialize a (handshake-era) session and return the headers that address it."""
    r = http.post("/mcp", json=INIT, headers={**ACCEPT, **srv.headers()})
    assert r.status_code == 200, r.text
    headers = {
        **ACCEPT,
        **srv.headers(),
        "mcp-session-id": r.headers["mcp-session-id"],
        "mcp-protocol-version": "2025-06-18",
    }
    r = http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
    assert r.status_code == 202
    return headers


def assert_serving(http: httpx.Client, headers: dict[str, str], request_id: int = 77) -> None:
    r = http.post("/mcp", json={"jsonrpc": "2.0", "id": request_id, "method": "tools/list"}, headers=headers)
    assert r.status_code == 200, r.text
    message = sse_or_json(r)
    assert message["id"] == request_id and message["result"]["tools"]


@pytest.mark.parametrize(("label", "line", "code", "request_id"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_http_malformed_bodies_get_error_answers(
    http_server: HttpServer, label: str, line: bytes, code: int, request_id: Any
) -> None:
    with httpx.Client(base_url=http_server.base, timeout=30) as http:
        headers = open_session(http, http_server)
        r = http.post("/mcp", content=line, headers=headers)
        if label == "fractional id":
            # The SDK reads a non-integer id as a notification: accepted, never answered, nothing hangs.
            assert r.status_code == 202, r.text
        else:
            assert 400 <= r.status_code < 500, (label, r.status_code, r.text)
            message = sse_or_json(r)
            assert message["jsonrpc"] == "2.0" and "error" in message, message
            assert message["error"]["code"] in (PARSE_ERROR, INVALID_REQUEST, -32602), message
        assert_serving(http, headers)


def test_http_odd_requests(http_server: HttpServer) -> None:
    with httpx.Client(base_url=http_server.base, timeout=30) as http:
        headers = open_session(http, http_server)
        huge = 10**30
        r = http.post("/mcp", json={"jsonrpc": "2.0", "id": huge, "method": "tools/list"}, headers=headers)
        assert sse_or_json(r)["id"] == huge
        assert http.post("/mcp", content=b"{}", headers={**headers, "Content-Type": "text/plain"}).status_code == 400
        assert http.put("/mcp", content=b"{}", headers=headers).status_code in (405, 400)
        assert http.post("/mcp", content=b"", headers=headers).status_code == 400
        unknown = {**headers, "mcp-session-id": "not-a-session"}
        stale = http.post("/mcp", json={"jsonrpc": "2.0", "id": 3, "method": "tools/list"}, headers=unknown)
        assert stale.status_code in (400, 404)
        assert_serving(http, headers)


@pytest.mark.parametrize(
    ("host", "status"),
    [
        ("evil.example", 421),
        ("127.0.0.1.evil.example:{port}", 421),
        ("127.0.0.1:{port}x", 421),
        ("localhost:{port}", 200),
        ("127.0.0.1:{port}", 200),
    ],
)
def test_http_host_header_variants(http_server: HttpServer, host: str, status: int) -> None:
    r = httpx.get(f"{http_server.base}/healthz", headers={"Host": host.format(port=http_server.port)}, timeout=30)
    assert r.status_code == status


def test_http_missing_host_header_is_refused(http_server: HttpServer) -> None:
    with socket.create_connection(("127.0.0.1", http_server.port), timeout=30) as sock:
        sock.sendall(b"GET /healthz HTTP/1.0\r\n\r\n")
        reply = sock.recv(4096)
    assert reply.split(b" ", 2)[1] in (b"421", b"400"), reply[:100]


@pytest.mark.parametrize(
    ("origin", "status"),
    [
        ("null", 403),
        ("http://evil.example", 403),
        ("http://localhost.evil.example:{port}", 403),
        ("http://127.0.0.1:{port}", 200),
        ("http://localhost:{port}", 200),
    ],
)
def test_http_origin_variants(http_server: HttpServer, origin: str, status: int) -> None:
    headers = {**ACCEPT, **http_server.headers(), "Origin": origin.format(port=http_server.port)}
    r = httpx.post(f"{http_server.base}/mcp", json=INIT, headers=headers, timeout=30)
    assert r.status_code == status


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Bearer x",
        f"Basic {TOKEN}",
        f"Bearer {TOKEN}x",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN.upper()}",
        f"Token {TOKEN}",
    ],
)
def test_http_token_variants_are_refused(http_server: HttpServer, authorization: str | None) -> None:
    headers = dict(ACCEPT)
    if authorization is not None:
        headers["Authorization"] = authorization
    r = httpx.post(f"{http_server.base}/mcp", json=INIT, headers=headers, timeout=30)
    assert r.status_code == 401


def test_http_token_rules(http_server: HttpServer) -> None:
    with httpx.Client(base_url=http_server.base, timeout=30) as http:
        # The scheme is case-insensitive; the token is not.
        assert http.post("/mcp", json=INIT, headers={**ACCEPT, "Authorization": f"bearer {TOKEN}"}).status_code == 200
        # A token in the query string does not count.
        assert http.post(f"/mcp?token={TOKEN}", json=INIT, headers=ACCEPT).status_code == 401
        # Default deny: a path no route serves still needs the token (routes added later are covered).
        assert http.get("/metrics").status_code == 401
        assert http.get("/metrics", headers=http_server.headers()).status_code == 404
        assert http.get("/healthz").status_code == 200


def test_http_body_limit_without_token_is_refused_before_reading(http_server: HttpServer) -> None:
    big = b"x" * (http_server.body_limit + 1)
    r = httpx.post(f"{http_server.base}/mcp", content=big, headers=ACCEPT, timeout=60)
    assert r.status_code in (401, 413)
    r = httpx.post(f"{http_server.base}/mcp", content=big, headers={**ACCEPT, **http_server.headers()}, timeout=60)
    assert r.status_code == 413


@pytest.mark.anyio
async def test_http_mid_call_disconnect_leaves_the_server_serving(
    http_server: HttpServer, mcp_images: list[str]
) -> None:
    srv = http_server
    with httpx.Client(base_url=srv.base, timeout=30) as sync_http:
        headers = open_session(sync_http, srv)
    call = {
        "jsonrpc": "2.0",
        "id": 55,
        "method": "tools/call",
        "params": {"name": "caption_image", "arguments": {"image": mcp_images[2]}},
    }
    with anyio.fail_after(90):
        with srv.gate.holding(mcp_images[0]):
            async with (
                httpx.AsyncClient(base_url=srv.base, timeout=30) as http,
                http.stream("POST", "/mcp", json=call, headers=headers) as response,
            ):
                assert response.status_code == 200
                await apoll(lambda: srv.service.stats().queue_depth >= 1)
            # Leaving the block closes the response mid-call and drops the connection.
        # The worker drains (the abandoned request either ran or was dropped) and the server answers again.
        await apoll(lambda: srv.service.stats().queue_depth == 0)
        async with httpx.AsyncClient(base_url=srv.base, timeout=30) as http:
            r = await http.post(
                "/mcp",
                json={**call, "id": 56, "params": {"name": "caption_image", "arguments": {"image": mcp_images[3]}}},
                headers=headers,
            )
            assert r.status_code == 200
            assert sse_or_json(r)["result"]["isError"] is False
            assert (await http.get("/healthz")).json()["status"] == "ok"
