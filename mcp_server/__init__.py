"""blip-tools MCP server: BLIP-2 captioning, VQA, scores and embeddings as MCP tools over stdio or streamable HTTP.

`create_server()` builds the app; `mcp_server.http.build_http_app()` wraps it for HTTP; `blip-mcp`
(`mcp_server.cli:main`) runs either transport.
"""

from __future__ import annotations

from ._common import AppContext, get_service, to_tool_error, tool_errors
from .server import INSTRUCTIONS, REGISTRARS, BlipMCPServer, create_server

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
