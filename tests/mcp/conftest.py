"""Fixtures for the MCP server tests: images, a loopback HTTP server (uvicorn in a thread, one per session)
and a raw stdio subprocess (one per session) whose stdout is recorded.

MCP tests use anyio's pytest plugin (`pytest.mark.anyio`) on the asyncio backend: the SDK's client and
pytest-asyncio async fixtures do not mix (cancel scopes exited in another task).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _mcp_testlib import (
    HTTP_MAX_IMAGE_BYTES,
    REPO,
    TOKEN,
    Gate,
    HttpServer,
    RawStdio,
    make_service,
    serving,
    write_image,
)


@pytest.fixture
def anyio_backend() -> str:
    """The SDK's asyncio path (the service bridges its futures with asyncio.wrap_future)."""
    return "asyncio"


@pytest.fixture(scope="session")
def mcp_images(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Absolute paths of four distinct PNG images."""
    folder = tmp_path_factory.mktemp("mcp_images")
    return [str(write_image(folder / f"img{i}.png", 300 + i)) for i in range(4)]


@pytest.fixture(scope="session")
def http_server(tiny_checkpoint: Path) -> Iterator[HttpServer]:
    """`blip-mcp --transport http` in-process: uvicorn in a thread on a free loopback port, with a token."""
    import uvicorn

    from mcp_server import create_server
    from mcp_server.http import HttpConfig, build_http_app, uvicorn_config

    service = make_service(tiny_checkpoint, max_wait_ms=2.0, max_image_bytes=HTTP_MAX_IMAGE_BYTES)
    gate = Gate(service)
    server = create_server(service)
    config = HttpConfig(host="127.0.0.1", port=0, token=TOKEN)
    app = build_http_app(server, config)
    try:
        with serving(uvicorn.Server(uvicorn_config(app, config))) as port:
            yield HttpServer(
                base=f"http://127.0.0.1:{port}",
                port=port,
                token=TOKEN,
                service=service,
                gate=gate,
                server=server,
                body_limit=app.state.body_limit,
            )
    finally:
        service.close()


# ------------------------------------------------------------------------------------------ stdio subprocess
@pytest.fixture(scope="session")
def stdio_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RawStdio]:
    """`python tests/mcp/_noisy_server.py --model <tiny>` over real pipes, initialized.

    The wrapper makes every caption emit print/stdout/fd-1/child-process/warnings/logging noise first,
    so the recorded stdout proves that only protocol reaches the wire.
    """
    from blip_tools.testing import tiny_settings_kwargs

    kw = tiny_settings_kwargs(tiny_checkpoint)
    stderr_path = tmp_path_factory.mktemp("stdio") / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONWARNINGS"] = "always"
    cmd = [
        sys.executable,
        str(Path(__file__).with_name("_noisy_server.py")),
        "--model",
        kw["model"],
        "--retrieval-model",
        kw["retrieval_model"],
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--allowed-dir",
        str(Path(tmp_path_factory.getbasetemp())),
    ]
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, cwd=REPO, env=env)
    raw = RawStdio(proc=proc, stderr_path=stderr_path)
    raw.start_reader()
    try:
        init = raw.request(
            "initialize",
            {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw-test", "version": "0"}},
        )
        assert init["result"]["serverInfo"]["name"] == "blip-tools", init
        raw.send({"jsonrpc": "2.0", "method": "notifications/initialized"})
        yield raw
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
