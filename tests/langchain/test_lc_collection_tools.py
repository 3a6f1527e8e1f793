"""LangChain collection tools (`index_images`, `search_images`, `locate_in_image`) on the tiny checkpoint."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from langchain_core.messages import ToolMessage
from langchain_tests.integration_tests import ToolsIntegrationTests
from langchain_tests.unit_tests import ToolsUnitTests
from PIL import Image

from blip_tools.grounding import LocateResult
from blip_tools.index import ImageIndex, IndexReport, SearchResult
from blip_tools.langchain import Blip2Toolkit
from blip_tools.langchain.collection_tools import IndexImagesTool, LocateInImageTool, SearchImagesTool


@pytest.fixture(scope="module")
def lc_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lc-collection") / "pics"
    folder.mkdir()
    for i in range(5):
        rng = np.random.default_rng(500 + i)
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8), "RGB").save(folder / f"q{i}.png")
    return folder


@pytest.fixture(scope="module")
def lc_index(service: Any, lc_folder: Path) -> Any:
    index = ImageIndex(lc_folder.parent / "index.sqlite", service=service)
    yield index
    index.close()


def _call(name: str, **args: Any) -> dict[str, Any]:
    return {"name": name, "args": args, "id": "call-1", "type": "tool_call"}


class _Case:
    tool_class: type[Any]
    _service: Any
    _index: Any
    _folder: Path

    @pytest.fixture(autouse=True)
    def _bind(self, service: Any, lc_index: Any, lc_folder: Path) -> None:
        self._service, self._index, self._folder = service, lc_index, lc_folder

    @property
    def tool_constructor(self) -> type[Any]:
        return self.tool_class

    @property
    def tool_constructor_params(self) -> dict[str, Any]:
        params: dict[str, Any] = {"service": self._service}
        if self.tool_class is not LocateInImageTool:
            params["index"] = self._index
        return params

    @property
    def tool_invoke_params_example(self) -> dict[str, Any]:
        if self.tool_class is IndexImagesTool:
            return {"directory": str(self._folder), "recursive": True, "captions": False}
        if self.tool_class is SearchImagesTool:
            return {"query": "a red car", "top_k": 3}
        return {"image": str(self._folder / "q0.png"), "text": "a red car"}


class _Index(_Case):
    tool_class = IndexImagesTool


class _Search(_Case):
    tool_class = SearchImagesTool


class _Locate(_Case):
    tool_class = LocateInImageTool


class TestIndexImagesUnit(_Index, ToolsUnitTests):
    pass


class TestIndexImagesIntegration(_Index, ToolsIntegrationTests):
    pass


class TestSearchImagesUnit(_Search, ToolsUnitTests):
    pass


class TestSearchImagesIntegration(_Search, ToolsIntegrationTests):
    pass


class TestLocateInImageUnit(_Locate, ToolsUnitTests):
    pass


class TestLocateInImageIntegration(_Locate, ToolsIntegrationTests):
    pass


def test_toolkit_lists_the_collection_tools(service: Any) -> None:
    names = [t.name for t in Blip2Toolkit(service=service).get_tools()]
    assert names[-3:] == ["index_images", "search_images", "locate_in_image"]


def test_index_then_search_through_the_tools(service: Any, lc_index: Any, lc_folder: Path) -> None:
    index_tool = IndexImagesTool(service=service, index=lc_index)
    search_tool = SearchImagesTool(service=service, index=lc_index)
    message = index_tool.invoke(_call("index_images", directory=str(lc_folder), captions=False))
    assert isinstance(message, ToolMessage) and message.status == "success"
    assert isinstance(message.artifact, IndexReport) and message.artifact.indexed == 5
    assert "5 searchable images" in message.content

    found = search_tool.invoke(_call("search_images", query="a photo", top_k=5, directory=str(lc_folder)))
    assert isinstance(found.artifact, SearchResult) and len(found.artifact.hits) == 5
    assert str(lc_folder / "q0.png") in found.content

    similar = search_tool.invoke(_call("search_images", image=str(lc_folder / "q3.png"), top_k=2))
    assert similar.artifact.hits[0].path == str((lc_folder / "q3.png").resolve())


def test_tool_errors_reach_the_model(service: Any, lc_index: Any, tmp_path: Path) -> None:
    search_tool = SearchImagesTool(service=service, index=lc_index)
    both = search_tool.invoke(_call("search_images", query="x", image="/nope.png"))
    assert both.status == "error" and "exactly one" in both.content
    neither = search_tool.invoke(_call("search_images"))
    assert neither.status == "error"
    bad_k = search_tool.invoke(_call("search_images", query="x", top_k=0))
    assert bad_k.status == "error" and "top_k" in bad_k.content
    index_tool = IndexImagesTool(service=service, index=lc_index)
    missing = index_tool.invoke(_call("index_images", directory=str(tmp_path / "missing")))
    assert missing.status == "error" and "not a directory" in missing.content


async def test_locate_returns_text_and_the_overlay_image(service: Any, lc_folder: Path) -> None:
    tool = LocateInImageTool(service=service)
    with anyio.fail_after(30):
        message = await tool.ainvoke(_call("locate_in_image", image=str(lc_folder / "q1.png"), text="a cat"))
    assert isinstance(message.artifact, LocateResult)
    text_block, image_block = message.content
    assert text_block["type"] == "text" and "matches best" in text_block["text"]
    assert image_block["type"] == "image" and image_block["mime_type"] == "image/png"
    overlay = Image.open(io.BytesIO(base64.b64decode(image_block["base64"])))
    assert overlay.size == (48, 40)
    assert message.artifact.heatmap.shape == (40, 48)


def test_async_locate_draws_its_overlay_off_the_event_loop(
    service: Any, lc_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Drawing the overlay decodes the image (through a daemon: reads or fetches it again): never on the loop."""
    import threading

    threads: list[threading.Thread] = []
    draw = LocateResult.overlay_png

    def recording(self: LocateResult, *args: Any, **kwargs: Any) -> bytes:
        threads.append(threading.current_thread())
        return draw(self, *args, **kwargs)

    monkeypatch.setattr(LocateResult, "overlay_png", recording)
    tool = LocateInImageTool(service=service)

    async def run() -> tuple[ToolMessage, threading.Thread]:
        message = await tool.ainvoke(_call("locate_in_image", image=str(lc_folder / "q1.png"), text="a car"))
        return message, threading.current_thread()

    message, loop_thread = anyio.run(run)
    assert isinstance(message, ToolMessage) and message.status == "success"
    assert threads and all(t is not loop_thread for t in threads)


def test_locate_without_the_overlay_returns_text_only(service: Any, lc_folder: Path) -> None:
    """For chat endpoints that refuse images in tool results: text content, the same artifact, no image promised."""
    tools = Blip2Toolkit(service=service, image_outputs=False).get_tools()
    tool = next(t for t in tools if t.name == "locate_in_image")
    assert isinstance(tool, LocateInImageTool) and not tool.overlay
    assert "overlay" not in tool.description and "overlay" in LocateInImageTool(service=service).description
    message = tool.invoke(_call("locate_in_image", image=str(lc_folder / "q1.png"), text="a cat"))
    assert message.status == "success"
    assert isinstance(message.content, str) and "matches best" in message.content
    assert isinstance(message.artifact, LocateResult) and message.artifact.overlay_png().startswith(b"\x89PNG")


def test_collection_tools_are_exported_with_the_others() -> None:
    """`from blip_tools.langchain import LocateInImageTool` (as the README writes it) works, like the other tools."""
    import blip_tools.langchain as lc
    from blip_tools.langchain import collection_tools

    for name in ("IndexImagesTool", "SearchImagesTool", "LocateInImageTool"):
        assert getattr(lc, name) is getattr(collection_tools, name) and name in lc.__all__
