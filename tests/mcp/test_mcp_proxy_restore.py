"""The stdio proxy with `--send-files always`: image paths are read on the proxy's side and sent as data URIs, and
the daemon's results name the caller's paths again, in text and structured content, for every tool.

The proxy's own steps (`_prepare_arguments`, `restore_result`, `merge_local_failures`) run around the real
daemon tools in memory; the stdio and HTTP legs are covered end to end in tests/test_remote.py."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _mcp_testlib import make_service, write_image
from mcp import Client
from mcp.types import CallToolResult

from blip_tools import BlipSettings
from blip_tools.remote import DaemonClient
from mcp_server import create_server
from mcp_server.proxy import ProxyContext, _prepare_arguments, merge_local_failures, restore_result
from mcp_server.server import BlipMCPServer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The caller's images: two of the same size and format (their data URIs are described alike), and a file
    that is not an image."""
    root = tmp_path_factory.mktemp("proxy-files")
    write_image(root / "first.png", 11)
    write_image(root / "second.png", 12)
    # A PNG signature over garbage: sent as data (only image files are), then refused by the daemon's decoder.
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not an image" * 10)
    return root


@pytest.fixture(scope="module")
def daemon(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BlipMCPServer]:
    """The daemon's MCP app over a private service that sees none of the caller's files (no allowed directory
    holds them), with its index in its own folder."""
    own = tmp_path_factory.mktemp("daemon-side")
    service = make_service(
        tiny_checkpoint, max_wait_ms=2.0, index_path=own / "index.sqlite", allowed_dirs=[str(own.resolve())]
    )
    try:
        yield create_server(service)
    finally:
        service.close()


async def through_proxy(daemon: BlipMCPServer, folder: Path, name: str, arguments: dict[str, Any]) -> CallToolResult:
    """What a host gets from the proxy for this call (`--send-files always`), the daemon called in memory."""
    proxy = ProxyContext(
        daemon=DaemonClient("http://127.0.0.1:9/mcp"),  # never dialled: the daemon is called in memory below
        settings=BlipSettings(allowed_dirs=[str(folder)]),
        send_files="always",
    )
    sent_arguments, sent, failed = _prepare_arguments(arguments, proxy)
    assert sent and all(s.sent.startswith("data:") for s in sent), "the proxy did not send the files as data"
    with anyio.fail_after(60):
        async with Client(daemon) as client:
            result = await client.call_tool(name, sent_arguments)
    restored = restore_result(result, sent)
    return merge_local_failures(restored, list(arguments["images"]), failed) if failed else restored


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if getattr(block, "type", "") == "text")


def assert_no_data(result: CallToolResult) -> None:
    """Nothing in the result describes or echoes the data URIs the proxy sent."""
    everything = text_of(result) + repr(result.structured_content)
    assert not re.search(r"data URI \(\d+ bytes\)|data:image/png;base64,\w", everything), everything


async def test_search_by_image_names_the_callers_path(daemon: BlipMCPServer, folder: Path) -> None:
    path = str(folder / "first.png")
    result = await through_proxy(daemon, folder, "search_images", {"image": path, "top_k": 3})
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None and result.structured_content["image"] == path
    assert f"images like {path}" in text_of(result)
    assert_no_data(result)


@pytest.mark.parametrize("tool", ["caption_image", "locate_in_image", "answer_question"])
async def test_single_image_results_name_the_callers_path(daemon: BlipMCPServer, folder: Path, tool: str) -> None:
    path = str(folder / "second.png")
    extra = {"caption_image": {"max_new_tokens": 3}, "locate_in_image": {"text": "a dog"}}
    arguments = {"image": path, **extra.get(tool, {"question": "what?", "max_new_tokens": 3})}
    result = await through_proxy(daemon, folder, tool, arguments)
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None and result.structured_content["image"]["source"] == path
    assert_no_data(result)


async def test_an_error_names_the_callers_path(daemon: BlipMCPServer, folder: Path) -> None:
    path = str(folder / "broken.png")
    result = await through_proxy(daemon, folder, "caption_image", {"image": path})
    assert result.is_error
    assert text_of(result).startswith("[invalid_image]") and path in text_of(result), text_of(result)
    assert_no_data(result)


async def test_batch_items_each_name_their_own_path(daemon: BlipMCPServer, folder: Path) -> None:
    paths = [str(folder / name) for name in ("first.png", "broken.png", "missing.png", "second.png")]
    result = await through_proxy(daemon, folder, "caption_images", {"images": paths, "max_new_tokens": 3})
    assert not result.is_error, text_of(result)
    assert result.structured_content is not None
    items = result.structured_content["items"]
    assert [item["image"] for item in items] == paths
    assert [item["ok"] for item in items] == [True, False, False, True]
    assert items[0]["result"]["image"]["source"] == paths[0]
    assert items[3]["result"]["image"]["source"] == paths[3]
    assert items[0]["result"]["image"]["sha256"] != items[3]["result"]["image"]["sha256"]
    assert paths[1] in items[1]["error"] and paths[2] in items[2]["error"]
    lines = text_of(result).splitlines()
    assert lines[0] == "Captioned 2 of 4 images (2 failed):"
    for index, path in enumerate(paths, 1):
        assert lines[index].startswith(f"{index}. {path}: ")
    assert paths[1] in lines[2].partition("ERROR")[2]
    assert_no_data(result)
