"""String arguments are taken as the strings they are: a prompt, query, image or directory that looks like JSON
(`"null"`, `"[1, 2]"`) is not parsed before validation, while a list sent as a JSON string still works and the
input schemas are unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import anyio
import pytest
from _mcp_testlib import make_service
from mcp import Client
from pydantic import Field

from blip_tools.index import SearchResult
from blip_tools.results import CaptionResult, ScoreResult
from mcp_server import create_server
from mcp_server.arguments import accepts_str
from mcp_server.server import BlipMCPServer

pytestmark = pytest.mark.anyio

JSON_LOOKING = ["null", "[1, 2]", '{"a": 1}', "123", "true"]


@pytest.fixture(scope="module")
def server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, mcp_images: list[str]
) -> Iterator[BlipMCPServer]:
    """A server over a private service whose index lives in a temporary folder; only test folders are allowed."""
    root = tmp_path_factory.mktemp("mcp-arguments")
    allowed = [str(root.resolve()), str(Path(mcp_images[0]).parent.resolve())]
    service = make_service(tiny_checkpoint, max_wait_ms=2.0, index_path=root / "index.sqlite", allowed_dirs=allowed)
    try:
        yield create_server(service)
    finally:
        service.close()


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if getattr(block, "type", "") == "text")


@pytest.mark.parametrize("value", JSON_LOOKING)
async def test_caption_prompt_is_taken_as_given(server: BlipMCPServer, mcp_images: list[str], value: str) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool("caption_image", {"image": mcp_images[0], "prompt": value, "max_new_tokens": 3})
    assert not r.is_error, text_of(r)
    assert CaptionResult.model_validate(r.structured_content).prompt == value


@pytest.mark.parametrize("value", JSON_LOOKING)
async def test_search_arguments_are_taken_as_given(server: BlipMCPServer, value: str) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            query = await client.call_tool("search_images", {"query": value, "top_k": 1})
            image = await client.call_tool("search_images", {"image": value, "top_k": 1})
            folder = await client.call_tool("search_images", {"query": "a dog", "directory": value})
    assert not query.is_error, text_of(query)
    assert SearchResult.model_validate(query.structured_content).query == value
    # `image` and `directory` reach the service as the strings they are, which refuses them as such.
    for r in (image, folder):
        assert r.is_error
        assert "valid string" not in text_of(r) and "exactly one of" not in text_of(r), text_of(r)
    assert text_of(image).startswith(("[invalid_image]", "[path_not_allowed]")), text_of(image)
    assert value in text_of(folder), text_of(folder)


async def test_null_for_an_optional_argument_means_its_default(server: BlipMCPServer, mcp_images: list[str]) -> None:
    """Models send `null` for arguments they leave unset; a default that does not take null is then used."""
    with anyio.fail_after(60):
        async with Client(server) as client:
            embedding = await client.call_tool("embed_image", {"image": mcp_images[0], "include_query_vectors": None})
            search = await client.call_tool("search_images", {"query": "a dog", "top_k": None})
            required = await client.call_tool("caption_image", {"image": None})
    assert not embedding.is_error, text_of(embedding)
    assert embedding.structured_content is not None and embedding.structured_content["query_vectors"] is None
    assert not search.is_error, text_of(search)
    assert required.is_error and text_of(required).startswith("[invalid_input]"), text_of(required)


async def test_lists_sent_as_json_strings_still_work(server: BlipMCPServer, mcp_images: list[str]) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            r = await client.call_tool("score_image_text", {"image": mcp_images[0], "texts": '["a dog", "null"]'})
    assert not r.is_error, text_of(r)
    assert [s.text for s in ScoreResult.model_validate(r.structured_content).scores] == ["a dog", "null"]


async def test_input_schemas_are_unchanged(server: BlipMCPServer) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            tools = {t.name: t for t in (await client.list_tools()).tools}
    prompt = tools["caption_image"].input_schema["properties"]["prompt"]
    assert prompt["anyOf"] == [{"maxLength": 500, "type": "string"}, {"type": "null"}]
    query = tools["search_images"].input_schema["properties"]["query"]
    assert query["anyOf"] == [{"maxLength": 1000, "type": "string"}, {"type": "null"}]
    assert tools["caption_images"].input_schema["properties"]["images"]["type"] == "array"


def test_accepts_str() -> None:
    assert accepts_str(str) and accepts_str(str | None) and accepts_str(Annotated[str, Field(min_length=1)] | None)
    assert accepts_str(int | str)
    assert not accepts_str(list[str]) and not accepts_str(list[str] | None) and not accepts_str(int | None)
