"""`blip-mcp --connect`: its flags follow the rule every other flag follows: a flag you give wins, otherwise the
`BLIP_*` setting applies (here `--send-files` and `BLIP_REMOTE_SEND_FILES`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blip_tools import BlipSettings
from mcp_server.cli import build_parser, send_files_choice

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("flags", "setting", "expected"),
    [
        ([], "auto", "auto"),
        ([], "never", "never"),
        ([], "always", "always"),
        (["--send-files", "always"], "never", "always"),
        (["--send-files", "auto"], "never", "auto"),
    ],
)
def test_send_files_flag_wins_else_the_setting_applies(flags: list[str], setting: str, expected: str) -> None:
    args = build_parser().parse_args(["--connect", "http://127.0.0.1:9/mcp", *flags])
    assert send_files_choice(args, BlipSettings(remote_send_files=setting)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(("flags", "expected"), [([], "never"), (["--send-files", "always"], "always")])
def test_the_proxy_runs_with_blip_remote_send_files(flags: list[str], expected: str) -> None:
    """The real command: the proxy says at start-up which mode it forwards with (stdin closed: it exits)."""
    env = {**os.environ, "BLIP_REMOTE_SEND_FILES": "never", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mcp_server", "--connect", "http://127.0.0.1:9/mcp", "--log-level", "INFO", *flags],
        input=b"",
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.stdout == b""  # nothing but protocol on stdout, and no protocol was asked for
    assert f"send_files={expected}".encode() in done.stderr, done.stderr.decode(errors="replace")[-2000:]


def test_send_files_without_connect_is_refused() -> None:
    """`--send-files` only means something to the proxy: without `--connect` it is an error, not silently ignored."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "mcp_server", "--send-files", "always"],
        input=b"",
        capture_output=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2
    assert done.stdout == b""
    assert b"--send-files applies only with --connect" in done.stderr


def test_proxy_errors_keep_the_retry_hint_of_an_overload() -> None:
    """The proxy formats errors as the daemon's tools do, so an `Overloaded` keeps its "retry after" hint."""
    from blip_tools.errors import Overloaded
    from mcp_server._common import error_message
    from mcp_server.proxy import error_result

    exc = Overloaded("the daemon's queue is full", retry_after_s=2.5)
    result = error_result(exc)
    assert result.is_error
    text = result.content[0].text  # type: ignore[union-attr]
    assert text == error_message(exc)
    assert text.startswith("[overloaded] ") and "Retry after 2.5 s." in text
