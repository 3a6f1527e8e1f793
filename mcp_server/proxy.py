"""`blip-mcp --connect URL`: a stdio MCP server that loads no model and forwards everything to a shared daemon.

A desktop host starts one stdio server per client; with `--connect`, each of them is this small proxy and the one
model lives in the daemon (`blip-mcp --transport http`). Tools are proxied generically: the daemon's tool list
(names, schemas, annotations) is served as is, and every call is forwarded by name with its arguments; results
(text, structured content, `is_error`) come back unchanged, progress notifications are relayed, and a host's
cancellation cancels the call on the daemon. Resources and prompts are forwarded the same way.

Image arguments (`image`, `images`) that are paths are read here and sent as data when the daemon cannot see this
machine's files (`send_files`, see `blip_tools.remote`); results then name the original paths again: the proxy
knows which argument it replaced and how the daemon writes that value (echoed, shortened, or described as
`data URI (N bytes)`), so it swaps exactly those strings back, per image of a batch.

Every call opens its own connection, so a daemon that is down gives a readable tool error at once
(`[model_not_available] The blip-mcp daemon at ... is unreachable ...`) and a daemon that is back just works.
While the daemon is down, `tools/list` answers with this package's own tool definitions, so a host that lists
tools once at start-up still gets them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import mcp_types as types
from mcp.server import Server
from mcp.server.context import ServerRequestContext
from mcp.shared.exceptions import MCPError

from blip_tools import __version__
from blip_tools.errors import BlipError, PayloadTooLarge
from blip_tools.remote import (
    CAPTION_IMAGES_MAX,
    ChunkProgress,
    DaemonClient,
    ProgressCallback,
    SendFiles,
    prepare_image,
    request_budget,
    send_in_chunks,
    sends_data,
)
from blip_tools.settings import BlipSettings

from ._common import error_message
from .server import INSTRUCTIONS

if TYPE_CHECKING:
    from .stdio import StdioWire

logger = logging.getLogger(__name__)

PROXY_NAME = "blip-tools"

_INTERNAL_ERROR = -32603


@dataclass
class ProxyContext:
    """What the proxy's lifespan yields: the daemon client and this side's settings."""

    daemon: DaemonClient
    """Connection details of the daemon (a fresh connection per call)."""

    settings: BlipSettings
    """This side's settings: `allowed_dirs` and `max_image_bytes` apply to files read here."""

    send_files: SendFiles = "auto"
    """`auto`: send file contents unless the daemon is on loopback and no `allowed_dirs` are set here; `always`;
    `never` (see `blip_tools.remote.sends_data`)."""

    fallback_tools: list[types.Tool] = field(default_factory=list)
    """Our own tool definitions, listed while the daemon is unreachable."""

    @property
    def sends_data(self) -> bool:
        return sends_data(self.send_files, self.daemon.loopback, self.settings)


# ---------------------------------------------------------------------------------------------- image arguments
@dataclass
class _Sent:
    """One image argument as given and as sent, to name the original again in the result."""

    original: str
    """What the caller passed (a path or `file://` URI)."""

    sent: str
    """What the daemon got instead (a `data:` URI, or the absolute path)."""

    label: str | None
    """How the daemon would have described `original` had it read it (`describe_ref`), when data was sent."""

    position: int | None = None
    """Index in the `images` list sent to the daemon; None for the `image` argument."""

    echoes: tuple[tuple[str, str], ...] = ()
    """Each exact string the daemon writes for `sent`, with what the caller should read instead."""


def _echoes(original: str, sent: str, label: str | None) -> tuple[tuple[str, str], ...]:
    """How the daemon writes a data URI we sent (whole, shortened as the batch tool echoes it, and as
    `images.describe_ref` describes it in image sources, search results and error messages), each paired with
    what it writes for the caller's own reference."""
    if not sent.startswith("data:"):
        return ()
    from blip_tools.images import describe_ref  # PIL only; this module stays light for `blip-mcp --connect`

    return (
        (sent, original),
        (_short_ref(sent), _short_ref(original)),
        (describe_ref(sent), label if label is not None else describe_ref(original)),
    )


