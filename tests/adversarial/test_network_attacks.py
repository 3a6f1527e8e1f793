"""Attacks on the HTTP surfaces that need no model: what another web site can make a user's browser send to a
server on loopback (fetch metadata, Origin), hostile JSON bodies for the console, and the console's script
inserting untrusted text as text only."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from blip_tools.errors import InvalidInput
from mcp_server.http import HostOriginMiddleware, security_settings_for
from mcp_server.web import console

BASE = "http://127.0.0.1:8765"
STATIC = Path(console.__file__).with_name("static")


def _guarded_app() -> Starlette:
    """A route behind the same Host/Origin middleware that `build_http_app` puts in front of every route."""

    async def thumb(request: Request) -> Response:
        return PlainTextResponse("private thumbnail")

    return Starlette(
        routes=[Route("/ui/api/thumb", thumb, methods=["GET"])],
        middleware=[Middleware(HostOriginMiddleware, security=security_settings_for("127.0.0.1"))],
    )


@pytest.mark.parametrize(
    ("dest", "mode"),
    [
        ("image", "no-cors"),  # <img src="http://127.0.0.1:8765/ui/api/thumb?path=..."> on another site
        ("script", "no-cors"),  # <script src=...>
        ("iframe", "navigate"),  # <iframe src=...>
        ("empty", "no-cors"),  # fetch(url, {mode: "no-cors"}): a GET carries no Origin
    ],
)
def test_cross_site_subresource_gets_without_an_origin_are_refused(dest: str, mode: str) -> None:
    headers = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": mode, "Sec-Fetch-Dest": dest}
    with TestClient(_guarded_app(), base_url=BASE) as http:
        answer = http.get("/ui/api/thumb?path=/home/me/Pictures/a.jpg", headers=headers)
    assert answer.status_code == 403, answer.text
    assert "private" not in answer.text


@pytest.mark.parametrize(
    "headers",
    [
        {},  # curl, Prometheus, RemoteService: no fetch metadata
        {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"},  # the console
        {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},  # typed URL
        {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document"},  # a link
    ],
)
def test_same_origin_calls_navigations_and_non_browser_clients_pass(headers: dict[str, str]) -> None:
    with TestClient(_guarded_app(), base_url=BASE) as http:
        answer = http.get("/ui/api/thumb", headers=headers)
    assert answer.status_code == 200, answer.text


def _json_body_of(body: bytes) -> object:
    """Run the console's JSON body parser on one request body."""
    sent = False

    async def receive() -> dict[str, object]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/ui/api/index",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json")],
    }
    return asyncio.run(console._json_body(Request(scope, receive)))


def test_deeply_nested_json_is_bad_input_not_a_server_error() -> None:
    with pytest.raises(InvalidInput, match="nests too deeply"):
        _json_body_of(b"[" * 200_000)
    with pytest.raises(InvalidInput, match="nests too deeply"):
        _json_body_of(b'{"directory": ' + b'{"a": ' * 100_000 + b"1" + b"}" * 100_000 + b"}")
    assert _json_body_of(json.dumps({"directory": "/srv/photos"}).encode()) == {"directory": "/srv/photos"}


def test_the_console_script_never_parses_text_as_html() -> None:
    """File names, captions, queries and error messages reach the page only through textContent/attributes."""
    script = (STATIC / "app.js").read_text(encoding="utf-8")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in script, sink
    assert not re.search(r"""setAttribute\(\s*["']on""", script)
    page = (STATIC / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script(?![^>]*\bsrc=)", page), "inline scripts would need a weaker CSP"
    assert not re.search(r"""\son[a-z]+\s*=""", page), "inline event handlers would need a weaker CSP"
