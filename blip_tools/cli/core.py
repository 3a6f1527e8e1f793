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

from ..errors import BlipError, InvalidImage, InvalidInput
from ..images import ImageInput
from ..params import GenerationParams
from ._common import (
    STDIN,
    STDIN_LABEL,
    HelpFormatter,
    add_model_options,
    add_remote_option,
    as_cli_image,
    check_images_first,
    check_stdin,
    handed_on,
    image_argument,
    print_json,
    read_stdin_image,
    relabel,
    service_from_args,
)

_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
_GLOB_MAGIC = re.compile(r"[*?[]")


def register(sub: argparse._SubParsersAction) -> None:
    """Add `tiny-checkpoint`, `caption` and `ask`."""
    p = sub.add_parser("tiny-checkpoint", help="write a tiny random BLIP-2 checkpoint (tests, demos)")
    p.add_argument("dir", type=Path, help="output folder (gets captioner/ and retrieval/)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights (default 0)")
    p.set_defaults(handler=_tiny_checkpoint)

    p = sub.add_parser(
        "caption",
        help="caption one or more images (files, folders or globs)",
        description="Caption images. With BLIP_REMOTE_URL set, the shared blip-mcp daemon there does the work "
        "(no model is loaded here) unless --local is given.",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
        "  blip-tools caption photo.jpg\n"
        "  blip-tools caption photos/ --json                 # a folder, recursively; JSON list\n"
        "  blip-tools caption 'photos/*.jpg' --prompt 'a photo of'\n"
        "  blip-tools caption photo.jpg --num-beams 5 --num-captions 3\n"
        "  blip-tools caption photo.jpg --sample --temperature 0.8 --top-p 0.9 --seed 1 --num-captions 3\n"
        "  blip-tools caption --demo photo.jpg               # tiny random model: no download, gibberish\n"
        "  cat photo.jpg | blip-tools caption -              # the image on stdin (shown as <stdin>)\n"
        "exit status: 0 all captioned; 1 some images failed (each named on stderr);\n"
        "  2 bad arguments, settings or model; 130 Ctrl-C",
    )
    p.add_argument(
        "images",
        nargs="+",
        help="image files, folders (their image files, recursively), quoted globs ('photos/*.jpg'), "
        "file:// or data: URIs, or - for an image piped to stdin",
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
        formatter_class=HelpFormatter,
        epilog="examples:\n"
        "  blip-tools ask photo.jpg 'What color is the car?'\n"
        "  blip-tools ask photo.jpg 'How many people are there?' --json\n"
        "exit status: 0 answered; 2 a bad image, arguments, settings or model; 130 Ctrl-C",
    )
    p.add_argument("image", help="image file, file:// or data: URI, or - for an image piped to stdin")
    p.add_argument("question", help="the question, e.g. 'What color is the car?'")
    _add_common(p, json_help="print the result as one JSON object")
    p.set_defaults(handler=_ask)


def _add_common(p: argparse.ArgumentParser, *, json_help: str) -> None:
    add_model_options(p)
    add_remote_option(p)
    g = p.add_argument_group("generation")
    for name, flag in _GEN_FLAGS.items():
        annotation = GenerationParams.model_fields[name].annotation
        if annotation is bool:
            g.add_argument(flag, action="store_true", default=None, dest=name, help=_gen_help(name))
        else:
            kind = int if annotation in (int, int | None) else float
            g.add_argument(flag, type=kind, dest=name, metavar="N" if kind is int else "X", help=_gen_help(name))
    p.add_argument("--json", action="store_true", help=json_help)


def _gen_help(name: str) -> str:
    """A generation flag's help: its `GenerationParams` field's description, with the default."""
    field = GenerationParams.model_fields[name]
    text = (field.description or "").rstrip(".")
    text = text[:1].lower() + text[1:]
    if field.default is None or isinstance(field.default, bool):
        return text
    if text.endswith(")"):  # "beam-search width (1 = greedy or sampling; default 1)"
        return f"{text[:-1]}; default {field.default})"
    return f"{text} (default {field.default})"


_GEN_FLAGS = {
    "max_new_tokens": "--max-new-tokens",
    "min_new_tokens": "--min-new-tokens",
    "num_beams": "--num-beams",
    "do_sample": "--sample",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "repetition_penalty": "--repetition-penalty",
    "length_penalty": "--length-penalty",
    "num_return_sequences": "--num-captions",
    "seed": "--seed",
}
"""`GenerationParams` fields and the flags that set them."""

_GEN_NAME = re.compile(r"\b(" + "|".join(_GEN_FLAGS) + r")\b(?:=(\w+))?")


