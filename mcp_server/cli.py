"""`blip-mcp`: run the blip-tools MCP server over stdio (default) or streamable HTTP.

Flags mirror `BlipSettings`; a flag given wins, `BLIP_*` environment variables apply to the rest.
In stdio mode stdout is claimed for the protocol before anything heavy is imported.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from blip_tools._ctrl_c import caused_by_ctrl_c

if TYPE_CHECKING:
    from pydantic import ValidationError

    from blip_tools.remote import SendFiles
    from blip_tools.settings import BlipSettings

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed so other commands can extend it)."""
    parser = argparse.ArgumentParser(
        prog="blip-mcp",
        description="BLIP-2 image captioning, VQA, scores and embeddings as MCP tools (one shared, batched model).",
    )
    from blip_tools import __version__

    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    model = parser.add_argument_group("model (mirror BLIP_* settings)")
    model.add_argument("--model", help="Captioning checkpoint: hub id or local dir (BLIP_MODEL).")
    model.add_argument("--retrieval-model", help="Retrieval checkpoint for embeddings/scores (BLIP_RETRIEVAL_MODEL).")
    model.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (BLIP_DEVICE).")
    model.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="BLIP_DTYPE.")
    model.add_argument(
        "--allowed-dir",
        action="append",
        dest="allowed_dirs",
        metavar="DIR",
        help="Only read images inside DIR (repeatable; BLIP_ALLOWED_DIRS).",
    )
    model.add_argument(
        "--allow-urls",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Allow http(s) image URLs, public addresses only (BLIP_ALLOW_URLS).",
    )
    model.add_argument("--max-batch-size", type=int, help="Most requests per forward pass (BLIP_MAX_BATCH_SIZE).")
    model.add_argument("--max-wait-ms", type=float, help="Batching wait window when idle (BLIP_MAX_WAIT_MS).")
    model.add_argument("--max-queue", type=int, help="Queued requests before Overloaded (BLIP_MAX_QUEUE).")
    model.add_argument(
        "--demo",
        action="store_true",
        help="Run on a tiny random checkpoint built on first use (for trying the plumbing; captions are noise).",
    )
    transport = parser.add_argument_group("transport")
    transport.add_argument("--transport", choices=["stdio", "http"], default="stdio", help="Default: stdio.")
    transport.add_argument("--host", default="127.0.0.1", help="HTTP bind address (default 127.0.0.1).")
    transport.add_argument("--port", type=int, default=None, help="HTTP port (default 8765; 0 picks a free one).")
    transport.add_argument(
        "--token",
        default=None,
        help="Bearer token for HTTP (prefer BLIP_TOKEN: a flag is visible to other local users). "
        "Required for a non-loopback --host.",
    )
    transport.add_argument(
        "--allowed-host",
        action="append",
        dest="allowed_hosts",
        default=[],
        metavar="NAME",
        help="Extra Host header value to accept over HTTP, e.g. a DNS name (repeatable).",
    )
    transport.add_argument(
        "--max-body-bytes",
        type=int,
        default=None,
        help="HTTP request body limit (default: one base64 image of BLIP_MAX_IMAGE_BYTES plus 256 KiB).",
    )
    transport.add_argument(
        "--session-idle-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="HTTP: forget an MCP session with no request in flight and no stream open for this long "
        "(default 600; the client then starts a new one). Clients without sessions are not affected.",
    )
    transport.add_argument(
        "--max-sessions",
        type=int,
        default=None,
        metavar="N",
        help="HTTP: open MCP sessions at most; one more gets HTTP 503 until one closes or expires (default 1000).",
    )
    transport.add_argument(
        "--client-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="HTTP: time a client has to send a request's headers, and the longest pause within its body, before "
        "it gets 408 and is disconnected (default 30). Calls themselves may take as long as the model needs.",
    )
    remote = parser.add_argument_group("shared daemon (load no model here)")
    remote.add_argument(
        "--connect",
        metavar="URL",
        default=None,
        help="Serve stdio but forward every call to a running `blip-mcp --transport http` daemon at URL "
        "(e.g. http://127.0.0.1:8765/mcp); its token comes from BLIP_TOKEN or --token.",
    )
    remote.add_argument(
        "--send-files",
        choices=["auto", "always", "never"],
        default=None,
        help="With --connect: read image paths here and send their bytes (always), send paths (never), or "
        "send bytes unless the daemon is on loopback (auto). Default: BLIP_REMOTE_SEND_FILES, else auto.",
    )
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return parser


