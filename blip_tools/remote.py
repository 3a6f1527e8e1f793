"""`RemoteService`: the `Blip2Service` API, served by a shared `blip-mcp` daemon over MCP (streamable HTTP).

One machine runs one model owner (`blip-mcp --transport http`); LangChain agents, scripts and the stdio proxy
(`blip-mcp --connect URL`) talk to it instead of loading their own copy. `RemoteService` has the public methods
the interfaces call on `Blip2Service` (`caption`, `acaption`, `caption_batch`, `answer`, `score`, `embed_images`,
`embed_texts`, `stats`, `model_info`, ...) and rebuilds the same typed results from the tools' structured content.

Connections: every operation opens a fresh, short-lived MCP client over its own HTTP connection (the protocol
version learned on the first connection is reused, so a call costs one HTTP request). Nothing is held open, so
a daemon restart needs no reconnect logic: the next call simply works again. A daemon that is down fails fast
with `ModelNotAvailable` (bounded connect timeout), never a hang.

Images given as paths are read here and sent as `data:` URIs when the daemon cannot see this machine's files
(`send_files`): `"auto"` sends data unless the daemon's URL is loopback and this side sets no `allowed_dirs` (paths
are checked where they are read: with `allowed_dirs` set here, files are read here, where they apply), `"always"`
always sends data, `"never"` sends paths (made absolute). Bytes and PIL images are always sent as data.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import datetime
import email.utils
import functools
import inspect
import io
import ipaddress
import json
import logging
import math
import mimetypes
import os
import re
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit, urlunsplit

from ._ctrl_c import ctrl_c_deferred
from .errors import (
    BlipError,
    CapabilityUnavailable,
    InferenceError,
    InvalidImage,
    InvalidInput,
    ModelNotAvailable,
    Overloaded,
    PathNotAllowed,
    PayloadTooLarge,
    RequestTimeout,
    ServiceClosed,
)
from .params import GenerationParams
from .results import AnswerResult, CaptionResult, EmbeddingResult, ModelInfo, ScoreResult, ServiceStats
from .service import Blip2Service
from .settings import BlipSettings

if TYPE_CHECKING:
    import mcp_types
    from mcp import Client
    from PIL import Image
    from pydantic import BaseModel

    from .grounding import LocateResult
    from .images import ImageInput

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R", bound="BaseModel")
SendFiles = Literal["auto", "always", "never"]
ProgressFn = Callable[[int, int], Any]
ProgressCallback = Callable[[float, float | None, str | None], Awaitable[None]]
"""An MCP progress callback: `(progress, total, message)`."""

MCP_PATH = "/mcp"
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_READ_TIMEOUT_S = 300.0
DEFAULT_CONCURRENCY = 16
_CLOSE_GRACE_S = 5.0
"""How long close() waits for cancelled calls to end before it gives up on them (they end in milliseconds)."""
CAPTION_IMAGES_MAX = 64
"""Most images the daemon's `caption_images` tool takes per call; longer lists are sent in chunks."""

_START_HINT = (
    "Start it with `blip-mcp --transport http` (add --port/--host/--token as needed), or point "
    "BLIP_REMOTE_URL / --connect at a running daemon."
)


# ---------------------------------------------------------------------------------------------- URLs
def normalize_url(url: str) -> str:
    """The daemon's MCP endpoint: `http://host:port` gets the `/mcp` path; anything else is kept as given."""
    text = url.strip()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise InvalidInput(f"The daemon URL must be http(s)://host:port[/mcp], got {text!r}")
    if parts.path in ("", "/"):
        parts = parts._replace(path=MCP_PATH)
    return urlunsplit(parts)


