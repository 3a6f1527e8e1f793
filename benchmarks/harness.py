"""Shared benchmark plumbing: results with PASS/FAIL checks, a text table, JSON files and PNG plots."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class Check:
    """One target from the issue, evaluated on this run's own figures."""

    name: str
    passed: bool
    detail: str


@dataclass
class ScenarioResult:
    """What a scenario measured: table rows (dicts with the same keys), checks and an optional plot."""

    scenario: str
    title: str
    size: str
    rows: list[dict[str, Any]]
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    plot: dict[str, Any] | None = None
    """`{"x": key, "y": [keys], "group": key or None, "xlabel", "ylabel", "logx"}` over `rows`."""
    seconds: float = 0.0


def machine() -> dict[str, Any]:
    """The machine a run happened on (the README quotes it next to the tables)."""
    import torch

    info: dict[str, Any] = {
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:  # pragma: no cover - a dependency
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    data = sorted(values)
    pos = (len(data) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratios(values: Sequence[float], base: Sequence[float]) -> list[float]:
    """Per-round ratios `values[i] / base[i]` of two measurements taken side by side in round i."""
    return [v / b for v, b in zip(values, base, strict=True)]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3f}"
    return str(value)


def table(result: ScenarioResult) -> str:
    """A markdown table of the rows, then the checks as PASS/FAIL lines."""
    lines = [f"### {result.scenario} — {result.title} ({result.size})", ""]
    if result.rows:
        keys = list(result.rows[0])
        lines.append("| " + " | ".join(keys) + " |")
        lines.append("|" + "|".join("---" for _ in keys) + "|")
        for row in result.rows:
            lines.append("| " + " | ".join(fmt(row.get(k, "")) for k in keys) + " |")
    for note in result.notes:
        lines.append(f"\n_{note}_")
    if result.checks:
        lines.append("")
        for check in result.checks:
            lines.append(f"{'PASS' if check.passed else 'FAIL'}: {check.name} — {check.detail}")
    return "\n".join(lines)


def save(result: ScenarioResult, out: Path, info: dict[str, Any]) -> list[Path]:
    """Write `<scenario>_<size>.json` (and `.png` when the result has a plot) under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{result.scenario}_{result.size}"
    path = out / f"{stem}.json"
    payload = asdict(result)
    payload["machine"] = info
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    written = [path]
    if result.plot and result.rows:
        try:
            written.append(plot(result, out / f"{stem}.png"))
        except ImportError:
            logger.warning("matplotlib is not installed: no plot for %s (pip install matplotlib)", stem)
    return written


def plot(result: ScenarioResult, path: Path) -> Path:
    """A small line plot of `rows` as described by `result.plot`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = result.plot or {}
    x_key, y_keys, group = spec["x"], list(spec["y"]), spec.get("group")
    fig, axes = plt.subplots(1, len(y_keys), figsize=(4.2 * len(y_keys), 3.2), squeeze=False)
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in result.rows:
        groups.setdefault(row.get(group) if group else None, []).append(row)
    for ax, y_key in zip(axes[0], y_keys, strict=True):
        for name, rows in groups.items():
            pts = [(r[x_key], r[y_key]) for r in rows if isinstance(r.get(y_key), int | float)]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=str(name) if group else None)
        ax.set_xlabel(spec.get("xlabel", x_key))
        ax.set_ylabel(y_key)
        if spec.get("logx"):
            ax.set_xscale("log", base=2)
        if spec.get("logy"):
            ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
        if group:
            ax.legend(fontsize=7)
    fig.suptitle(f"{result.scenario}: {result.title} ({result.size})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
