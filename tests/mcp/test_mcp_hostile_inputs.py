"""Hostile tool arguments over an in-memory client: each is a tool error `[invalid_input] ...` that names the bad
argument (never a silent default or an `[internal_error]`), and the server keeps serving afterwards."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp import Client

from blip_tools.results import CaptionResult
from mcp_server import create_server
from mcp_server.server import BlipMCPServer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def server(service: Any) -> BlipMCPServer:
    """The MCP server over the session's shared tiny-checkpoint service (borrowed, not closed)."""
    return create_server(service)


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if getattr(block, "type", "") == "text")


def _valid_args(image: str) -> dict[str, dict[str, Any]]:
    return {
        "caption_image": {"image": image, "max_new_tokens": 3},
        "caption_images": {"images": [image], "max_new_tokens": 3},
        "answer_question": {"image": image, "question": "what?", "max_new_tokens": 3},
        "score_image_text": {"image": image, "texts": ["a dog"]},
        "embed_image": {"image": image},
        "embed_text": {"text": "a dog"},
        "index_images": {"directory": "/nonexistent-folder"},
        "search_images": {"query": "a dog"},
        "locate_in_image": {"image": image, "text": "a dog"},
    }


async def test_unknown_arguments_are_refused_by_name(server: BlipMCPServer, mcp_images: list[str]) -> None:
    # The SDK's argument model ignored them: a misspelt `max_tokens` ran with the default 30 tokens, silently.
    with anyio.fail_after(60):
        async with Client(server) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
            for name, args in _valid_args(mcp_images[0]).items():
                r = await client.call_tool(name, {**args, "max_tokens": 5})
                assert r.is_error, f"{name} accepted an unknown argument: {text_of(r)}"
                assert text_of(r).startswith("[invalid_input] Invalid arguments: max_tokens: Extra inputs"), text_of(r)
                assert f"call {name} again" in text_of(r)
                assert tools[name].input_schema.get("additionalProperties") is False, name
            ok = await client.call_tool("caption_image", {"image": mcp_images[0], "max_new_tokens": 3})
    assert not ok.is_error, text_of(ok)
    assert CaptionResult.model_validate(ok.structured_content).caption is not None


@pytest.mark.parametrize("directory", ["\x00", "/tmp\x00/x"])
@pytest.mark.parametrize("tool", ["index_images", "search_images"])
async def test_a_nul_in_a_folder_path_is_invalid_input_not_a_crash(
    server: BlipMCPServer, mcp_images: list[str], tool: str, directory: str
) -> None:
    args = {"directory": directory} if tool == "index_images" else {"query": "a dog", "directory": directory}
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool(tool, args)
            ok = await client.call_tool("embed_image", {"image": mcp_images[0]})
    assert r.is_error
    assert text_of(r).startswith("[invalid_input] Invalid arguments: directory: a folder path cannot")
    assert "NUL character" in text_of(r)
    assert not ok.is_error, text_of(ok)


@pytest.mark.parametrize(
    ("directory", "expected"),
    [("a" * 4097, "String should have at most 4096 characters"), ("\ud800", "unable to parse raw data as a unicode")],
)
async def test_search_images_directory_keeps_its_bounds(server: BlipMCPServer, directory: str, expected: str) -> None:
    # The NUL check must not push the length bound and the string check off the inner string.
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool("search_images", {"query": "a dog", "directory": directory})
    assert r.is_error
    assert text_of(r).startswith("[invalid_input] Invalid arguments: directory:")
    assert expected in text_of(r)
