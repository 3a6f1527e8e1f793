"""MCP collection tools through an in-memory `Client(server)`: index with progress, search, locate, errors."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _mcp_testlib import make_service, write_image
from mcp import Client
from PIL import Image

from blip_tools.index import IndexReport, SearchResult
from mcp_server import create_server
from mcp_server.server import REGISTRARS, BlipMCPServer

pytestmark = pytest.mark.anyio

NAMES = {"index_images", "search_images", "locate_in_image"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mcp-collection")
    (root / "pics" / "sub").mkdir(parents=True)
    for i in range(6):
        write_image(root / "pics" / ("sub" if i >= 4 else "") / f"m{i}.png", 900 + i)
    return root


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, folder: Path) -> Iterator[BlipMCPServer]:
    """A server over a private service whose index lives in the test folder (allowed dir = the pictures)."""
    from mcp_server import collection_tools

    service = make_service(
        tiny_checkpoint, index_path=folder / "index.sqlite", allowed_dirs=[str((folder / "pics").resolve())]
    )
    registrars = REGISTRARS if collection_tools.register in REGISTRARS else (*REGISTRARS, collection_tools.register)
    try:
        yield create_server(service, registrars=registrars)
    finally:
        service.close()


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if getattr(block, "type", "") == "text")


async def test_tools_are_listed_with_schemas(server: BlipMCPServer) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) >= NAMES
    for name in NAMES:
        tool = tools[name]
        assert tool.output_schema is not None and tool.description
        assert all(p.get("description") for p in tool.input_schema["properties"].values()), name
        assert tool.annotations is not None and tool.annotations.destructive_hint is False
    assert tools["search_images"].annotations.read_only_hint and tools["locate_in_image"].annotations.read_only_hint
    assert tools["index_images"].annotations.read_only_hint is False  # it writes the index database
    assert tools["index_images"].input_schema["required"] == ["directory"]


async def test_index_with_progress_then_search(server: BlipMCPServer, folder: Path) -> None:
    progress: list[tuple[float, float | None, str | None]] = []

    async def on_progress(done: float, total: float | None, message: str | None) -> None:
        progress.append((done, total, message))

    pics = str(folder / "pics")
    with anyio.fail_after(120):
        async with Client(server) as client:
            r = await client.call_tool(
                "index_images", {"directory": pics, "captions": True}, progress_callback=on_progress
            )
            assert not r.is_error, text_of(r)
            again = await client.call_tool("index_images", {"directory": pics})
            found = await client.call_tool("search_images", {"query": "a bird", "top_k": 10})
            sub = await client.call_tool(
                "search_images", {"query": "a bird", "directory": str(folder / "pics" / "sub")}
            )
            similar = await client.call_tool("search_images", {"image": str(folder / "pics" / "m2.png"), "top_k": 2})
    report = IndexReport.model_validate(r.structured_content)
    assert (report.indexed, report.embedded, report.captioned) == (6, 6, 6)
    assert "6 searchable images" in text_of(r)
    # Progress per image, in order, all delivered before the result.
    assert [p[0] for p in progress] == sorted(p[0] for p in progress) and progress[-1][0] == 6
    assert all(p[1] == 6 for p in progress) and progress[-1][2] == "indexed 6/6 images"
    assert IndexReport.model_validate(again.structured_content).embedded == 0
    hits = SearchResult.model_validate(found.structured_content).hits
    assert len(hits) == 6 and all(h.caption is not None for h in hits)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert {Path(h.path).name for h in SearchResult.model_validate(sub.structured_content).hits} == {"m4.png", "m5.png"}
    assert SearchResult.model_validate(similar.structured_content).hits[0].path.endswith("m2.png")
    assert hits[0].path in text_of(found)


async def test_errors_are_tool_errors(server: BlipMCPServer, folder: Path, tmp_path: Path) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            outside = await client.call_tool("index_images", {"directory": str(tmp_path)})
            neither = await client.call_tool("search_images", {"top_k": 3})
            bad_k = await client.call_tool("search_images", {"query": "x", "top_k": 500})
            missing = await client.call_tool(
                "locate_in_image", {"image": str(folder / "pics" / "nope.png"), "text": "x"}
            )
            ok = await client.call_tool("search_images", {"query": "x", "top_k": 1})
    assert outside.is_error and "[path_not_allowed]" in text_of(outside)
    assert neither.is_error and "exactly one" in text_of(neither)
    assert bad_k.is_error and "top_k" in text_of(bad_k)
    assert missing.is_error and "[invalid_image]" in text_of(missing)
    assert not ok.is_error


async def test_locate_returns_overlay_image_and_summary(server: BlipMCPServer, folder: Path) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool("locate_in_image", {"image": str(folder / "pics" / "m1.png"), "text": "a cat"})
    assert not r.is_error, text_of(r)
    kinds = [block.type for block in r.content]
    assert kinds == ["text", "image"]
    image_block = r.content[1]
    assert image_block.mime_type == "image/png"
    overlay = Image.open(io.BytesIO(base64.b64decode(image_block.data)))
    assert overlay.size == (48, 40)
    data = r.structured_content
    assert data is not None and "heatmap" not in data
    x0, y0, x1, y1 = data["box"]
    assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 40
    assert 0.0 <= data["itm_probability"] <= 1.0
    assert "matches best around pixel" in text_of(r)