def is_loopback_url(url: str) -> bool:
    """True when the URL's host is this machine (localhost, 127.0.0.0/8 or ::1), so it can read our files."""
    host = (urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------- errors
def _error_classes() -> dict[str, type[BlipError]]:
    """Every `BlipError` subclass by its `code` (walked, so new leaves are picked up without a table)."""
    found: dict[str, type[BlipError]] = {BlipError.code: BlipError}
    stack: list[type[BlipError]] = [BlipError]
    while stack:
        cls = stack.pop()
        for sub in cls.__subclasses__():
            found.setdefault(sub.code, sub)
            stack.append(sub)
    return found


_TOOL_PREFIX = re.compile(r"^Error executing tool [\w.-]+:\s*")
_CODE = re.compile(r"^\[([a-z_]+)\]\s*")
_RETRY = re.compile(r"retry after ([0-9]+(?:\.[0-9]+)?)\s*s", re.IGNORECASE)


def error_from_text(text: str) -> BlipError:
    """Rebuild the typed error from a daemon tool error (`[code] message`); unknown codes give `BlipError`."""
    message = _TOOL_PREFIX.sub("", text.strip(), count=1)
    match = _CODE.match(message)
    cls: type[BlipError] = BlipError
    if match:
        cls = _error_classes().get(match.group(1), BlipError)
        message = message[match.end() :]
    elif "validation error" in message:
        cls = InvalidInput
    message = message.strip() or "The daemon reported an error without a message."
    if cls is Overloaded or issubclass(cls, Overloaded):
        retry = _RETRY.search(message)
        return Overloaded(message, retry_after_s=float(retry.group(1)) if retry else 1.0)
    try:
        return cls(message)
    except TypeError:  # a subclass with a different constructor: keep the text, lose only the type
        return BlipError(message)


def _leaves(exc: BaseException) -> list[BaseException]:
    """The leaf exceptions of (nested) exception groups, plus `__cause__` chains one level deep."""
    if isinstance(exc, BaseExceptionGroup):
        out: list[BaseException] = []
        for sub in exc.exceptions:
            out.extend(_leaves(sub))
        return out
    return [exc]


def transport_error(exc: BaseException, url: str) -> BlipError:
    """Map what the MCP client / HTTP stack raised while talking to the daemon to one readable `BlipError`."""
    import httpx2
    from mcp.shared.exceptions import MCPError

    leaves = _leaves(exc)
    for leaf in leaves:
        if isinstance(leaf, BlipError):
            return leaf
    for leaf in leaves:
        if isinstance(leaf, (httpx2.ConnectError, httpx2.ConnectTimeout, ConnectionRefusedError)):
            return ModelNotAvailable(f"The blip-mcp daemon at {url} is unreachable ({leaf}). {_START_HINT}")
        if isinstance(leaf, httpx2.HTTPStatusError):
            return _status_error(
                leaf.response.status_code,
                url,
                shutdown=_is_shutdown_response(leaf.response),
                retry_after=_retry_after_header(leaf.response.headers),
            )
        if isinstance(leaf, httpx2.TimeoutException | TimeoutError):
            return RequestTimeout(f"The blip-mcp daemon at {url} did not answer in time ({type(leaf).__name__}).")
        if isinstance(leaf, (httpx2.RemoteProtocolError, httpx2.ReadError, httpx2.WriteError)):
            return _lost(url, str(leaf))
        if isinstance(leaf, MCPError):
            return _mcp_error(leaf, url)
    first = leaves[0] if leaves else exc
    logger.debug("unexpected error talking to %s", url, exc_info=first)
    return BlipError(f"Talking to the blip-mcp daemon at {url} failed: {type(first).__name__}: {first}")


_TELLING_STATUSES = (401, 403, 404, 413, 421, 429, 500, 502, 503, 504)
_SDK_STAND_IN = "Server returned an error response"
"""The MCP client's message for an HTTP error whose body is no JSON-RPC error (it says nothing of its own)."""


def _is_shutdown_response(response: Any) -> bool:
    """uvicorn's own 500, which is what a call in flight gets when the daemon stops under it (SIGTERM, a restart).

    At the end of a graceful shutdown uvicorn cancels what still runs and answers `Internal Server Error` as plain
    text with `connection: close`; the SDK's and the app's own 500s carry a JSON-RPC error or keep the connection.
    """
    headers = response.headers
    return (
        response.status_code == 500
        and headers.get("connection", "").lower() == "close"
        and headers.get("content-type", "").lower().startswith("text/plain")
    )


class RequestTooLarge(PayloadTooLarge):
    """The daemon refused a whole request body as too large (HTTP 413), not one image in it."""


def _lost(url: str, why: str) -> ModelNotAvailable:
    return ModelNotAvailable(
        f"The connection to the blip-mcp daemon at {url} was lost during the call ({why}); "
        "it may have stopped or restarted. Retry, and check the daemon's log if it persists."
    )


def _retry_after_header(headers: Any) -> float | None:
    """Seconds from a `Retry-After` header (a number of seconds or an HTTP date), None when absent or unreadable."""
    value = str(headers.get("retry-after", "") or "").strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        seconds = (when - datetime.datetime.now(datetime.UTC)).total_seconds()
    return min(max(seconds, 0.0), 3600.0) if math.isfinite(seconds) else None


def _status_error(
    status: int, url: str, *, shutdown: bool = False, detail: str | None = None, retry_after: float | None = None
) -> BlipError:
    """The error for an HTTP status; `shutdown` marks uvicorn's 500 at shutdown, `detail` the daemon's message,
    `retry_after` a 429/503's `Retry-After` in seconds."""
    if status in (401, 403):
        return BlipError(
            f"The blip-mcp daemon at {url} refused the request (HTTP {status}): pass its token "
            "(BLIP_TOKEN, --token, or RemoteService(url, token=...))."
        )
    if status == 404:
        return ModelNotAvailable(f"No MCP endpoint at {url} (HTTP 404): the daemon serves it at /mcp.")
    if status == 413:
        return RequestTooLarge(f"The request was too large for the daemon at {url} (HTTP 413): send a smaller image.")
    if status == 421:
        return BlipError(
            f"The daemon at {url} does not accept this host name (HTTP 421): start it with --allowed-host <name>."
        )
    if shutdown:
        return _lost(url, f"HTTP {status} while it shut down")
    if status == 500:
        why = f"{detail.rstrip('.')}. See the daemon's log." if detail else "see the daemon's log."
        return BlipError(f"The blip-mcp daemon at {url} had an internal error (HTTP 500): {why}")
    if status == 502:
        return ModelNotAvailable(
            f"The server in front of the blip-mcp daemon at {url} got no valid answer from it (HTTP 502 Bad Gateway"
            f"{': ' + detail if detail else ''}); the daemon may be down or restarting. Retry shortly."
        )
    if status == 504:
        return RequestTimeout(
            f"The blip-mcp daemon at {url} did not answer in time (HTTP 504 Gateway Timeout from the server in front "
            "of it). Retry, or send fewer images per call."
        )
    if status in (429, 503):
        wait = 1.0 if retry_after is None else retry_after
        return Overloaded(
            f"The server at {url} is at capacity (HTTP {status}): every replica is busy and its queue is full. "
            f"Retry after {wait:.1f} s.",
            retry_after_s=wait,
        )
    return BlipError(f"The blip-mcp daemon at {url} answered HTTP {status}.")


def _mcp_error(exc: Any, url: str) -> BlipError:
    """A JSON-RPC error from the daemon (or the transport's synthetic one) as a `BlipError`."""
    code = getattr(exc, "code", None)
    message = str(getattr(exc, "message", None) or exc)
    status = re.search(r"\b(401|403|404|413|421)\b", message)
    if status and ("HTTP" in message or "status" in message.lower()):
        return _status_error(int(status.group(1)), url)
    if code in (-32602, -32601):  # invalid params, method not found
        return InvalidInput(message)
    if "stream ended without a response" in message.lower():  # the daemon stopped while it streamed progress
        return _lost(url, message)
    if "connect" in message.lower() and ("fail" in message.lower() or "refused" in message.lower()):
        return ModelNotAvailable(f"The blip-mcp daemon at {url} is unreachable ({message}). {_START_HINT}")
    return BlipError(f"The blip-mcp daemon at {url} returned an error: {message}")


def tool_text(result: mcp_types.CallToolResult) -> str:
    """The text blocks of a tool result, joined."""
    return "\n".join(getattr(block, "text", "") for block in result.content if getattr(block, "type", "") == "text")


# ---------------------------------------------------------------------------------------------- batch requests
_ITEM_OVERHEAD = 8
"""JSON quotes, comma and spacing around one image reference in a request body."""


def request_budget(max_image_bytes: int) -> int:
    """Characters of image references one batch request may carry: one image of `max_image_bytes` as base64.

    The daemon's request body limit is sized for one such image (plus room for the JSON-RPC envelope), so a
    batch of data URIs is split into requests that each fit it. This side's `max_image_bytes` is the estimate;
    should the daemon's limit be lower, `send_in_chunks` halves a refused request and retries.
    """
    return 4 * ((max_image_bytes + 2) // 3)


def plan_chunks(sizes: Sequence[int], budget: int, max_count: int = CAPTION_IMAGES_MAX) -> list[tuple[int, int]]:
    """Split items of the given encoded sizes into consecutive `(start, stop)` ranges, in order.

    Each range holds at most `max_count` items whose sizes (plus JSON overhead) add up to at most `budget`;
    an item larger than `budget` on its own gets a range of its own (the daemon then judges it).
    """
    if budget < 1 or max_count < 1:
        raise InvalidInput(f"budget and max_count must be >= 1, got {budget} and {max_count}")
    chunks: list[tuple[int, int]] = []
    start, used = 0, 0
    for index, size in enumerate(sizes):
        cost = size + _ITEM_OVERHEAD
        if index > start and (used + cost > budget or index - start >= max_count):
            chunks.append((start, index))
            start, used = index, 0
        used += cost
    if start < len(sizes):
        chunks.append((start, len(sizes)))
    return chunks


ChunkProgress = Callable[[float, str | None], Awaitable[None]]
"""Progress within one request of `send_in_chunks`: `(items done in this request, the daemon's message)`."""


async def send_in_chunks(
    sizes: Sequence[int],
    budget: int,
    send: Callable[[int, int, ChunkProgress], Awaitable[Sequence[T]]],
    too_large: Callable[[int, PayloadTooLarge], T],
    *,
    progress: Callable[[float, str | None], Awaitable[None]] | None = None,
    max_count: int = CAPTION_IMAGES_MAX,
) -> list[T]:
    """Send a batch as requests that fit the daemon's body limit; one result per item, in the items' order.

    `send(start, stop, relay)` makes one request for items `start:stop`, passes the daemon's progress within that
    request to `relay(count, message)`, and returns one result per item (a different count is an error). Ranges
    come from `plan_chunks` and go one after another. A range the daemon refuses as a whole request body
    (HTTP 413, `RequestTooLarge`) is split in halves and retried; a single refused item gets
    `too_large(index, error)` in its place, so only that item fails. Any other error, including an item the daemon
    refused on its own (a plain `PayloadTooLarge`), ends the batch.

    `progress(done, message)` counts over the whole batch: every item once, never backwards, ending at
    `len(sizes)`. `message` is the daemon's own only when one request carries the whole batch, else None.
    """
    out: list[T] = []
    total = len(sizes)
    done = 0.0

    async def advance(to: float, message: str | None) -> None:
        nonlocal done
        if to > done:
            done = to
            if progress is not None:
                await progress(done, message)

    async def attempt(start: int, stop: int) -> None:
        async def relay(value: float, message: str | None) -> None:
            whole = start == 0 and stop == total
            await advance(start + min(max(value, 0.0), stop - start), message if whole else None)

        try:
            results = await send(start, stop, relay)
        except RequestTooLarge as exc:
            if stop - start == 1:
                out.append(too_large(start, exc))
                await advance(stop, None)
                return
            middle = (start + stop) // 2
            logger.info("a request of %d images was too large for the daemon; sending it in halves", stop - start)
            await attempt(start, middle)
            await attempt(middle, stop)
            return
        if len(results) != stop - start:
            raise BlipError(f"The daemon returned {len(results)} results for {stop - start} images.")
        out.extend(results)
        await advance(stop, None)

    for start, stop in plan_chunks(sizes, budget, max_count):
        await attempt(start, stop)
    return out


# ---------------------------------------------------------------------------------------------- image inputs
def _image_mime(name: str, data: bytes) -> str:
    """A plausible `image/*` media type (the daemon sniffs the real format anyway)."""
    guess, _ = mimetypes.guess_type(name)
    if guess and guess.startswith("image/"):
        return guess
    if data.startswith(b"\x89PNG"):
        return "image/png"
    if data.startswith(b"\xff\xd8"):
        return "image/jpeg"
    return "image/png"


def data_uri(data: bytes, mime: str = "image/png") -> str:
    """`data:<mime>;base64,<data>`."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def sends_data(send_files: SendFiles, loopback: bool, settings: BlipSettings) -> bool:
    """Whether image paths are read on this side and sent as data: `always`; `auto` unless the daemon is on
    loopback (it reads the same files) and this side sets no `allowed_dirs` (a path is checked only where it is
    read, so with `allowed_dirs` here the file is read here, where they apply); never with `never`."""
    return send_files == "always" or (send_files == "auto" and (not loopback or bool(settings.allowed_dirs)))


def prepare_image(ref: ImageInput | str, settings: BlipSettings, *, send_data: bool) -> tuple[str, str | None]:
    """Turn an image reference into the string sent to the daemon, and the source label to show locally.

    Paths and `file://` URIs are read here (with this side's `allowed_dirs` and size limit) and sent as a data
    URI when `send_data`, else sent as an absolute path. Bytes and PIL images are always sent as data.
    Data URIs, base64 and URLs pass through. Returns `(wire_ref, label)`; `label` is None when the daemon's own
    description is already right.
    """
    from PIL import Image

    from . import images

    if isinstance(ref, Image.Image):
        return data_uri(_png_bytes(ref)), "PIL image"
    if isinstance(ref, (bytes, bytearray)):
        raw = bytes(ref)
        if len(raw) > settings.max_image_bytes:
            raise PayloadTooLarge(
                f"The image is {len(raw)} bytes; the limit is {settings.max_image_bytes} (BLIP_MAX_IMAGE_BYTES)."
            )
        return data_uri(raw, _image_mime("", raw)), images.describe_ref(raw)
    if isinstance(ref, Path):
        ref = str(ref)
    if not isinstance(ref, str):
        raise InvalidImage(f"Unsupported image input of type {type(ref).__name__}; pass {images.ACCEPTED_FORMS}.")
    kind = images._classify(ref)
    if kind not in ("path", "file-uri"):
        return ref, None
    label = images.describe_ref(ref)
    path = images._file_uri_path(ref.strip(), strict=True) if kind == "file-uri" else ref
    absolute = os.path.abspath(os.path.expanduser(path))
    if not send_data:
        return absolute, None
    data = images._read_file(Path(absolute), settings, label)
    if not images.has_image_signature(data[:16]):
        # Never upload what is not an image: a prompt-injected call could name ~/.ssh/id_ed25519.
        raise InvalidImage(
            f"{label} is not an image file (accepted: {', '.join(images.ALLOWED_FORMATS)}); it was not sent to the "
            "daemon."
        )
    return data_uri(data, _image_mime(absolute, data)), label


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _overlay_image(source: ImageInput, size: tuple[int, int], settings: BlipSettings, url: str) -> Image.Image:
    """The image a daemon's `LocateResult` draws its overlay on, decoded here by `load_image` when first asked for.

    `source` is what was sent (the data URI read here, no second read; an absolute path the daemon read too; a
    URL, data URI or base64 as given), or the caller's bytes or PIL image. The daemon sends no pixels back.

    Raises:
        InferenceError: this side cannot load the image under its own settings (say a URL only the daemon may
            fetch), or decodes it to another size than the daemon did (the heatmap would not line up).
    """
    from .images import load_image

    try:
        loaded = load_image(source, settings)
    except BlipError as exc:
        raise InferenceError(
            f"No overlay: the blip-mcp daemon at {url} located the text, but the overlay is drawn here and this side "
            f"cannot load the image: {exc}"
        ) from exc
    if loaded.image.size != size:  # another decoder (or the file changed since): the heatmap would not line up
        raise InferenceError(
            f"No overlay: the blip-mcp daemon at {url} saw the image at {size[0]}x{size[1]}, this side decodes it "
            f"at {loaded.image.width}x{loaded.image.height}."
        )
    return loaded.image


# ---------------------------------------------------------------------------------------------- the MCP client
def _stop_loop(loop: asyncio.AbstractEventLoop) -> None:
    """A dropped `RemoteService`'s finalizer: stop its private loop, whose thread then closes it (`_run_loop`).

    It may run in any thread, at any allocation: `call_soon_threadsafe` takes no lock, and a loop that close()
    has closed already is left alone."""
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(loop.stop)


class DaemonClient:
    """Async access to a daemon's MCP tools and resources; a fresh connection per operation, in any event loop.

    Args:
        url: the daemon's endpoint (`http://127.0.0.1:8765/mcp`; a bare `http://host:port` gets `/mcp`).
        token: bearer token the daemon requires (`--token` / `BLIP_TOKEN` there).
        connect_timeout_s: how long to wait for the TCP/TLS connection before reporting the daemon down.
        timeout_s: overall limit for listing and reading resources.
        read_timeout_s: longest silence while a tool call runs (progress notifications reset it).
    """

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        timeout_s: float = 30.0,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
    ) -> None:
        if connect_timeout_s <= 0 or timeout_s <= 0 or read_timeout_s <= 0:
            raise InvalidInput(
                f"timeouts must be > 0, got connect={connect_timeout_s}, timeout={timeout_s}, read={read_timeout_s}"
            )
        self.url = normalize_url(url)
        self.token = token
        if token and urlsplit(self.url).scheme == "http" and not is_loopback_url(self.url):
            logger.warning(
                "the token for %s is sent over plain HTTP, readable on the network with every image; use https:// "
                "(a reverse proxy) or an SSH tunnel to a loopback port",
                self.url,
            )
        self.connect_timeout_s = connect_timeout_s
        self.timeout_s = timeout_s
        self.read_timeout_s = read_timeout_s
        self._discover: mcp_types.DiscoverResult | None = None
        self._version: str | None = None
        self._tools: dict[str, mcp_types.Tool] | None = None
        self._listing: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Task[Any]] = (
            weakref.WeakKeyDictionary()
        )
        """The listing in flight per event loop, which concurrent first calls share instead of each listing."""

    @property
    def loopback(self) -> bool:
        """Whether the daemon runs on this machine (and can read this machine's files)."""
        return is_loopback_url(self.url)

    @asynccontextmanager
    async def connect(self, statuses: list[tuple[int, bool, float | None]] | None = None) -> AsyncIterator[Client]:
        """A connected MCP client for one operation (the first connection negotiates the protocol version).

        HTTP error statuses seen on the way are appended to `statuses` as `(status, shutdown, retry_after)`
        (`shutdown`: uvicorn's 500 of a daemon that stops; `retry_after`: a `Retry-After` header, in seconds): the
        MCP transport reports most of them only as a generic error, and a 401 deserves a message about the token.
        """
        import httpx2
        from mcp import Client
        from mcp.client.streamable_http import streamable_http_client

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        timeout = httpx2.Timeout(self.read_timeout_s, connect=self.connect_timeout_s)

        @asynccontextmanager
        async def transport() -> AsyncIterator[Any]:
            async def record(response: httpx2.Response) -> None:
                if response.status_code >= 400 and statuses is not None:
                    statuses.append(
                        (
                            response.status_code,
                            _is_shutdown_response(response),
                            _retry_after_header(response.headers),
                        )
                    )

            async with (
                httpx2.AsyncClient(headers=headers, timeout=timeout, event_hooks={"response": [record]}) as http,
                streamable_http_client(self.url, http_client=http, terminate_on_close=False) as streams,
            ):
                yield streams

        known = self._discover
        client = Client(
            transport(),
            mode=self._version if known is not None and self._version else "auto",
            prior_discover=known,
            cache=None,
        )
        async with client:
            if known is None and client.session.discover_result is not None:
                # A modern daemon: later connections adopt this result and skip the discovery round trip.
                self._discover = client.session.discover_result
                self._version = client.protocol_version
            self._seed_tools(client)
            yield client

    def _seed_tools(self, client: Client) -> None:
        """Give a fresh connection the tools already listed, so a tool call is one HTTP request, not two.

        The SDK checks a tool's result against its output schema and, in a session that has not listed the tools,
        lists them first: every call on a fresh connection was `tools/call` then `tools/list`. Behind a server that
        refuses requests under load (Ray Serve's queue limits) the second could be refused after the daemon had
        done the work, and the caller got `Overloaded` for a result that was thrown away. The tools are given
        without their output schemas: `RemoteService` parses each result into its pydantic model (a stricter check
        than the SDK's), and the stdio proxy's own host validates what it relays. `_absorb_tool_listing` is the
        SDK's private hook for a cached listing; without it (another SDK version) the SDK lists as before.
        """
        absorb = getattr(client.session, "_absorb_tool_listing", None)
        if self._tools is None or absorb is None:
            return
        from mcp_types import ListToolsResult

        tools = [tool.model_copy(update={"output_schema": None}) for tool in self._tools.values()]
        absorb(ListToolsResult(tools=tools), complete=True)

    async def run(self, operation: Callable[[Client], Awaitable[T]], *, timeout_s: float | None = None) -> T:
        """Run `operation(client)` on a fresh connection, mapping every transport failure to a `BlipError`."""
        import anyio
        from mcp.shared.exceptions import MCPError

        for attempt in range(2):
            statuses: list[tuple[int, bool, float | None]] = []
            try:
                with anyio.fail_after(timeout_s):
                    async with self.connect(statuses) as client:
                        return await operation(client)
            except BlipError:
                raise
            except Exception as exc:
                if attempt == 0 and self._discover is not None and _is_version_error(exc, MCPError):
                    self._discover = None  # the daemon was replaced by another version: negotiate again
                    continue
                telling = [seen for seen in statuses if seen[0] in _TELLING_STATUSES]
                if telling:
                    status, shutdown, retry_after = telling[-1]
                    raise _status_error(
                        status, self.url, shutdown=shutdown, detail=_daemon_message(exc), retry_after=retry_after
                    ) from exc
                raise transport_error(exc, self.url) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    async def call_tool(
        self,
        name: str,
        arguments: Mapping[str, Any] | None = None,
        *,
        progress: ProgressCallback | None = None,
        timeout_s: float | None = None,
    ) -> mcp_types.CallToolResult:
        """Call one tool and return its result as the daemon sent it (`is_error` results are returned, not raised)."""
        if self._tools is None:
            await self._listed()  # on its own connection first, so the call's connection sends only the call

        relay = _ProgressRelay(progress) if progress is not None else None

        async def op(client: Client) -> mcp_types.CallToolResult:
            result = await client.call_tool(name, dict(arguments or {}), progress_callback=relay)  # type: ignore[arg-type]
            if relay is not None:
                await relay.drain()
            return result

        return await self.run(op, timeout_s=timeout_s)

    async def list_tools(self) -> list[mcp_types.Tool]:
        """Every tool the daemon offers (all pages); remembered for `tool_schema`."""

        async def op(client: Client) -> list[mcp_types.Tool]:
            tools: list[mcp_types.Tool] = []
            cursor: str | None = None
            for _ in range(100):
                page = await client.list_tools(cursor=cursor)
                tools.extend(page.tools)
                cursor = page.next_cursor
                if not cursor:
                    break
            return tools

        tools = await self.run(op, timeout_s=self.timeout_s)
        self._tools = {t.name: t for t in tools}
        return tools

    async def _listed(self) -> None:
        """List the daemon's tools, sharing a listing already in flight on this event loop."""
        loop = asyncio.get_running_loop()
        listing = self._listing.get(loop)
        if listing is None or listing.done():
            listing = self._listing[loop] = loop.create_task(self.list_tools())
            listing.add_done_callback(lambda task: task.cancelled() or task.exception())  # seen, even if unawaited
        await asyncio.shield(listing)  # a caller cancelled meanwhile leaves the listing to the others

    async def tool_parameters(self, name: str) -> set[str]:
        """The argument names the daemon's tool accepts (listed once, then remembered)."""
        if self._tools is None or name not in self._tools:
            await self._listed()
        assert self._tools is not None
        tool = self._tools.get(name)
        if tool is None:
            raise CapabilityUnavailable(f"The blip-mcp daemon at {self.url} has no tool {name!r}.")
        return set((tool.input_schema or {}).get("properties", {}))

    async def read_text(self, uri: str) -> str:
        """The text of a resource (e.g. `blip://stats`)."""

        async def op(client: Client) -> str:
            result = await client.read_resource(uri)
            return "".join(getattr(c, "text", "") or "" for c in result.contents)

        return await self.run(op, timeout_s=self.timeout_s)


def _read(model: type[R], content: Any, tool: str) -> R:
    """The daemon's result for `tool` as `model`; a result of another shape (another blip-tools version) is typed."""
    from pydantic import ValidationError

    try:
        return model.model_validate(content)
    except ValidationError as exc:
        errors = exc.errors()
        where = ".".join(str(part) for part in errors[0]["loc"]) if errors else ""
        what = errors[0]["msg"] if errors else str(exc)
        raise BlipError(
            f"The daemon's {tool} tool returned a result this client cannot read ({where or 'result'}: {what}); "
            "is the daemon running another version of blip-tools? Use the same version on both sides."
        ) from None


class _ProgressRelay:
    """A progress callback whose calls still running can be waited for before the connection closes.

    The SDK runs each progress callback as a task of the connection, and a call returns as soon as its result
    arrives: closing the connection then cancelled callbacks for progress the daemon sent just before the result
    (the stdio proxy lost the last counts it relays to its host). `drain()` lets them finish, for a few seconds at
    most, so a host that stops reading cannot hold the call.
    """

    DRAIN_S = 5.0

    def __init__(self, fn: ProgressCallback) -> None:
        self._fn = fn
        self._running = 0
        self._idle: Any = None

    async def __call__(self, value: float, total: float | None, message: str | None) -> None:
        self._running += 1
        try:
            await self._fn(value, total, message)
        finally:
            self._running -= 1
            if not self._running and self._idle is not None:
                self._idle.set()

    async def drain(self) -> None:
        """Wait for the callbacks of progress that arrived before the result (they start before this resumes)."""
        import anyio

        await anyio.sleep(0)
        if self._running:
            self._idle = anyio.Event()
            with anyio.move_on_after(self.DRAIN_S):
                await self._idle.wait()


def _daemon_message(exc: BaseException) -> str | None:
    """The daemon's own words in a JSON-RPC error it sent with an HTTP error status, if it sent any."""
    from mcp.shared.exceptions import MCPError

    for leaf in _leaves(exc):
        if isinstance(leaf, MCPError):
            message = str(getattr(leaf, "message", None) or leaf).strip()
            if message and message != _SDK_STAND_IN:
                return message
    return None


def _is_version_error(exc: BaseException, mcp_error: type[Exception]) -> bool:
    from mcp_types import UNSUPPORTED_PROTOCOL_VERSION

    return any(isinstance(e, mcp_error) and e.code == UNSUPPORTED_PROTOCOL_VERSION for e in _leaves(exc))  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- the service
class RemoteService(Blip2Service):
    """The `Blip2Service` API backed by a `blip-mcp` daemon: same methods, same typed results, same errors.

    It subclasses `Blip2Service` so it fits wherever one is expected (`Blip2Toolkit(service=RemoteService(url))`,
    `ImageIndex(service=RemoteService(url).start())`: `start()` first, so the index records the daemon's model, not
    this side's settings), but it has no local runtime or batcher: every public method is overridden to call
    the daemon, and `add_listener` is not available. Sync methods run on a private event-loop thread; async
    methods run in the caller's loop, and cancelling the awaiting task cancels the call on the daemon.

    Args:
        url: the daemon (`http://127.0.0.1:8765` or `.../mcp`).
        token: the daemon's bearer token, if it requires one. Default: `settings.token` (`BLIP_TOKEN`).
        settings: this side's settings: `allowed_dirs` and `max_image_bytes` apply when files are read here.
            Defaults to `BlipSettings()`.
        send_files: `auto` (send file contents unless the daemon is on loopback and `settings.allowed_dirs` is
            unset; see `sends_data`), `always` or `never`.
            Default: `settings.remote_send_files` (`BLIP_REMOTE_SEND_FILES`, else `auto`).
        connect_timeout_s: how long a connection attempt may take before the daemon counts as down.
        concurrency: most calls in flight at once from one batch method.
    """

    def __init__(  # no super().__init__(): nothing local to build (no runtime, no batcher)
        self,
        url: str,
        token: str | None = None,
        *,
        settings: BlipSettings | None = None,
        send_files: SendFiles | None = None,
        connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
        read_timeout_s: float = DEFAULT_READ_TIMEOUT_S,
        concurrency: int = DEFAULT_CONCURRENCY,
    ) -> None:
        self.settings = settings if settings is not None else BlipSettings()
        # Unset arguments follow the settings (BLIP_TOKEN, BLIP_REMOTE_SEND_FILES), as the README and the 401
        # message promise, so RemoteService(url) behaves like the shared service BLIP_REMOTE_URL gives.
        if token is None:
            token = self.settings.token
        if send_files is None:
            send_files = self.settings.remote_send_files
        if send_files not in ("auto", "always", "never"):
            raise InvalidInput(f"send_files must be 'auto', 'always' or 'never', got {send_files!r}")
        if concurrency < 1:
            raise InvalidInput(f"concurrency must be an integer >= 1, got {concurrency}")
        self.daemon = DaemonClient(url, token=token, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s)
        self.url = self.daemon.url
        self.send_files: SendFiles = send_files
        self.concurrency = concurrency
        self._closed = False
        self._retrieval_model: str | None = None
        """The daemon's retrieval model as `start()` found it; embeddings from another one are refused."""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        # Calls in flight, so close() can end them: each guarded task with its loop and nesting depth, the
        # tasks close() is cancelling, and the futures sync callers wait on.
        self._inflight: dict[asyncio.Task[Any], tuple[asyncio.AbstractEventLoop, int]] = {}
        self._closing: set[asyncio.Task[Any]] = set()
        self._futures: set[concurrent.futures.Future[Any]] = set()

    def __repr__(self) -> str:
        return f"RemoteService({self.url!r}, send_files={self.send_files!r})"

    # ------------------------------------------------------------------ lifecycle
    @classmethod
    def shared(cls) -> Blip2Service:
        """The process-wide remote service for `BLIP_REMOTE_URL` (see `default_service`)."""
        service = default_service()
        if not isinstance(service, RemoteService):
            raise ModelNotAvailable("RemoteService.shared() needs BLIP_REMOTE_URL set to a running blip-mcp daemon.")
        return service

    @classmethod
    def set_shared(cls, service: Blip2Service | None) -> None:
        """Install the process-wide *local* service (delegates to `Blip2Service.set_shared`)."""
        Blip2Service.set_shared(service)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def sends_data(self) -> bool:
        """Whether image paths are read here and sent as data (see `send_files` and the function `sends_data`)."""
        return sends_data(self.send_files, self.daemon.loopback, self.settings)

    @property
    def started(self) -> bool:
        """Whether `start()` has run, so `settings.model`/`retrieval_model` name the daemon's checkpoints."""
        return self._retrieval_model is not None

    def start(self) -> RemoteService:
        """Check that the daemon answers, and take the names of its checkpoints as this service's own.

        Reads `blip://model` (`ModelNotAvailable` if the daemon does not answer) and sets `settings.model` and
        `settings.retrieval_model` to what the daemon runs, so whatever records them names the model that made
        the results: an `ImageIndex` built on this service afterwards tags its vectors and captions with the
        daemon's checkpoints, never with this side's defaults, and keeps them apart from another model's. From
        then on an embedding from another retrieval model (the daemon was restarted with one) is refused with
        `ModelNotAvailable` instead of being mixed in. Returns self.
        """
        info = self.model_info()
        self.settings = self.settings.model_copy(update={"model": info.model, "retrieval_model": info.retrieval_model})
        self._retrieval_model = info.retrieval_model
        return self

    def close(self, drain: bool = True, timeout_s: float | None = 30.0) -> None:
        """Stop accepting calls, end the calls in flight, and stop the private loop thread (the daemon keeps running).

        Calls in flight from any thread or event loop are cancelled (on the daemon too) and raise `ServiceClosed`
        at once; so does every later call. The work runs on the daemon, so there is nothing here to drain:
        `drain` is accepted for `Blip2Service` compatibility, and `timeout_s` bounds the wait for the loop thread.
        """
        current = threading.current_thread()
        with self._lock:
            self._closed = True
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            inflight = list(self._inflight.items())
            futures = list(self._futures)
            self._closing.update(task for task, _ in inflight)
        for task, (task_loop, _) in inflight:
            with contextlib.suppress(RuntimeError):  # that loop is closed already: nothing runs there any more
                task_loop.call_soon_threadsafe(self._cancel_for_close, task)
        if loop is not None:
            # Cancel first (above), then stop: the loop thread then cancels what is left, waits for it, and closes
            # the loop (`_run_loop`), also when close() runs on that thread, inside a callback.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(loop.stop)
        if thread is current:
            return
        if futures:
            grace = _CLOSE_GRACE_S if timeout_s is None else min(_CLOSE_GRACE_S, max(timeout_s, 0.0))
            concurrent.futures.wait(futures, timeout=grace)
        for future in futures:  # a call that did not end by itself: its caller gets ServiceClosed from _sync
            future.cancel()
        if thread is not None:
            thread.join(timeout_s)

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        """The private loop thread: run until close() stops it, then end what is left and close the loop.

        As `asyncio.run` does: cancel the remaining tasks and wait for them briefly, so their connections close
        and their callers hear of it; shut down async generators and the default executor; close the loop.
        """
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            try:
                tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
                for task in tasks:
                    task.cancel("RemoteService closed")
                if tasks:
                    loop.run_until_complete(asyncio.wait(tasks, timeout=_CLOSE_GRACE_S))
                for task in tasks:  # a caller close() gave up on has its error already: don't log it at exit
                    if task.done() and not task.cancelled():
                        task.exception()
                loop.run_until_complete(loop.shutdown_asyncgens())
                loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), _CLOSE_GRACE_S))
            except BaseException:  # never leave the loop open, whatever went wrong while ending it
                logger.debug("ending the RemoteService loop", exc_info=True)
            finally:
                asyncio.set_event_loop(None)
                loop.close()

    def __enter__(self) -> RemoteService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def add_listener(self, fn: Callable[..., None]) -> None:
        """Batch events happen in the daemon; read `stats()` (or `blip://stats`) instead."""
        raise CapabilityUnavailable("Batch listeners run inside the daemon; poll RemoteService.stats() instead.")

    def _cancel_for_close(self, task: asyncio.Task[Any]) -> None:
        """Cancel `task` if it is still inside a guarded call (runs on the task's own loop, so no race)."""
        with self._lock:
            live = task in self._inflight and task in self._closing
            if not live:
                self._closing.discard(task)
        if live:
            task.cancel("RemoteService closed")

    def _closed_error(self) -> ServiceClosed:
        return ServiceClosed(f"This RemoteService ({self.url}) was closed; create a new one.")

    async def _guarded(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` as a call close() can end: its cancel by close() surfaces here as `ServiceClosed`."""
        task = asyncio.current_task()
        try:
            with self._lock:
                self._check_open()
                if task is not None:
                    _, depth = self._inflight.get(task, (None, 0))
                    self._inflight[task] = (asyncio.get_running_loop(), depth + 1)
        except BaseException:
            coro.close()
            raise
        try:
            return await coro
        except asyncio.CancelledError:
            with self._lock:
                ours = task is not None and task in self._closing
            if not ours:
                raise
            assert task is not None
            task.uncancel()  # the caller did not cancel: the service was closed under it
            raise self._closed_error() from None
        finally:
            if task is not None:
                with self._lock:
                    loop, depth = self._inflight.pop(task)
                    if depth > 1:
                        self._inflight[task] = (loop, depth - 1)
                    else:
                        self._closing.discard(task)

    def _check_open(self) -> None:
        if self._closed:
            raise self._closed_error()

    def _sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run a coroutine on the private loop thread and wait for it (Ctrl-C cancels the call; close() ends it)."""
        future: concurrent.futures.Future[T] | None = None
        try:
            # A Ctrl-C is held until this call is registered (so close() can end it); then it cancels the call, as
            # one while it waits does.
            with ctrl_c_deferred(), self._lock:
                self._check_open()
                if self._loop is None:
                    # Recorded only once its thread runs: a thread that cannot start (the system's limit) must not
                    # leave a loop that every later call would wait on for good.
                    loop = asyncio.new_event_loop()
                    thread = threading.Thread(target=self._run_loop, args=(loop,), name="blip-remote-loop", daemon=True)
                    try:
                        thread.start()
                    except BaseException:
                        loop.close()
                        raise
                    self._loop, self._thread = loop, thread
                    # Dropped without close() (a notebook cell run again): stop the thread, which closes the loop.
                    weakref.finalize(self, _stop_loop, loop).atexit = False
                # Registered under the lock, so a concurrent close() sees this call and ends it.
                future = asyncio.run_coroutine_threadsafe(self._guarded(coro), self._loop)
                self._futures.add(future)
            return future.result()
        except concurrent.futures.CancelledError as exc:
            if self._closed:
                raise self._closed_error() from exc
            raise BlipError("The request was cancelled before it finished.") from exc
        except BaseException:
            if future is not None:
                future.cancel()
            raise
        finally:
            if future is not None:
                with self._lock:
                    self._futures.discard(future)
            if inspect.getcoroutinestate(coro) == inspect.CORO_CREATED:
                coro.close()  # never started (refused, or close() stopped the loop first): no "never awaited" warning

    # ------------------------------------------------------------------ helpers
    async def _image_arg(self, image: ImageInput) -> tuple[str, str | None]:
        self._check_open()
        return await asyncio.to_thread(prepare_image, image, self.settings, send_data=self.sends_data)

    async def _gen_args(self, tool: str, params: GenerationParams | None, gen: dict[str, Any]) -> dict[str, Any]:
        """The decoding arguments to send: validated here, only the non-default ones, each one the tool takes."""
        p = GenerationParams.from_kwargs(params, **gen)
        wanted = p.model_dump(exclude_defaults=True)
        if not wanted:
            return {}
        accepted = await self._guarded(self.daemon.tool_parameters(tool))
        missing = sorted(set(wanted) - accepted)
        if missing:
            raise InvalidInput(f"The daemon's {tool} tool does not take {', '.join(missing)}; leave it at its default.")
        return wanted

    async def _call(
        self,
        tool: str,
        arguments: dict[str, Any],
        progress: ProgressCallback | None = None,
    ) -> dict[str, Any]:
        """Call a tool; return its structured content or raise the typed error it reported."""
        result = await self._guarded(
            self.daemon.call_tool(tool, {k: v for k, v in arguments.items() if v is not None}, progress=progress)
        )
        if result.is_error:
            raise self._daemon_error(tool_text(result))
        if result.structured_content is None:
            text = tool_text(result)
            try:
                parsed = json.loads(text)
            except ValueError:
                raise BlipError(f"The daemon's {tool} tool returned no structured content: {text[:200]}") from None
            if not isinstance(parsed, dict):
                raise BlipError(f"The daemon's {tool} tool returned no structured content.")
            return parsed
        return dict(result.structured_content)

    def _daemon_error(self, text: str) -> BlipError:
        """The typed error a daemon tool reported; a refused path also says whose settings refused it."""
        error = error_from_text(text)
        if isinstance(error, PathNotAllowed):
            error = PathNotAllowed(
                f"{error} (This was the blip-mcp daemon at {self.url}, which read the path itself: its own "
                "BLIP_ALLOWED_DIRS applies, not this side's. Or have this side read the file and send its bytes: "
                "send_files='always', BLIP_REMOTE_SEND_FILES=always or --send-files always.)"
            )
        return error

    def _same_model(self, result: EmbeddingResult) -> EmbeddingResult:
        """`result`, if the model that made it is the one `start()` found (vectors of two models do not mix)."""
        expected = self._retrieval_model
        if expected is not None and result.model != expected:
            raise ModelNotAvailable(
                f"The blip-mcp daemon at {self.url} now embeds with {result.model!r}, not {expected!r} as when this "
                "client started (was it restarted with another retrieval model?). Their vectors do not mix: start "
                "the command again (or call start() again) to use the new model."
            )
        return result

    @staticmethod
    def _relabel(result: T, label: str | None) -> T:
        """Show the caller's own description of the image (a path, not 'data URI') in the result."""
        info = getattr(result, "image", None)
        if label is not None and info is not None:
            info.source = label
        return result

    async def _gather(
        self,
        calls: Sequence[Callable[[], Awaitable[T]]],
        return_exceptions: bool,
        on_progress: ProgressFn | None,
    ) -> list[T | BlipError]:
        """`Blip2Service._gather`, but a closed service raises `ServiceClosed` once instead of once per item."""
        self._check_open()

        def progress(done: int, total: int) -> Any:
            self._check_open()  # closed meanwhile: end the batch here, no further callbacks
            return on_progress(done, total) if on_progress is not None else None

        results = await super()._gather(calls, return_exceptions, progress)
        if any(isinstance(r, ServiceClosed) for r in results):
            raise self._closed_error()
        return results

    def _batch_window(self) -> int:
        """Batch calls keep at most `concurrency` tool calls in flight to the daemon."""
        return self.concurrency

    # ------------------------------------------------------------------ caption / answer
    async def acaption(
        self, image: ImageInput, prompt: str | None = None, *, params: GenerationParams | None = None, **gen: Any
    ) -> CaptionResult:
        """Caption one image on the daemon (`caption_image`)."""
        gen_args = await self._gen_args("caption_image", params, gen)
        ref, label = await self._image_arg(image)
        content = await self._call("caption_image", {"image": ref, "prompt": prompt, **gen_args})
        return self._relabel(_read(CaptionResult, content, "caption_image"), label)

    def caption(
        self, image: ImageInput, prompt: str | None = None, *, params: GenerationParams | None = None, **gen: Any
    ) -> CaptionResult:
        """Caption one image on the daemon."""
        return self._sync(self.acaption(image, prompt, params=params, **gen))

    async def aanswer(
        self, image: ImageInput, question: str, *, params: GenerationParams | None = None, **gen: Any
    ) -> AnswerResult:
        """Answer a question about one image on the daemon (`answer_question`)."""
        if not isinstance(question, str) or not question.strip():
            raise InvalidInput("question must be a non-empty string, e.g. 'What color is the car?'")
        gen_args = await self._gen_args("answer_question", params, gen)
        ref, label = await self._image_arg(image)
        content = await self._call("answer_question", {"image": ref, "question": question, **gen_args})
        return self._relabel(_read(AnswerResult, content, "answer_question"), label)

    def answer(
        self, image: ImageInput, question: str, *, params: GenerationParams | None = None, **gen: Any
    ) -> AnswerResult:
        """Answer a question about one image on the daemon."""
        return self._sync(self.aanswer(image, question, params=params, **gen))

    async def acaption_batch(
        self,
        images: Sequence[ImageInput],
        prompt: str | None = None,
        *,
        params: GenerationParams | None = None,
        return_exceptions: bool = False,
        on_progress: ProgressFn | None = None,
        **gen: Any,
    ) -> list[CaptionResult | BlipError]:
        """Caption many images through `caption_images` (batched on the daemon, progress per image).

        Images go in requests of at most 64 that fit the daemon's request body limit (see `send_in_chunks`), so
        a batch of images sent as data is never refused whole for its size. Decoding arguments that
        `caption_images` does not take fall back to one `caption_image` call per image.
        """
        p = GenerationParams.from_kwargs(params, **gen)
        wanted = p.model_dump(exclude_defaults=True)
        accepted = await self._guarded(self.daemon.tool_parameters("caption_images"))
        if not set(wanted) <= accepted:
            return await self._gather(
                [lambda img=img: self.acaption(img, prompt, params=p) for img in images],  # type: ignore[misc]
                return_exceptions,
                on_progress,
            )
        total = len(images)
        results: list[CaptionResult | BlipError | None] = [None] * total
        prepared: list[tuple[int, str, str | None]] = []
        failed_here = 0

        async def report(done: float) -> None:
            self._check_open()  # close() from a progress callback: no further callbacks
            if on_progress is not None:
                maybe = on_progress(int(done), total)
                if asyncio.iscoroutine(maybe):
                    await maybe

        for index, image in enumerate(images):
            try:
                ref, label = await self._image_arg(image)
            except BlipError as exc:
                if not return_exceptions or isinstance(exc, ServiceClosed):
                    raise
                results[index] = exc
                failed_here += 1
                await report(failed_here)
                continue
            prepared.append((index, ref, label))

        async def send(start: int, stop: int, relay: ChunkProgress) -> list[dict[str, Any] | BlipError]:
            async def progress(value: float, _total: float | None, message: str | None) -> None:
                await relay(int(value), message)

            chunk = prepared[start:stop]
            content = await self._call(
                "caption_images", {"images": [ref for _, ref, _ in chunk], "prompt": prompt, **wanted}, progress
            )
            items = list(content.get("items", []))
            if not return_exceptions:  # fail at the first bad image, before the next request is sent
                for item in items:
                    if not item.get("ok"):
                        raise self._daemon_error(str(item.get("error") or "unknown error"))
            return items

        def too_large(_index: int, exc: PayloadTooLarge) -> BlipError:
            if not return_exceptions:
                raise exc
            return exc

        async def progress(done: float, _message: str | None) -> None:
            await report(failed_here + done)

        items = await send_in_chunks(
            [len(ref) for _, ref, _ in prepared],
            request_budget(self.settings.max_image_bytes),
            send,
            too_large,
            progress=progress,
        )
        for (index, _, label), item in zip(prepared, items, strict=True):
            if isinstance(item, BlipError):
                error = item
            elif item.get("ok") and item.get("result") is not None:
                results[index] = self._relabel(_read(CaptionResult, item["result"], "caption_images"), label)
                continue
            else:
                error = self._daemon_error(str(item.get("error") or "unknown error"))
            if not return_exceptions:
                raise error
            results[index] = error
        return [r for r in results if r is not None]

    def caption_batch(
        self,
        images: Sequence[ImageInput],
        prompt: str | None = None,
        *,
        params: GenerationParams | None = None,
        return_exceptions: bool = False,
        on_progress: ProgressFn | None = None,
        **gen: Any,
    ) -> list[CaptionResult | BlipError]:
        """Caption many images on the daemon (see `acaption_batch`); `on_progress` runs on the loop thread."""
        return self._sync(
            self.acaption_batch(
                images, prompt, params=params, return_exceptions=return_exceptions, on_progress=on_progress, **gen
            )
        )

    async def aanswer_batch(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str],
        *,
        params: GenerationParams | None = None,
        return_exceptions: bool = False,
        on_progress: ProgressFn | None = None,
        **gen: Any,
    ) -> list[AnswerResult | BlipError]:
        """Answer `questions[i]` about `images[i]` for every pair (concurrent calls, batched on the daemon)."""
        if len(images) != len(questions):
            raise InvalidInput(
                f"answer_batch needs as many questions as images, got {len(questions)} and {len(images)}"
            )
        p = GenerationParams.from_kwargs(params, **gen)
        return await self._gather(
            [
                lambda img=img, q=q: self.aanswer(img, q, params=p)  # type: ignore[misc]
                for img, q in zip(images, questions, strict=True)
            ],
            return_exceptions,
            on_progress,
        )

    def answer_batch(
        self,
        images: Sequence[ImageInput],
        questions: Sequence[str],
        *,
        params: GenerationParams | None = None,
        return_exceptions: bool = False,
        on_progress: ProgressFn | None = None,
        **gen: Any,
    ) -> list[AnswerResult | BlipError]:
        """Answer questions about images on the daemon (see `aanswer_batch`)."""
        return self._sync(
            self.aanswer_batch(
                images, questions, params=params, return_exceptions=return_exceptions, on_progress=on_progress, **gen
            )
        )

    # ------------------------------------------------------------------ embeddings and scores
    async def ascore(self, image: ImageInput, texts: Sequence[str]) -> ScoreResult:
        """How well each text matches the image (`score_image_text`)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        if not texts:
            raise InvalidInput("score needs at least one text to compare with the image")
        ref, label = await self._image_arg(image)
        content = await self._call("score_image_text", {"image": ref, "texts": texts})
        return self._relabel(_read(ScoreResult, content, "score_image_text"), label)

    def score(self, image: ImageInput, texts: Sequence[str]) -> ScoreResult:
        """How well each text matches the image."""
        return self._sync(self.ascore(image, texts))

    async def _embed_image(self, image: ImageInput, include_query_vectors: bool) -> EmbeddingResult:
        ref, label = await self._image_arg(image)
        arguments: dict[str, Any] = {"image": ref}
        if include_query_vectors:
            arguments["include_query_vectors"] = True
        content = await self._call("embed_image", arguments)
        return self._relabel(self._same_model(_read(EmbeddingResult, content, "embed_image")), label)

    async def aembed_images(
        self,
        images: Sequence[ImageInput],
        *,
        include_query_vectors: bool = False,
        return_exceptions: bool = False,
        on_progress: ProgressFn | None = None,
    ) -> list[EmbeddingResult | BlipError]:
        """Image embeddings (one `embed_image` call per image, concurrent, batched on the daemon)."""
        return await self._gather(
            [lambda img=img: self._embed_image(img, include_query_vectors) for img in images],  # type: ignore[misc]
            return_exceptions,
            on_progress,
        )

    def embed_images(
        self,
        images: Sequence[ImageInput],
        *,
        include_query_vectors: bool = False,
        return_exceptions: bool = False,
        on_progress: ProgressFn | None = None,
    ) -> list[EmbeddingResult | BlipError]:
        """Image embeddings from the daemon."""
        return self._sync(
            self.aembed_images(
                images,
                include_query_vectors=include_query_vectors,
                return_exceptions=return_exceptions,
                on_progress=on_progress,
            )
        )

    async def aembed_texts(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        """Text embeddings (one `embed_text` call per text, concurrent, batched on the daemon)."""
        if isinstance(texts, str):
            raise InvalidInput("embed_texts takes a list of strings, not a single string")

        async def one(text: str) -> EmbeddingResult:
            content = await self._call("embed_text", {"text": text})
            return self._same_model(_read(EmbeddingResult, content, "embed_text"))

        results = await self._gather([lambda t=t: one(t) for t in texts], False, None)  # type: ignore[misc]
        return [r for r in results if isinstance(r, EmbeddingResult)]

    def embed_texts(self, texts: Sequence[str]) -> list[EmbeddingResult]:
        """Text embeddings from the daemon."""
        return self._sync(self.aembed_texts(texts))

    # ------------------------------------------------------------------ grounding
    async def alocate(self, image: ImageInput, text: str) -> LocateResult:
        """Where `text` matches in the image (`locate_in_image`).

        The daemon sends the heatmap on the patch grid only; `heatmap` is upsampled from it and the image is
        decoded here when first needed (`overlay_png()`), so a call that only wants the box costs no decode.
        """
        from .grounding import LocateResult

        ref, label = await self._image_arg(image)
        content = await self._call("locate_in_image", {"image": ref, "text": text})
        result = self._relabel(_read(LocateResult, content, "locate_in_image"), label)
        source: ImageInput = ref if isinstance(image, str | Path) else image
        size = (result.image.width, result.image.height)
        result._image_source = functools.partial(_overlay_image, source, size, self.settings, self.url)
        return result

    def locate(self, image: ImageInput, text: str) -> LocateResult:
        """Where `text` matches in the image, computed on the daemon."""
        return self._sync(self.alocate(image, text))

    # ------------------------------------------------------------------ introspection
    async def astats(self) -> ServiceStats:
        """The daemon's counters (`blip://stats`)."""
        return ServiceStats.model_validate_json(await self._guarded(self.daemon.read_text("blip://stats")))

    def stats(self) -> ServiceStats:
        """The daemon's counters: requests, batches, batch-size histogram, models loaded, ..."""
        return self._sync(self.astats())

    async def amodel_info(self) -> ModelInfo:
        """What the daemon runs (`blip://model`)."""
        return ModelInfo.model_validate_json(await self._guarded(self.daemon.read_text("blip://model")))

    def model_info(self) -> ModelInfo:
        """Which checkpoints, device and dtype the daemon runs, what it can do, and its limits."""
        return self._sync(self.amodel_info())


# ---------------------------------------------------------------------------------------------- selection
_defaults: dict[tuple[str, str | None, SendFiles], RemoteService] = {}
_defaults_lock = threading.Lock()


def default_service(settings: BlipSettings | None = None) -> Blip2Service | RemoteService:
    """The service an interface should use: a `RemoteService` when `BLIP_REMOTE_URL` is set, else the shared one.

    The remote service is created once per (URL, token, `remote_send_files`) and reused, like
    `Blip2Service.shared()`.
    """
    if settings is None:
        return Blip2Service.shared()  # honours BLIP_REMOTE_URL itself
    if not settings.remote_url:
        return Blip2Service.shared()
    key = (normalize_url(settings.remote_url), settings.token, settings.remote_send_files)
    with _defaults_lock:
        service = _defaults.get(key)
        if service is None or service.closed:
            service = RemoteService(
                settings.remote_url,
                token=settings.token,
                settings=settings,
                send_files=settings.remote_send_files,
            )
            _defaults[key] = service
        return service


__all__ = [
    "DaemonClient",
    "RemoteService",
    "RequestTooLarge",
    "SendFiles",
    "default_service",
    "error_from_text",
    "is_loopback_url",
    "normalize_url",
    "plan_chunks",
    "prepare_image",
    "request_budget",
    "send_in_chunks",
    "sends_data",
    "transport_error",
]
