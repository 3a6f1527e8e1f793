"""Collection subcommands: `index DIR`, `search QUERY`, `duplicates` and `locate IMAGE TEXT`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from ..errors import InvalidInput
from ..index import _display
from ._common import add_model_options, service_from_args


def register(sub: argparse._SubParsersAction) -> None:
    """Add `index`, `search`, `duplicates` and `locate`."""
    p = sub.add_parser("index", help="index a folder of images for search (incremental; safe to interrupt)")
    p.add_argument("dir", type=Path, help="folder of images")
    p.add_argument("--no-recursive", dest="recursive", action="store_false", help="only the folder itself")
    p.add_argument("--no-captions", dest="captions", action="store_false", help="embed only (faster)")
    _add_index_options(p)
    p.set_defaults(handler=_index)

    p = sub.add_parser("search", help="search indexed images by text, or by an example image with --image")
    p.add_argument("query", nargs="?", help="what to look for, e.g. 'a dog on a beach'")
    p.add_argument("--image", help="find images similar to this one instead of a text query")
    p.add_argument("-k", "--top-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--dir", type=Path, help="only images under this folder")
    p.add_argument("--rerank", action="store_true", help="re-score the top k with the ITM head (text queries)")
    _add_index_options(p)
    p.set_defaults(handler=_search)

    p = sub.add_parser("duplicates", help="groups of near-identical indexed images")
    p.add_argument("--dir", type=Path, help="only images under this folder")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity (default 0.95)")
    _add_index_options(p)
    p.set_defaults(handler=_duplicates)

    p = sub.add_parser("locate", help="heatmap of where a text matches in an image (ITM Grad-CAM)")
    p.add_argument("image", help="image file, file:// or data: URI")
    p.add_argument("text", help="what to find, e.g. 'the red car'")
    p.add_argument("-o", "--output", type=Path, help="write the heatmap overlay PNG here")
    add_model_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_locate)


def _add_index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, dest="index_path", help="SQLite index file (BLIP_INDEX_PATH)")
    add_model_options(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _open(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    from ..index import ImageIndex

    service = service_from_args(args)
    return service, ImageIndex(args.index_path, service=service)


def _index(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    service, index = _open(args)
    with service, index:
        bar = tqdm(unit="img", file=sys.stderr, disable=not sys.stderr.isatty(), desc="indexing")

        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        try:
            report = index.index(args.dir, recursive=args.recursive, captions=args.captions, on_progress=progress)
        finally:
            bar.close()
    if args.json:
        print(report.model_dump_json(indent=2))
    else:
        print(report.summary())
        for failure in report.errors:
            print(f"  {_display(failure.path)}: {_display(failure.error)}", file=sys.stderr)
    return 0 if report.complete else 1


def _search(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.image is None):
        print("error: give a text QUERY or --image IMAGE (one of them)", file=sys.stderr)
        return 2
    service, index = _open(args)
    with service, index:
        result = index.search(args.query, image=args.image, top_k=args.top_k, directory=args.dir, rerank=args.rerank)
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(result.summary())
    return 0


def _duplicates(args: argparse.Namespace) -> int:
    service, index = _open(args)
    with service, index:
        groups = index.duplicates(threshold=args.threshold, directory=args.dir)
    if args.json:
        print(json.dumps([g.model_dump(mode="json") for g in groups], indent=2))
        return 0
    if not groups:
        print("no near-duplicates found")
    for i, group in enumerate(groups, 1):
        kind = "identical pixels" if group.exact else f"similarity >= {group.min_similarity:.3f}"
        print(f"group {i} ({kind}):")
        for path in group.paths:
            print(f"  {_display(path)}")
    return 0


def _check_output(path: Path) -> None:
    """Refuse an output file that cannot be written before any model work is done."""
    folder = path.parent
    if path.is_dir():
        raise InvalidInput(f"--output {path} is a folder; give a file name such as {path / 'heatmap.png'}.")
    if not folder.is_dir():
        raise InvalidInput(f"--output {path}: the folder {folder} does not exist; create it or choose another path.")
    if not os.access(folder, os.W_OK):
        raise InvalidInput(f"--output {path}: the folder {folder} is not writable; choose another path.")


def _locate(args: argparse.Namespace) -> int:
    if args.output is not None:
        _check_output(args.output)
    with service_from_args(args) as service:
        result = service.locate(args.image, args.text)
    if args.output is not None:
        try:
            args.output.write_bytes(result.overlay_png(max_side=None))
        except OSError as exc:
            raise InvalidInput(f"Cannot write the overlay to {args.output}: {exc.strerror or exc}.") from exc
    if args.json:
        print(result.model_dump_json(indent=2))
    else:
        print(result.summary())
        if args.output is not None:
            print(f"overlay written to {args.output}")
    return 0
