"""Serve over stdio with nothing but protocol messages on stdout, and an answer for every malformed line.

`claim_stdio()` runs first thing in `blip-mcp` (before torch or transformers are imported): it keeps
private duplicates of the real stdin/stdout for the transport, points descriptor 1 at stderr (C
libraries, child processes) and descriptor 0 at /dev/null, and sets `sys.stdout` to `sys.stderr`
(`print`, tqdm, stray library output). Warnings and logging already go to stderr.

The SDK's stdio transport silently drops a line it cannot parse, so a client waiting on that request id
would hang. `_CheckedLines` answers such lines itself with a JSON-RPC error (-32700 parse error,
-32600 invalid request, echoing the id when there is one) before they reach the SDK.

Stopping: the session ends when the client closes stdin, and on Ctrl-C (SIGINT) even while stdin stays open:
stdin is read on a daemon thread, so a blocked read never holds up the shutdown (a read in an anyio worker thread
cannot be cancelled, and interpreter exit would wait for it). A client that goes away without reading (its end of
stdout closed) ends the session too, without a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import sys
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import anyio
import anyio.from_thread
import anyio.to_thread
from anyio.streams.memory import MemoryObjectSendStream
from mcp.server.stdio import stdio_server
from mcp.types import jsonrpc_message_adapter
from pydantic import ValidationError

from .server import BlipMCPServer

logger = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600


def quiet_libraries() -> None:
    """Keep transformers / huggingface_hub / tokenizers from printing progress bars and chatter."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@dataclass
class StdioWire:
    """The protocol's private ends of stdin and stdout."""

    stdin: BinaryIO
    stdout: BinaryIO


def _claim(fd: int, mode: str, divert_to: int) -> BinaryIO:
    private = os.dup(fd)
    os.set_inheritable(private, False)
    os.dup2(divert_to, fd)
    return os.fdopen(private, mode, buffering=0)  # type: ignore[return-value]


def claim_stdio() -> StdioWire:
    """Take the real stdin/stdout for the protocol; everything else written to stdout goes to stderr."""
    sys.stdout.flush()
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        try:
            stdin = _claim(0, "rb", devnull)
        finally:
            os.close(devnull)
        stdout = _claim(1, "wb", 2)
    except OSError:  # no real descriptors (embedded interpreters): swap the Python-level streams only
        stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    sys.stdout = sys.stderr
    return StdioWire(stdin=stdin, stdout=stdout)


class _Writer:
    """Serialised line writes to the wire (the SDK's writer and our error answers share it).

    Once the client has closed its end (it exited or was killed), further writes are dropped: there is nobody to
    read them, and the session ends when stdin reaches its end.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._lock = anyio.Lock()
        self._gone = False

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            written = self._stream.write(view)
            view = view[written or 0 :]

    async def write(self, text: str) -> None:
        async with self._lock:
            if self._gone:
                return
            try:
                await anyio.to_thread.run_sync(self._write_all, text.encode("utf-8"))
            except (BrokenPipeError, ConnectionResetError):
                self._gone = True
                logger.info("the client closed its end of stdout; dropping what is left to send")

    async def flush(self) -> None:
        return None


def malformed_line_error(line: str) -> dict[str, Any] | None:
    """The JSON-RPC error answer for a line the SDK would drop, or None when the line is a valid message.

    Also None for a malformed notification (no id): notifications are never answered.
    """
    try:
        message = jsonrpc_message_adapter.validate_json(line, by_name=False)
    except ValidationError as exc:
        try:
            data = json.loads(line)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            return _error(None, PARSE_ERROR, "Parse error: each line must be one JSON-RPC message in JSON.")
        if isinstance(data, list):
            return _error(
                None, INVALID_REQUEST, "Invalid request: JSON-RPC batches are not supported; send one message per line."
            )
        if not isinstance(data, dict):
            return _error(None, INVALID_REQUEST, "Invalid request: a JSON-RPC message must be a JSON object.")
        request_id = _valid_id(data.get("id"))
        if "method" in data and "id" not in data:
            logger.warning("dropped a malformed notification: %s", _first_error(exc))
            return None
        return _error(request_id, INVALID_REQUEST, f"Invalid request: {_first_error(exc)}")
    data = json.loads(line)
    if isinstance(data, dict) and "id" in data and "method" in data and getattr(message, "id", None) is None:
        # e.g. a fractional or boolean id: the SDK would take it for a notification and never answer.
        return _error(None, INVALID_REQUEST, "Invalid request: id must be a string or an integer.")
    return None


def _valid_id(value: Any) -> str | int | None:
    if isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    return None


def _first_error(exc: ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "not a JSON-RPC 2.0 message"
    err = errors[0]
    loc = ".".join(str(p) for p in err.get("loc", ()))
    return f"{loc}: {err.get('msg', 'invalid')}"[:200]


def _error(request_id: str | int | None, code: int, message: str) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "id": request_id, "error": {"code": code, "message": message}}


class _CheckedLines:
    """stdin lines for the SDK's reader; malformed ones are answered here and not passed on.

    A daemon thread reads stdin and hands each line to the event loop (one at a time, so a client that sends
    faster than the server reads is held back by the pipe). Cancelling the iteration (Ctrl-C) does not wait for
    that thread's blocked read, and the thread does not keep the process alive.
    """

    def __init__(self, stream: BinaryIO, writer: _Writer) -> None:
        self._text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="\n")
        self._writer = writer

    def __aiter__(self) -> AsyncIterator[str]:
        return self._iterate()

    def _pump(self, portal: anyio.from_thread.BlockingPortal, send: MemoryObjectSendStream[str]) -> None:
        """Reader thread: pass each stdin line to the loop until stdin ends or nobody listens any more."""
        try:
            for line in self._text:
                portal.call(send.send, line)
        except (anyio.BrokenResourceError, anyio.ClosedResourceError, RuntimeError):
            return  # the session is over (the portal or the stream has closed)
        except Exception as exc:  # an unreadable stdin ends the session like its end would
            logger.warning("reading stdin failed (%s: %s); ending the session", type(exc).__name__, exc)
        with contextlib.suppress(RuntimeError):  # the portal has stopped: the session is over anyway
            portal.call(send.close)

    async def _iterate(self) -> AsyncIterator[str]:
        send, receive = anyio.create_memory_object_stream[str]()
        async with anyio.from_thread.BlockingPortal() as portal, receive:
            reader = threading.Thread(target=self._pump, args=(portal, send), name="blip-mcp-stdin", daemon=True)
            reader.start()
            async for line in receive:
                if not line.strip():
                    continue
                answer = malformed_line_error(line)
                if answer is None:
                    yield line
                else:
                    logger.warning("answered a malformed message with error %s", answer["error"]["code"])
                    await self._writer.write(json.dumps(answer, separators=(",", ":")) + "\n")


async def serve_stdio(server: BlipMCPServer, wire: StdioWire) -> None:
    """Run one MCP session over the claimed stdin/stdout until stdin closes."""
    writer = _Writer(wire.stdout)
    lines = _CheckedLines(wire.stdin, writer)
    async with stdio_server(stdin=lines, stdout=writer) as (read_stream, write_stream):  # type: ignore[arg-type]
        # MCPServer.run_stdio_async() would claim sys.stdin/stdout itself; we pass our own checked wire.
        lowlevel = server._lowlevel_server
        await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
