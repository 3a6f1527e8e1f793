"""Hostile inputs to the LangChain tools: every one ends as a result or an error `ToolMessage` with a readable
message, never an exception out of `invoke`/`ainvoke`, and the service keeps serving afterwards."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import ToolMessage
from langchain_core.tools import BaseTool

from blip_tools.index import ImageIndex
from blip_tools.langchain.collection_tools import IndexImagesTool, SearchImagesTool
from blip_tools.results import CaptionResult


def _call(name: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "args": args, "id": "call-1", "type": "tool_call"}


@pytest.fixture
def index_tools(service: Any, tmp_path: Path) -> Iterator[dict[str, BaseTool]]:
    """`index_images` and `search_images` over a private index in a temporary folder."""
    index = ImageIndex(tmp_path / "index.sqlite", service=service)
    try:
        yield {
            "index_images": IndexImagesTool(service=service, index=index),
            "search_images": SearchImagesTool(service=service, index=index),
        }
    finally:
        index.close()


async def test_a_plain_string_input_fills_the_first_argument(
    tools: dict[str, BaseTool], index_tools: dict[str, BaseTool], lc_image: str
) -> None:
    # `tool.invoke("/x.png")` (older agents, quick scripts): LangChain validates the string as the schema's first
    # field and passes it positionally, which the tools' keyword-only `_run` refused with a TypeError.
    # Without a tool call, LangChain returns the content only.
    for content in (tools["caption_image"].invoke(lc_image), await tools["caption_image"].ainvoke(lc_image)):
        assert content.startswith(f"Caption of {lc_image}")
    for content in (tools["embed_image"].invoke(lc_image), await tools["embed_image"].ainvoke(lc_image)):
        assert content.startswith(f"Embedded {lc_image}")
    assert index_tools["index_images"].invoke(str(Path(lc_image).parent)).startswith("Indexed ")
    assert "photo.png" in await index_tools["search_images"].ainvoke("a photo")


@pytest.mark.parametrize("directory", ["\x00", "/tmp/pics\x00/../etc"])
@pytest.mark.parametrize("tool", ["index_images", "search_images"])
async def test_a_nul_in_a_folder_path_is_a_readable_error(
    index_tools: dict[str, BaseTool], service: Any, lc_image: str, tool: str, directory: str
) -> None:
    args = {"directory": directory} if tool == "index_images" else {"query": "a dog", "directory": directory}
    for message in (
        index_tools[tool].invoke(_call(tool, **args)),
        await index_tools[tool].ainvoke(_call(tool, **args)),
    ):
        assert isinstance(message, ToolMessage) and message.status == "error"
        assert message.content.startswith("Invalid arguments: directory:")
        assert "NUL character" in message.content
    assert isinstance(service.caption(lc_image, max_new_tokens=3), CaptionResult)  # still serving


@pytest.mark.parametrize(("num_beams", "do_sample"), [(2, None), (1, None), (2, True)])
def test_num_captions_above_the_beams_is_explained_in_the_tools_own_terms(
    tools: dict[str, BaseTool], lc_image: str, num_beams: int, do_sample: bool | None
) -> None:
    args: dict[str, Any] = {"image": lc_image, "num_captions": 4, "num_beams": num_beams}
    if do_sample is not None:
        args["do_sample"] = do_sample
    message = tools["caption_image"].invoke(_call("caption_image", **args))
    assert message.status == "error"
    assert message.content.startswith("Invalid arguments:")
    assert "num_captions=4 needs num_beams >= 4" in message.content
    assert "num_return_sequences" not in message.content  # not an argument this tool has


@pytest.mark.parametrize("args", [{"num_captions": 4}, {"num_captions": 4, "do_sample": True, "seed": 1}])
def test_num_captions_alone_or_sampled_still_works(
    tools: dict[str, BaseTool], lc_image: str, args: dict[str, Any]
) -> None:
    message = tools["caption_image"].invoke(_call("caption_image", image=lc_image, max_new_tokens=3, **args))
    assert message.status == "success", message.content
    assert isinstance(message.artifact, CaptionResult) and len(message.artifact.captions) == 4