def _prepare_arguments(
    arguments: dict[str, Any], context: ProxyContext
) -> tuple[dict[str, Any], list[_Sent], dict[int, BlipError]]:
    """Read path-valued `image` / `images` arguments here when the daemon cannot see our files (worker thread).

    Returns the arguments to send, what was swapped, and the `images` entries that could not be read here
    (by position; they are left out of the call and reported in place). A bad `image` raises.
    """
    out = dict(arguments)
    sent: list[_Sent] = []
    failed: dict[int, BlipError] = {}
    send_data = context.sends_data

    def one(ref: Any, position: int | None) -> Any:
        if not isinstance(ref, str):
            return ref
        wire, label = prepare_image(ref, context.settings, send_data=send_data)
        if wire != ref:
            sent.append(_Sent(ref, wire, label, position, _echoes(ref, wire, label)))
        return wire

    if "image" in out:
        out["image"] = one(out["image"], None)
    if isinstance(out.get("images"), list):
        kept: list[Any] = []
        for index, ref in enumerate(out["images"]):
            try:
                kept.append(one(ref, len(kept)))
            except BlipError as exc:
                failed[index] = exc
        out["images"] = kept
    return out, sent, failed


def _short_ref(ref: str, limit: int = 120) -> str:
    """An image reference short enough to echo back (as the daemon's batch tool does)."""
    return ref if len(ref) <= limit else f"{ref[:60]}...({len(ref)} chars)"


def merge_local_failures(
    result: types.CallToolResult | None, originals: list[Any], failed: dict[int, BlipError]
) -> types.CallToolResult:
    """Put the images that could not be read here back in place as failed items of a batch result.

    `result` is the daemon's answer for the other images (None when there were none). Only the batch shape
    (`items` of `{image, ok, result, error}` with `succeeded`/`failed`) can be merged; for any other shape
    the first local error is returned for the whole call.
    """
    items_in: list[Any] = []
    if result is not None:
        structured = result.structured_content or {}
        if result.is_error or not isinstance(structured.get("items"), list):
            return result if result.is_error else error_result(next(iter(failed.values())))
        items_in = list(structured["items"])
    if len(items_in) != len(originals) - len(failed):
        return error_result(next(iter(failed.values())))
    remaining = iter(items_in)
    items: list[dict[str, Any]] = []
    for index, ref in enumerate(originals):
        if index in failed:
            exc = failed[index]
            items.append({"image": _short_ref(str(ref)), "ok": False, "result": None, "error": error_message(exc)})
        else:
            items.append(dict(next(remaining)))
    return _batch_result(items)


def _batch_result(items: list[dict[str, Any]]) -> types.CallToolResult:
    """A `caption_images` result for `items`, with the text the daemon's batch tool writes for them."""
    lines: list[str] = []
    for index, item in enumerate(items, 1):
        if item.get("ok"):
            lines.append(f"{index}. {item.get('image')}: {(item.get('result') or {}).get('caption', '')}")
        else:
            lines.append(f"{index}. {item.get('image')}: ERROR {item.get('error')}")
    bad = sum(1 for item in items if not item.get("ok"))
    total = len(items)
    header = f"Captioned {total - bad} of {total} images" + (f" ({bad} failed)" if bad else "") + ":"
    return types.CallToolResult(
        content=[types.TextContent(type="text", text="\n".join([header, *lines]))],
        structured_content={"items": items, "succeeded": total - bad, "failed": bad},
    )


