"""What a new user following README.md ran into (helper-56's walkthrough), checked on the programs themselves."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BLIP_")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def test_blip_mcp_invalid_settings_name_the_flag_and_the_variable() -> None:
    # A host config with a bad value (flag or `env`) shows one line in the host's MCP log that says what to fix,
    # as `blip-tools` does; it used to read "invalid settings: Invalid arguments: max_batch_size: ...".
    run = subprocess.run(
        [sys.executable, "-m", "mcp_server", "--transport", "http", "--port", "0", "--max-batch-size", "0"],
        env=_env(BLIP_MAX_QUEUE="0"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert "Invalid settings: max_batch_size: Input should be greater than or equal to 1 (got 0)" in run.stderr
    assert "Fix --max-batch-size or BLIP_MAX_BATCH_SIZE, --max-queue or BLIP_MAX_QUEUE." in run.stderr
    assert "Invalid arguments" not in run.stderr
    assert run.stderr.count("\n") == 1, run.stderr


_ECHO_CHECK = """
import logging, sys
{configure}
import huggingface_hub.utils.logging  # adds huggingface_hub's own stderr handler, as loading a model does
logging.getLogger("huggingface_hub.utils._http").warning("Retrying in 1s [Retry 1/5].")
logging.getLogger("blip_tools.runtime").warning("a blip-tools warning")
"""


@pytest.mark.parametrize(
    "configure",
    [
        "from blip_tools.cli import _configure_logging; _configure_logging(False)",
        "from blip_tools.cli import _configure_logging; _configure_logging(True)",
        "from mcp_server.cli import _configure_logging; _configure_logging('INFO')",
    ],
    ids=["blip-tools", "blip-tools -v", "blip-mcp"],
)
def test_hub_warnings_are_printed_once(configure: str) -> None:
    # With the hub unreachable (no network, or a mistyped model name) every retry warning of huggingface_hub
    # used to appear twice: once from its own handler, once from ours.
    code = textwrap.dedent(_ECHO_CHECK).format(configure=configure)
    run = subprocess.run(
        [sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert run.returncode == 0, run.stderr
    assert run.stderr.count("Retrying in 1s [Retry 1/5].") == 1, run.stderr
    assert run.stderr.count("a blip-tools warning") == 1, run.stderr


def test_a_library_without_its_own_handler_is_still_logged() -> None:
    import logging

    from blip_tools.cli._logging import SkipLibraryEchoes

    top = logging.getLogger("huggingface_hub")
    saved = top.handlers[:]
    try:
        for handler in saved:
            top.removeHandler(handler)
        record = logging.LogRecord("huggingface_hub.utils._http", logging.WARNING, __file__, 1, "x", None, None)
        assert SkipLibraryEchoes().filter(record)
        top.addHandler(logging.NullHandler())
        assert not SkipLibraryEchoes().filter(record)
        other = logging.LogRecord("huggingface_hubx", logging.WARNING, __file__, 1, "x", None, None)
        assert SkipLibraryEchoes().filter(other)
    finally:
        for handler in top.handlers[:]:
            top.removeHandler(handler)
        for handler in saved:
            top.addHandler(handler)


@pytest.mark.parametrize(
    ("args", "warned"),
    [
        (["--connect", "http://127.0.0.1:9/mcp", "--allowed-dir", "/tmp", "--send-files", "never"], True),
        (["--connect", "http://192.0.2.1:9/mcp", "--allowed-dir", "/tmp", "--send-files", "never"], True),
        (["--connect", "http://127.0.0.1:9/mcp", "--allowed-dir", "/tmp"], False),  # auto: files read (checked) here
        (["--connect", "http://127.0.0.1:9/mcp", "--send-files", "never"], False),
    ],
)
def test_proxy_says_when_its_allowed_dirs_do_not_apply(args: list[str], warned: bool) -> None:
    # With --send-files never the proxy sends paths unchecked and the daemon's own BLIP_ALLOWED_DIRS decides.
    run = subprocess.run(
        [sys.executable, "-m", "mcp_server", *args],
        env=_env(),
        stdin=subprocess.DEVNULL,  # the host closes stdin at once: the proxy starts and ends (exit 0)
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    assert ("limit only the files this proxy reads" in run.stderr) is warned, run.stderr
    if "--allowed-dir" in args and not warned:
        assert "image files are read here and sent" in run.stderr  # what the proxy logs it does


@pytest.fixture
def loopback_daemon(tiny_checkpoint: Path) -> Iterator[str]:
    """A `blip-mcp --transport http` daemon on the tiny checkpoint, on a free loopback port: its MCP URL."""
    models = ["--model", str(tiny_checkpoint / "captioner"), "--retrieval-model", str(tiny_checkpoint / "retrieval")]
    daemon = subprocess.Popen(
        [sys.executable, "-m", "mcp_server", "--transport", "http", "--port", "0", *models],
        env=_env(),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert daemon.stderr is not None
        for line in daemon.stderr:  # "... blip-mcp HTTP ready on 127.0.0.1:PORT/mcp (...)"
            found = re.search(r"HTTP ready on (127\.0\.0\.1:\d+/mcp)", line)
            if found:
                break
        else:
            pytest.fail(f"the daemon never got ready (exit status {daemon.wait(timeout=30)})")
        threading.Thread(target=daemon.stderr.read, daemon=True).start()  # keep its log pipe drained
        yield f"http://{found.group(1)}"
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


def test_cli_allowed_dir_applies_with_a_daemon_on_loopback(tmp_path: Path, loopback_daemon: str) -> None:
    # `blip-tools caption IMG --allowed-dir DIR` with BLIP_REMOTE_URL on loopback (BLIP_REMOTE_SEND_FILES auto)
    # sent the path to the daemon unchecked, so an image outside DIR was captioned; now it is read (and refused)
    # here, and an image inside DIR is still captioned by the daemon.
    from PIL import Image

    inside, outside = tmp_path / "inside", tmp_path / "outside.png"
    inside.mkdir()
    Image.new("RGB", (8, 8)).save(outside)
    Image.new("RGB", (8, 8)).save(inside / "in.png")
    for flags, env in (
        (["--allowed-dir", str(inside)], {}),
        ([], {"BLIP_ALLOWED_DIRS": str(inside)}),
    ):
        for image, status in ((outside, 1), (inside / "in.png", 0)):
            run = subprocess.run(
                [sys.executable, "-m", "blip_tools", "caption", str(image), *flags],
                env=_env(BLIP_REMOTE_URL=loopback_daemon, **env),
                capture_output=True,
                text=True,
                timeout=120,
                cwd=tmp_path,
            )
            assert run.returncode == status, run.stderr
            assert ("outside the allowed directories" in run.stderr) is (status == 1), run.stderr


async def test_proxy_allowed_dir_applies_with_a_daemon_on_loopback(tmp_path: Path, loopback_daemon: str) -> None:
    # README's proxy host config: `blip-mcp --connect URL --allowed-dir DIR` with the daemon on loopback. Under
    # send_files auto the proxy sent paths unchecked, so the model read an image outside DIR; now it reads the
    # files itself (checked) and sends their bytes.
    from mcp import Client
    from mcp.client.stdio import StdioServerParameters, stdio_client
    from PIL import Image

    inside, outside = tmp_path / "inside", tmp_path / "outside.png"
    inside.mkdir()
    Image.new("RGB", (8, 8)).save(outside)
    Image.new("RGB", (8, 8)).save(inside / "in.png")
    proxy = StdioServerParameters(
        command=sys.executable,
        args=["-m", "mcp_server", "--connect", loopback_daemon, "--allowed-dir", str(inside)],
        env=_env(),
    )
    async with Client(stdio_client(proxy)) as client:
        refused = await client.call_tool("caption_image", {"image": str(outside)})
        assert refused.is_error
        assert refused.content[0].text.startswith("[path_not_allowed]"), refused.content  # type: ignore[union-attr]
        captioned = await client.call_tool("caption_image", {"image": str(inside / "in.png")})
        assert not captioned.is_error, captioned.content


@pytest.mark.skipif(sys.platform != "linux", reason="needs a file system that takes any bytes in a name")
def test_caption_names_a_file_with_non_utf8_bytes_as_the_index_does(tmp_path: Path, tiny_checkpoint: Path) -> None:
    # Text showed `caf\udce9.jpg` and --json `caf?.jpg` (the file could not be told apart); the index shows the
    # byte as `\xe9`. Now all three agree.
    from PIL import Image

    folder = tmp_path / "odd"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(os.path.join(os.fsencode(folder), b"caf\xe9.png"), format="PNG")
    env = _env(BLIP_MODEL=str(tiny_checkpoint / "captioner"), BLIP_RETRIEVAL_MODEL=str(tiny_checkpoint / "retrieval"))
    for extra in ([], ["--json"]):
        run = subprocess.run(
            [sys.executable, "-m", "blip_tools", "caption", "odd", *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr
        if extra:
            assert json.loads(run.stdout)[0]["image"]["source"] == "odd/caf\\xe9.png"
        else:
            assert run.stdout.startswith("odd/caf\\xe9.png: "), run.stdout
