"""The proxy's `caption_images` over several requests (`_caption_images_in_chunks`), against a scripted daemon.

Only an HTTP 413 refusal of a whole request body (`RequestTooLarge`) splits a request; an image the daemon refuses
on its own comes back in its place and nothing is sent twice; progress counts over the whole list, each image
once, ending at the total. The real daemon over HTTP is covered in tests/test_remote.py."""

from __future__ import annotations

from typing import Any

import anyio
import mcp_types as types
import pytest

from blip_tools import BlipSettings
from blip_tools.remote import DaemonClient, RequestTooLarge
from mcp_server.proxy import ProxyContext, _caption_images_in_chunks

pytestmark = pytest.mark.anyio

BIG = "B" * 1000
"""An image reference whose request the scripted daemon always refuses as too large (HTTP 413), even alone."""


class ScriptedDaemon(DaemonClient):
    """Answers `caption_images` in memory: a request of more than one image holding BIG is refused (HTTP 413) and
    so is BIG alone; an image named `huge` fails in its place (the daemon's max_image_bytes); the rest succeed,
    with one progress notification per image."""

    def __init__(self) -> None:
        super().__init__("http://127.0.0.1:9/mcp")
        self.requests: list[list[str]] = []

    async def call_tool(  # type: ignore[override]
        self, name: str, arguments: Any = None, *, progress: Any = None, timeout_s: float | None = None
    ) -> types.CallToolResult:
        images = list(arguments["images"])
        self.requests.append(images)
        if BIG in images:
            raise RequestTooLarge("The request was too large for the daemon (HTTP 413): send a smaller image.")
        items = []
        for done, ref in enumerate(images, 1):
            if ref == "huge":
                items.append({"image": ref, "ok": False, "result": None, "error": "[payload_too_large] too big"})
            else:
                items.append({"image": ref, "ok": True, "result": {"caption": ref}, "error": None})
            if progress is not None:
                await progress(float(done), float(len(images)), f"captioned {done}/{len(images)} images")
        return types.CallToolResult(
            content=[types.TextContent(type="text", text="done")],
            structured_content={"items": items, "succeeded": len(images), "failed": 0},
        )


async def test_only_a_refused_request_body_is_split_and_progress_counts_each_image_once() -> None:
    daemon = ScriptedDaemon()
    proxy = ProxyContext(daemon=daemon, settings=BlipSettings(max_image_bytes=3000), send_files="always")
    images = ["a", "huge", "b", BIG, "c", "d"]
    seen: list[tuple[float, float | None]] = []

    async def progress(value: float, total: float | None, message: str | None) -> None:
        seen.append((value, total))
        assert message

    with anyio.fail_after(10):
        result = await _caption_images_in_chunks(proxy, {"max_new_tokens": 3}, images, progress)
    items = (result.structured_content or {})["items"]
    assert [i["ok"] for i in items] == [True, False, True, False, True, True]
    assert items[1]["error"].startswith("[payload_too_large]")
    assert "HTTP 413" in items[3]["error"]
    # Requests holding BIG are refused whole and split; every image the daemon did process went exactly once.
    processed = [ref for request in daemon.requests if BIG not in request for ref in request]
    assert sorted(processed) == ["a", "b", "c", "d", "huge"], daemon.requests
    values = [v for v, _ in seen]
    assert values == sorted(values) and values[-1] == len(images), seen
    assert all(total == len(images) for _, total in seen)