def _swap(value: Any, echoes: list[tuple[str, str]]) -> Any:
    """Every string in `value` (nested) with each exact echo of sent data replaced by the caller's own reference."""
    if isinstance(value, str):
        for echo, original in echoes:
            value = value.replace(echo, original)
        return value
    if isinstance(value, list):
        return [_swap(v, echoes) for v in value]
    if isinstance(value, dict):
        return {k: _swap(v, echoes) for k, v in value.items()}
    return value


def _unambiguous(sent: list[_Sent]) -> list[tuple[str, str]]:
    """The echoes of all of `sent` that stand for one caller reference only (two same-size images sent as data
    are both described as `data URI (N bytes)`; such text cannot be attributed, so it is left as it is)."""
    targets: dict[str, set[str]] = {}
    for s in sent:
        for echo, original in s.echoes:
            targets.setdefault(echo, set()).add(original)
    return [(echo, original) for s in sent for echo, original in s.echoes if len(targets[echo]) == 1]


def restore_result(result: types.CallToolResult, sent: list[_Sent]) -> types.CallToolResult:
    """The daemon's result as the host should see it: its own paths instead of the data we sent.

    Only the exact strings the daemon writes for each data URI we sent are swapped. In a batch result each item
    is restored with its own image's echoes (by position) and the text is written again from the items.
    """
    data = [s for s in sent if s.echoes]
    if not data:  # a fresh result, as for every other call: the daemon's own `_meta` stays with the daemon
        return types.CallToolResult(
            content=list(result.content), structured_content=result.structured_content, is_error=result.is_error
        )
    echoes = _unambiguous(data)
    structured = copy.deepcopy(result.structured_content)
    if structured is not None:
        items = structured.get("items")
        if isinstance(items, list):
            for s in data:
                if s.position is not None and s.position < len(items):
                    items[s.position] = _swap(items[s.position], list(s.echoes))
        structured = _swap(structured, echoes)
        items = structured.get("items")
        batch = any(s.position is not None for s in data)
        if batch and not result.is_error and isinstance(items, list) and all(isinstance(i, dict) for i in items):
            return types.CallToolResult(content=_batch_result(items).content, structured_content=structured)
    content = [
        block.model_copy(update={"text": _swap(block.text, echoes)}) if isinstance(block, types.TextContent) else block
        for block in result.content
    ]
    return types.CallToolResult(content=content, structured_content=structured, is_error=result.is_error)


def error_result(exc: BlipError) -> types.CallToolResult:
    """A tool error in the daemon's own format (`[code] message`), so clients parse both alike."""
    return types.CallToolResult(
        content=[types.TextContent(type="text", text=error_message(exc))],
        is_error=True,
    )


def _as_mcp_error(exc: BlipError) -> MCPError:
    """For non-tool requests: the daemon's own JSON-RPC error when there was one, else ours as text."""
    cause = exc.__cause__
    stack: list[BaseException] = [cause] if cause is not None else []
    while stack:
        current = stack.pop()
        if isinstance(current, MCPError):
            return current
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
    return MCPError(code=_INTERNAL_ERROR, message=error_message(exc))


# ---------------------------------------------------------------------------------------------- handlers
Ctx = ServerRequestContext[ProxyContext, Any]


async def _list_tools(ctx: Ctx, params: types.PaginatedRequestParams | None) -> types.ListToolsResult:
    proxy = ctx.lifespan_context
    try:
        tools = await proxy.daemon.list_tools()
    except BlipError as exc:
        logger.warning("%s; listing this package's own tool definitions until it is back", str(exc).rstrip("."))
        tools = proxy.fallback_tools
    return types.ListToolsResult(tools=tools)


