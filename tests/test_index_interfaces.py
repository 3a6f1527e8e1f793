"""The image index through the other interfaces: a damaged index file in MCP, LangChain and the CLI."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from langchain_core.messages import ToolMessage
from PIL import Image

from blip_tools import Blip2Service, BlipSettings
from blip_tools.cli import main
from blip_tools.errors import IndexDamaged
from blip_tools.testing import tiny_settings_kwargs


def _folder(root: Path, seeds: range) -> Path:
    root.mkdir(parents=True)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8), "RGB").save(root / f"r{seed}.png")
    return root


@pytest.fixture
def damaged(tmp_path: Path) -> Path:
    """An index file that is not a SQLite database at all."""
    db = tmp_path / "damaged.sqlite"
    db.write_bytes(b"hello world" * 100)
    return db


@pytest.fixture
def damaged_service(tiny_checkpoint: Path, damaged: Path) -> Iterator[Blip2Service]:
    """A private service whose default index (`BLIP_INDEX_PATH`) is the damaged file; no model is ever loaded."""
    with Blip2Service(BlipSettings(**tiny_settings_kwargs(tiny_checkpoint), index_path=damaged)) as service:
        yield service


# ---------------------------------------------------------------------------------------------- damaged file
@pytest.mark.anyio
async def test_mcp_tools_report_index_damaged(damaged_service: Blip2Service, tmp_path: Path) -> None:
    from mcp import Client

    from mcp_server import create_server

    pics = _folder(tmp_path / "pics", range(2))
    with anyio.fail_after(60):
        async with Client(create_server(damaged_service)) as client:
            search = await client.call_tool("search_images", {"query": "a dog", "top_k": 3})
            index = await client.call_tool("index_images", {"directory": str(pics)})
    for result in (search, index):
        text = "\n".join(b.text for b in result.content if getattr(b, "type", "") == "text")
        assert result.is_error and "[index_damaged]" in text and "Delete it" in text, text


def test_langchain_tools_report_index_damaged(damaged_service: Blip2Service, tmp_path: Path) -> None:
    from langchain_core.tools import ToolException

    from blip_tools.langchain.collection_tools import IndexImagesTool, SearchImagesTool

    call = {"name": "search_images", "args": {"query": "a dog"}, "id": "call-1", "type": "tool_call"}
    message = SearchImagesTool(service=damaged_service).invoke(call)
    assert isinstance(message, ToolMessage) and message.status == "error"
    assert "is damaged or is not a blip-tools index" in str(message.content)
    tool = IndexImagesTool(service=damaged_service, handle_tool_error=False)
    with pytest.raises(ToolException) as caught:
        tool.invoke({"directory": str(_folder(tmp_path / "pics", range(1)))})
    assert isinstance(caught.value.__cause__, IndexDamaged)


@pytest.mark.parametrize("command", ["search", "index"])
def test_cli_reports_a_damaged_index_with_exit_code_2(
    tiny_checkpoint: Path,
    damaged: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    for name in ("BLIP_REMOTE_URL", "BLIP_ALLOWED_DIRS", "BLIP_INDEX_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in tiny_settings_kwargs(tiny_checkpoint).items():
        monkeypatch.setenv(f"BLIP_{name.upper()}", value)
    previous = Blip2Service._shared
    try:
        what = "a dog" if command == "search" else str(_folder(tmp_path / "pics", range(1)))
        code = main([command, what, "--index", str(damaged)])
    finally:
        Blip2Service.set_shared(previous)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: The image index {damaged} is damaged or is not a blip-tools index"), err
