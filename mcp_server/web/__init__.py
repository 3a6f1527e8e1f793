"""The HTTP server's extras: Prometheus `/metrics` and the local web console at `/ui`.

`build_app()` is `mcp_server.http.build_http_app()` plus these routes; it is what `blip-mcp --transport http`
serves. Both sit behind the same Host/Origin checks, token and body limit as `/mcp`; only the console's page and
static files (which hold no data) are reachable without the token.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.routing import BaseRoute

from blip_tools.service import Blip2Service

from ..http import HEALTH_PATH, BodyRefusal, HttpConfig, LifespanHook, build_http_app
from ..metrics import METRICS_PATH, BlipMetrics
from ..server import BlipMCPServer
from .console import API_PREFIX, UI_PATH, Console

logger = logging.getLogger(__name__)


def build_app(
    server: BlipMCPServer,
    config: HttpConfig | None = None,
    *,
    metrics: bool = True,
    ui: bool = True,
    routes: Sequence[BaseRoute] = (),
    lifespan_hooks: Sequence[LifespanHook] = (),
) -> Starlette:
    """The full HTTP app: MCP at `/mcp`, `/healthz`, `/metrics` and the console at `/ui`.

    Args:
        server: from `create_server()`.
        config: bind address, token, extra hosts and body limit (see `HttpConfig`).
        metrics: serve `/metrics` (Prometheus text format; needs the token when one is set).
        ui: serve the web console at `/ui` and its API at `/ui/api/...`.
        routes: more routes, behind the same checks.
        lifespan_hooks: more hooks entered once the service is running.

    The app's `state.metrics` is its `BlipMetrics` (own registry) and `state.console` its `Console`, or None.
    """
    config = config or HttpConfig()
    config.check()

    def current_service() -> Blip2Service | None:
        context = server.current_context
        return context.service if context is not None else None

    def status() -> str:
        context = server.current_context
        return context.status if context is not None else "starting"

    blip_metrics = BlipMetrics(current_service, status) if metrics else None
    console = None
    if ui:
        limit = config.body_limit(server.blip_settings)
        console = Console(server, metrics=blip_metrics, token_required=config.token is not None, body_limit=limit)
    extra_routes: list[BaseRoute] = []
    hooks: list[LifespanHook] = []
    exempt = [HEALTH_PATH]
    refusals: dict[str, BodyRefusal] = {}
    if blip_metrics is not None:
        extra_routes.append(blip_metrics.route())

        @asynccontextmanager
        async def metrics_hook(running: BlipMCPServer) -> AsyncIterator[None]:
            async with blip_metrics.running(running.app_context.service):
                yield

        hooks.append(metrics_hook)
    if console is not None:
        extra_routes += console.routes()
        hooks.append(console.running)
        exempt += console.public_paths
        refusals[f"{API_PREFIX}/"] = console.refuse_oversized  # a JSON error (counted), not the SDK's plain 413

    @asynccontextmanager
    async def announce(running: BlipMCPServer) -> AsyncIterator[None]:
        host = f"[{config.host}]" if ":" in config.host else config.host
        if console is not None:
            logger.info("web console: http://%s:%s%s", host, config.port, UI_PATH)
        if blip_metrics is not None:
            logger.info("Prometheus metrics: http://%s:%s%s", host, config.port, METRICS_PATH)
        yield

    hooks.append(announce)
    app = build_http_app(
        server,
        config,
        routes=[*extra_routes, *routes],
        lifespan_hooks=[*hooks, *lifespan_hooks],
        exempt_paths=exempt,
        body_refusals=refusals,
    )
    app.state.metrics = blip_metrics
    app.state.console = console
    return app


__all__ = ["API_PREFIX", "METRICS_PATH", "UI_PATH", "BlipMetrics", "Console", "build_app"]