async def _call_tool(ctx: Ctx, params: types.CallToolRequestParams) -> types.CallToolResult:
    proxy = ctx.lifespan_context

    async def progress(value: float, total: float | None, message: str | None) -> None:
        await ctx.session.report_progress(value, total, message)

    given = dict(params.arguments or {})
    try:
        arguments, sent, failed = await anyio.to_thread.run_sync(_prepare_arguments, given, proxy)
        if failed and not arguments.get("images"):
            return merge_local_failures(None, list(given["images"]), failed)
        images = arguments.get("images")
        if params.name == "caption_images" and isinstance(images, list) and 1 < len(images) <= CAPTION_IMAGES_MAX:
            result = await _caption_images_in_chunks(proxy, arguments, images, progress)
        else:
            result = await proxy.daemon.call_tool(params.name, arguments, progress=progress)
    except BlipError as exc:
        logger.info("tool %r failed: %s", params.name, exc)
        return error_result(exc)
    result = restore_result(result, sent)
    return merge_local_failures(result, list(given["images"]), failed) if failed else result


class _WholeResult(Exception):
    """A `caption_images` request that failed whole (bad arguments, say): its result goes back as it is."""

    def __init__(self, result: types.CallToolResult) -> None:
        super().__init__("the daemon failed the whole request")
        self.result = result


async def _caption_images_in_chunks(
    proxy: ProxyContext, arguments: dict[str, Any], images: list[Any], progress: ProgressCallback
) -> types.CallToolResult:
    """Forward `caption_images` as requests that fit the daemon's body limit (`send_in_chunks`), merged in order.

    Images read here travel as data URIs, and the daemon's body limit is sized for one image; so the list is
    split by encoded size, and a request still refused as too large is split again, down to a single image that
    then fails alone. Progress is relayed as a count over the whole list.
    """
    total = len(images)
    refused = 0
    answers: list[types.CallToolResult] = []

    async def send(start: int, stop: int, relay: ChunkProgress) -> list[dict[str, Any]]:
        async def forward(value: float, _part: float | None, message: str | None) -> None:
            await relay(value, message)

        result = await proxy.daemon.call_tool(
            "caption_images", {**arguments, "images": images[start:stop]}, progress=forward
        )
        items = (result.structured_content or {}).get("items")
        if result.is_error or not isinstance(items, list):
            raise _WholeResult(result)
        answers.append(result)
        return [dict(item) for item in items]

    def too_large(index: int, exc: PayloadTooLarge) -> dict[str, Any]:
        nonlocal refused
        refused += 1
        ref = str(images[index])
        return {"image": _short_ref(ref), "ok": False, "result": None, "error": error_message(exc)}

    async def report(done: float, message: str | None) -> None:
        # The daemon's own message when one request carries the whole list; else a count over the whole list.
        await progress(done, total, message or f"captioned {int(done)}/{total} images")

    sizes = [len(ref) if isinstance(ref, str) else 0 for ref in images]
    try:
        items = await send_in_chunks(
            sizes, request_budget(proxy.settings.max_image_bytes), send, too_large, progress=report
        )
    except _WholeResult as whole:
        return whole.result
    if len(answers) == 1 and refused == 0:
        return answers[0]  # one request did it all: the daemon's own result, unchanged
    return _batch_result(items)


async def _list_resources(ctx: Ctx, params: types.PaginatedRequestParams | None) -> types.ListResourcesResult:
    try:
        return await ctx.lifespan_context.daemon.run(lambda c: c.list_resources(), timeout_s=30.0)
    except BlipError as exc:
        raise _as_mcp_error(exc) from exc


async def _list_templates(ctx: Ctx, params: types.PaginatedRequestParams | None) -> types.ListResourceTemplatesResult:
    try:
        return await ctx.lifespan_context.daemon.run(lambda c: c.list_resource_templates(), timeout_s=30.0)
    except BlipError as exc:
        raise _as_mcp_error(exc) from exc


async def _read_resource(ctx: Ctx, params: types.ReadResourceRequestParams) -> types.ReadResourceResult:
    try:
        return await ctx.lifespan_context.daemon.run(lambda c: c.read_resource(params.uri), timeout_s=30.0)
    except BlipError as exc:
        raise _as_mcp_error(exc) from exc


