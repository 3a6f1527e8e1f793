"""Soak run (issue 9): minutes of mixed valid, invalid, oversize and cancelled traffic against the tiny model.

Checks that resident memory stays flat after warm-up, that no request gets stuck (every call returns within
a bound), that only the project's error types escape, and that a normal request still works at the end.

    python benchmarks/soak.py --minutes 10          # the full run
    python benchmarks/soak.py --minutes 2 --out bench-results
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import logging
import os
import random
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from blip_tools.errors import BlipError

logger = logging.getLogger("benchmarks.soak")

STUCK_S = 30.0
"""A call still running after this long counts as stuck (requests time out after 10 s in the queue)."""


def rss_mb() -> float:
    """Resident set size of this process in MiB (Linux /proc; 0 elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


class _Traffic:
    """The request mix; each `one()` call sends one request and returns its outcome label."""

    def __init__(self, svc: Any, folder: Path, seed: int) -> None:
        import numpy as np
        from PIL import Image

        self.svc = svc
        self.rng = random.Random(seed)
        gen = np.random.default_rng(seed)
        self.images = [Image.fromarray(gen.integers(0, 256, (40, 48, 3), dtype=np.uint8), "RGB") for _ in range(64)]
        self.paths = []
        for i in range(8):
            path = folder / f"img{i}.png"
            self.images[i].save(path)
            self.paths.append(str(path))
        png = io.BytesIO()
        self.images[0].save(png, "PNG")
        self.truncated = png.getvalue()[: len(png.getvalue()) // 2]
        big = gen.integers(0, 256, (400, 400, 3), dtype=np.uint8)
        raw = io.BytesIO()
        Image.fromarray(big, "RGB").save(raw, "PNG")
        self.oversize_b64 = base64.b64encode(raw.getvalue()).decode()  # > max_image_bytes below
        self.missing = str(folder / "missing.png")

    def image(self) -> Any:
        # Fresh pixels now and then (cache misses), repeats otherwise (cache hits).
        if self.rng.random() < 0.3:
            img = self.images[self.rng.randrange(len(self.images))].copy()
            img.putpixel((0, 0), tuple(self.rng.randrange(256) for _ in range(3)))
            return img
        return self.rng.choice(self.images + self.paths)

    def one(self) -> str:
        svc, r = self.svc, self.rng.random()
        try:
            if r < 0.35:
                svc.caption(self.image(), max_new_tokens=self.rng.choice([4, 8, 12]))
            elif r < 0.55:
                svc.answer(self.image(), self.rng.choice(["what color?", "is there a dog?", "how many?"]))
            elif r < 0.60:
                svc.caption_batch([self.image() for _ in range(4)], return_exceptions=True, max_new_tokens=6)
            elif r < 0.65:
                svc.embed_images([self.image()])
            elif r < 0.68:
                svc.score(self.image(), ["a dog", "a red car"])
            elif r < 0.72:
                svc.caption(self.truncated)
            elif r < 0.76:
                svc.caption("data:image/png;base64,@@not-base64@@")
            elif r < 0.79:
                svc.caption(self.missing)
            elif r < 0.83:
                svc.caption(self.oversize_b64)
            elif r < 0.86:
                svc.caption(self.image(), max_new_tokens=100_000)
            else:
                return self._cancelled()
            return "ok"
        except BlipError as exc:
            return type(exc).__name__

    def _cancelled(self) -> str:
        async def run() -> str:
            task = asyncio.ensure_future(self.svc.acaption(self.image(), max_new_tokens=8))
            await asyncio.sleep(self.rng.uniform(0.0, 0.03))
            task.cancel()
            try:
                await task
                return "ok (finished before cancel)"
            except asyncio.CancelledError:
                return "cancelled"

        return asyncio.run(run())


def soak(minutes: float, callers: int, out: Path | None, seed: int = 0) -> dict[str, Any]:
    """Run the soak for `minutes`; returns (and writes) its figures and checks."""
    import torch

    from benchmarks.sizes import checkpoint
    from blip_tools.service import Blip2Service
    from blip_tools.settings import BlipSettings
    from blip_tools.testing import tiny_settings_kwargs

    torch.set_num_threads(1)
    settings = BlipSettings(
        **tiny_settings_kwargs(checkpoint("tiny")),
        max_queue=32,
        request_timeout_s=10.0,
        max_image_bytes=200_000,
        feature_cache_size=64,
        prefix_cache_size=16,
    )
    duration = minutes * 60.0
    outcomes: Counter[str] = Counter()
    unexpected: list[str] = []
    inflight: dict[int, float] = {}
    lock = threading.Lock()
    samples: list[tuple[float, float, int]] = []  # (t, rss MiB, completed calls)
    stop = threading.Event()
    with tempfile.TemporaryDirectory() as tmp, Blip2Service(settings).start() as svc:
        traffic = [_Traffic(svc, Path(tmp), seed + i) for i in range(callers)]
        start = time.monotonic()

        def caller(i: int) -> None:
            while not stop.is_set():
                with lock:
                    inflight[i] = time.monotonic()
                try:
                    label = traffic[i].one()
                except Exception as exc:  # anything not a BlipError is a finding
                    label = f"UNEXPECTED {type(exc).__name__}"
                    unexpected.append(f"{type(exc).__name__}: {exc}")
                with lock:
                    inflight.pop(i, None)
                    outcomes[label] += 1

        threads = [threading.Thread(target=caller, args=(i,), daemon=True, name=f"soak-{i}") for i in range(callers)]
        for t in threads:
            t.start()
        oldest = 0.0
        while (now := time.monotonic()) - start < duration:
            with lock:
                done = sum(outcomes.values())
                ages = [now - s for s in inflight.values()]
            oldest = max([oldest, *ages])
            samples.append((round(now - start, 1), round(rss_mb(), 1), done))
            time.sleep(min(5.0, max(duration / 60, 0.5)))
        stop.set()
        for t in threads:
            t.join(timeout=STUCK_S)
        stuck = sum(t.is_alive() for t in threads)
        final_ok = bool(svc.caption(traffic[0].images[0], max_new_tokens=4).caption is not None)
        stats = svc.stats()
    warm = [s for s in samples if s[0] >= duration * 0.2] or samples
    growth = warm[-1][1] - warm[0][1]
    total = sum(outcomes.values())
    report = {
        "minutes": minutes,
        "callers": callers,
        "requests": total,
        "per_s": round(total / duration, 1),
        "outcomes": dict(outcomes.most_common()),
        "rss_mb": {
            "start": samples[0][1],
            "after_warmup": warm[0][1],
            "end": warm[-1][1],
            "max": max(s[1] for s in samples),
        },
        "rss_growth_after_warmup_mb": round(growth, 1),
        "oldest_call_s": round(oldest, 2),
        "stuck_callers": stuck,
        "unexpected": unexpected[:10],
        "service": {
            "requests": stats.requests,
            "batches": stats.batches,
            "rejected": stats.rejected,
            "cancelled": stats.cancelled,
            "expired": stats.expired,
            "errors": stats.errors,
            "cache_hits": stats.cache_hits,
            "prefix_cache_hits": stats.prefix_cache_hits,
        },
        "samples": samples,
    }
    report["checks"] = {
        "memory flat after warm-up (growth < 64 MiB)": growth < 64,
        f"no call ran longer than {STUCK_S:.0f} s": oldest < STUCK_S and stuck == 0,
        "only blip-tools errors escaped": not unexpected,
        "a normal request works at the end": final_ok,
    }
    if out is not None:
        _write(report, out)
    return report


def _write(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    t = [s[0] / 60 for s in report["samples"]]
    fig, (a, b) = plt.subplots(1, 2, figsize=(8.4, 3.0))
    a.plot(t, [s[1] for s in report["samples"]], marker=".")
    a.set_xlabel("minutes")
    a.set_ylabel("RSS (MiB)")
    a.set_ylim(bottom=0)
    b.plot(t, [s[2] for s in report["samples"]], marker=".")
    b.set_xlabel("minutes")
    b.set_ylabel("calls finished")
    for ax in (a, b):
        ax.grid(True, alpha=0.3)
    fig.suptitle(f"soak: {report['minutes']} min, {report['callers']} callers, mixed traffic (tiny)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "soak.png", dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0, help="how long to run (default 10)")
    parser.add_argument("--callers", type=int, default=8, help="concurrent callers (default 8)")
    parser.add_argument("--out", type=Path, default=Path("bench-results"), help="where soak.json/png go")
    args = parser.parse_args(argv)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    report = soak(args.minutes, args.callers, args.out)
    shown = {k: v for k, v in report.items() if k not in ("samples", "checks")}
    print(json.dumps(shown, indent=2))
    for name, passed in report["checks"].items():
        print(f"{'PASS' if passed else 'FAIL'}: soak: {name}")
    return 0 if all(report["checks"].values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
