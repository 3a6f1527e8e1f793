"""Options every model-using subcommand shares, and how they become `BlipSettings`."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pydantic import ValidationError

from ..errors import InvalidInput
from ..images import ImageInput
from ..params import format_validation_error
from ..service import Blip2Service
from ..settings import BlipSettings


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that an epilog starting with `examples:` keeps its lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--device`, `--dtype`, `--demo`, ... mirroring `BlipSettings`."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", help="captioning checkpoint: hub id or local folder (BLIP_MODEL)")
    g.add_argument("--retrieval-model", help="retrieval checkpoint for embeddings/search (BLIP_RETRIEVAL_MODEL)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (BLIP_DEVICE)")
    g.add_argument(
        "--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="weights' precision (BLIP_DTYPE)"
    )
    g.add_argument(
        "--max-batch-size", type=int, metavar="N", help="most requests in one forward pass (BLIP_MAX_BATCH_SIZE)"
    )
    g.add_argument(
        "--allowed-dir",
        action="append",
        dest="allowed_dirs",
        metavar="DIR",
        help="image paths must lie inside DIR (repeatable; BLIP_ALLOWED_DIRS)",
    )
    g.add_argument(
        "--allow-urls", action="store_true", default=None, help="allow public http(s) image URLs (BLIP_ALLOW_URLS)"
    )
    g.add_argument(
        "--demo",
        action="store_true",
        help="run on a tiny random checkpoint built on the fly (no download; output is gibberish)",
    )


def settings_from_args(args: argparse.Namespace, *, demo: bool = True) -> BlipSettings:
    """Flags override `BLIP_*` environment settings; `--demo` points at the tiny checkpoint (built if need be)."""
    overrides: dict[str, Any] = {}
    if demo and getattr(args, "demo", False):
        from ..testing import ensure_demo_checkpoint, tiny_settings_kwargs

        overrides.update(tiny_settings_kwargs(ensure_demo_checkpoint()))
    for name in _FLAGS:
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    try:
        return BlipSettings(**overrides)
    except ValidationError as exc:
        raise settings_error(exc) from None


_FLAGS = {
    "model": "--model",
    "retrieval_model": "--retrieval-model",
    "device": "--device",
    "dtype": "--dtype",
    "max_batch_size": "--max-batch-size",
    "allowed_dirs": "--allowed-dir",
    "allow_urls": "--allow-urls",
}
"""Settings the model options set, and their flags."""


def settings_error(exc: ValidationError) -> InvalidInput:
    """Invalid `BlipSettings` (a flag or a `BLIP_*` variable) as one line naming the setting and where it is set.

    e.g. `Invalid settings: max_batch_size: Input should be greater than or equal to 1 (got 0). Fix
    --max-batch-size or BLIP_MAX_BATCH_SIZE.`
    """
    fields = list(dict.fromkeys(str(e["loc"][0]) for e in exc.errors() if e.get("loc")))
    where = [f"{_FLAGS[f]} or BLIP_{f.upper()}" if f in _FLAGS else f"BLIP_{f.upper()}" for f in fields]
    detail = format_validation_error(exc).removeprefix("Invalid arguments: ")
    return InvalidInput(f"Invalid settings: {detail}. Fix {', '.join(where) or 'the BLIP_* variables'}.")


_LOCAL_MODEL_FLAGS = {**{k: v for k, v in _FLAGS.items() if k not in ("allowed_dirs", "allow_urls")}, "demo": "--demo"}
"""Flags that configure a model loaded in this process (meaningless for a shared daemon's model)."""


def add_remote_option(parser: argparse.ArgumentParser) -> None:
    """`--local`, for commands that use a shared `blip-mcp` daemon when `BLIP_REMOTE_URL` is set."""
    parser.add_argument(
        "--local",
        action="store_true",
        help="load the model in this process even when BLIP_REMOTE_URL names a shared blip-mcp daemon",
    )


def service_from_args(args: argparse.Namespace, *, remote: bool = False, files_read_here: bool = False) -> Blip2Service:
    """The service a command calls, built from the flags.

    With `remote` (commands that need only what a `RemoteService` offers), `BLIP_REMOTE_URL` set and no
    `--local`, it is the shared daemon's client (`blip_tools.remote.default_service`); `--allowed-dir` and
    `--allow-urls` then apply to the files read here. Otherwise a local service, installed as the process-wide
    shared one.

    `files_read_here` is for commands that read their image files here anyway (the index hashes every file):
    with `BLIP_REMOTE_SEND_FILES=auto` the daemon then gets the files' contents even on loopback, so it needs no
    access to them (its own allowed_dirs, its container's mounts) and a path it may not read cannot turn into a
    failure recorded against the file. `never` still sends paths.
    """
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    remote = remote and not getattr(args, "local", False)
    settings = settings_from_args(args, demo=not remote)  # a daemon's client needs no demo checkpoint built
    if remote and settings.remote_url:
        if files_read_here and settings.remote_send_files == "auto":
            settings = settings.model_copy(update={"remote_send_files": "always"})
        given = [flag for name, flag in _LOCAL_MODEL_FLAGS.items() if getattr(args, name, None) not in (None, False)]
        if given:
            verb, them = ("configures", "it") if len(given) == 1 else ("configure", "them")
            raise InvalidInput(
                f"{', '.join(given)} {verb} a model loaded here, but BLIP_REMOTE_URL sends this command to the "
                f"blip-mcp daemon at {settings.remote_url}, which runs its own. Add --local to load the model here, "
                f"or drop {them}."
            )
        from ..remote import default_service

        return default_service(settings)
    if remote and getattr(args, "demo", False):
        settings = settings_from_args(args)
    service = Blip2Service(settings)
    Blip2Service.set_shared(service)
    return service


def as_cli_image(ref: str) -> str:
    """An image argument as the loader should read it: a bare name that exists here is that file or folder.

    The loader reads a bare name without `/` or an extension (`cat`, `photos`) as base64; on a command line a
    name that exists in the working directory means that file, so it becomes `./name` (and a folder then gets
    the loader's "is a directory" message instead of "not a recognised image").
    """
    from ..images import _classify

    if _classify(ref) != "base64" or len(ref) > 255 or "\0" in ref:
        return ref
    try:
        return os.path.join(os.curdir, ref) if os.path.lexists(ref) else ref
    except (OSError, ValueError):
        return ref


def check_image_first(service: Blip2Service, image: ImageInput) -> None:
    """Load one image argument before a local model loads, so a mistyped path fails at once.

    The model loads before the first image is read, which takes a while even for a small checkpoint (and starts
    a download of several GB for a hub model not cached yet). A daemon's model is already loaded, and with
    `BLIP_REMOTE_SEND_FILES=never` a path is the daemon's to read, so a daemon's client checks nothing here.
    """
    if service.settings.remote_url:
        from ..remote import RemoteService

        if isinstance(service, RemoteService):
            return
    from ..images import load_image

    load_image(image, service.settings)
