"""Collection subcommands: `index DIR`, `search QUERY`, `duplicates` and `locate IMAGE TEXT`.

With `BLIP_REMOTE_URL` set (and no `--local`) they use the shared `blip-mcp` daemon's model, as `caption` and
`ask` do. The index file itself is always read and written here; only the model calls go to the daemon, and the
index records the daemon's checkpoint names with its vectors (`RemoteService.start()`), so they never mix with
vectors of the model a `--local` run loads.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InvalidInput
from ..images import display_name as _display
from ._common import (
    HelpFormatter,
    add_model_options,
    add_remote_option,
    check_stdin,
    image_argument,
    print_json,
    relabel,
    service_from_args,
)

if TYPE_CHECKING:
    from ..images import ImageInput
    from ..index import ImageIndex
    from ..service import Blip2Service

_DAEMON = (
    " With BLIP_REMOTE_URL set, the shared blip-mcp daemon there runs the model (none is loaded here) unless "
    "--local is given; the index file stays on this machine."
)


def register(sub: argparse._SubParsersAction) -> None:
    """Add `index`, `search`, `duplicates` and `locate`."""
    p = sub.add_parser(
        "index",
        help="index a folder of images for search (incremental; safe to interrupt)",
        description="Index a folder of images for search (incremental; safe to interrupt)." + _DAEMON + " The files "
        "are read here and sent to the daemon as data (BLIP_REMOTE_SEND_FILES=never sends their paths instead).",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
        "  blip-tools index ~/Pictures                # run it again any time; Ctrl-C is safe, the next run resumes\n"
        "  blip-tools index ~/Pictures --no-captions  # embeddings only (faster)\n"
        "exit status: 0 done, every image indexed; 1 some images failed (this run's failures listed on\n"
        "  stderr; files that failed before and are unchanged are counted, not retried) or the run stopped\n"
        "  early (run it again to resume); 2 bad arguments, settings, model or index; 130 Ctrl-C",
    )
    p.add_argument("dir", type=Path, help="folder of images")
    p.add_argument("--no-recursive", dest="recursive", action="store_false", help="only the folder itself")
    p.add_argument("--no-captions", dest="captions", action="store_false", help="embed only (faster)")
    _add_index_options(p)
    p.set_defaults(handler=_index)

    p = sub.add_parser(
        "search",
        help="search indexed images by text, or by an example image with --image",
        description="Search indexed images by text, or by an example image with --image." + _DAEMON + " Only images "
        "indexed with the same retrieval model are searched.",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
        "  blip-tools search 'a dog on a beach'\n"
        "  blip-tools search --image ~/Pictures/dog.jpg -k 5\n"
        "  blip-tools search 'a red car' --dir ~/Pictures/2024 --rerank",
    )
    p.add_argument("query", nargs="?", help="what to look for, e.g. 'a dog on a beach'")
    p.add_argument("--image", help="find images similar to this one instead of a text query (- reads it from stdin)")
    p.add_argument("-k", "--top-k", type=int, default=10, help="number of results (default 10)")
    p.add_argument("--dir", type=Path, help="only images under this folder")
    p.add_argument("--rerank", action="store_true", help="re-score the top k with the ITM head (text queries)")
    _add_index_options(p)
    p.set_defaults(handler=_search)

    p = sub.add_parser(
        "duplicates",
        help="groups of near-identical indexed images",
        description="Groups of near-identical indexed images, from the stored vectors (no model call). With "
        "BLIP_REMOTE_URL set, the images compared are those indexed with the daemon's retrieval model (asked of the "
        "daemon), unless --local is given.",
        formatter_class=HelpFormatter,
        epilog="examples:\n"
        "  blip-tools duplicates --threshold 0.95\n"
        "  blip-tools duplicates --dir ~/Pictures/2024 --json",
    )
    p.add_argument("--dir", type=Path, help="only images under this folder")
    p.add_argument("--threshold", type=float, default=0.95, help="cosine similarity (default 0.95)")
    _add_index_options(p)
    p.set_defaults(handler=_duplicates)

    p = sub.add_parser(
        "locate",
        help="heatmap of where a text matches in an image (ITM Grad-CAM)",
        description="Heatmap of where a text matches in an image (ITM Grad-CAM). With BLIP_REMOTE_URL set, the "
        "shared blip-mcp daemon there computes it (no model is loaded here) unless --local is given; --output then "
        "draws the overlay here, on the image as this side reads it.",
        formatter_class=HelpFormatter,
        epilog="examples:\n  blip-tools locate photo.jpg 'the dog' -o heatmap.png",
    )
    p.add_argument("image", help="image file, file:// or data: URI, or - for an image piped to stdin")
    p.add_argument("text", help="what to find, e.g. 'the red car'")
    p.add_argument("-o", "--output", type=Path, help="write the heatmap overlay PNG here")
    add_model_options(p)
    add_remote_option(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=_locate)


def _add_index_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--index", type=Path, dest="index_path", help="SQLite index file (BLIP_INDEX_PATH)")
    add_model_options(p)
    add_remote_option(p)
    p.add_argument("--json", action="store_true", help="print JSON")


def _open(args: argparse.Namespace) -> tuple[Blip2Service, ImageIndex]:
    """The service (the daemon's client with BLIP_REMOTE_URL) and the index on it."""
    from ..index import ImageIndex

    service = service_from_args(args, remote=True, files_read_here=True)
    try:
        # On a daemon's client the index first starts it (its checkpoint names become the settings the index
        # records), so a daemon that is down fails here, before the index file is created.
        return service, ImageIndex(args.index_path, service=service)
    except BaseException:
        service.close()
        raise


def _note_stale(index: ImageIndex) -> None:
    """Say (on stderr) that images embedded with another retrieval model were left out, and how to include them."""
    stale = index.stats().stale
    if stale:
        print(
            f"note: {stale} indexed image(s) were embedded with another retrieval model than "
            f"{_display(index.retrieval_model)} and are left out; `blip-tools index DIR` re-embeds them with "
            "this one (BLIP_REMOTE_URL and --local choose which model that is).",
            file=sys.stderr,
        )


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
        print_json(report.model_dump_json(indent=2))
    else:
        print(report.summary())
        for failure in report.errors:
            print(f"  {_display(failure.path)}: {_display(failure.error)}", file=sys.stderr)
    return 0 if report.complete and not report.failed and not report.errors else 1


def _search(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.image is None):
        print("error: give a text QUERY or --image IMAGE (one of them)", file=sys.stderr)
        return 2
    stdin = args.image is not None and check_stdin([args.image])
    image: ImageInput | None = None
    source: str | None = None
    service, index = _open(args)
    with service, index:
        if args.image is not None:  # before the retrieval model loads
            image, source = image_argument(service, args.image, stdin=stdin)
        result = index.search(args.query, image=image, top_k=args.top_k, directory=args.dir, rerank=args.rerank)
        _note_stale(index)
    if source is not None:
        result = result.model_copy(update={"image": source})
    if args.json:
        print_json(result.model_dump_json(indent=2))
    else:
        print(result.summary())
    return 0


def _duplicates(args: argparse.Namespace) -> int:
    service, index = _open(args)
    with service, index:
        groups = index.duplicates(threshold=args.threshold, directory=args.dir)
        _note_stale(index)
    if args.json:
        print_json(json.dumps([g.model_dump(mode="json") for g in groups], indent=2))
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
    stdin = check_stdin([args.image])
    with service_from_args(args, remote=True) as service:
        image, source = image_argument(service, args.image, stdin=stdin)  # before the retrieval model loads
        result = service.locate(image, args.text)
    if source is not None:
        result = relabel(result, source)
    if args.output is not None:
        try:
            args.output.write_bytes(result.overlay_png(max_side=None))
        except OSError as exc:
            raise InvalidInput(f"Cannot write the overlay to {args.output}: {exc.strerror or exc}.") from exc
    if args.json:
        print_json(result.model_dump_json(indent=2))
    else:
        print(result.summary())
        if args.output is not None:
            print(f"overlay written to {args.output}")
    return 0
