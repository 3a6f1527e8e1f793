"""A real `blip-mcp` stdio subprocess: a full session in raw JSON-RPC lines, and proof that stdout carries
nothing but protocol messages even when library code prints, warns and logs during calls."""

from __future__ import annotations

import json

from _mcp_testlib import RawStdio
from mcp.types import jsonrpc_message_adapter

TOOLS = {"caption_image", "caption_images", "answer_question", "score_image_text", "embed_image", "embed_text"}
TOOLS |= {"index_images", "search_images", "locate_in_image"}  # mcp_server/collection_tools.py


def call(stdio: RawStdio, name: str, arguments: dict) -> dict:  # type: ignore[type-arg]
    response = stdio.request("tools/call", {"name": name, "arguments": arguments})
    assert "result" in response, response
    return response["result"]


def assert_stdout_is_protocol_only(stdio: RawStdio) -> None:
    """Every line the server wrote to stdout is one valid JSON-RPC message."""
    assert stdio.lines, "nothing was read from stdout"
    for line in stdio.lines:
        assert line.endswith(b"\n")
        jsonrpc_message_adapter.validate_json(line)
        assert b"NOISE" not in line


def test_session_initialize_list_caption_fail_then_succeed(stdio_server: RawStdio, mcp_images: list[str]) -> None:
    tools = stdio_server.request("tools/list")["result"]["tools"]
    assert {t["name"] for t in tools} == TOOLS

    good = call(stdio_server, "caption_image", {"image": mcp_images[0]})
    assert good["isError"] is False
    assert good["structuredContent"]["caption"] == good["structuredContent"]["captions"][0]["text"]
    assert good["content"][0]["text"].startswith("Caption: ")

    # Outside --allowed-dir: a readable error result, not a crash.
    bad = call(stdio_server, "caption_image", {"image": "/etc/hostname"})
    assert bad["isError"] is True
    assert "[path_not_allowed]" in bad["content"][0]["text"]

    again = call(stdio_server, "caption_image", {"image": mcp_images[1]})
    assert again["isError"] is False

    stats = stdio_server.request("resources/read", {"uri": "blip://stats"})["result"]["contents"][0]["text"]
    assert json.loads(stats)["completed"] >= 2
    assert_stdout_is_protocol_only(stdio_server)


def test_stdout_stays_clean_under_prints_warnings_and_logging(stdio_server: RawStdio, mcp_images: list[str]) -> None:
    # Each caption in the noisy wrapper prints, writes to fd 1 and sys.__stdout__, runs a child that prints,
    # warns and logs before calling the service.
    result = call(stdio_server, "caption_images", {"images": mcp_images[:2]})
    assert result["isError"] is False
    assert_stdout_is_protocol_only(stdio_server)
    stderr = stdio_server.stderr_tail(200_000)
    for noise in (
        "NOISE print()",
        "NOISE sys.stdout.write",
        "NOISE os.write(1)",
        "NOISE sys.__stdout__",
        "NOISE child process",
        "NOISE warnings.warn",
        "NOISE logging",
    ):
        assert noise in stderr, f"{noise!r} went neither to stdout nor to stderr"
