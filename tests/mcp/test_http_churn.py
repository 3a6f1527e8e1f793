"""The HTTP daemon under client churn: slow or half-open clients are cut off (408) instead of holding a connection
for good, an endless request head is refused (431) instead of growing the process, and a call still running stays
untouched however long it takes; a session-based client that drops a call's connection cancels that call."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from _mcp_testlib import TOKEN, WAIT_S, Gate, make_service, serving

SLOW_S = 1.0  # the servers here give clients this long (HttpConfig.client_timeout_s)
ACCEPT = {"Accept": "application/json, text/event-stream", "Content-Type": "application/json"}
INIT = json.dumps(
    {
        "jsonrpc": "2.0",
        "id": 1,
        "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "ch", "version": "0"}},
    }
).encode()


@pytest.fixture(scope="module")
def churn_service(tiny_checkpoint: Path) -> Iterator[Any]:
    service = make_service(tiny_checkpoint, max_wait_ms=2.0)
    Gate(service)
    yield service
    service.close()


@pytest.fixture(params=["auto", "h11"])
def slow_server(request: pytest.FixtureRequest, churn_service: Any) -> Iterator[int]:
    """The HTTP app with a short client timeout, on uvicorn's default parser (httptools here) and on h11."""
    import uvicorn

    from mcp_server import create_server
    from mcp_server.http import HttpConfig, build_http_app, uvicorn_config

    config = HttpConfig(port=0, token=TOKEN, client_timeout_s=SLOW_S, max_header_bytes=8192)
    app = build_http_app(create_server(churn_service), config)
    with serving(uvicorn.Server(uvicorn_config(app, config, http=request.param))) as port:
        yield port


def _head(port: int, length: int, path: str = "/mcp") -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Accept: application/json, text/event-stream\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def _outcome(sock: socket.socket, within_s: float) -> tuple[bytes, float]:
    """What the server sent before closing the connection, and when it closed (seconds from now)."""
    start = time.monotonic()
    sock.settimeout(within_s)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        raise AssertionError(f"the server kept the connection open for {within_s} s; got {received[:200]!r}") from None
    except ConnectionResetError:
        pass
    return received, time.monotonic() - start


