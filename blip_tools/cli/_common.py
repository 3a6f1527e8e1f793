"""Options every model-using subcommand shares, and how they become `BlipSettings`."""

from __future__ import annotations

import argparse
import os
from typing import Any

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
    for name in ("model", "retrieval_model", "device", "dtype", "max_batch_size", "allowed_dirs", "allow_urls"):
        value = getattr(args, name, None)
        if value is not None:
            overrides[name] = value
    return BlipSettings(**overrides)


def service_from_args(args: argparse.Namespace) -> Blip2Service:
    """A service built from the flags, installed as the process-wide shared one."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    service = Blip2Service(settings_from_args(args))
    Blip2Service.set_shared(service)
    return service
