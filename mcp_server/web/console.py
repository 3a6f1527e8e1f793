"""The web console's routes: the page and its static files at `/ui`, and its JSON API at `/ui/api/...`.

Every API call goes through the server's running `Blip2Service` (the same one MCP sessions use). Uploaded
images arrive as the raw request body, are capped at `max_image_bytes` while they are read, and are passed
to the service as bytes, so the service's own limits and decoding rules apply unchanged.

The page and static files carry no data and are reachable without the token (a browser cannot add a header to
a page load); the page asks for the token once and sends it as `Authorization: Bearer` on every API call.
Host/Origin checks, the token and the body limit come from `mcp_server.http.build_http_app`. No CORS headers
are ever sent: the API serves the console's own origin only. Every answer of the API that is not a result is its
JSON error (`.errors`), also for a path under `/ui/api/` that names no endpoint (404 `not_found`) and an endpoint
called with another method (405 `method_not_allowed`, with `Allow`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Route, request_response
from starlette.types import Receive, Scope, Send

from blip_tools import __version__
from blip_tools.errors import BlipError, IndexDamaged, InvalidImage, InvalidInput, PayloadTooLarge, ServiceClosed
from blip_tools.service import Blip2Service

from .errors import MethodNotAllowed, NotFound, error_response, status_for
from .gallery import THUMB_SIDES, Gallery

if TYPE_CHECKING:
    from ..metrics import BlipMetrics
    from ..server import BlipMCPServer

logger = logging.getLogger(__name__)

_T = TypeVar("_T")

UI_PATH = "/ui"
API_PREFIX = "/ui/api"
STATIC_PREFIX = "/ui/static"

MAX_SCORE_TEXTS = 32
MAX_TEXT_CHARS = 500
MAX_TOP_K = 100

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".svg": "image/svg+xml",
}

_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _static_files() -> dict[str, tuple[bytes, str]]:
    """The console's static files (name → bytes, content type), read once from the package."""
    folder = resources.files("mcp_server.web") / "static"
    out: dict[str, tuple[bytes, str]] = {}
    for entry in folder.iterdir():
        suffix = Path(entry.name).suffix
        if entry.is_file() and suffix in _CONTENT_TYPES:
            out[entry.name] = (entry.read_bytes(), _CONTENT_TYPES[suffix])
    return out