def test_clients_that_stop_sending_are_cut_off_and_others_are_served(slow_server: int) -> None:
    port = slow_server
    connect = lambda: socket.create_connection(("127.0.0.1", port))  # noqa: E731
    silent, partial_head, partial_body = connect(), connect(), connect()
    partial_head.sendall(f"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n".encode())
    partial_body.sendall(_head(port, len(INIT)) + INIT[:10])
    try:
        for sock, answer in ((silent, b""), (partial_head, b"HTTP/1.1 408 "), (partial_body, b"HTTP/1.1 408 ")):
            received, _ = _outcome(sock, within_s=SLOW_S + 10)
            assert received.startswith(answer) if answer else received == b"", received[:200]
    finally:
        for sock in (silent, partial_head, partial_body):
            sock.close()
    r = httpx.post(f"http://127.0.0.1:{port}/mcp", content=INIT, headers={**ACCEPT, "Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200, r.text


def test_a_body_that_keeps_coming_is_not_cut_off(slow_server: int) -> None:
    """The timeout bounds pauses, not the whole upload: five pauses of 0.6 s (3 s in all) against a 1 s timeout."""
    with socket.create_connection(("127.0.0.1", slow_server)) as sock:
        sock.sendall(_head(slow_server, len(INIT)))
        step = len(INIT) // 5 + 1
        for i in range(0, len(INIT), step):
            time.sleep(SLOW_S * 0.6)
            sock.sendall(INIT[i : i + step])
        sock.settimeout(WAIT_S)
        reply = sock.recv(65536)
    assert reply.startswith(b"HTTP/1.1 200 "), reply[:300]


def test_an_endless_request_head_is_refused(slow_server: int) -> None:
    """Without a limit, httptools kept every header line: 190 MB of headers grew the daemon by 195 MB."""
    with socket.create_connection(("127.0.0.1", slow_server)) as sock:
        sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{slow_server}\r\n".encode())
        line = b"X-Pad: " + b"a" * 1000 + b"\r\n"
        refused = False
        try:
            for _ in range(2000):  # 2 MB, far past the 8 KiB allowed
                sock.sendall(line)
        except (BrokenPipeError, ConnectionResetError):
            refused = True  # the server closed it before we were done
        if not refused:
            received, _ = _outcome(sock, within_s=10)
            # 431 from our limit; h11 has a limit of its own (the same size) and answers 400
            assert received[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 400", b""), received[:300]


def test_calls_and_streams_that_outlast_the_client_timeout_are_not_cut(
    slow_server: int, churn_service: Any, tmp_path: Path
) -> None:
    """The timeout is on what the client sends: a call the model holds for 3x as long still gets its answer."""
    from _mcp_testlib import write_image

    image = str(write_image(tmp_path / "slow.png", 7))
    gate: Gate = churn_service.runtime.generate
    call = {
        "jsonrpc": "2.0",
        "id": 2,
        "method": "tools/call",
        "params": {"name": "caption_image", "arguments": {"image": image, "max_new_tokens": 3}},
    }
    auth = {**ACCEPT, "Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{slow_server}", timeout=WAIT_S) as http:
        r = http.post("/mcp", content=INIT, headers=auth)
        headers = {**auth, "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
        http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)
        with gate.holding(image), http.stream("POST", "/mcp", json=call, headers=headers) as response:
            time.sleep(SLOW_S * 3)
            gate.release()
            body = response.read()
        assert response.status_code == 200
        assert b'"isError":false' in body, body[:500]


# ------------------------------------------------------------------------------------------ dropped calls
@pytest.fixture(scope="module")
def session_server(churn_service: Any) -> Iterator[str]:
    """The HTTP app as `blip-mcp --transport http` serves it (sessions kept), on the gated tiny service."""
    import uvicorn

    from mcp_server import create_server
    from mcp_server.http import HttpConfig, build_http_app, uvicorn_config

    config = HttpConfig(port=0, token=TOKEN)
    with serving(uvicorn.Server(uvicorn_config(build_http_app(create_server(churn_service), config), config))) as port:
        yield f"http://127.0.0.1:{port}"


def test_a_session_client_that_drops_a_call_cancels_it(session_server: str, churn_service: Any, tmp_path: Path) -> None:
    """Its answer could never be delivered (no event store): the queued requests are dropped, not computed.

    Before, all of them ran once the model was free (20 killed clients: 20 captions for nobody)."""
    from _mcp_testlib import poll, watching_cancellations, write_image

    images = [str(write_image(tmp_path / f"d{i}.png", 20 + i)) for i in range(4)]
    gate: Gate = churn_service.runtime.generate
    auth = {**ACCEPT, "Authorization": f"Bearer {TOKEN}"}
    before = churn_service.stats()
    with httpx.Client(base_url=session_server, timeout=WAIT_S) as http, watching_cancellations(churn_service) as seen:
        r = http.post("/mcp", content=INIT, headers=auth)
        headers = {**auth, "mcp-session-id": r.headers["mcp-session-id"], "mcp-protocol-version": "2025-06-18"}
        http.post("/mcp", json={"jsonrpc": "2.0", "method": "notifications/initialized"}, headers=headers)

        def call(request_id: int, image: str) -> dict[str, Any]:
            arguments = {"image": image, "max_new_tokens": 3}
            return {
                "jsonrpc": "2.0",
                "id": request_id,
                "method": "tools/call",
                "params": {"name": "caption_image", "arguments": arguments},
            }

        with gate.holding(images[0]):
            with httpx.Client(base_url=session_server, timeout=WAIT_S) as dropping:
                streams = [
                    dropping.stream("POST", "/mcp", json=call(10 + i, images[1 + i]), headers=headers) for i in (0, 1)
                ]
                responses = [stream.__enter__() for stream in streams]
                assert [response.status_code for response in responses] == [200, 200]
                poll(lambda: churn_service.stats().queue_depth >= 2, what="both calls queued")
            # The client is gone: both connections closed, with the calls still queued behind the blocker.
            poll(seen.is_set, what="the server-side handler to be cancelled")
            # Each connection's call is cancelled on its own, and `seen` tells of the first only: wait for both before
            # the blocker ends, or the worker may take the second into a batch.
            poll(
                lambda: sum(p.future.cancelled() for p in list(churn_service._batcher._pending)) == 2,
                what="both queued requests to be cancelled",
            )
        poll(lambda: churn_service.stats().queue_depth == 0, what="the queue to drain")
        after = churn_service.stats()
        assert after.cancelled - before.cancelled == 2
        assert after.completed - before.completed == 1  # the blocker only
        # The same session goes on: a call whose client waits is answered.
        r = http.post("/mcp", json=call(12, images[3]), headers=headers)
        assert r.status_code == 200 and b'"isError":false' in r.content, r.text[:500]


def test_blip_mcp_client_timeout_flag_cuts_off_a_silent_client(tiny_checkpoint: Path, tmp_path: Path) -> None:
    """`blip-mcp --transport http --client-timeout 1`: a connection that sends only half a request is answered 408
    and closed after about a second (the default is 30 s); an impossible value is a usage error (exit 2)."""
    import subprocess
    import sys

    from _mcp_testlib import http_args, ready_port
    from _testlib import WAIT_S, python_process

    stderr = tmp_path / "stderr.txt"
    with python_process([*http_args(tiny_checkpoint), "--client-timeout", "1"], stderr, stdout=subprocess.DEVNULL) as p:
        port = ready_port(p, stderr)
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
            sock.sendall(b"POST /mcp HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and then nothing
            answer, waited = _outcome(sock, within_s=10)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert 0.5 < waited < 5, waited
    refused = subprocess.run(
        [sys.executable, *http_args(tiny_checkpoint), "--client-timeout", "0"], capture_output=True, text=True
    )
    assert refused.returncode == 2 and "client_timeout_s" in refused.stderr, refused.stderr[-2000:]