async def _list_prompts(ctx: Ctx, params: types.PaginatedRequestParams | None) -> types.ListPromptsResult:
    try:
        return await ctx.lifespan_context.daemon.run(lambda c: c.list_prompts(), timeout_s=30.0)
    except BlipError as exc:
        raise _as_mcp_error(exc) from exc


async def _get_prompt(ctx: Ctx, params: types.GetPromptRequestParams) -> types.GetPromptResult:
    try:
        return await ctx.lifespan_context.daemon.run(
            lambda c: c.get_prompt(params.name, params.arguments), timeout_s=30.0
        )
    except BlipError as exc:
        raise _as_mcp_error(exc) from exc


# ---------------------------------------------------------------------------------------------- the server
async def local_tool_definitions(settings: BlipSettings) -> list[types.Tool]:
    """This package's tool definitions (no model is loaded: the server's lifespan never runs)."""
    from .server import create_server

    return list(await create_server(settings).list_tools())


def create_proxy(
    url: str,
    *,
    token: str | None = None,
    settings: BlipSettings | None = None,
    send_files: SendFiles = "auto",
    connect_timeout_s: float = 5.0,
) -> Server[ProxyContext]:
    """A low-level MCP server that forwards tools, resources and prompts to the daemon at `url`."""
    settings = settings if settings is not None else BlipSettings()
    daemon = DaemonClient(url, token=token, connect_timeout_s=connect_timeout_s)

    @asynccontextmanager
    async def lifespan(_server: Server[ProxyContext]) -> AsyncIterator[ProxyContext]:
        fallback = await local_tool_definitions(settings)
        context = ProxyContext(daemon=daemon, settings=settings, send_files=send_files, fallback_tools=fallback)
        logger.info(
            "blip-mcp proxy: forwarding to %s (send_files=%s%s: image files are %s)",
            daemon.url,
            send_files,
            ", daemon on loopback" if daemon.loopback else "",
            "read here and sent" if context.sends_data else "sent as paths",
        )
        yield context

    return Server(
        PROXY_NAME,
        version=__version__,
        title="BLIP-2 vision tools (via a shared daemon)",
        instructions=INSTRUCTIONS,
        lifespan=lifespan,
        on_list_tools=_list_tools,
        on_call_tool=_call_tool,
        on_list_resources=_list_resources,
        on_list_resource_templates=_list_templates,
        on_read_resource=_read_resource,
        on_list_prompts=_list_prompts,
        on_get_prompt=_get_prompt,
    )


async def serve_proxy_stdio(server: Server[ProxyContext], wire: StdioWire) -> None:
    """Run the proxy over the claimed stdin/stdout until stdin closes (same checked wire as `blip-mcp`)."""
    from mcp.server.stdio import stdio_server

    from .stdio import _CheckedLines, _Writer

    writer = _Writer(wire.stdout)
    lines = _CheckedLines(wire.stdin, writer)
    async with stdio_server(stdin=lines, stdout=writer) as (read_stream, write_stream):  # type: ignore[arg-type]
        await server.run(read_stream, write_stream, server.create_initialization_options())


def run_proxy(url: str, settings: BlipSettings, wire: StdioWire, *, send_files: SendFiles = "auto") -> int:
    """Serve the proxy over stdio until the host closes stdin (`blip-mcp --connect URL`). Returns the exit status."""
    logging.getLogger("httpx2").setLevel(logging.WARNING)  # one INFO line per forwarded call is noise here
    server = create_proxy(url, token=settings.token, settings=settings, send_files=send_files)
    try:
        anyio.run(serve_proxy_stdio, server, wire)
    except KeyboardInterrupt:
        return 130
    return 0


__all__ = [
    "ProxyContext",
    "create_proxy",
    "error_result",
    "local_tool_definitions",
    "merge_local_failures",
    "restore_result",
    "run_proxy",
    "serve_proxy_stdio",
]