# ---------------------------------------------------------------------------------------------- parsing helpers
def _int(request: Request, name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be an integer between {lo} and {hi}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise InvalidInput(f"{name} must be between {lo} and {hi}, got {value}")
    return value


def _float(request: Request, name: str) -> float | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be a number, got {raw!r}") from None


def _bool(request: Request, name: str, default: bool = False) -> bool:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise InvalidInput(f"{name} must be true or false, got {raw!r}")


def _text(value: Any, name: str, *, required: bool = True) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise InvalidInput(f"{name} must be a non-empty text")
        return None
    if not isinstance(value, str):
        raise InvalidInput(f"{name} must be a text, got {type(value).__name__}")
    if len(value) > MAX_TEXT_CHARS:
        raise InvalidInput(f"{name} must be at most {MAX_TEXT_CHARS} characters, got {len(value)}")
    return value.strip()


def _gen_params(request: Request) -> dict[str, Any]:
    """Decoding arguments from the query string (the service validates their combination)."""
    gen: dict[str, Any] = {}
    for name, hi in (("max_new_tokens", 512), ("num_beams", 16), ("num_return_sequences", 16), ("seed", 2**32 - 1)):
        value = _int(request, name, None, 0 if name == "seed" else 1, hi)
        if value is not None:
            gen[name] = value
    for name in ("temperature", "top_p"):
        number = _float(request, name)
        if number is not None:
            gen[name] = number
    if request.query_params.get("do_sample"):
        gen["do_sample"] = _bool(request, "do_sample")
    return gen


async def _json_body(request: Request) -> dict[str, Any]:
    """A JSON object body (Content-Type application/json required: no form posts from other pages)."""
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise InvalidInput("send a JSON object with Content-Type: application/json")
    try:
        body = json.loads(await request.body() or b"{}")
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # `[[[[...` nested past Python's recursion limit: bad input, not a server fault
        raise InvalidInput("the request body nests too deeply; send a flat JSON object") from None
    if not isinstance(body, dict):
        raise InvalidInput("the request body must be a JSON object")
    return body


class _ClientGone(Exception):
    """The client closed the connection while its request waited for the model (nobody to answer)."""


async def _unless_gone(request: Request, work: Awaitable[_T]) -> _T:
    """Await `work`, cancelling it if the client disconnects first (then `_ClientGone`).

    A browser tab closed, a script's timeout: the request must leave the queue (counted as cancelled) rather than
    spend the model's time on an answer nobody reads. Only call it once the body has been read: the watcher takes
    over `receive`, where the server reports `http.disconnect`.
    """
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass  # an empty body's `http.request` (GET): keep listening

    watcher = asyncio.ensure_future(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client went away, or this handler itself was cancelled
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise _ClientGone
    return task.result()


def _json_flag(body: dict[str, Any], name: str, *, default: bool) -> bool:
    """A JSON true/false (absent: `default`); anything else, even the text "false", is refused, not read as true."""
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise InvalidInput(f"{name} must be true or false (a JSON boolean), got {json.dumps(value)}")
    return value


class _AnyMethod:
    """A request handler as an ASGI app, so that a `Route` without `methods` takes every method (Starlette's
    default for a plain function is GET only, and any other method got its plain-text 405)."""

    def __init__(self, handler: Handler) -> None:
        self._app = request_response(handler)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


# ---------------------------------------------------------------------------------------------- the console
@dataclass
class _Running:
    service: Blip2Service
    gallery: Gallery


Handler = Callable[[Request], Awaitable[Response]]


class Console:
    """The `/ui` routes of one HTTP app and the state they share (the gallery's index, the metrics)."""

    def __init__(
        self,
        server: BlipMCPServer,
        *,
        metrics: BlipMetrics | None = None,
        token_required: bool = False,
        body_limit: int | None = None,
    ) -> None:
        self.server = server
        self.metrics = metrics
        self.token_required = token_required
        self.body_limit = body_limit
        self.max_image_bytes = server.blip_settings.max_image_bytes
        self._files = _static_files()
        self._running: _Running | None = None
        self._methods: dict[str, list[str]] = {}
        """API path → the methods its endpoint takes (filled by `routes`)."""

    # ------------------------------------------------------------------ wiring
    @property
    def public_paths(self) -> list[str]:
        """Paths reachable without the token: the page and its static files (no data in them)."""
        return [UI_PATH, f"{UI_PATH}/", *(f"{STATIC_PREFIX}/{name}" for name in sorted(self._files))]

    def routes(self) -> list[BaseRoute]:
        """The page, its static files and the JSON API."""
        api: list[tuple[str, Handler, str]] = [
            ("/info", self.info, "GET"),
            ("/dashboard", self.dashboard, "GET"),
            ("/caption", self.caption, "POST"),
            ("/answer", self.answer, "POST"),
            ("/score", self.score, "POST"),
            ("/locate", self.locate, "POST"),
            ("/search", self.search, "GET"),
            ("/index", self.index_folder, "POST"),
            ("/thumb", self.thumbnail, "GET"),
        ]
        out: list[BaseRoute] = [
            Route(UI_PATH, self.page, methods=["GET"]),
            Route(f"{UI_PATH}/", self.page, methods=["GET"]),
        ]
        out += [Route(f"{STATIC_PREFIX}/{name}", self.static, methods=["GET"]) for name in sorted(self._files)]
        endpoints = [
            Route(f"{API_PREFIX}{path}", self._guard(handler), methods=[method]) for path, handler, method in api
        ]
        self._methods = {route.path: sorted(route.methods or ()) for route in endpoints}
        # Last: any other path or method under the API answers the API's JSON error, not Starlette's plain text.
        # (A route that matches the path but not the method only half-matches, so this catch-all gets those too.)
        unrouted = _AnyMethod(self._guard(self.unrouted))
        out += [*endpoints, Route(API_PREFIX, unrouted), Route(f"{API_PREFIX}/{{rest:path}}", unrouted)]
        return out

    @asynccontextmanager
    async def running(self, server: BlipMCPServer) -> AsyncIterator[None]:
        """Lifespan hook: bind to the running service; close the gallery's index on exit."""
        service = server.app_context.service
        gallery = Gallery(service)
        self._running = _Running(service, gallery)
        try:
            yield
        finally:
            self._running = None
            await asyncio.to_thread(gallery.close)

    def _state(self) -> _Running:
        if self._running is None:
            raise ServiceClosed("The blip-tools service is not running; restart blip-mcp.")
        return self._running

    def _guard(self, handler: Handler) -> Handler:
        """Map our errors to JSON error responses (with the HTTP status and a retry hint) and count them."""

        async def guarded(request: Request) -> Response:
            try:
                return await handler(request)
            except BlipError as exc:
                return self._error_response(exc, request.url.path)
            except (_ClientGone, ClientDisconnect):  # no one to answer (499: nginx's "client closed request")
                return Response(status_code=499)
            except Exception as exc:  # a bug below us: still the API's JSON error (counted), not a plain-text 500
                logger.exception("console %s failed unexpectedly", request.url.path)
                error = BlipError(
                    f"Internal error ({type(exc).__name__}) in {request.url.path}; the server log has the details."
                )
                return self._error_response(error, request.url.path)

        return guarded

    def _error_response(self, exc: BlipError, path: str) -> Response:
        """One of our errors as the API's JSON error, with its status (and retry hint), counted once."""
        if self.metrics is not None:
            self.metrics.count_error(exc, "ui")
        if status_for(exc) >= 500 or isinstance(exc, IndexDamaged):  # the operator has something to look at
            logger.warning("console %s failed: %s", path, exc)
        return error_response(exc)  # the one mapping of our errors to HTTP statuses (`.errors`)

    def refuse_oversized(self, body_limit: int) -> Response:
        """The API's answer to a body over the server's whole limit (refused before any route runs)."""
        error = PayloadTooLarge(
            f"The request body is larger than the server's limit of {body_limit} bytes; an uploaded image may be "
            f"at most max_image_bytes = {self.max_image_bytes} bytes (BLIP_MAX_IMAGE_BYTES): "
            "send a smaller or re-encoded image."
        )
        return self._error_response(error, API_PREFIX)

    async def unrouted(self, request: Request) -> Response:
        """Any other path or method under `/ui/api`: `not_found` (404), or `method_not_allowed` (405, `Allow`)."""
        path = f"{API_PREFIX}/{request.path_params['rest']}" if "rest" in request.path_params else API_PREFIX
        allowed = self._methods.get(path)
        if allowed is not None:
            raise MethodNotAllowed(f"{path} takes {' or '.join(allowed)}, not {request.method}.", allowed)
        known = ", ".join(sorted(self._methods))
        near = self._methods.get(path.rstrip("/"))
        hint = f" (without the trailing slash: {path.rstrip('/')})" if near is not None else f"; the API has {known}"
        raise NotFound(f"No console API endpoint at {path}{hint}.")

    # ------------------------------------------------------------------ page
    async def page(self, request: Request) -> Response:
        """`GET /ui`: the console (a single page; its script asks for the token when one is needed)."""
        if request.url.path.endswith("/"):
            return RedirectResponse(UI_PATH, status_code=308)
        data, media = self._files["index.html"]
        return Response(data, media_type=media, headers=_SECURITY_HEADERS)

    async def static(self, request: Request) -> Response:
        """`GET /ui/static/<name>`: one of the packaged files (the route list is the allow-list)."""
        data, media = self._files[request.url.path.rsplit("/", 1)[1]]
        return Response(data, media_type=media, headers=_SECURITY_HEADERS)

    # ------------------------------------------------------------------ API: status
    async def info(self, request: Request) -> Response:
        """`GET /ui/api/info`: model, status, limits and where the gallery's index lives."""
        state = self._state()
        context = self.server.current_context
        return JSONResponse(
            {
                "version": __version__,
                "status": context.status if context is not None else "starting",
                "model": state.service.model_info().model_dump(mode="json"),
                "max_image_bytes": self.max_image_bytes,
                "body_limit": self.body_limit,
                "token_required": self.token_required,
                "index_path": str(state.gallery.index_path),
                "metrics": self.metrics is not None,
            }
        )

    async def dashboard(self, request: Request) -> Response:
        """`GET /ui/api/dashboard?window=S`: the service counters and per-second series for the last S seconds."""
        state = self._state()
        window = _int(request, "window", 120, 5, 300) or 120
        stats = state.service.stats()
        context = self.server.current_context
        body: dict[str, Any] = {
            "status": context.status if context is not None else "starting",
            "stats": stats.model_dump(mode="json"),
            "live": None,
        }
        if self.metrics is not None:
            self.metrics.live.record_queue_depth(stats.queue_depth)
            body["live"] = self.metrics.live.snapshot(window)
        return JSONResponse(body)

    # ------------------------------------------------------------------ API: playground
    async def _image_or_path(self, request: Request, state: _Running) -> bytes | Path:
        """The uploaded image (raw body, capped at `max_image_bytes`), or `?path=` naming an indexed file."""
        path = request.query_params.get("path")
        if path:
            return await asyncio.to_thread(state.gallery.check_indexed, path)
        return await self._upload(request)

    async def _upload(self, request: Request) -> bytes:
        """Read the raw body as image bytes, refusing it as soon as it passes `max_image_bytes`."""
        limit = self.max_image_bytes
        too_large = (
            "The uploaded image is larger than max_image_bytes = {limit} bytes (BLIP_MAX_IMAGE_BYTES): "
            "send a smaller or re-encoded image."
        )
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise PayloadTooLarge(too_large.format(limit=limit))
        if request.headers.get("content-type", "").lower().startswith("multipart/"):  # `curl -F`, an HTML <form>
            raise InvalidImage(
                "Send the image file itself as the request body, not a multipart form: "
                "curl --data-binary @photo.jpg URL, or fetch(url, {method: 'POST', body: file})."
            )
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(too_large.format(limit=limit))
            chunks.append(chunk)
        if total == 0:
            raise InvalidImage("Send the image file as the request body, e.g. fetch(url, {method: 'POST', body}).")
        return b"".join(chunks)

    async def caption(self, request: Request) -> Response:
        """`POST /ui/api/caption[?prompt=...&max_new_tokens=...]`, image as the body: a `CaptionResult`."""
        state = self._state()
        prompt = _text(request.query_params.get("prompt"), "prompt", required=False)
        gen = _gen_params(request)
        image = await self._image_or_path(request, state)
        result = await _unless_gone(request, state.service.acaption(image, prompt, **gen))
        return JSONResponse(result.model_dump(mode="json"))

    async def answer(self, request: Request) -> Response:
        """`POST /ui/api/answer?question=...`, image as the body: an `AnswerResult`."""
        state = self._state()
        question = _text(request.query_params.get("question"), "question")
        assert question is not None
        gen = _gen_params(request)
        image = await self._image_or_path(request, state)
        result = await _unless_gone(request, state.service.aanswer(image, question, **gen))
        return JSONResponse(result.model_dump(mode="json"))

    async def score(self, request: Request) -> Response:
        """`POST /ui/api/score?text=a&text=b`, image as the body: a `ScoreResult` (ITC and ITM per text)."""
        state = self._state()
        texts = [t for t in (_text(v, "text", required=False) for v in request.query_params.getlist("text")) if t]
        if not texts:
            raise InvalidInput("give at least one text to score, e.g. ?text=a%20dog&text=a%20cat")
        if len(texts) > MAX_SCORE_TEXTS:
            raise InvalidInput(f"score at most {MAX_SCORE_TEXTS} texts at once, got {len(texts)}")
        image = await self._image_or_path(request, state)
        result = await _unless_gone(request, state.service.ascore(image, texts))
        return JSONResponse(result.model_dump(mode="json"))

    async def locate(self, request: Request) -> Response:
        """`POST /ui/api/locate?text=...[&path=...]`: the grounding heatmap overlay (PNG data URI), box and peak."""
        state = self._state()
        text = _text(request.query_params.get("text"), "text")
        assert text is not None
        image = await self._image_or_path(request, state)
        result = await _unless_gone(request, state.service.alocate(image, text))
        png = await asyncio.to_thread(result.overlay_png, max_side=768)
        body = result.model_dump(mode="json", exclude={"grid"})
        body["summary"] = result.summary()
        body["overlay"] = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
        return JSONResponse(body)

    # ------------------------------------------------------------------ API: gallery
    async def search(self, request: Request) -> Response:
        """`GET /ui/api/search?q=...&top_k=12&rerank=false`: ranked indexed images with scores and captions."""
        state = self._state()
        query = _text(request.query_params.get("q"), "q")
        top_k = _int(request, "top_k", 12, 1, MAX_TOP_K) or 12
        rerank = _bool(request, "rerank")
        directory = request.query_params.get("directory") or None
        index = await asyncio.to_thread(state.gallery.index)
        result = await _unless_gone(request, index.asearch(query, top_k=top_k, directory=directory, rerank=rerank))
        return JSONResponse(result.model_dump(mode="json"))

    async def index_folder(self, request: Request) -> Response:
        """`POST /ui/api/index` with `{"directory": ..., "recursive": true, "captions": true}`: an `IndexReport`."""
        state = self._state()
        body = await _json_body(request)
        directory = _text(body.get("directory"), "directory")
        assert directory is not None
        recursive = _json_flag(body, "recursive", default=True)
        captions = _json_flag(body, "captions", default=True)
        index = await asyncio.to_thread(state.gallery.index)
        report = await index.aindex(directory, recursive=recursive, captions=captions)
        state.gallery.changed()
        stats = await asyncio.to_thread(index.stats)
        return JSONResponse({"report": report.model_dump(mode="json"), "summary": report.summary(),
                             "index": stats.model_dump(mode="json")})  # fmt: skip

    async def thumbnail(self, request: Request) -> Response:
        """`GET /ui/api/thumb?path=...&size=256`: a JPEG thumbnail of an indexed image (nothing else is served)."""
        state = self._state()
        path = request.query_params.get("path")
        if not path:
            raise InvalidInput("path is required: one of the paths a search returned")
        size = _int(request, "size", 256, THUMB_SIDES[0], THUMB_SIDES[-1]) or 256
        side = min(THUMB_SIDES, key=lambda s: abs(s - size))
        data = await state.gallery.athumbnail(path, side)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=60"})


__all__ = ["API_PREFIX", "STATIC_PREFIX", "UI_PATH", "Console", "status_for"]
