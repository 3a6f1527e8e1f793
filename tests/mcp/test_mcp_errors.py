"""Every error a client gets: tool errors read `[code] message` (never the SDK's `Error executing tool ...`), each is
told to the error observers (and so counted in `blip_errors_total`) exactly once, and bad prompt requests are
invalid-params errors that say what is wrong."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest
from _mcp_testlib import make_service
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS

from blip_tools.errors import BlipError, InvalidInput
from mcp_server import create_server
from mcp_server._common import add_error_observer
from mcp_server.server import BlipMCPServer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def private(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[BlipMCPServer, Any]]:
    """A server over a private service (its methods may be patched), with its index in a temporary folder."""
    root = tmp_path_factory.mktemp("mcp-errors")
    service = make_service(tiny_checkpoint, max_wait_ms=2.0, index_path=root / "index.sqlite")
    try:
        yield create_server(service), service
    finally:
        service.close()


@pytest.fixture
def observed() -> Iterator[list[str]]:
    """The codes of the errors told to the observers during the test, in order."""
    codes: list[str] = []
    remove = add_error_observer(lambda exc: codes.append(exc.code))
    try:
        yield codes
    finally:
        remove()


def text_of(result: Any) -> str:
    return "\n".join(block.text for block in result.content if getattr(block, "type", "") == "text")


async def test_every_tool_error_starts_with_its_code(
    private: tuple[BlipMCPServer, Any], mcp_images: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, service = private

    async def call_level_error(*args: Any, **kwargs: Any) -> Any:
        raise InvalidInput("max_new_tokens (600) is above the server's limit of 64")

    async def crash(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internals")

    with anyio.fail_after(60):
        async with Client(server) as client:
            missing = await client.call_tool("caption_image", {"image": str(tmp_path / "missing.png")})
            neither = await client.call_tool("search_images", {"top_k": 2})
            schema = await client.call_tool("caption_image", {"image": mcp_images[0], "num_beams": 99})
            unknown = await client.call_tool("no_such_tool", {})
            monkeypatch.setattr(service, "acaption_batch", call_level_error)
            whole_call = await client.call_tool("caption_images", {"images": mcp_images[:2]})
            monkeypatch.setattr(service, "aanswer", crash)
            crashed = await client.call_tool("answer_question", {"image": mcp_images[0], "question": "what?"})
    expected = {
        "[invalid_image] ": missing,
        "[invalid_input] search_images needs exactly one of": neither,
        "[invalid_input] Invalid arguments: num_beams": schema,
        "[invalid_input] Unknown tool: no_such_tool. Available tools: ": unknown,
        "[invalid_input] max_new_tokens (600) is above": whole_call,
        "[internal_error] The tool answer_question failed unexpectedly": crashed,
    }
    for start, result in expected.items():
        assert result.is_error and result.structured_content is None
        assert text_of(result).startswith(start), text_of(result)
        assert "Error executing tool" not in text_of(result)
    assert "caption_image" in text_of(unknown)
    assert "secret internals" not in text_of(crashed), "a crash's own text must stay in the server log"


async def test_each_error_is_reported_once(
    private: tuple[BlipMCPServer, Any], mcp_images: list[str], tmp_path: Path, observed: list[str]
) -> None:
    server, _ = private
    with anyio.fail_after(60):
        async with Client(server) as client:
            await client.call_tool("caption_image", {"image": str(tmp_path / "missing.png")})
            await client.call_tool("caption_image", {"image": mcp_images[0], "num_beams": 99})
            await client.call_tool("no_such_tool", {})
            await client.call_tool("search_images", {"top_k": 2})
            batch = await client.call_tool(
                "caption_images",
                {"images": [str(tmp_path / "a.png"), mcp_images[0], str(tmp_path / "b.png")], "max_new_tokens": 3},
            )
            fine = await client.call_tool("embed_text", {"text": "no error here"})
    assert not batch.is_error and not fine.is_error
    assert sorted(observed) == sorted(
        ["invalid_image", "invalid_input", "invalid_input", "invalid_input", "invalid_image", "invalid_image"]
    )


async def test_blip_errors_total_counts_bad_input_and_failed_batch_items(
    private: tuple[BlipMCPServer, Any], mcp_images: list[str], tmp_path: Path
) -> None:
    from mcp_server.metrics import BlipMetrics

    server, service = private
    metrics = BlipMetrics(lambda: service)

    def count(code: str) -> float:
        return metrics.registry.get_sample_value("blip_errors_total", {"interface": "mcp", "type": code}) or 0.0

    with anyio.fail_after(60):
        async with metrics.running(service), Client(server) as client:
            await client.call_tool("caption_image", {"image": mcp_images[0], "num_beams": 99})
            await client.call_tool("caption_image", {"image": mcp_images[0], "max_new_tokens": 0})
            await client.call_tool(
                "caption_images", {"images": [str(tmp_path / "a.png"), str(tmp_path / "b.png")], "max_new_tokens": 3}
            )
    assert count("invalid_input") == 2, "bad input that never reached the model is not counted"
    assert count("invalid_image") == 2, "failed items of a batch are not counted"


def test_an_observer_that_raises_changes_nothing() -> None:
    from mcp_server._common import to_tool_error

    def broken(exc: BlipError) -> None:
        raise RuntimeError("observer bug")

    remove = add_error_observer(broken)
    try:
        assert str(to_tool_error(InvalidInput("bad"))) == "[invalid_input] bad"
    finally:
        remove()


# ------------------------------------------------------------------------------------------ prompts
@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        ("describe_image", {}, "missing required argument(s): image"),
        ("describe_image", {"image": "/x.png", "bogus": "1"}, "unknown argument(s): bogus"),
        ("inspect_image", {"focus": "signs"}, "missing required argument(s): image"),
        ("no_such_prompt", {}, "Unknown prompt: no_such_prompt. Available prompts: describe_image, inspect_image"),
    ],
)
async def test_bad_prompt_requests_say_what_is_wrong(
    private: tuple[BlipMCPServer, Any], name: str, arguments: dict[str, str], expected: str
) -> None:
    server, _ = private
    with anyio.fail_after(60):
        async with Client(server) as client:
            with pytest.raises(MCPError) as info:
                await client.get_prompt(name, arguments)
            ok = await client.get_prompt("describe_image", {"image": "/x.png"})
    assert info.value.code == INVALID_PARAMS
    assert expected in info.value.message
    if name != "no_such_prompt":
        assert "It takes: image (required)" in info.value.message
    assert ok.messages
