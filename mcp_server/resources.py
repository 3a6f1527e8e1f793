"""MCP resources: `blip://model` (what runs, what it can do, its limits) and `blip://stats` (live counters).

Static resources get no request context in the SDK, so they read the running service from the server
(`BlipMCPServer.app_context`, set by the lifespan) instead of from a global.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mcp.server.mcpserver.exceptions import ResourceError

if TYPE_CHECKING:
    from .server import BlipMCPServer


def register(server: BlipMCPServer) -> None:
    """Add `blip://model` and `blip://stats` to `server`."""

    def running() -> BlipMCPServer:
        if server.current_context is None:
            raise ResourceError("The blip-tools service is not running.")
        return server

    @server.resource(
        "blip://model",
        name="model",
        title="Model information",
        description="Checkpoints, device, dtype, capabilities and limits of the shared BLIP-2 service.",
        mime_type="application/json",
    )
    def model_info() -> str:
        return running().app_context.service.model_info().model_dump_json(indent=2)

    @server.resource(
        "blip://stats",
        name="stats",
        title="Service statistics",
        description="Requests, batches, batch-size histogram, queue depth, rejections, cache hits and errors.",
        mime_type="application/json",
    )
    def stats() -> str:
        return running().app_context.service.stats().model_dump_json(indent=2)
