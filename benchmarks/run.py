"""Run benchmark scenarios, print their tables and PASS/FAIL lines, write JSON, PNG plots and `summary.md`."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from .harness import ScenarioResult, machine, save, table
from .scenarios import SCENARIOS, BenchContext

logger = logging.getLogger(__name__)

ALL = ("B0", "B1", "B2", "B3", "B4", "B5", "B6", "B7")
NAMES = (*ALL, "REAL")
"""Every scenario `run` takes by name (besides `all`, which is `ALL`)."""
DEFAULT_TOKENS = {"tiny": 16, "small": 16, "real": 20}


def _registry() -> dict[str, Callable[[BenchContext], ScenarioResult]]:
    from .layers import b3_layers
    from .real_cpu import real_cpu

    return {**SCENARIOS, "B3": b3_layers, "REAL": real_cpu}


def run(
    scenarios: Sequence[str],
    size: str,
    out: Path,
    *,
    quick: bool = False,
    tokens: int | None = None,
    root: Path | None = None,
    stream: TextIO = sys.stdout,
) -> list[ScenarioResult]:
    """Run the named scenarios (`B0`…`B7`, `REAL`, or `all`) on one size; returns their results."""
    names = list(ALL) if "all" in scenarios else [s.upper() for s in scenarios]
    registry = _registry()
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown scenario(s) {unknown}; choose from {sorted(registry)} or all")
    ctx = BenchContext(size=size, quick=quick, root=root, tokens=tokens or DEFAULT_TOKENS[size])
    info = machine()
    print(
        f"# blip-tools bench — size {size}, {info['cpu']} ({info['cores']} cores, torch threads "
        f"{info['torch_threads']}), load {info['load_avg_1m']}",
        file=stream,
        flush=True,
    )
    results = []
    for name in names:
        start = time.perf_counter()
        result = registry[name](ctx)
        result.seconds = round(time.perf_counter() - start, 2)
        results.append(result)
        save(result, out, info)
        print("\n" + table(result) + f"\n({result.seconds:.1f} s)", file=stream, flush=True)
    _summary(results, out, info)
    failed = [c for r in results for c in r.checks if not c.passed]
    print(
        f"\n{sum(len(r.checks) for r in results) - len(failed)} checks passed, {len(failed)} failed; results in {out}",
        file=stream,
        flush=True,
    )
    return results


def _summary(results: list[ScenarioResult], out: Path, info: dict[str, object]) -> None:
    """Append this run's tables to `summary.md` (one section per run) and keep `machine.json` current."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "machine.json").write_text(json.dumps(info, indent=2) + "\n")
    body = "\n\n".join(table(r) for r in results)
    with (out / "summary.md").open("a") as fh:
        fh.write(f"\n## Run {info['when']} — {info['cpu']}, {info['cores']} cores, load {info['load_avg_1m']}\n\n")
        fh.write(body + "\n")
