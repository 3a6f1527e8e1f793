"""Shared pieces for every tool module: the typed app context, service access and the one error mapping.

Tool modules (ours and the collections tools) import from here, so errors are mapped once and the
service is always reached through the lifespan context, never through a global.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any

import anyio
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import Field

from blip_tools.errors import BlipError, Overloaded, ServiceClosed
from blip_tools.service import Blip2Service
from blip_tools.settings import BlipSettings

logger = logging.getLogger(__name__)


_LOAD_POLL_S = 0.02
"""How often a call waiting for the background model load checks whether it has ended."""


@dataclass
class AppContext:
    """What the lifespan yields: the one service every session shares, and room for other tool modules' state."""

    service: Blip2Service
    """The started service (one model owner per process)."""

    settings: BlipSettings
    """The settings the service runs with (limits, allowed dirs, URL policy)."""

    extras: dict[str, Any] = field(default_factory=dict)
    """Per-server objects other tool modules keep (e.g. an open image index), keyed by module name."""

    ready: threading.Event = field(default_factory=threading.Event)
    """Set once the background model load has finished (successfully or not)."""

    load_error: BaseException | None = None
    """Why the background load failed; requests retry the load and report the same error to the model."""

    def load_in_background(self) -> None:
        """Load the captioner in a thread, so a stdio host's `initialize` is answered at once.

        Requests that arrive first simply wait on the runtime's load lock; a failed load is retried by the
        first request, which then reports the readable `ModelNotAvailable` as a tool error.
        """

        def load() -> None:
            try:
                self.service.start()
            except BaseException as exc:
                self.load_error = exc
                logger.error("loading the model failed: %s", exc)
            finally:
                self.ready.set()

        threading.Thread(target=load, name="blip-model-loader", daemon=True).start()

    async def captioner_loaded(self) -> None:
        """Wait (cancellably) for the background load; if it failed while this call waited, raise its error.

        Without this a call that arrives during a load that fails waits for it on the runtime's load lock and then
        starts a second load of its own, so the host gets the error only after two failed loads: for a hub id with
        the hub unreachable that is about 5 minutes instead of 2.5, far past a host's request timeout. A call that
        arrives after the failure still retries the load (a checkpoint fixed meanwhile is picked up).
        """
        if self.ready.is_set():
            return
        while not self.ready.is_set():  # a thread sets it: poll, so the wait stays cancellable and needs no thread
            await anyio.sleep(_LOAD_POLL_S)
        if isinstance(self.load_error, BlipError):
            raise copy.copy(self.load_error)  # a copy each: concurrent callers must not share one traceback

    @property
    def status(self) -> str:
        """`ok` (model loaded), `loading`, `error` (the load failed) or `closed`."""
        if self.service.closed:
            return "closed"
        if not self.ready.is_set():
            return "loading"
        return "error" if self.load_error is not None else "ok"


def app_context(ctx: Context) -> AppContext:
    """The lifespan's `AppContext` for this request (raises `ServiceClosed` outside a running server)."""
    try:
        value = ctx.request_context.lifespan_context
    except ValueError as exc:  # Context used outside a request
        raise ServiceClosed("The blip-tools service is not running in this context.") from exc
    if not isinstance(value, AppContext):
        raise ServiceClosed("The blip-tools service is not running (the server was started without its lifespan).")
    return value


def get_service(ctx: Context) -> Blip2Service:
    """The shared `Blip2Service` for this request."""
    return app_context(ctx).service


async def captioner_service(ctx: Context) -> Blip2Service:
    """The shared service once the background load of its captioner has ended (raises the error of a failed load
    this call waited for: see `AppContext.captioner_loaded`). For the tools that caption or answer."""
    context = app_context(ctx)
    await context.captioner_loaded()
    return context.service


class ToolFailed(BlipError):
    """A tool failed with a `ToolError` that carried none of our error codes (e.g. from another tool module)."""

    code = "tool_error"


class ToolCrashed(BlipError):
    """A tool raised something unexpected; the client sees only that it failed, the server log has the traceback."""

    code = "internal_error"


class ReportedToolError(ToolError):
    """A `ToolError` whose message is `[code] text` and which the error observers have already been told about."""


_RETRY_HINT = re.compile(r"\bretry (?:after|in) [0-9]+(?:\.[0-9]+)? ?s\b", re.IGNORECASE)
"""A retry hint with a number of seconds in an error's own text (then it needs no second one)."""


def error_message(exc: BlipError) -> str:
    """The readable text for one of our errors, with its code and, when overloaded, the retry hint (no side effects).

    Tools never call this directly: `report_error` (or `to_tool_error`) formats *and* counts an error.
    """
    text = str(exc).strip() or type(exc).__name__
    if isinstance(exc, Overloaded) and not _RETRY_HINT.search(text):
        text = f"{text} Retry after {exc.retry_after_s:.1f} s."
    return f"[{exc.code}] {text}"


ErrorObserver = Callable[[BlipError], None]
"""Told about every `BlipError` returned to a client (e.g. the metrics' error counter)."""

_error_observers: list[ErrorObserver] = []


def add_error_observer(fn: ErrorObserver) -> Callable[[], None]:
    """Call `fn(exc)` for every error returned to a client (`report_error`); returns a function that removes it."""
    _error_observers.append(fn)

    def remove() -> None:
        if fn in _error_observers:
            _error_observers.remove(fn)

    return remove


def report_error(exc: BlipError) -> str:
    """The one way an error reaches an MCP client: tell every error observer once, and return its text.

    Every error text a caller gets goes through here: a whole call's `ToolError` (`to_tool_error`, also used by
    the server for arguments that fail the input schema and for unknown tools) and each failed item of a batch
    result, so `blip_errors_total` counts each error returned exactly once.
    """
    for observer in list(_error_observers):
        try:
            observer(exc)
        except Exception:  # an observer must never change what the client gets
            logger.exception("error observer %r raised; ignored", observer)
    return error_message(exc)


def to_tool_error(exc: BlipError) -> ReportedToolError:
    """Map a `BlipError` to the `ToolError` whose message (`[code] text`) reaches the model, reporting it once."""
    return ReportedToolError(report_error(exc))


@contextmanager
def tool_errors() -> Iterator[None]:
    """Turn any `BlipError` raised inside the block into a `ToolError` with its readable message."""
    try:
        yield
    except BlipError as exc:
        raise to_tool_error(exc) from exc


def read_only(title: str, *, open_world: bool = False, idempotent: bool = True) -> ToolAnnotations:
    """Annotations for our tools: they read images and never change anything."""
    return ToolAnnotations(
        title=title,
        read_only_hint=True,
        destructive_hint=False,
        idempotent_hint=idempotent,
        open_world_hint=open_world,
    )


IMAGE_DESCRIPTION = (
    "The image: an absolute file path (preferred), a file:// URI, a data:image/...;base64, URI or raw base64"
    " (http(s) URLs only when the server allows them). Images pasted into the chat cannot be passed; "
    "ask the user for the file path."
)

ImageArg = Annotated[str, Field(description=IMAGE_DESCRIPTION, min_length=1)]
"""The `image` argument every tool takes (one string, as in the tool contract)."""

ImagesArg = Annotated[
    list[Annotated[str, Field(min_length=1)]],
    Field(description="Images, each as for `image`: absolute paths preferred.", min_length=1, max_length=64),
]
"""The `images` argument of batch tools (1 to 64 entries)."""
