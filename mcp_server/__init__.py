"""blip-tools MCP server: BLIP-2 captioning, VQA, scores and embeddings as MCP tools over stdio or streamable HTTP.

`create_server()` builds the app; `mcp_server.http.build_http_app()` wraps it for HTTP; `blip-mcp`
(`mcp_server.cli:main`) runs either transport.

The names below load on first use: importing the package (as the `blip-mcp` entry point does) imports neither the
MCP SDK nor blip_tools, so Ctrl-C right after starting `blip-mcp` reaches `main()`, which ends quietly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from blip_tools._lazy import lazy_attributes

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


if not TYPE_CHECKING:  # type checkers see the imports above, so a misspelt name is still an error there
    __getattr__, __dir__ = lazy_attributes(__name__, _HOMES, globals(), __all__)
