"""Fixtures for the metrics and web console tests: one loopback HTTP server (uvicorn in a thread) for the whole
`tests/web` folder, with a token, a private service on the tiny checkpoint, an image index in a temp folder
and a folder of indexed pictures (simple coloured shapes, so screenshots are readable)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from _testlib import serving
from _web_testlib import MAX_IMAGE_BYTES, MAX_QUEUE, SHAPES, TOKEN, Gate, WebServer, poll, shape_image


@pytest.fixture
def anyio_backend() -> str:
    """The SDK's asyncio path (the service bridges its futures with asyncio.wrap_future)."""
    return "asyncio"


@pytest.fixture(scope="session")
def web_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebServer]:
    """`blip-mcp --transport http`'s full app (MCP, /metrics, /ui) on a free loopback port, with a token."""
    import uvicorn

    from blip_tools import Blip2Service, BlipSettings
    from blip_tools.index import ImageIndex
    from blip_tools.testing import tiny_settings_kwargs
    from mcp_server import create_server
    from mcp_server.http import HttpConfig, uvicorn_config
    from mcp_server.web import build_app

    root = tmp_path_factory.mktemp("web")
    allowed = root / "allowed"
    gallery = allowed / "gallery"
    gallery.mkdir(parents=True)
    for i in range(len(SHAPES)):
        shape_image(i).save(gallery / f"{SHAPES[i][0].replace(' ', '-')}.png")
    outside = allowed / "not-indexed.png"
    shape_image(3).save(outside)
    index_path = root / "index" / "index.sqlite"
    settings = BlipSettings(
        **tiny_settings_kwargs(tiny_checkpoint),
        max_wait_ms=2.0,
        max_queue=MAX_QUEUE,
        max_image_bytes=MAX_IMAGE_BYTES,
        allowed_dirs=[allowed],
        index_path=index_path,
    )
    service = Blip2Service(settings).start()
    gate = Gate(service)
    with ImageIndex(index_path, service=service) as index:
        report = index.index(gallery, captions=True)
    assert report.indexed == len(SHAPES), report
    server = create_server(service)
    config = HttpConfig(host="127.0.0.1", port=0, token=TOKEN)
    app = build_app(server, config)
    try:
        with serving(uvicorn.Server(uvicorn_config(app, config))) as port:
            srv = WebServer(
                base=f"http://127.0.0.1:{port}",
                port=port,
                service=service,
                app=app,
                gate=gate,
                gallery_dir=gallery,
                outside_file=outside,
                index_path=index_path,
            )
            srv.artifacts.mkdir(parents=True, exist_ok=True)

            def ready() -> bool:
                with srv.client() as http:
                    return http.get("/healthz").status_code == 200

            poll(ready, what="the model to load")
            try:
                yield srv
            finally:
                gate.open_event.set()  # before the server stops: a held request would hold up its shutdown
    finally:
        service.close()
