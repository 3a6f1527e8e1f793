"""Serve over stdio with nothing but protocol messages on stdout.

`claim_stdout()` runs first thing in `blip-mcp` (before torch or transformers are imported): it keeps a
private duplicate of the real stdout for the transport, points file descriptor 1 at stderr (so C
libraries and child processes write there) and sets `sys.stdout` to `sys.stderr` (so `print`, tqdm and
stray library output go there). Warnings and logging already go to stderr.
"""

from __future__ import annotations

import io
import os
import sys
from typing import BinaryIO

import anyio
from mcp.server.stdio import stdio_server

from .server import BlipMCPServer


def quiet_libraries() -> None:
    """Keep transformers / huggingface_hub / tokenizers from printing progress bars and chatter."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def claim_stdout() -> BinaryIO:
    """Take the real stdout for the protocol and send everything else written to stdout to stderr.

    Returns an unbuffered binary stream on a private duplicate of the original stdout.
    """
    sys.stdout.flush()
    try:
        wire_fd = os.dup(1)
        os.dup2(2, 1)
    except OSError:  # no real descriptors (embedded interpreters): fall back to the Python-level swap only
        wire = sys.stdout.buffer
        sys.stdout = sys.stderr
        return wire
    os.set_inheritable(wire_fd, False)
    sys.stdout = sys.stderr
    return os.fdopen(wire_fd, "wb", buffering=0)


async def serve_stdio(server: BlipMCPServer, wire: BinaryIO) -> None:
    """Run one MCP session over stdin and `wire` (the claimed stdout) until stdin closes."""
    text = io.TextIOWrapper(wire, encoding="utf-8", newline="\n", write_through=True)
    async with stdio_server(stdout=anyio.wrap_file(text)) as (read_stream, write_stream):
        # MCPServer.run_stdio_async() would claim sys.stdout itself; we pass our own wire instead.
        lowlevel = server._lowlevel_server
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
