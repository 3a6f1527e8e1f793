"""`blip-tools bench`: run the benchmark suite in `benchmarks/` (ships with the source tree, not the wheel)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path


def _scenario(text: str) -> str:
    """A `--scenario` value, any case; an unknown name is a usage error (exit 2), not a traceback from the suite."""
    if text.lower() == "all":
        return "all"
    names: tuple[str, ...] = _import_suite().NAMES  # type: ignore[attr-defined]
    if text.upper() not in names:
        raise argparse.ArgumentTypeError(f"unknown scenario {text!r}; choose from {', '.join(names)} or all")
    return text.upper()


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    """Add `bench`."""
    p = sub.add_parser(
        "bench",
        help="run benchmarks (B0–B7, REAL) and write tables, JSON and PNG plots",
        description="Scenarios: B0 batch sweep, B1 closed loop, B2 wait window, B3 per-layer overhead, B4 open "
        "loop, B5 burst, B6 cancellations, B7 poisoned input, REAL real-size CPU comparison with plain "
        "transformers. Checks from the performance issue print as PASS/FAIL lines.",
    )
    p.add_argument(
        "--scenario",
        action="append",
        default=None,
        type=_scenario,
        help="B0..B7, REAL or all (repeatable; default: all, which is B0..B7)",
    )
    p.add_argument("--size", choices=["tiny", "small", "real"], default="tiny", help="model size (default tiny)")
    p.add_argument("--out", type=Path, default=Path("bench-results"), help="output folder (default bench-results)")
    p.add_argument("--quick", action="store_true", help="smaller workloads (smoke test)")
    p.add_argument("--tokens", type=_positive, metavar="N", help="fixed tokens per caption (default 16; 20 for real)")
    p.add_argument(
        "--threads",
        type=_positive,
        metavar="N",
        help="torch intra-op threads (default: 1 for tiny, all cores otherwise)",
    )
    p.set_defaults(handler=_bench)


def _import_suite() -> object:
    """`benchmarks.run`, from the current directory or the source checkout this package lives in."""
    try:
        return importlib.import_module("benchmarks.run")
    except ModuleNotFoundError:
        pass
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        if (root / "benchmarks" / "run.py").exists():
            sys.path.insert(0, str(root))
            return importlib.import_module("benchmarks.run")
    raise SystemExit(
        "error: the benchmark suite lives in the source tree's benchmarks/ folder; run `blip-tools bench` from a "
        "clone of the repository (pip install -e '.[dev]')"
    )


def _bench(args: argparse.Namespace) -> int:
    suite = _import_suite()  # first: from an installed wheel, say at once that the suite needs a checkout
    import torch

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    threads = args.threads or (1 if args.size == "tiny" else (os.cpu_count() or 1))
    torch.set_num_threads(threads)
    results = suite.run(  # type: ignore[attr-defined]
        args.scenario or ["all"], args.size, args.out, quick=args.quick, tokens=args.tokens
    )
    return 1 if any(not c.passed for r in results for c in r.checks) else 0
