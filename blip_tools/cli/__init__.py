"""`blip-tools` command line: one argparse program whose subcommands live in small modules.

Each module in `_COMMAND_MODULES` exposes `register(subparsers)`, adding its subcommands with a `handler`
default that takes the parsed arguments and returns an exit code.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from .. import __version__
from .._ctrl_c import caused_by_ctrl_c
from ..errors import BlipError
from ._logging import skip_library_echoes

_COMMAND_MODULES = ["core", "collections", "finetune", "bench", "ray"]


def build_parser() -> argparse.ArgumentParser:
    """The full parser with every registered subcommand."""
    parser = argparse.ArgumentParser(
        prog="blip-tools",
        description="Caption images, answer questions about them and search them locally with BLIP-2.",
        epilog="With BLIP_REMOTE_URL set, caption, ask, index, search, duplicates and locate use that shared "
        "blip-mcp daemon's model instead of loading one (--local overrides; an index file stays on this machine); "
        "finetune, bench, serve-ray and tiny-checkpoint always work in this process.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress to stderr")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in _COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `blip-tools` console script."""
    restore = _tolerant_output()
    try:
        code = _run(argv)
        if sys.stdout is not None:  # None when started with stdout closed (`>&-`): print() writes nowhere then
            sys.stdout.flush()  # here, not at exit, so a reader that went away is noticed below
        return code
    except BrokenPipeError:
        return _output_closed()
    except (KeyboardInterrupt, Exception) as exc:  # also in the imports before a command runs (Ctrl-C at startup)
        if not caused_by_ctrl_c(exc):
            raise
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        restore()


def _tolerant_output() -> Callable[[], None]:
    """Let stdout and stderr write any text: what their encoding cannot hold becomes a `\\xe9`-style escape.

    Under `PYTHONIOENCODING=ascii` or a Latin-1 locale a file name like `café.jpg` would otherwise end the command
    with a UnicodeEncodeError (stderr already escapes; stdout does not). Only this process's own streams change,
    and only while the command runs (returns the undo); a stream that cannot be reconfigured (not a text file)
    is left as it is. JSON output escapes such characters itself (`_common.print_json`), so it stays valid.
    """
    undo: list[tuple[Any, str | None]] = []
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is None or getattr(stream, "errors", None) == "backslashreplace":
            continue
        with contextlib.suppress(Exception):  # closed, not a TextIOWrapper after all: keep it as it is
            previous = stream.errors
            reconfigure(errors="backslashreplace")
            undo.append((stream, previous))

    def restore() -> None:
        for stream, previous in undo:
            with contextlib.suppress(Exception):  # a reader gone away: nothing to put back that matters
                stream.reconfigure(errors=previous)

    return restore


_SIGPIPE_STATUS = 141
"""128 + SIGPIPE: what a shell reports for a command whose reader went away (`... | head -1`)."""


def _output_closed() -> int:
    """The reader of stdout (or stderr) went away: stop quietly, as command-line tools do.

    What is still buffered for the closed pipe would fail again when Python flushes it at exit, with an
    "Exception ignored" message, so both streams are pointed at /dev/null first.
    """
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):  # not a real file: nothing to flush there
                os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)
    return _SIGPIPE_STATUS


def _configure_logging(verbose: bool) -> None:
    """Log to stderr (INFO with -v, else WARNING), each line once."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    skip_library_echoes()  # huggingface_hub prints its warnings itself: once, not twice


def _run(argv: Sequence[str] | None) -> int:
    """Parse and run one command; its heavy imports happen here, under `main`'s guard."""
    from pydantic import ValidationError

    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args.verbose)
    try:
        code: int = args.handler(args)
    except BlipError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValidationError as exc:
        if exc.title != "BlipSettings":  # only settings read from the environment are the user's to fix
            raise
        from ._common import settings_error

        print(f"error: {settings_error(exc)}", file=sys.stderr)
        return 2
    return code


__all__ = ["build_parser", "main"]
