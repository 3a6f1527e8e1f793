"""Options every model-using subcommand shares, and how they become `BlipSettings`."""

from __future__ import annotations

import argparse
import os
from typing import Any

from pydantic import ValidationError

from ..errors import InvalidInput
from ..params import format_validation_error
from ..service import Blip2Service
from ..settings import BlipSettings


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """`--model`, `--device`, `--dtype`, `--demo`, ... mirroring `BlipSettings`."""
    g = parser.add_argument_group("model")
    g.add_argument("--model", help="captioning checkpoint: hub id or local folder (BLIP_MODEL)")
    g.add_argument("--retrieval-model", help="retrieval checkpoint for embeddings/search (BLIP_RETRIEVAL_MODEL)")
    g.add_argument("--device", help="auto, cpu, cuda, cuda:1, mps (BLIP_DEVICE)")
    g.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="(BLIP_DTYPE)")
    g.add_argument("--max-batch-size", type=int, help="(BLIP_MAX_BATCH_SIZE)")
    g.add_argument("--allowed-dir", action="append", dest="allowed_dirs", help="restrict image paths (repeatable)")
    g.add_argument("--allow-urls", action="store_true", default=None, help="allow public http(s) image URLs")
    g.add_argument(
        "--demo",
        action="store_true",
        help="run on a tiny random checkpoint built on the fly (no download; output is gibberish)",
    )


def settings_from_args(args: argparse.Namespace) -> BlipSettings:
    """Flags override `BLIP_*` environment settings; `--demo` points at the tiny checkpoint."""
    overrides: dict[str, Any] = {}
    if getattr(args, "demo", False):
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


def service_from_args(args: argparse.Namespace) -> Blip2Service:
    """A service built from the flags, installed as the process-wide shared one."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    service = Blip2Service(settings_from_args(args))
    Blip2Service.set_shared(service)
    return service
