"""blip-tools MCP server: BLIP-2 captioning, VQA, scores and embeddings as MCP tools over stdio or streamable HTTP.

`create_server()` builds the app; `mcp_server.http.build_http_app()` wraps it for HTTP; `blip-mcp`
(`mcp_server.cli:main`) runs either transport.

The names below load on first use: importing the package (as the `blip-mcp` entry point does) imports neither the
MCP SDK nor blip_tools, so Ctrl-C right after starting `blip-mcp` reaches `main()`, which ends quietly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._common import AppContext, get_service, to_tool_error, tool_errors
    from .server import INSTRUCTIONS, REGISTRARS, BlipMCPServer, create_server

_HOMES = {
    "INSTRUCTIONS": "server",
    "REGISTRARS": "server",
    "AppContext": "_common",
    "BlipMCPServer": "server",
    "create_server": "server",
    "get_service": "_common",
    "to_tool_error": "_common",
    "tool_errors": "_common",
}

__all__ = [
    "INSTRUCTIONS",
    "REGISTRARS",
    "AppContext",
    "BlipMCPServer",
    "create_server",
    "get_service",
    "to_tool_error",
    "tool_errors",
]


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{home}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