def _gen_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The generation flags given, checked before any model work; errors name the flags, not the API fields."""
    gen = {n: getattr(args, n) for n in _GEN_FLAGS if getattr(args, n, None) is not None}
    try:
        GenerationParams.from_kwargs(**gen)
    except InvalidInput as exc:
        raise InvalidInput(_GEN_NAME.sub(_flag_for, str(exc))) from None
    return gen


def _flag_for(match: re.Match[str]) -> str:
    """`num_return_sequences` -> `--num-captions`, `do_sample=true` -> `--sample`, `num_beams=1` -> `--num-beams 1`."""
    name, value = match.group(1), match.group(2)
    if name == "do_sample" or value is None:
        return _GEN_FLAGS[name]
    return f"{_GEN_FLAGS[name]} {value}"


def _expand(refs: list[str]) -> tuple[list[str], bool, set[int]]:
    """Folders become their image files (sorted) and globs their matching files; the rest is passed through.

    Also says whether the arguments name a collection (several, a folder or a glob), so the JSON output is a list
    however many images it turned out to hold, and which entries are globs that matched nothing (kept in place,
    so the output names them).
    """
    out: list[str] = []
    unmatched: set[int] = set()
    collection = len(refs) > 1
    for ref in refs:
        if ref == STDIN:  # always stdin, even if a file or folder is named `-` (that is ./-)
            out.append(ref)
            continue
        folder = _folder(ref)
        matches = _glob(ref) if folder is None else None
        if folder is not None:
            collection = True
            out.extend(str(p) for p in sorted(folder.rglob("*")) if p.suffix.lower() in _IMAGE_SUFFIXES)
        elif matches is not None:
            collection = True
            if not matches:
                unmatched.add(len(out))
            out.extend(matches or [ref])
        else:
            out.append(as_cli_image(ref))
    return out, collection, unmatched


def _no_match(pattern: str) -> InvalidImage:
    where = os.path.abspath(os.path.expanduser(pattern))
    shown = "" if where == pattern else f" (resolved to {where})"
    return InvalidImage(f"No files match the pattern {pattern}{shown}; check the folder and the pattern.")


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
    from ..images import _classify, describe_ref, display_name

    if ref == STDIN:
        return STDIN_LABEL
    return display_name(ref) if _classify(ref) in ("path", "file-uri") else describe_ref(ref)


def _tiny_checkpoint(args: argparse.Namespace) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is imported: no warnings on stderr
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

    gen = _gen_kwargs(args)
    check_stdin(args.images)
    images, collection, unmatched = _expand(args.images)
    if not images:
        suffixes = ", ".join(sorted(_IMAGE_SUFFIXES))
        print(f"error: no image files ({suffixes}) in {', '.join(args.images)}", file=sys.stderr)
        return 2
    results: list[Any] = [_no_match(ref) if i in unmatched else None for i, ref in enumerate(images)]
    inputs: list[ImageInput] = list(images)
    sources: dict[int, str] = {}  # the result's image source where the service is handed something else
    with service_from_args(args, remote=True) as service:
        if STDIN in images:
            i = images.index(STDIN)
            sources[i] = STDIN_LABEL
            try:
                inputs[i] = read_stdin_image(service.settings)
            except BlipError as exc:
                results[i] = exc
        todo = [i for i, result in enumerate(results) if result is None]
        # Reported like any failed image, without loading the model first; an image checked is handed on.
        for i, checked in zip(todo, check_images_first(service, [inputs[i] for i in todo]), strict=True):
            if isinstance(checked, BlipError):
                results[i] = checked
            elif checked is not None:
                inputs[i] = handed_on(checked)
                sources.setdefault(i, checked.info.source)
        todo = [i for i in todo if results[i] is None]
        if todo:
            bar = tqdm(total=len(todo), unit="img", file=sys.stderr, disable=len(todo) < 2 or not sys.stderr.isatty())
            captioned = service.caption_batch(
                [inputs[i] for i in todo],
                args.prompt,
                return_exceptions=True,
                on_progress=lambda done, total: bar.update(done - bar.n),
                **gen,
            )
            bar.close()
            for i, result in zip(todo, captioned, strict=True):
                labelled = i in sources and not isinstance(result, BlipError)
                results[i] = relabel(result, sources[i]) if labelled else result
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
        print_json(json.dumps(rows if collection else rows[0], indent=2))
    return 1 if failed else 0


def _ask(args: argparse.Namespace) -> int:
    gen = _gen_kwargs(args)
    stdin = check_stdin([args.image])
    with service_from_args(args, remote=True) as service:
        image, source = image_argument(service, args.image, stdin=stdin)
        result = service.answer(image, args.question, **gen)
    if source is not None:
        result = relabel(result, source)
    if args.json:
        print_json(result.model_dump_json(indent=2))
    else:
        print(result.answer)
    return 0
