"""Prompt argument values: a `style` that is neither brief nor detailed, or an empty `image` (a host's form left
blank), is an invalid-params error (-32602) that says what is accepted, not a prompt built on a silent guess."""

from __future__ import annotations

from typing import Any

import anyio
import pytest
from mcp import Client
from mcp.shared.exceptions import MCPError
from mcp.types import INVALID_PARAMS

from mcp_server import create_server
from mcp_server.server import BlipMCPServer

pytestmark = pytest.mark.anyio


@pytest.fixture(scope="module")
def server(service: Any) -> BlipMCPServer:
    return create_server(service)


@pytest.mark.parametrize(
    ("name", "arguments", "expected"),
    [
        (
            "describe_image",
            {"image": "/x.png", "style": "verbose"},
            "style must be 'brief' or 'detailed' (got 'verbose')",
        ),
        ("describe_image", {"image": " "}, "image must be the path of an image file (got an empty value)"),
        ("inspect_image", {"image": "", "focus": "signs"}, "image must be the path of an image file"),
    ],
)
async def test_bad_prompt_values_are_invalid_params(
    server: BlipMCPServer, name: str, arguments: dict[str, str], expected: str
) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            with pytest.raises(MCPError) as info:
                await client.get_prompt(name, arguments)
    assert info.value.code == INVALID_PARAMS
    assert f"Prompt {name}: {expected}" in info.value.message


async def test_style_takes_any_case_and_blank_means_brief(server: BlipMCPServer) -> None:
    with anyio.fail_after(60):
        async with Client(server) as client:
            detailed = await client.get_prompt("describe_image", {"image": "/x.png", "style": " Detailed"})
            blank = await client.get_prompt("describe_image", {"image": "/x.png", "style": ""})
    assert "answer_question" in detailed.messages[0].content.text  # type: ignore[union-attr]
    assert "one sentence" in blank.messages[0].content.text  # type: ignore[union-attr]