def settings_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The `BlipSettings` values the flags set explicitly (the environment fills in the rest)."""
    values: dict[str, Any] = {}
    if args.demo:
        from blip_tools.testing import ensure_demo_checkpoint, tiny_settings_kwargs

        values.update(tiny_settings_kwargs(ensure_demo_checkpoint()))
    for name in (
        "model",
        "retrieval_model",
        "device",
        "dtype",
        "allowed_dirs",
        "allow_urls",
        "max_batch_size",
        "max_wait_ms",
        "max_queue",
    ):
        value = getattr(args, name)
        if value is not None:
            values[name] = value
    if args.token is not None:
        values["token"] = args.token
    return values


def settings_error(exc: ValidationError) -> str:
    """Invalid settings as one line naming each setting's flag and variable, as `blip-tools` words it.

    e.g. `Invalid settings: max_queue: Input should be greater than or equal to 1 (got 0). Fix --max-queue or
    BLIP_MAX_QUEUE.`
    """
    from blip_tools.params import format_validation_error

    flags = {action.dest: action.option_strings[0] for action in build_parser()._actions if action.option_strings}
    fields = list(dict.fromkeys(str(e["loc"][0]) for e in exc.errors() if e.get("loc")))
    where = [f"{flags[f]} or BLIP_{f.upper()}" if f in flags else f"BLIP_{f.upper()}" for f in fields]
    detail = format_validation_error(exc).removeprefix("Invalid arguments: ")
    return f"Invalid settings: {detail}. Fix {', '.join(where) or 'the BLIP_* variables'}."


def send_files_choice(args: argparse.Namespace, settings: BlipSettings) -> SendFiles:
    """`--send-files` when given, else the `BLIP_REMOTE_SEND_FILES` setting (default `auto`)."""
    return args.send_files if args.send_files is not None else settings.remote_send_files


def _warn_if_allowed_dirs_unused(settings: BlipSettings, send_files: SendFiles) -> None:
    """`--allowed-dir` on a proxy limits only the files it reads; say so when it sends paths instead.

    With `--send-files never` the proxy passes image paths to the daemon as they are, and the daemon's own
    `BLIP_ALLOWED_DIRS` decides what may be read: a host config that gives the proxy `--allowed-dir` would otherwise
    look restricted while it is not. (`auto` reads the files here when allowed directories are set:
    `blip_tools.remote.sends_data`.)
    """
    if settings.allowed_dirs and send_files == "never":
        logger.warning(
            "--allowed-dir / BLIP_ALLOWED_DIRS (%s) limit only the files this proxy reads and sends; with "
            "--send-files never image paths go to the daemon as they are and the daemon's own BLIP_ALLOWED_DIRS "
            "decides what it reads. Set BLIP_ALLOWED_DIRS on the daemon, or drop --send-files never.",
            ":".join(str(d) for d in settings.allowed_dirs),
        )


def _configure_logging(level: str) -> None:
    """Log to stderr (stdout belongs to the protocol in stdio mode); route warnings there too."""
    logging.basicConfig(
        stream=sys.stderr, level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    logging.captureWarnings(True)
    from blip_tools.cli._logging import skip_library_echoes

    skip_library_echoes()  # huggingface_hub prints its warnings itself: once, not twice


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `blip-mcp` / `python -m mcp_server`. Returns the exit status."""
    try:
        return _run(build_parser().parse_args(argv))
    except (KeyboardInterrupt, Exception) as exc:  # Ctrl-C, also during the imports at startup: 130, no traceback
        if not caused_by_ctrl_c(exc):
            raise
        return 130


def _run(args: argparse.Namespace) -> int:
    """Configure, check and serve; imports the heavy parts (the SDK, blip_tools) only here, under `main`'s guard."""
    wire = None
    if args.transport == "stdio":
        from .stdio import claim_stdio, quiet_libraries

        quiet_libraries()
        wire = claim_stdio()
    _configure_logging(args.log_level)

    from pydantic import ValidationError

    from blip_tools.errors import BlipError
    from blip_tools.settings import BlipSettings

    try:
        settings = BlipSettings(**settings_kwargs(args)).for_server()
    except ValidationError as exc:
        logger.error("%s", settings_error(exc))
        return 2
    except BlipError as exc:
        logger.error("%s", exc)
        return 2

    if args.send_files is not None and not args.connect:
        logger.error("--send-files applies only with --connect (a proxy); BLIP_REMOTE_SEND_FILES sets it for clients")
        return 2
    if args.connect:
        if wire is None:
            logger.error("--connect serves stdio; drop --transport http (the daemon is the HTTP server)")
            return 2
        from .proxy import run_proxy

        send_files = send_files_choice(args, settings)
        _warn_if_allowed_dirs_unused(settings, send_files)
        return run_proxy(args.connect, settings, wire, send_files=send_files)

    config = None
    if wire is None:
        from .http import (
            DEFAULT_CLIENT_TIMEOUT_S,
            DEFAULT_MAX_SESSIONS,
            DEFAULT_PORT,
            DEFAULT_SESSION_IDLE_TIMEOUT_S,
            HttpConfig,
        )

        config = HttpConfig(
            host=args.host,
            port=DEFAULT_PORT if args.port is None else args.port,
            token=settings.token,
            allowed_hosts=list(args.allowed_hosts),
            max_body_bytes=args.max_body_bytes,
            session_idle_timeout_s=(
                DEFAULT_SESSION_IDLE_TIMEOUT_S if args.session_idle_timeout is None else args.session_idle_timeout
            ),
            max_sessions=DEFAULT_MAX_SESSIONS if args.max_sessions is None else args.max_sessions,
            client_timeout_s=DEFAULT_CLIENT_TIMEOUT_S if args.client_timeout is None else args.client_timeout,
        )
        try:
            config.check()  # e.g. a non-loopback bind without a token: refuse before loading anything
        except BlipError as exc:
            logger.error("%s", exc)
            return 2

    from .server import create_server

    server = create_server(settings)
    try:
        if wire is not None:
            import anyio

            from .stdio import serve_stdio

            anyio.run(serve_stdio, server, wire)
        else:
            from .http import run_http

            assert config is not None
            return run_http(server, config)
    except BlipError as exc:
        logger.error("%s", exc)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
