"""Core subcommands: `tiny-checkpoint`, `caption` and `ask`."""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from ..errors import BlipError, InvalidInput
from ._common import add_model_options, add_remote_option, service_from_args

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_GLOB_MAGIC = re.compile(r"[*?[]")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `tiny-checkpoint`, `caption` and `ask`."""
    p = sub.add_parser("tiny-checkpoint", help="write a tiny random BLIP-2 checkpoint (tests, demos)")
    p.add_argument("dir", type=Path, help="output folder (gets captioner/ and retrieval/)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(handler=_tiny_checkpoint)

    p = sub.add_parser(
        "caption",
        help="caption one or more images (files, folders or globs)",
        description="Caption images. With BLIP_REMOTE_URL set, the shared blip-mcp daemon there does the work "
        "(no model is loaded here) unless --local is given.",
    )
    p.add_argument(
        "images",
        nargs="+",
        help="image files, folders (their image files, recursively), quoted globs ('photos/*.jpg'), "
        "file:// or data: URIs",
    )
    p.add_argument("--prompt", help="text the caption should continue, e.g. 'a photo of'")
    _add_common(
        p,
        json_help="print JSON: a list of results whenever a folder, a glob or several images were given (even if "
        "they hold one image); one object only for exactly one image argument",
    )
    p.set_defaults(handler=_caption)

    p = sub.add_parser(
        "ask",
        help="answer a question about an image",
        description="Answer a question about an image. With BLIP_REMOTE_URL set, the shared blip-mcp daemon "
        "there answers (no model is loaded here) unless --local is given.",
    )
    p.add_argument("image", help="image file, file:// or data: URI")
    p.add_argument("question", help="the question, e.g. 'What color is the car?'")
    _add_common(p, json_help="print the result as one JSON object")
    p.set_defaults(handler=_ask)


def _add_common(p: argparse.ArgumentParser, *, json_help: str) -> None:
    add_model_options(p)
    add_remote_option(p)
    g = p.add_argument_group("generation")
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--min-new-tokens", type=int)
    g.add_argument("--num-beams", type=int)
    g.add_argument("--sample", action="store_true", default=None, dest="do_sample", help="sample instead of greedy")
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--repetition-penalty", type=float)
    g.add_argument("--length-penalty", type=float)
    g.add_argument("--num-captions", type=int, dest="num_return_sequences", help="texts per image")
    g.add_argument("--seed", type=int)
    p.add_argument("--json", action="store_true", help=json_help)


def _gen_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    names = (
        "max_new_tokens",
        "min_new_tokens",
        "num_beams",
        "do_sample",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "length_penalty",
        "num_return_sequences",
        "seed",
    )
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


def _expand(refs: list[str]) -> tuple[list[str], bool]:
    """Folders become their image files (sorted) and globs their matching files; the rest is passed through.

    Also says whether the arguments name a collection (several, a folder or a glob), so the JSON output is a list
    however many images it turned out to hold.
    """
    out: list[str] = []
    collection = len(refs) > 1
    for ref in refs:
        folder = _folder(ref)
        matches = _glob(ref) if folder is None else None
        if folder is not None:
            collection = True
            out.extend(str(p) for p in sorted(folder.rglob("*")) if p.suffix.lower() in _IMAGE_SUFFIXES)
        elif matches is not None:
            collection = True
            out.extend(matches or [ref])  # nothing matched: the loader reports the pattern as not found
        else:
            out.append(ref)
    return out, collection


def _folder(ref: str) -> Path | None:
    """The folder `ref` names, or None: data URIs, URLs and long base64 are never looked up on disk.

    A short bare name (`photos`) also reads as base64, so it is looked up too.
    """
    from ..images import _classify

    if _classify(ref) not in ("path", "base64") or len(ref) > 4096:
        return None
    path = Path(ref).expanduser()
    try:
        return path if path.is_dir() else None
    except (OSError, ValueError):  # a name too long, a NUL: not a folder; the image loader says what is wrong
        return None


def _glob(ref: str) -> list[str] | None:
    """The files a quoted glob matches (sorted), or None when `ref` is no glob (or an existing file's name)."""
    from ..images import _classify

    if _classify(ref) != "path" or not _GLOB_MAGIC.search(ref):
        return None
    pattern = os.path.expanduser(ref)
    try:
        if Path(pattern).exists():
            return None
        return [m for m in sorted(glob.glob(pattern, recursive=True)) if Path(m).is_file()]
    except (OSError, ValueError):
        return None


def _label(ref: str) -> str:
    """How an image argument is shown in the output: a path as given; data URIs, base64 and URLs described."""
    from ..images import _classify, describe_ref

    return ref if _classify(ref) in ("path", "file-uri") else describe_ref(ref)


def _tiny_checkpoint(args: argparse.Namespace) -> int:
    from ..testing import build_tiny_checkpoint

    try:
        root = build_tiny_checkpoint(args.dir, seed=args.seed)
    except OSError as exc:  # a file in the way, no permission, a full disk: the user's to fix, not a crash
        reason = exc.strerror or str(exc)
        where = f" ({exc.filename})" if exc.filename and str(exc.filename) != str(args.dir) else ""
        raise InvalidInput(
            f"Cannot write the tiny checkpoint to {args.dir}: {reason}{where}. Choose a folder you can write to."
        ) from exc
    print(f"wrote {root / 'captioner'} and {root / 'retrieval'}")
    print(f"use it with: BLIP_MODEL={root / 'captioner'} BLIP_RETRIEVAL_MODEL={root / 'retrieval'}")
    return 0


def _caption(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    images, collection = _expand(args.images)
    if not images:
        print("error: no images found", file=sys.stderr)
        return 2
    with service_from_args(args, remote=True) as service:
        bar = tqdm(total=len(images), unit="img", file=sys.stderr, disable=len(images) < 2 or not sys.stderr.isatty())
        results = service.caption_batch(
            images,
            args.prompt,
            return_exceptions=True,
            on_progress=lambda done, total: bar.update(done - bar.n),
            **_gen_kwargs(args),
        )
        bar.close()
    failed = 0
    rows: list[dict[str, Any]] = []
    for ref, result in zip(map(_label, images), results, strict=True):
        if isinstance(result, BlipError):
            failed += 1
            rows.append({"image": ref, "error": str(result), "type": type(result).__name__})
            if not args.json:
                print(f"{ref}: error: {result}", file=sys.stderr)
            continue
        rows.append({"image": ref, **result.model_dump(mode="json")})
        if not args.json:
            texts = [c.text for c in result.captions]
            print(f"{ref}: {texts[0]}" if len(texts) == 1 else f"{ref}:\n  " + "\n  ".join(texts))
    if args.json:
        print(json.dumps(rows if collection else rows[0], indent=2))
    return 1 if failed else 0


def _ask(args: argparse.Namespace) -> int:
    with service_from_args(args, remote=True) as service:
        result = service.answer(args.image, args.question, **_gen_kwargs(args))
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(result.answer)
    return 0
