"""The image index through the other interfaces: a damaged index file in MCP, LangChain and the CLI, and index
runs over a `RemoteService` (a daemon's client), which get the bytes the index read instead of the paths."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest
from langchain_core.messages import ToolMessage
from PIL import Image
from test_remote import TOKEN, Daemon

from blip_tools import Blip2Service, BlipSettings
from blip_tools.cli import main
from blip_tools.errors import IndexDamaged
from blip_tools.index import ImageIndex
from blip_tools.remote import RemoteService
from blip_tools.testing import tiny_settings_kwargs


def _folder(root: Path, seeds: range) -> Path:
    root.mkdir(parents=True)
    for seed in seeds:
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8), "RGB").save(root / f"r{seed}.png")
    return root


@pytest.fixture
def damaged(tmp_path: Path) -> Path:
    """An index file that is not a SQLite database at all."""
    db = tmp_path / "damaged.sqlite"
    db.write_bytes(b"hello world" * 100)
    return db


@pytest.fixture
def damaged_service(tiny_checkpoint: Path, damaged: Path) -> Iterator[Blip2Service]:
    """A private service whose default index (`BLIP_INDEX_PATH`) is the damaged file; no model is ever loaded."""
    with Blip2Service(BlipSettings(**tiny_settings_kwargs(tiny_checkpoint), index_path=damaged)) as service:
        yield service


# ---------------------------------------------------------------------------------------------- damaged file
@pytest.mark.anyio
async def test_mcp_tools_report_index_damaged(damaged_service: Blip2Service, tmp_path: Path) -> None:
    from mcp import Client

    from mcp_server import create_server

    pics = _folder(tmp_path / "pics", range(2))
    with anyio.fail_after(60):
        async with Client(create_server(damaged_service)) as client:
            search = await client.call_tool("search_images", {"query": "a dog", "top_k": 3})
            index = await client.call_tool("index_images", {"directory": str(pics)})
    for result in (search, index):
        text = "\n".join(b.text for b in result.content if getattr(b, "type", "") == "text")
        assert result.is_error and "[index_damaged]" in text and "Delete it" in text, text


def test_langchain_tools_report_index_damaged(damaged_service: Blip2Service, tmp_path: Path) -> None:
    from langchain_core.tools import ToolException

    from blip_tools.langchain.collection_tools import IndexImagesTool, SearchImagesTool

    call = {"name": "search_images", "args": {"query": "a dog"}, "id": "call-1", "type": "tool_call"}
    message = SearchImagesTool(service=damaged_service).invoke(call)
    assert isinstance(message, ToolMessage) and message.status == "error"
    assert "is damaged or is not a blip-tools index" in str(message.content)
    tool = IndexImagesTool(service=damaged_service, handle_tool_error=False)
    with pytest.raises(ToolException) as caught:
        tool.invoke({"directory": str(_folder(tmp_path / "pics", range(1)))})
    assert isinstance(caught.value.__cause__, IndexDamaged)


@pytest.mark.parametrize("command", ["search", "index"])
def test_cli_reports_a_damaged_index_with_exit_code_2(
    tiny_checkpoint: Path,
    damaged: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    for name in ("BLIP_REMOTE_URL", "BLIP_ALLOWED_DIRS", "BLIP_INDEX_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in tiny_settings_kwargs(tiny_checkpoint).items():
        monkeypatch.setenv(f"BLIP_{name.upper()}", value)
    previous = Blip2Service._shared
    try:
        what = "a dog" if command == "search" else str(_folder(tmp_path / "pics", range(1)))
        code = main([command, what, "--index", str(damaged)])
    finally:
        Blip2Service.set_shared(previous)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert err.startswith(f"error: The image index {damaged} is damaged or is not a blip-tools index"), err


# ---------------------------------------------------------------------------------------------- remote service
@pytest.fixture(scope="module")
def daemon_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The only folder the daemon may read."""
    return _folder(tmp_path_factory.mktemp("daemon") / "pics", range(20, 24))


@pytest.fixture(scope="module")
def index_daemon(tiny_checkpoint: Path, daemon_dir: Path) -> Iterator[Daemon]:
    settings = BlipSettings(**tiny_settings_kwargs(tiny_checkpoint), max_wait_ms=2.0, allowed_dirs=[daemon_dir])
    daemon = Daemon(settings)
    daemon.start()
    yield daemon
    daemon.close()


def test_remote_index_run_sends_the_bytes_it_read(index_daemon: Daemon, tmp_path: Path, reads: Counter[str]) -> None:
    pics = _folder(tmp_path / "mine", range(30, 34))  # outside the daemon's allowed dir: it could not read them
    (pics / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with (
        RemoteService(index_daemon.url, token=TOKEN, settings=BlipSettings()) as remote,
        ImageIndex(tmp_path / "remote.sqlite", service=remote) as index,
    ):
        assert not remote.sends_data  # loopback "auto" would send paths; the index sends the bytes it read
        report = index.index(pics)
        assert (report.embedded, report.captioned, report.failed, report.indexed) == (4, 4, 1, 4)
        assert len(reads) == 5 and set(reads.values()) == {1}
        failure = report.errors[0]
        assert failure.path.endswith("broken.png") and "broken.png" in failure.error, failure
        # (A search by an example path would send the path: the daemon may not read it. Its bytes work.)
        similar = index.search(image=(pics / "r31.png").read_bytes(), top_k=1)
        assert similar.hits[0].path == str((pics / "r31.png").resolve())


def test_remote_told_to_send_paths_gets_paths(
    index_daemon: Daemon, daemon_dir: Path, tmp_path: Path, reads: Counter[str]
) -> None:
    remote = RemoteService(index_daemon.url, token=TOKEN, settings=BlipSettings(), send_files="never")
    with remote, ImageIndex(tmp_path / "never.sqlite", service=remote) as index:
        report = index.index(daemon_dir, captions=False)
    assert (report.embedded, report.failed) == (4, 0)
    assert set(reads.values()) == {2}  # hashed here, then read by the daemon (in this process) from the path
