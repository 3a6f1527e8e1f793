"""The HTTP app for `blip-mcp --transport http`: streamable HTTP MCP at `/mcp`, `/healthz`, and room for more routes.

Security, outermost first, for EVERY route (ours and those other modules add):
1. `HostOriginMiddleware`: Host must be one of the allowed hosts (else 421), a browser Origin one of the
   allowed origins (else 403) — DNS-rebinding protection derived from the bind address. A browser request that
   another site makes without an Origin (an `<img>`, `<script>` or `<iframe>` GET; `Sec-Fetch-Site: cross-site`)
   is refused too (403): only a top-level navigation, such as following a link to `/ui`, is let through.
2. `BearerTokenMiddleware`: with a token set, `Authorization: Bearer <token>` compared in constant time
   (else 401); only `/healthz` is exempt. A non-loopback bind without a token is refused at startup.
3. A request body limit (413), sized for one base64 image of `max_image_bytes` plus JSON-RPC slack; routes
   that speak JSON (the console's API) get the refusal in their own error form (`body_refusals`).

Session-based (2025-era) MCP clients are bounded too (`HttpConfig.max_sessions`, `session_idle_timeout_s`): a
session a client never closes is forgotten once idle, and no more than so many are open at once; a call whose
connection such a client drops is cancelled (`DroppedCallsMiddleware`). Every client gets `client_timeout_s` to send
a request and `max_header_bytes` for its head (`_ClientDeadlines`, in `uvicorn_config`): a slow or half-open
connection is closed, not kept.

Other modules build on `build_http_app(server, config, routes=..., lifespan_hooks=...)`; their routes sit
behind the same three checks and reach the service with `service_from_request(request)`.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import json
import logging
import math
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from types import FrameType
from typing import Any

import anyio
import uvicorn
from mcp.server.transport_security import RequestBodyLimitMiddleware, TransportSecuritySettings
from pydantic_core import from_json
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from blip_tools.errors import InvalidInput
from blip_tools.service import Blip2Service
from blip_tools.settings import BlipSettings

from .server import BlipMCPServer

logger = logging.getLogger(__name__)

MCP_PATH = "/mcp"
HEALTH_PATH = "/healthz"
DEFAULT_PORT = 8765

LISTEN_FAILED_EXIT = 3
"""`blip-mcp`'s exit status when it cannot listen on the address (e.g. the port is in use): the status uvicorn
gives a failed startup, and what the README documents."""

#: Room for the JSON-RPC envelope, the data-URI prefix and the other arguments around one image.
BODY_SLACK_BYTES = 256 * 1024

DEFAULT_SESSION_IDLE_TIMEOUT_S = 600.0
"""A session-based MCP client with no request in flight and no GET stream open for this long is forgotten (10 min;
the SDK's own default is 30)."""

DEFAULT_MAX_SESSIONS = 1000
"""Open MCP sessions at most (about 40 MB at ~40 KB each; the SDK's own default is 10,000)."""

DEFAULT_CLIENT_TIMEOUT_S = 30.0
"""A request's head must arrive within this many seconds, its body with no pause longer (uvicorn has no such limit:
a client that stops sending held its connection and its file descriptor for good)."""

DEFAULT_MAX_HEADER_BYTES = 64 * 1024
"""Largest request head (request line and headers); more gets 431. uvicorn's httptools parser has no limit: one
client sending headers without end grew the daemon by 200 MB."""

_LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1")


def body_limit_for(settings: BlipSettings) -> int:
    """Largest request body: one base64 image of `max_image_bytes` (4/3 of it, rounded up) plus slack.

    The default `max_image_bytes` of 20 MB gives 26,666,668 + 262,144 = 26,928,812 bytes (about 25.7 MiB).
    """
    base64_len = 4 * ((settings.max_image_bytes + 2) // 3)
    return base64_len + BODY_SLACK_BYTES


def is_loopback(host: str) -> bool:
    """True for a bind address that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_forms(host: str) -> list[str]:
    """Host-header spellings of one address: bracketed for IPv6."""
    bare = host.strip("[]")
    try:
        if ipaddress.ip_address(bare).version == 6:
            return [f"[{bare}]"]
    except ValueError:
        pass
    return [bare]


def authority(host: str, port: int) -> str:
    """`host:port` as a URL writes it (`[::1]:8765` for IPv6), for log lines a user may paste."""
    return f"{_host_forms(host)[0]}:{port}"


def _machine_names() -> list[str]:
    """This machine's names and addresses, for an all-interfaces bind (0.0.0.0 / ::)."""
    names = {socket.gethostname(), socket.getfqdn()}
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None):
            names.add(str(info[4][0]))
    except OSError:
        pass
    return sorted(n for n in names if n)


def security_settings_for(host: str, extra_hosts: Iterable[str] = ()) -> TransportSecuritySettings:
    """Explicit Host/Origin allow-lists derived from the bind address (never left to the SDK's defaults).

    Loopback binds accept the loopback names; a specific address accepts itself; 0.0.0.0/:: accept this
    machine's names and addresses. `extra_hosts` (e.g. a DNS name or a reverse proxy's host) are added.
    Each host is allowed with any port; origins are http(s)://host with any port.
    """
    bases: list[str] = []
    if is_loopback(host):
        bases += ["127.0.0.1", "localhost", "::1"]
    elif host in ("0.0.0.0", "::", ""):
        bases += ["127.0.0.1", "localhost", "::1", *_machine_names()]
    else:
        bases.append(host)
    bases += list(extra_hosts)
    hosts: list[str] = []
    origins: list[str] = []
    for base in dict.fromkeys(bases):
        for form in _host_forms(base):
            hosts += [form, f"{form}:*"]
            origins += [f"http://{form}", f"http://{form}:*", f"https://{form}", f"https://{form}:*"]
    return TransportSecuritySettings(enable_dns_rebinding_protection=True, allowed_hosts=hosts, allowed_origins=origins)


@dataclass
class HttpConfig:
    """How the HTTP app is served and guarded."""

    host: str = "127.0.0.1"
    """Bind address. Anything but loopback needs a token."""

    port: int = DEFAULT_PORT
    """TCP port (0 picks a free one)."""

    token: str | None = None
    """Bearer token every route but /healthz requires (`--token` or `BLIP_TOKEN`)."""

    allowed_hosts: list[str] = field(default_factory=list)
    """Extra Host names to accept besides those derived from `host` (e.g. a DNS name)."""

    max_body_bytes: int | None = None
    """Request body limit; None derives it from `max_image_bytes` (see `body_limit_for`)."""

    session_idle_timeout_s: float = DEFAULT_SESSION_IDLE_TIMEOUT_S
    """Seconds a session of a session-based (2025-era) MCP client may go without a request in flight or a GET
    stream open before the server forgets it; its ID then answers 404 and the client starts a new session (as the
    protocol asks). Sessions a client never closes cost memory (about 40 KB each) until then. Clients that send
    one request per call (`RemoteService`, `blip-mcp --connect`) hold no session and are not affected."""

    max_sessions: int = DEFAULT_MAX_SESSIONS
    """Open sessions at most; while that many are open, a request that would open another gets 503 ("Too many
    open sessions"). Open sessions and clients without sessions are unaffected; room frees up as sessions are
    closed or reach `session_idle_timeout_s`."""

    client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S
    """Seconds a client has to send a request's head (from connecting, or from the previous response), and the
    longest pause allowed while it sends a body. A client that is too slow gets 408 and the connection is closed,
    so half-open and slowloris connections cannot pile up (each holds a file descriptor). Not a limit on calls:
    once a request has arrived, its answer may take as long as the model needs."""

    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    """Largest request head (request line plus headers); a longer one gets 431 and the connection is closed."""

    stateless: bool = False
    """Serve MCP without sessions: every request stands alone (the SDK's stateless HTTP mode).

    Needed where a load balancer spreads one client's requests over several processes (Ray Serve replicas),
    which know nothing of each other's sessions. Tools, resources, prompts and progress work as before; what a
    session-based (2025-era) client cannot do there is cancel a call with `notifications/cancelled` (it may land
    on another process) or keep a GET stream open. Modern clients (`RemoteService`, `blip-mcp --connect`) send
    one request per call anyway. A single process keeps sessions (the default).
    """

    def check(self) -> None:
        """Refuse unsafe combinations before binding (a non-loopback bind without a token)."""
        if not is_loopback(self.host) and not self.token:
            raise InvalidInput(
                f"Refusing to serve on {self.host} without a token: anyone who can reach this address could use "
                "the model and read images the server can see. Set --token (or BLIP_TOKEN), or bind to 127.0.0.1."
            )
        if self.token is not None and len(self.token) < 16:
            raise InvalidInput(
                "The token must be at least 16 characters (e.g. `python -c 'import secrets; "
                "print(secrets.token_urlsafe(32))'`)."
            )
        if self.max_body_bytes is not None and self.max_body_bytes < 1024:
            raise InvalidInput(f"max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        idle = self.session_idle_timeout_s
        if isinstance(idle, bool) or not isinstance(idle, int | float) or not 0 < idle < math.inf:
            raise InvalidInput(f"session_idle_timeout_s must be a number of seconds > 0, got {idle!r}")
        if isinstance(self.max_sessions, bool) or not isinstance(self.max_sessions, int) or self.max_sessions < 1:
            raise InvalidInput(f"max_sessions must be an integer >= 1, got {self.max_sessions!r}")
        slow = self.client_timeout_s
        if isinstance(slow, bool) or not isinstance(slow, int | float) or not 0 < slow < math.inf:
            raise InvalidInput(f"client_timeout_s must be a number of seconds > 0, got {slow!r}")
        head = self.max_header_bytes
        if isinstance(head, bool) or not isinstance(head, int) or head < 1024:
            raise InvalidInput(f"max_header_bytes must be an integer >= 1024, got {head!r}")

    def body_limit(self, settings: BlipSettings) -> int:
        """The request body limit in bytes."""
        return self.max_body_bytes if self.max_body_bytes is not None else body_limit_for(settings)


# ---------------------------------------------------------------------------------------------- token checks
def bearer_token(headers: Headers) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None."""
    value = headers.get("authorization")
    if not value:
        return None
    scheme, _, token = value.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented token with the expected one."""
    if presented is None:
        return False
    return hmac.compare_digest(presented.encode("utf-8"), expected.encode("utf-8"))


def _plain(status: int, text: str, headers: dict[str, str] | None = None) -> Response:
    return PlainTextResponse(text + "\n", status_code=status, headers=headers)


class BearerTokenMiddleware:
    """Require `Authorization: Bearer <token>` on every HTTP request except `exempt_paths` (401 otherwise).

    Default-deny: routes added later by other modules are covered without doing anything.
    """

    def __init__(self, app: ASGIApp, token: str | None, exempt_paths: Iterable[str] = (HEALTH_PATH,)) -> None:
        self.app = app
        self.token = token
        self.exempt_paths = frozenset(exempt_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or self.token is None or scope["path"] in self.exempt_paths:
            await self.app(scope, receive, send)
            return
        if token_matches(bearer_token(Headers(scope=scope)), self.token):
            await self.app(scope, receive, send)
            return
        response = _plain(
            401,
            "Unauthorized: send the server token as 'Authorization: Bearer <token>'.",
            {"WWW-Authenticate": 'Bearer realm="blip-mcp"'},
        )
        await response(scope, receive, send)


class HostOriginMiddleware:
    """DNS-rebinding protection for every route: bad Host → 421, bad browser Origin → 403."""

    def __init__(self, app: ASGIApp, security: TransportSecuritySettings) -> None:
        self.app = app
        self.security = security

    def _host_ok(self, host: str | None) -> bool:
        if not host:
            return False
        for allowed in self.security.allowed_hosts:
            if host == allowed or (
                allowed.endswith(":*") and host.startswith(allowed[:-1]) and host[len(allowed) - 1 :].isdigit()
            ):
                return True
        return False

    def _origin_ok(self, origin: str | None) -> bool:
        if origin is None:  # non-browser clients send none
            return True
        for allowed in self.security.allowed_origins:
            if origin == allowed or (
                allowed.endswith(":*") and origin.startswith(allowed[:-1]) and origin[len(allowed) - 1 :].isdigit()
            ):
                return True
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if not self._host_ok(headers.get("host")):
            logger.warning("refused a request with Host %r (allowed: see --allowed-host)", headers.get("host"))
            await _plain(421, "Misdirected request: this Host is not served here.")(scope, receive, send)
            return
        if not self._origin_ok(headers.get("origin")):
            logger.warning("refused a request with Origin %r", headers.get("origin"))
            await _plain(403, "Forbidden: cross-origin requests are not allowed.")(scope, receive, send)
            return
        if headers.get("origin") is None and _cross_site_subresource(headers):  # one with an Origin was judged above
            logger.warning("refused a cross-site %r request for %r", headers.get("sec-fetch-dest"), scope.get("path"))
            await _plain(403, "Forbidden: cross-site requests are not allowed.")(scope, receive, send)
            return
        await self.app(scope, receive, send)


def _cross_site_subresource(headers: Headers) -> bool:
    """A browser request another site made that is not a top-level navigation (fetch metadata, `Sec-Fetch-*`).

    Browsers send no Origin on a cross-site GET by `<img>`, `<script>`, `<link>` or `<iframe>`, so the Origin
    check cannot see one; without a token such a GET would otherwise run the model (`/ui/api/search`), and the
    load or error event of an `<img>` would tell the other site which of the user's files are indexed
    (`/ui/api/thumb`). Browsers send `Sec-Fetch-Site` to loopback and https servers; clients that are not
    browsers send none and are unaffected.
    """
    if headers.get("sec-fetch-site", "").strip().lower() != "cross-site":
        return False
    navigation = headers.get("sec-fetch-mode", "").strip().lower() == "navigate"
    return not (navigation and headers.get("sec-fetch-dest", "document").strip().lower() == "document")


BodyRefusal = Callable[[int], Response]
"""Builds the answer to a request whose body passes the limit (given in bytes), for routes that speak JSON."""


class BodyLimitMiddleware:
    """The SDK's request body limit (413 before the route runs) on every route; `refusals` answer it in the form
    of the routes under a path prefix (the console's JSON errors) instead of the SDK's plain text."""

    def __init__(self, app: ASGIApp, max_body_size: int, refusals: Mapping[str, BodyRefusal] | None = None) -> None:
        self.app = app
        self.max_body_size = max_body_size
        self.limited = RequestBodyLimitMiddleware(app, max_body_size)
        self.refusals = dict(refusals or {})

    def _refusal(self, scope: Scope) -> BodyRefusal | None:
        if scope["type"] != "http":
            return None
        path = str(scope.get("path", ""))
        return next((refuse for prefix, refuse in self.refusals.items() if path.startswith(prefix)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refuse = self._refusal(scope)
        if refuse is None:
            await self.limited(scope, receive, send)
            return
        entered = refused = False

        async def app(scope: Scope, receive: Receive, send: Send) -> None:
            nonlocal entered
            entered = True
            await self.app(scope, receive, send)

        async def relay(message: Message) -> None:
            nonlocal refused
            if entered:
                await send(message)
            else:  # the limiter answers before the route runs: that answer is replaced below
                refused = True

        await RequestBodyLimitMiddleware(app, self.max_body_size)(scope, receive, relay)
        if refused and not entered:
            await refuse(self.max_body_size)(scope, receive, send)


# ---------------------------------------------------------------------------------------------- dropped calls
_SESSION_HEADER = b"mcp-session-id"


def _request_ids(body: bytes) -> list[Any]:
    """The ids of the JSON-RPC requests in a POST body (none for notifications, responses or invalid JSON)."""
    try:
        parsed = from_json(body)
    except ValueError:
        return []
    messages = parsed if isinstance(parsed, list) else [parsed]
    return [m["id"] for m in messages if isinstance(m, dict) and "method" in m and m.get("id") is not None]


class DroppedCallsMiddleware:
    """A session-based (2025-era) client that drops the connection of a call still running cancels the call.

    Over streamable HTTP a call's answer comes back on the POST's own connection (an SSE stream), and this server
    keeps no event store to replay it: once the client has dropped that connection, the answer can never reach it.
    The SDK still ran such calls to the end (on that wire only `notifications/cancelled` cancels), so a client that
    vanished (killed, timed out, asleep) left its calls queued for the model, each holding a place in the queue
    and the model's time: 20 killed clients' queued captions were all computed afterwards. This sends that
    notification for the client, through its own session, once the connection is gone without the answer: the
    tool's handler is cancelled and the batcher drops the queued request, as the SDK does for modern clients, which
    cancel by closing the stream. Requests without a session (modern clients, stateless mode) are left alone.
    """

    def __init__(self, app: ASGIApp, path: str = MCP_PATH) -> None:
        self.app = app
        self.path = path

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope.get("method") != "POST"
            or scope.get("path") != self.path
            or not any(name == _SESSION_HEADER for name, _ in scope.get("headers", ()))
        ):
            await self.app(scope, receive, send)
            return
        opening = dict(scope)  # as it came: routing adds to `scope` in place
        # The body's chunks are the ones the app gets (no copy); they are parsed for request ids only if the client
        # goes away unanswered, so a normal call (often a 20 MB base64 image) is not parsed twice.
        chunks: list[bytes] = []
        client_gone = answered = False

        async def watched_receive() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.request":
                chunks.append(message.get("body", b""))
            elif message["type"] == "http.disconnect":
                client_gone = True
            return message

        async def watched_send(message: Message) -> None:
            nonlocal answered
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                answered = True
            await send(message)

        try:
            await self.app(scope, watched_receive, watched_send)
        finally:
            if client_gone and not answered and (request_ids := _request_ids(b"".join(chunks))):
                with anyio.move_on_after(10, shield=True):
                    for request_id in request_ids:
                        await self._cancel(opening, request_id)

    async def _cancel(self, scope: Scope, request_id: Any) -> None:
        """Post `notifications/cancelled` for `request_id` to the app as the client would (same session, same
        credentials); a request that already finished ignores it."""
        body = json.dumps(
            {
                "jsonrpc": "2.0",
                "method": "notifications/cancelled",
                "params": {"requestId": request_id, "reason": "The client closed the connection of this call."},
            }
        ).encode()
        dropped = (b"content-length", b"content-type", b"transfer-encoding")
        headers = [(name, value) for name, value in scope["headers"] if name not in dropped]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if delivered:
                return {"type": "http.disconnect"}
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def discard(message: Message) -> None:
            pass

        logger.debug("a client dropped the connection of call %r: cancelling it", request_id)
        await self.app({**scope, "headers": headers}, receive, discard)


# ---------------------------------------------------------------------------------------------- the app
def service_from_request(request: Request) -> Blip2Service:
    """The running service, for routes other modules add (e.g. /metrics, /ui)."""
    server: BlipMCPServer = request.app.state.blip_server
    return server.app_context.service


async def _healthz(request: Request) -> Response:
    """Liveness and readiness without the token: 200 `ok` once the model is loaded, 503 while loading or failed."""
    server: BlipMCPServer = request.app.state.blip_server
    context = server.current_context
    status = "starting" if context is None else context.status
    body: dict[str, Any] = {"status": status}
    if context is not None and status == "ok":
        body["queue_depth"] = context.service.stats().queue_depth
    return JSONResponse(body, status_code=200 if status == "ok" else 503)


LifespanHook = Callable[[BlipMCPServer], AbstractAsyncContextManager[None]]
"""Entered after the service is running and exited before it closes (e.g. to attach a metrics listener)."""


def build_http_app(
    server: BlipMCPServer,
    config: HttpConfig | None = None,
    *,
    routes: Sequence[BaseRoute] = (),
    lifespan_hooks: Sequence[LifespanHook] = (),
    exempt_paths: Iterable[str] = (HEALTH_PATH,),
    body_refusals: Mapping[str, BodyRefusal] | None = None,
) -> Starlette:
    """The Starlette app: MCP at `/mcp`, `/healthz`, plus `routes`, all behind Host/Origin, token and body checks.

    Args:
        server: from `create_server()`; its lifespan (the service) starts with the app and is shared by all
            sessions.
        config: bind address, token, extra hosts and body limit; `config.check()` is applied here.
        routes: extra routes or mounts (e.g. `/metrics`, `/ui`); they need the token like `/mcp` does.
        lifespan_hooks: async context managers entered once the service is running.
        exempt_paths: paths reachable without the token (default only `/healthz`).
        body_refusals: path prefix → the answer for a body over the limit there (default: the SDK's plain 413).
    """
    config = config or HttpConfig()
    config.check()
    security = security_settings_for(config.host, config.allowed_hosts)
    limit = config.body_limit(server.blip_settings)
    mcp_app = server.streamable_http_app(
        streamable_http_path=MCP_PATH,
        max_request_body_size=limit,
        stateless_http=config.stateless,
        session_idle_timeout=config.session_idle_timeout_s,
        max_sessions=config.max_sessions,
        transport_security=security,
        host=config.host,
    )

    resumable = server.session_manager.event_store is not None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with server.session_manager.run(), AsyncExitStack() as hooks:
            for hook in lifespan_hooks:
                await hooks.enter_async_context(hook(server))
            logger.info(
                "blip-mcp HTTP ready on %s%s (token %s, body limit %d bytes, %s)",
                authority(config.host, config.port),
                MCP_PATH,
                "required" if config.token else "off",
                limit,
                "stateless"
                if config.stateless
                else f"sessions: at most {config.max_sessions}, idle timeout {config.session_idle_timeout_s:g} s",
            )
            yield

    app = Starlette(
        routes=[Route(HEALTH_PATH, _healthz, methods=["GET"]), *routes, *mcp_app.routes],
        middleware=[
            Middleware(HostOriginMiddleware, security=security),
            Middleware(BearerTokenMiddleware, token=config.token, exempt_paths=exempt_paths),
            Middleware(BodyLimitMiddleware, max_body_size=limit, refusals=body_refusals),
            # stateless: the SDK cancels a dropped call itself; an event store would let a client resume instead
            *([] if config.stateless or resumable else [Middleware(DroppedCallsMiddleware)]),
        ],
        lifespan=lifespan,
    )
    app.state.blip_server = server
    app.state.http_config = config
    app.state.body_limit = limit
    return app


class _ShutdownCutFilter(logging.Filter):
    """Drops uvicorn's "Exception in ASGI application" traceback for a request its graceful shutdown cut short.

    On SIGTERM uvicorn waits `timeout_graceful_shutdown` seconds, then cancels what still runs and says so in one
    line ("Cancel N running task(s), timeout graceful shutdown exceeded"); without this filter it also logs a full
    traceback for every one of those requests (a `CancelledError`), dozens of them on a busy server.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        cut = isinstance(exc, asyncio.CancelledError) and str(record.msg).startswith("Exception in ASGI application")
        return not cut


_SHUTDOWN_CUT_FILTER = _ShutdownCutFilter()


# ---------------------------------------------------------------------------------------------- slow clients
_REQUEST_TIMEOUT = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: 52\r\n"
    b"connection: close\r\n\r\nRequest Timeout: the request did not arrive in time.\n"
)
_HEAD_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 41\r\nconnection: close\r\n\r\nRequest header fields are too large.\n"
)


class _ClientDeadlines(asyncio.Protocol):
    """Deadlines for what a client sends, on top of uvicorn's HTTP protocols (which have none but keep-alive).

    A request's head must be complete within `client_timeout_s` of the connection (or of the previous response),
    and its body must keep coming, with no pause longer than that; otherwise the client gets 408 (none if it sent
    nothing) and the connection is closed. While the app has not read what arrived (uvicorn paused reading), the
    client is not waiting on itself and the clock restarts. Once a request has arrived nothing is timed: answers
    take as long as they take, SSE streams stay open. Subclasses say which phase the connection is in.
    """

    client_timeout_s: float = DEFAULT_CLIENT_TIMEOUT_S
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    # set by uvicorn's protocol classes
    transport: asyncio.Transport
    loop: asyncio.AbstractEventLoop
    flow: Any
    cycle: Any

    _timer: asyncio.TimerHandle | None = None
    _timed: str | None = None  # the phase `_timer` runs for
    _head_data = False  # bytes came while the head was timed

    def _phase(self) -> str | None:
        """ "head" while a request's head is awaited, "body" while its body is, None while the app has the turn."""
        raise NotImplementedError

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._deadline(progress=False)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._timed == "head":
            self._head_data = True
        self._deadline(progress=True)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._deadline(progress=False)

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self._stop_timer()  # the connection is another protocol's from here on
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timed = None, None

    def _deadline(self, *, progress: bool) -> None:
        """(Re)arm the timer for the current phase: the head's from its start, the body's from the latest bytes."""
        if self.transport.is_closing():
            self._stop_timer()
            return
        phase = self._phase()
        if phase is not None and phase == self._timed and (phase == "head" or not progress):
            return
        self._stop_timer()
        if phase is not None:
            self._timer = self.loop.call_later(self.client_timeout_s, self._expired)
            self._timed, self._head_data = phase, False

    def _expired(self) -> None:
        timed, self._timer, self._timed = self._timed, None, None
        if self.transport.is_closing() or self._phase() is None:
            return
        if self.flow.read_paused:  # the app has not read what came yet: not the client's delay
            self._deadline(progress=True)
            return
        if timed == "body" or self._head_data:
            self.transport.write(_REQUEST_TIMEOUT)
        self.transport.close()

    def _refuse_head(self) -> None:
        self._stop_timer()
        if not self.transport.is_closing():
            self.transport.write(_HEAD_TOO_LARGE)
            self.transport.close()


def _guarded_protocols() -> dict[str, type[asyncio.Protocol]]:
    """`http=` name → uvicorn's protocol class with `_ClientDeadlines` (httptools only where it is installed)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(_ClientDeadlines, H11Protocol):
        """h11 limits the head itself (`h11_max_incomplete_event_size`); its state machine gives the phase."""

        def _phase(self) -> str | None:
            import h11

            state = self.conn.their_state
            return "head" if state is h11.IDLE else "body" if state is h11.SEND_BODY else None

    protocols: dict[str, type[asyncio.Protocol]] = {"h11": GuardedH11Protocol}
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is optional
        protocols["auto"] = GuardedH11Protocol
        return protocols

    class GuardedHttpToolsProtocol(_ClientDeadlines, HttpToolsProtocol):
        """httptools has no limit on the head: its size is counted here, and the parser's callbacks give the phase."""

        _message = "idle"  # "head" from a message's first byte, "body" once its headers are in, "idle" once done
        _head_bytes = 0
        _head_over = False

        def _phase(self) -> str | None:
            if self._message != "idle":
                return self._message
            return "head" if self.cycle is None or self.cycle.response_complete else None

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._head_over:
                self._refuse_head()

        def on_message_begin(self) -> None:
            self._message, self._head_bytes = "head", 0
            super().on_message_begin()

        def on_url(self, url: bytes) -> None:
            if self._count_head(len(url)):
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._count_head(len(name) + len(value) + 4):
                super().on_header(name, value)

        def _count_head(self, size: int) -> bool:
            self._head_bytes += size
            self._head_over = self._head_over or self._head_bytes > self.max_header_bytes
            return not self._head_over

        def on_headers_complete(self) -> None:
            if self._head_over:  # refused once this chunk is parsed; the app never sees it
                return
            self._message = "body"
            super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._head_over:
                super().on_body(body)

        def on_message_complete(self) -> None:
            self._message = "idle"
            if not self._head_over:
                super().on_message_complete()

    protocols["httptools"] = protocols["auto"] = GuardedHttpToolsProtocol
    return protocols


def client_guarded_protocol(config: HttpConfig, http: str = "auto") -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol `http` ("auto", "h11", "httptools") with `config`'s client deadlines and head limit."""
    base = _guarded_protocols()[http]
    limits = {"client_timeout_s": float(config.client_timeout_s), "max_header_bytes": config.max_header_bytes}
    return type(base.__name__, (base,), limits)


def uvicorn_config(app: Starlette, config: HttpConfig, **overrides: Any) -> Any:
    """A `uvicorn.Config` that logs to stderr at warning level (no access log, no server header).

    Requests still running 5 s after SIGTERM (or Ctrl-C) are cut; the log says how many in one line. Clients get
    `config.client_timeout_s` to send a request and `config.max_header_bytes` for its head (`_ClientDeadlines`);
    `http=` ("auto", "h11", "httptools") picks the parser as in uvicorn.
    """
    http = overrides.pop("http", "auto")
    options: dict[str, Any] = {
        "http": client_guarded_protocol(config, http) if isinstance(http, str) else http,
        "h11_max_incomplete_event_size": config.max_header_bytes,
        "host": config.host,
        "port": config.port,
        "log_level": "warning",
        "access_log": False,
        "server_header": False,
        "timeout_graceful_shutdown": 5,
        "lifespan": "on",
    }
    options.update(overrides)
    built = uvicorn.Config(app, **options)  # configures uvicorn's loggers (filters added to them stay)
    error_log = logging.getLogger("uvicorn.error")
    if _SHUTDOWN_CUT_FILTER not in error_log.filters:
        error_log.addFilter(_SHUTDOWN_CUT_FILTER)
    return built


def listen_sockets(host: str, port: int, backlog: int = 2048) -> list[socket.socket]:
    """Listening TCP sockets for `host` and `port`, bound as uvicorn (asyncio's `create_server`) would bind them.

    One socket per address `host` resolves to (`localhost`: 127.0.0.1 and ::1; "" every interface), IPv6 ones
    without dual stack, skipping an address family the machine has turned off; `port` 0 picks one free port, the
    same for all of them. Raises `OSError` (e.g. `EADDRINUSE`) with nothing left open.
    """
    infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    sockets: list[socket.socket] = []
    unavailable: OSError | None = None
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            try:
                sock = socket.socket(family, kind, proto)
            except OSError:  # e.g. IPv6 compiled in but turned off
                continue
            if os.name == "posix":  # restart at once on a port whose old connections linger in TIME_WAIT
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and sockets:
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            try:
                sock.bind(address)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise
                unavailable = exc  # an address of a family not set up here: asyncio skips it too
                continue
            sockets.append(sock)
            sock.listen(backlog)
        if not sockets:
            raise unavailable or OSError(errno.EADDRNOTAVAIL, f"{host!r} has no address to listen on")
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _cannot_listen(config: HttpConfig, exc: OSError) -> str:
    where = authority(config.host, config.port)
    if exc.errno == errno.EADDRINUSE:
        reach = "127.0.0.1" if config.host in ("0.0.0.0", "::", "") else _host_forms(config.host)[0]
        health = f"http://{reach}:{config.port}{HEALTH_PATH}"
        return (
            f"cannot listen on {where}: address already in use. Another server has that port (`curl {health}` "
            "shows whether it is a blip-mcp daemon): stop it, or pick another --port."
        )
    return f"cannot listen on {where}: {exc.strerror or exc}"


class _InterruptibleServer(uvicorn.Server):
    """uvicorn's server, whose second Ctrl-C quits at once (exit status 130) instead of ending in a traceback.

    uvicorn's own "force quit" stops waiting for running requests but then cancels the app's lifespan (a traceback
    in the log) and still waits for the service to close; a second Ctrl-C while the service closes does nothing.
    """

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if sig == signal.SIGINT and self.should_exit:
            logger.warning("second Ctrl-C: quitting now, without waiting for running calls or the model")
            sys.stderr.flush()
            os._exit(130)
        super().handle_exit(sig, frame)


def run_http(server: BlipMCPServer, config: HttpConfig) -> int:
    """Serve `server` over streamable HTTP until interrupted, with `/metrics` and the `/ui` console.

    The socket is bound and listening before the app starts, so its "ready" line is true when logged and a port in
    use fails before the model starts loading. Returns the exit status: 0, or `LISTEN_FAILED_EXIT` when it
    cannot listen. Ctrl-C ends it with `KeyboardInterrupt` once the service has closed; a second Ctrl-C ends the
    process at once (exit status 130).
    """
    from .web import build_app

    try:
        sockets = listen_sockets(config.host, config.port)
    except OSError as exc:
        logger.error("%s", _cannot_listen(config, exc))
        return LISTEN_FAILED_EXIT
    config = replace(config, port=sockets[0].getsockname()[1])  # the port 0 picked, for the log
    app = build_app(server, config)
    _InterruptibleServer(uvicorn_config(app, config)).run(sockets=sockets)
    return 0
