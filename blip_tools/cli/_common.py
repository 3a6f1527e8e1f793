"""Options every model-using subcommand shares, and how they become `BlipSettings`."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ..errors import BlipError, InvalidInput
from ..images import ImageInput
from ..params import format_validation_error
from ..service import Blip2Service
from ..settings import BlipSettings

if TYPE_CHECKING:
    from PIL import Image

    from ..images import LoadedImage


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
    failure recorded against the file. With allowed directories set here (`--allowed-dir`, `BLIP_ALLOWED_DIRS`)
    every command reads its files here under `auto`, so they apply (`blip_tools.remote.sends_data`). `never`
    still sends paths.
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


STDIN = "-"
"""The image argument that means "the image bytes piped to stdin"."""

STDIN_LABEL = "<stdin>"
"""How the output names the image read from stdin."""


def check_stdin(refs: Sequence[str]) -> bool:
    """Whether the image arguments read stdin (`-`); a usage error when `-` is given twice or stdin is a terminal.

    Checked before anything loads, so `blip-tools caption -` typed without a pipe fails at once instead of
    waiting for input that is not coming.
    """
    count = sum(ref == STDIN for ref in refs)
    if count > 1:
        raise InvalidInput(
            f"`-` (the image on stdin) was given {count} times; stdin holds one image. For a file named -, write ./-."
        )
    if not count:
        return False
    stdin = sys.stdin
    try:
        interactive = stdin is None or stdin.isatty()
    except (OSError, ValueError):  # closed
        interactive = True
    if interactive:
        raise InvalidInput(
            "`-` reads the image from stdin, but stdin is a terminal (or closed): pipe the image in, e.g. "
            "`cat photo.jpg | blip-tools caption -`. For a file named -, write ./-."
        )
    return True


def read_stdin_image(settings: BlipSettings) -> bytes:
    """The image bytes piped to stdin, read in binary and capped like any image (`BLIP_MAX_IMAGE_BYTES`)."""
    from ..images import read_stream

    return read_stream(sys.stdin.buffer, settings, STDIN_LABEL)


def check_image_first(service: Blip2Service, image: ImageInput) -> LoadedImage | None:
    """Load one image argument before a local model loads, so a mistyped path fails at once.

    The model loads before the first image is read, which takes a while even for a small checkpoint (and starts
    a download of several GB for a hub model not cached yet). A daemon's model is already loaded, and with
    `BLIP_REMOTE_SEND_FILES=never` a path is the daemon's to read, so a daemon's client checks nothing here
    (None).

    Returns the loaded image: give the service `handed_on(loaded)` instead of the argument, so a file is read
    and decoded (a URL fetched) once, and put `loaded.info.source` back into the result (`relabel`).
    """
    if _daemon_client(service):
        return None
    from ..images import load_image

    return load_image(image, service.settings)


def check_images_first(service: Blip2Service, images: Sequence[ImageInput]) -> list[LoadedImage | BlipError | None]:
    """`check_image_first` for the image arguments of one command, each one's loaded image or error (None: the
    service reads it).

    One image is loaded. Of several, none is read here, unless every one is a local file that does not exist
    (one stat each): then each is checked, so a command whose images are all mistyped fails without loading
    the model, and a normal run reads each image once, in the service.
    """
    if len(images) > 1 and not all(_missing_file(image) for image in images):
        return [None] * len(images)
    checked: list[LoadedImage | BlipError | None] = []
    for image in images:
        try:
            checked.append(check_image_first(service, image))
        except BlipError as exc:
            checked.append(exc)
    return checked


def handed_on(loaded: LoadedImage) -> Image.Image:
    """The checked image as the service takes it again, without decoding (or fetching) it a second time.

    Its orientation is applied already and its alpha composited, so its metadata goes: the service would apply
    the EXIF orientation a PIL image carries once more.
    """
    loaded.image.info.clear()
    return loaded.image


def image_argument(service: Blip2Service, ref: str, *, stdin: bool) -> tuple[ImageInput, str | None]:
    """A command's one image argument (`-`: the bytes on stdin), read before a local model loads and handed on.

    Returns what to give the service and how its result should name the image (`relabel`; None: as the service
    names it). Read and decoded (a URL fetched) once: a mistyped path fails before the model loads.
    """
    image: ImageInput = read_stdin_image(service.settings) if stdin else as_cli_image(ref)
    source = STDIN_LABEL if stdin else None
    loaded = check_image_first(service, image)
    if loaded is None:  # a daemon's client: the daemon reads it
        return image, source
    return handed_on(loaded), source or loaded.info.source


def relabel(result: Any, source: str) -> Any:
    """`result` (caption, answer, locate: it has an `image: ImageInfo`) with the image's `source` set to how the
    command line named the image, not `PIL image` or `bytes (N)`."""
    return result.model_copy(update={"image": result.image.model_copy(update={"source": source})})


def print_json(text: str) -> None:
    """Print JSON text on stdout so that it stays valid JSON whatever the terminal's encoding.

    Outside strings JSON is ASCII, so on a stdout that cannot write all of Unicode (`PYTHONIOENCODING=ascii`,
    a Latin-1 locale) every non-ASCII character is written as its `\\uXXXX` escape, not `?` or `\\xe9`.
    """
    if not _stdout_is_utf(sys.stdout):
        text = _NON_ASCII.sub(lambda m: json.dumps(m.group())[1:-1], text)
    print(text)


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def _stdout_is_utf(stream: Any) -> bool:
    import codecs

    try:
        return codecs.lookup(getattr(stream, "encoding", None) or "ascii").name.startswith("utf")
    except LookupError:
        return False


def _daemon_client(service: Blip2Service) -> bool:
    if service.settings.remote_url:
        from ..remote import RemoteService

        return isinstance(service, RemoteService)
    return False


def _missing_file(image: ImageInput) -> bool:
    """Whether `image` is a local path (or file:// URI) naming nothing: one stat, no read. URLs, data URIs and
    base64 are never missing files."""
    from ..images import _classify, _file_uri_path

    if not isinstance(image, str):
        return False
    kind = _classify(image)
    if kind not in ("path", "file-uri"):
        return False
    try:
        path = _file_uri_path(image.strip(), strict=True) if kind == "file-uri" else image
        return not os.path.exists(os.path.expanduser(path))
    except (BlipError, OSError, ValueError):  # a bad URI, a NUL, a name too long: the check says what is wrong
        return True
