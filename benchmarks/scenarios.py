"""Scenarios B0–B2 and B4–B7 (B3 lives in `layers.py`): batching, wait window, open loop and faults.

Each function takes a `BenchContext` and returns a `ScenarioResult`. Throughput scenarios turn the feature and
prefix caches off and force fixed-length outputs (`min_new_tokens = max_new_tokens`), so every request costs
the same and figures compare like with like.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import gc
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blip_tools.batching import BatchEvent
from blip_tools.errors import BlipError, Overloaded, RequestTimeout
from blip_tools.params import GenerationParams
from blip_tools.runtime import Blip2Runtime, GenerationItem
from blip_tools.service import Blip2Service

from .harness import Check, ScenarioResult, median, percentile, ratios, timed
from .sizes import make_images, settings_for

logger = logging.getLogger(__name__)


@dataclass
class BenchContext:
    """Size, scale and output length shared by the scenarios of one run."""

    size: str
    quick: bool = False
    """Smaller workloads (tests, smoke runs)."""
    root: Path | None = None
    """Where benchmark checkpoints live (default `~/.cache/blip-tools/bench`)."""
    tokens: int = 16
    """Fixed number of generated tokens per request."""

    def settings(self, **overrides: Any) -> Any:
        kw: dict[str, Any] = {"feature_cache_size": 0, "prefix_cache_size": 0}
        kw.update(overrides)
        return settings_for(self.size, self.root, **kw)

    def service(self, runtime_cls: type[Blip2Runtime] | None = None, **overrides: Any) -> Blip2Service:
        settings = self.settings(**overrides)
        runtime = runtime_cls(settings) if runtime_cls is not None else None
        return Blip2Service(settings, runtime=runtime).start()

    def gen(self) -> dict[str, int]:
        return {"max_new_tokens": self.tokens, "min_new_tokens": self.tokens}

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full


class _BatchLog:
    """Collects BatchEvents to report mean batch size and how busy the model worker was."""

    def __init__(self) -> None:
        self.events: list[BatchEvent] = []
        self._lock = threading.Lock()

    def __call__(self, event: BatchEvent) -> None:
        with self._lock:
            self.events.append(event)

    def reset(self) -> None:
        with self._lock:
            self.events.clear()

    def mean_batch(self) -> float:
        sizes = [e.size for e in self.events if not e.retried]
        return sum(sizes) / len(sizes) if sizes else float("nan")

    def busy_s(self) -> float:
        return sum(e.exec_s for e in self.events)


def _closed_loop(
    svc: Blip2Service, images: Sequence[Any], callers: int, per_caller: int, gen: dict[str, Any], think_s: float = 0.0
) -> tuple[float, list[float]]:
    """`callers` threads each caption `per_caller` images back to back; (wall seconds, latencies)."""
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(callers + 1)
    rng = random.Random(0)
    thinks = [
        [rng.expovariate(1.0 / think_s) if think_s > 0 else 0.0 for _ in range(per_caller)] for _ in range(callers)
    ]

    def caller(c: int) -> None:
        barrier.wait()
        for k in range(per_caller):
            if thinks[c][k]:
                time.sleep(thinks[c][k])
            start = time.perf_counter()
            svc.caption(images[(c * per_caller + k) % len(images)], **gen)
            with lock:
                latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=caller, args=(c,), daemon=True) for c in range(callers)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    return time.perf_counter() - start, latencies


def _closed_loop_async(
    svc: Blip2Service, images: Sequence[Any], callers: int, per_caller: int, gen: dict[str, Any]
) -> tuple[float, list[float]]:
    """`callers` asyncio tasks on one event loop (as in the MCP server) each `acaption` back to back."""
    latencies: list[float] = []

    async def caller(c: int) -> None:
        for k in range(per_caller):
            start = time.perf_counter()
            await svc.acaption(images[(c * per_caller + k) % len(images)], **gen)
            latencies.append(time.perf_counter() - start)

    async def run() -> float:
        start = time.perf_counter()
        await asyncio.gather(*(caller(c) for c in range(callers)))
        return time.perf_counter() - start

    return asyncio.run(run()), latencies


def _offline(svc: Blip2Service, images: Sequence[Any], n: int, gen: dict[str, Any]) -> None:
    """B1's "offline" mode: the same images through the service's batch API, `n` per `caption_batch` call."""
    for j in range(0, len(images), n):
        svc.caption_batch(images[j : j + n], **gen)


def _items(rt: Blip2Runtime, images: Sequence[Any], tag: str) -> list[GenerationItem]:
    prompt = rt.encode_prompt(None)
    return [GenerationItem(rt.preprocess(img, f"{tag}-{i}"), prompt) for i, img in enumerate(images)]


# ---------------------------------------------------------------------------------------------- B0
def b0_batch_sweep(ctx: BenchContext) -> ScenarioResult:
    """Items/s of the runtime alone for batch sizes 1…64."""
    caps = {"tiny": 64, "small": 32, "real": 4}
    batches = [b for b in (1, 2, 4, 8, 16, 32, 64) if b <= caps[ctx.size]]
    if ctx.quick:
        batches = [b for b in batches if b in (1, 4, 16)]
    reps = ctx.scale(3, 1) if ctx.size != "real" else 1
    svc = ctx.service(max_batch_size=max(batches))
    try:
        rt = svc.runtime
        params = GenerationParams(**ctx.gen())
        items = _items(rt, make_images(max(batches) * reps, ctx.size, seed=1), "b0")
        rt.generate(items[:1], params)  # warm-up
        rows: list[dict[str, Any]] = []
        base = None
        for b in batches:
            times = [timed(lambda j=j, b=b: rt.generate(items[j * b : (j + 1) * b], params))[0] for j in range(reps)]
            per_s = b / median(times)
            base = base or per_s
            rows.append(
                {"batch": b, "items_per_s": per_s, "ms_per_batch": median(times) * 1000, "speedup_vs_b1": per_s / base}
            )
    finally:
        svc.close()
    return ScenarioResult(
        "B0",
        "batch sweep (runtime only)",
        ctx.size,
        rows,
        notes=[f"{ctx.tokens} tokens per caption; median of {reps} batches per size"],
        plot={"x": "batch", "y": ["items_per_s", "ms_per_batch"], "logx": True},
    )


# ---------------------------------------------------------------------------------------------- B1
def b1_closed_loop(ctx: BenchContext) -> ScenarioResult:
    """N closed-loop callers: one-by-one (batching off) vs dynamic batching vs offline batched calls.

    "offline" hands the same images to the service's batch API, n per call (`caption_batch`): the same
    decoding, hashing, preprocessing and results as the callers' path, minus the concurrency. "runtime bound"
    calls the runtime on items preprocessed in a loop, with no service at all: an upper bound, reported only.
    The modes take turns for several rounds and each reports its median round, so machine noise (which moves
    a single figure by ±20 % here) hits them alike; the checks against offline take each round's ratio and
    report the median over rounds.
    """
    counts = [8, 32] if ctx.quick else [8, 32, 64]
    if ctx.size == "real":
        counts = [4]
    total = ctx.scale({"tiny": 1024, "small": 128, "real": 8}[ctx.size], 64)
    one_total = min(total, {"tiny": 256, "small": 64, "real": 8}[ctx.size])  # the batch-1 rate is steady at once
    rounds = 1 if ctx.quick or ctx.size == "real" else 5 if ctx.size == "tiny" else 3
    rows: list[dict[str, Any]] = []
    checks: list[Check] = []
    gen = ctx.gen()
    params = GenerationParams(**gen)
    bound_note = ""
    for n in counts:
        per = max(1, total // n)
        images = make_images(n * per, ctx.size, seed=10 + n)
        walls: dict[str, list[float]] = {"runtime_bound": [], "offline": [], "dynamic": [], "dynamic_async": []}
        logs = {mode: _BatchLog() for mode in ("offline", "dynamic", "dynamic_async", "one_by_one")}
        with ctx.service(max_batch_size=n) as off, ctx.service(max_batch_size=64) as dyn:
            rt = off.runtime
            off.caption_batch(images[:n], **gen)  # warm-up
            dyn.caption(images[0], **gen)
            off.add_listener(logs["offline"])
            logging_to = [logs["dynamic"]]  # both dynamic modes share one service: log to the running one
            dyn.add_listener(lambda event, to=logging_to: to[0](event))

            def runtime_bound(rt: Blip2Runtime = rt, images: list[Any] = images, n: int = n) -> None:
                items = _items(rt, images, "off")
                for j in range(0, len(items), n):
                    rt.generate(items[j : j + n], params)

            latencies: dict[str, list[float]] = {"dynamic": [], "dynamic_async": []}
            for _ in range(rounds):
                walls["runtime_bound"].append(timed(runtime_bound)[0])
                walls["offline"].append(timed(functools.partial(_offline, off, images, n, gen))[0])
                wall, lat = _closed_loop(dyn, images, n, per, gen)
                walls["dynamic"].append(wall)
                latencies["dynamic"] += lat
                logging_to[0] = logs["dynamic_async"]
                wall, lat = _closed_loop_async(dyn, images, n, per, gen)
                walls["dynamic_async"].append(wall)
                latencies["dynamic_async"] += lat
                logging_to[0] = logs["dynamic"]
        with ctx.service(max_batch_size=1) as one:
            one.caption(images[0], **gen)
            one.add_listener(logs["one_by_one"])
            one_wall, one_lat = _closed_loop(one, images[:one_total], n, max(1, one_total // n), gen)
        figures = {mode: len(images) / median(w) for mode, w in walls.items()}
        figures["one_by_one"] = one_total / one_wall
        latencies["one_by_one"] = one_lat
        for mode in ("runtime_bound", "offline", "one_by_one", "dynamic", "dynamic_async"):
            log = logs.get(mode)
            spent = one_wall if mode == "one_by_one" else sum(walls[mode])
            rows.append(
                {
                    "mode": mode,
                    "callers": n,
                    "items": one_total if mode == "one_by_one" else len(images),
                    "items_per_s": figures[mode],
                    "p50_ms": _pct(latencies.get(mode, []), 50),
                    "p99_ms": _pct(latencies.get(mode, []), 99),
                    "mean_batch": log.mean_batch() if log else float(n),
                    "worker_busy": log.busy_s() / spent if log else 1.0,
                }
            )
        if ctx.size == "tiny" and n == 32:
            # Paired: each round's offline wall / the same round's dynamic wall (same items), median over rounds.
            per_round = ratios(walls["offline"], walls["dynamic"])
            ratio_off = median(per_round)
            ratio_one = figures["dynamic"] / figures["one_by_one"]
            ratio_bound = figures["dynamic"] / figures["runtime_bound"]
            checks.append(Check("tiny, 32 callers: dynamic >= 0.9x offline", ratio_off >= 0.9, f"{ratio_off:.2f}x"))
            checks.append(Check("tiny, 32 callers: dynamic >= 8x one-by-one", ratio_one >= 8.0, f"{ratio_one:.1f}x"))
            ratio_async = median(ratios(walls["offline"], walls["dynamic_async"]))
            checks.append(
                Check(
                    "tiny, 32 asyncio callers (as in the MCP server): dynamic >= 0.9x offline",
                    ratio_async >= 0.9,
                    f"{ratio_async:.2f}x",
                )
            )
            bound_note = (
                f"tiny, 32 callers: dynamic = {ratio_bound:.2f}x the runtime bound (no service, no threads); "
                f"dynamic / offline per round: {', '.join(f'{r:.2f}' for r in per_round)}"
            )
    notes = [
        "offline = the service's batch API, n images per caption_batch call; runtime_bound = bare runtime calls on "
        "items preprocessed in a loop (no loading, hashing, results or threads): an upper bound, not a target",
        "dynamic = caller threads calling caption(); dynamic_async = asyncio tasks on one event loop calling "
        "acaption()",
        f"runtime_bound, offline and both dynamic modes take turns for {rounds} round(s); items_per_s is the "
        "median round; the checks against offline are paired: the median over rounds of that round's ratio",
        "worker_busy = model time / wall time: near 1 means image decoding and preprocessing in the callers' "
        "threads overlapped the model",
    ]
    if bound_note:
        notes.append(bound_note)
    if ctx.size == "tiny" and not ctx.quick:
        notes.append(_photo_note(ctx))
    return ScenarioResult(
        "B1",
        "closed loop: one-by-one vs dynamic vs offline",
        ctx.size,
        rows,
        checks,
        notes=notes,
        plot={"x": "callers", "y": ["items_per_s", "p50_ms"], "group": "mode", "logx": True, "logy": True},
    )


def _photo_note(ctx: BenchContext, callers: int = 32, per: int = 4, rounds: int = 3) -> str:
    """32 callers sending 640x480 JPEG bytes: the tiny model's images skip decoding, photos do not.

    A photo's decode and resize are long C calls without the GIL, so how many of them run at once matters
    here, where for the 48-pixel images above only the GIL's hand-overs do.
    """
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(7)
    photos = []
    for _ in range(callers * per):
        base = Image.fromarray(rng.integers(0, 256, (60, 80, 3), dtype=np.uint8), "RGB").resize((640, 480))
        buf = io.BytesIO()
        base.save(buf, format="JPEG", quality=90)
        photos.append(buf.getvalue())
    gen = ctx.gen()
    walls: dict[str, list[float]] = {"offline": [], "dynamic": [], "dynamic_async": []}
    with ctx.service(max_batch_size=callers) as svc:
        svc.caption_batch(photos[:callers], **gen)  # warm-up
        for _ in range(rounds):
            walls["offline"].append(timed(functools.partial(_offline, svc, photos, callers, gen))[0])
            walls["dynamic"].append(_closed_loop(svc, photos, callers, per, gen)[0])
            walls["dynamic_async"].append(_closed_loop_async(svc, photos, callers, per, gen)[0])
    rate = {mode: len(photos) / median(w) for mode, w in walls.items()}
    return (
        f"photos: {callers} callers sending 640x480 JPEG bytes ({len(photos)} per round, median of {rounds} rounds): "
        f"offline {rate['offline']:.0f} items/s, dynamic threads {rate['dynamic']:.0f} "
        f"({rate['dynamic'] / rate['offline']:.2f}x), dynamic asyncio {rate['dynamic_async']:.0f} "
        f"({rate['dynamic_async'] / rate['offline']:.2f}x)"
    )


def _pct(values: list[float], q: float) -> float:
    return percentile(values, q) * 1000 if values else float("nan")


# ---------------------------------------------------------------------------------------------- B2
def b2_wait_window(ctx: BenchContext) -> ScenarioResult:
    """Throughput and latency for several `max_wait_ms` under staggered arrivals (callers think between calls)."""
    windows = [0.0, 2.0, 10.0] if ctx.quick else [0.0, 1.0, 2.0, 5.0, 10.0, 20.0]
    callers = 16 if ctx.size != "real" else 2
    per = ctx.scale({"tiny": 8, "small": 4, "real": 1}[ctx.size], 3)
    gen = ctx.gen()
    images = make_images(callers * per, ctx.size, seed=20)
    rows: list[dict[str, Any]] = []
    with ctx.service(max_batch_size=64) as probe:
        probe.caption(images[0], **gen)
        one, _ = timed(lambda: probe.caption(images[1], **gen))
    for window in windows:
        log = _BatchLog()
        with ctx.service(max_batch_size=64, max_wait_ms=window) as svc:
            svc.caption(images[0], **gen)
            svc.add_listener(log)
            wall, lat = _closed_loop(svc, images, callers, per, gen, think_s=one)
        rows.append(
            {
                "max_wait_ms": window,
                "items_per_s": len(images) / wall,
                "p50_ms": percentile(lat, 50) * 1000,
                "p99_ms": percentile(lat, 99) * 1000,
                "mean_batch": log.mean_batch(),
            }
        )
    return ScenarioResult(
        "B2",
        "wait-window sweep, staggered arrivals",
        ctx.size,
        rows,
        notes=[f"{callers} callers, each thinking Exp(mean {one * 1000:.0f} ms = one request's latency) between calls"],
        plot={"x": "max_wait_ms", "y": ["items_per_s", "p50_ms", "mean_batch"]},
    )


# ---------------------------------------------------------------------------------------------- B4
def b4_open_loop(ctx: BenchContext) -> ScenarioResult:
    """Poisson arrivals at 0.2–1.2x capacity: p50/p99 latency, rejections and timeouts."""
    gen = ctx.gen()
    loads = [0.4, 1.0, 1.2] if ctx.quick else [0.2, 0.4, 0.6, 0.8, 1.0, 1.2]
    duration = ctx.scale({"tiny": 4, "small": 6, "real": 60}[ctx.size], 1)
    images = make_images(64, ctx.size, seed=40)
    # Capacity: what the service sustains with 64 closed-loop callers (the runtime alone is faster: B0).
    callers, per = (64, 4) if ctx.size != "real" else (4, 1)
    with ctx.service(max_batch_size=64) as svc:
        svc.caption(images[0], **gen)
        wall, _ = _closed_loop(svc, images, callers, per, gen)
        capacity = callers * per / wall
    rows: list[dict[str, Any]] = []
    limits = {"max_batch_size": 64, "max_queue": 64, "request_timeout_s": max(2.0, 40.0 / capacity)}
    try:
        for load in loads:
            rate = capacity * load
            # A server's settings (`BlipSettings.for_server()`): with the library's default, full collections of
            # everything torch and the model allocated (160-240 ms on the tiny model here) set p99 at every load.
            with ctx.service(**limits, gc_freeze=True) as svc:
                svc.caption(images[0], **gen)
                rows.append(_open_loop(svc, images, rate, duration, gen) | {"load": load})
            # Its runtime is in a reference cycle: frozen, it (and its model) would stay until the end of B4.
            del svc
            gc.unfreeze()
    finally:
        gc.unfreeze()  # the scenarios after this one run with the default collector again
    checks = [
        Check(
            "B4: every open-loop request resolved",
            all(r["unresolved"] == 0 for r in rows),
            f"{sum(r['unresolved'] for r in rows)} unresolved",
        )
    ]
    for r in rows:
        r["offered_per_s"] = round(r.pop("offered"), 2)
    return ScenarioResult(
        "B4",
        f"open loop (capacity {capacity:.1f}/s)",
        ctx.size,
        [
            {
                k: r[k]
                for k in (
                    "load",
                    "offered_per_s",
                    "done_per_s",
                    "p50_ms",
                    "p99_ms",
                    "rejected",
                    "timeouts",
                    "unresolved",
                )
            }
            for r in rows
        ],
        checks,
        notes=[
            "max_queue=64; rejections are `Overloaded` at submit, timeouts `RequestTimeout` while queued",
            "the open-loop services run as a server does (`BLIP_GC_FREEZE` on, as in `blip-mcp` and Ray replicas); "
            "the capacity comes from a library service (the default, off)",
        ],
        plot={"x": "load", "y": ["p50_ms", "p99_ms", "rejected"], "logy": False},
    )


def _open_loop(
    svc: Blip2Service, images: Sequence[Any], rate: float, duration: float, gen: dict[str, Any]
) -> dict[str, Any]:
    rng = random.Random(1)
    latencies: list[float] = []
    counts = {"rejected": 0, "timeouts": 0, "errors": 0}
    lock = threading.Lock()
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=96, thread_name_prefix="b4")
    futures = []

    def one(i: int, due: float) -> None:
        try:
            svc.caption(images[i % len(images)], **gen)
            with lock:
                latencies.append(time.perf_counter() - due)
        except Overloaded:
            with lock:
                counts["rejected"] += 1
        except RequestTimeout:
            with lock:
                counts["timeouts"] += 1
        except BlipError:
            with lock:
                counts["errors"] += 1

    start = time.perf_counter()
    due = start
    i = 0
    while True:
        due += rng.expovariate(rate)
        if due - start > duration:
            break
        delay = due - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        futures.append(pool.submit(one, i, due))
        i += 1
    _done, not_done = concurrent.futures.wait(futures, timeout=300)
    pool.shutdown(wait=not not_done, cancel_futures=True)
    wall = time.perf_counter() - start
    return {
        "offered": i / duration,
        "done_per_s": len(latencies) / wall,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "unresolved": len(not_done),
        **counts,
    }


# ---------------------------------------------------------------------------------------------- B5
def b5_burst(ctx: BenchContext) -> ScenarioResult:
    """A burst 4x the queue: single calls are rejected at once past the queue; `caption_batch` backs off and
    finishes all; nothing hangs."""
    queue = 16 if ctx.size == "real" else 64
    burst = 4 * queue
    gen = ctx.gen()
    images = make_images(burst, ctx.size, seed=50)
    rows: list[dict[str, Any]] = []
    with ctx.service(max_batch_size=16, max_queue=queue) as svc:
        svc.caption(images[0], **gen)
        barrier = threading.Barrier(burst)
        outcome: list[str] = []
        lock = threading.Lock()

        def caller(i: int) -> None:
            barrier.wait()
            try:
                svc.caption(images[i], **gen)
                kind = "ok"
            except Overloaded:
                kind = "rejected"
            except BlipError as exc:
                kind = type(exc).__name__
            with lock:
                outcome.append(kind)

        threads = [threading.Thread(target=caller, args=(i,), daemon=True) for i in range(burst)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=600)
        wall = time.perf_counter() - start
        hung = sum(t.is_alive() for t in threads)
        rows.append(
            {
                "mode": "single calls",
                "submitted": burst,
                "ok": outcome.count("ok"),
                "rejected": outcome.count("rejected"),
                "other": len(outcome) - outcome.count("ok") - outcome.count("rejected"),
                "hung": hung,
                "seconds": wall,
            }
        )
        wall, results = timed(lambda: svc.caption_batch(images, return_exceptions=True, **gen))
        ok = sum(not isinstance(r, BlipError) for r in results)
        rows.append(
            {
                "mode": "caption_batch",
                "submitted": burst,
                "ok": ok,
                "rejected": 0,
                "other": burst - ok,
                "hung": 0,
                "seconds": wall,
            }
        )
        after = svc.caption(images[1], **gen)
    checks = [
        Check(
            "B5: burst resolves every caller (accepted + rejected = submitted)",
            rows[0]["ok"] + rows[0]["rejected"] + rows[0]["other"] == burst and hung == 0,
            f"{rows[0]['ok']} ok + {rows[0]['rejected']} rejected + {rows[0]['other']} other of {burst}, {hung} hung",
        ),
        Check("B5: caption_batch completes the whole burst", rows[1]["ok"] == burst, f"{rows[1]['ok']}/{burst}"),
        Check("B5: a normal request succeeds afterwards", bool(after.caption is not None), "ok"),
    ]
    return ScenarioResult("B5", f"burst of {burst} into a queue of {queue}", ctx.size, rows, checks)


# ---------------------------------------------------------------------------------------------- B6
def b6_half_cancel(ctx: BenchContext) -> ScenarioResult:
    """64 async callers, half cancel after a short random delay: cancelled work is dropped, the rest is served."""
    callers = 16 if ctx.size == "real" else 64
    gen = ctx.gen()
    images = make_images(callers, ctx.size, seed=60)

    async def run(cancel: bool, svc: Blip2Service) -> dict[str, Any]:
        rng = random.Random(6)
        latencies: list[float] = []

        async def one(i: int) -> None:
            start = time.perf_counter()
            await svc.acaption(images[i], **gen)
            latencies.append(time.perf_counter() - start)

        tasks = [asyncio.ensure_future(one(i)) for i in range(callers)]
        if cancel:
            for i in range(0, callers, 2):
                asyncio.get_running_loop().call_later(rng.uniform(0.0, 0.05), tasks[i].cancel)
        start = time.perf_counter()
        done, pending = await asyncio.wait(tasks, timeout=600)
        wall = time.perf_counter() - start
        return {
            "cancelled_tasks": sum(t.cancelled() for t in done),
            "completed": len(latencies),
            "unfinished": len(pending),
            "p50_ms": percentile(latencies, 50) * 1000,
            "seconds": wall,
        }

    rows = []
    for cancel in (False, True):
        with ctx.service(max_batch_size=16) as svc:
            svc.caption(images[0], **gen)
            before = svc.stats()
            r = asyncio.run(run(cancel, svc))
            after = svc.stats()
            ran = sum(n * c for n, c in after.batch_size_histogram.items()) - sum(
                n * c for n, c in before.batch_size_histogram.items()
            )
            follow = svc.caption(images[1], **gen)
        rows.append(
            {"half_cancel": cancel, **r, "dropped_before_run": after.cancelled - before.cancelled, "rows_run": ran}
        )
    checks = [
        Check(
            "B6: no task left hanging", all(r["unfinished"] == 0 for r in rows), str([r["unfinished"] for r in rows])
        ),
        Check(
            "B6: the model ran fewer rows when half cancelled",
            rows[1]["rows_run"] < rows[0]["rows_run"],
            f"{rows[1]['rows_run']} vs {rows[0]['rows_run']}",
        ),
        Check("B6: a request after the cancellations succeeds", follow.caption is not None, "ok"),
    ]
    return ScenarioResult("B6", f"{callers} async callers, half cancel", ctx.size, rows, checks)


# ---------------------------------------------------------------------------------------------- B7
class _PoisonRuntime(Blip2Runtime):
    """Fails any batch that contains the poisoned image (a model error only that input triggers)."""

    poison: str | None = None

    def generate(self, items: Sequence[GenerationItem], params: GenerationParams) -> Any:
        if self.poison is not None and any(it.image.key == self.poison for it in items):
            raise RuntimeError("poisoned input")
        return super().generate(items, params)


def b7_poisoned(ctx: BenchContext) -> ScenarioResult:
    """One poisoned input in a batch of 32: bisection fails only it; the cost in extra handler calls and time."""
    n = 8 if ctx.size == "real" else 32
    gen = ctx.gen()
    images = make_images(n, ctx.size, seed=70)
    rows: list[dict[str, Any]] = []
    captions: dict[bool, list[str | None]] = {}
    for poisoned in (False, True):
        with ctx.service(_PoisonRuntime, max_batch_size=n, max_wait_ms=200.0) as svc:
            svc.caption(images[0], **gen)
            rt = svc.runtime
            assert isinstance(rt, _PoisonRuntime)
            if poisoned:
                from blip_tools.images import load_image

                rt.poison = load_image(images[n // 3], svc.settings).sha256
            before = svc.stats()
            wall, results = timed(lambda svc=svc: _concurrent_captions(svc, images, gen))
            after = svc.stats()
        captions[poisoned] = [None if isinstance(r, BaseException) else r for r in results]
        rows.append(
            {
                "poisoned": poisoned,
                "ok": sum(not isinstance(r, BaseException) for r in results),
                "failed": sum(isinstance(r, BaseException) for r in results),
                "handler_calls": after.batches - before.batches,
                "seconds": wall,
            }
        )
    same = all(p is None or p == c for p, c in zip(captions[True], captions[False], strict=True))
    checks = [
        Check(
            "B7: only the poisoned request fails",
            rows[1]["failed"] == 1 and rows[1]["ok"] == n - 1,
            f"{rows[1]['ok']} ok, {rows[1]['failed']} failed, {rows[1]['handler_calls']} handler calls",
        ),
        Check("B7: the others get the clean run's captions", same, "equal" if same else "differ"),
    ]
    return ScenarioResult("B7", f"one poisoned input in a batch of {n}", ctx.size, rows, checks)


def _concurrent_captions(svc: Blip2Service, images: Sequence[Any], gen: dict[str, Any]) -> list[Any]:
    def one(img: Any) -> Any:
        try:
            return svc.caption(img, **gen).caption
        except BlipError as exc:
            return exc

    with concurrent.futures.ThreadPoolExecutor(max_workers=len(images)) as pool:
        return list(pool.map(one, images))


SCENARIOS: dict[str, Callable[[BenchContext], ScenarioResult]] = {
    "B0": b0_batch_sweep,
    "B1": b1_closed_loop,
    "B2": b2_wait_window,
    "B4": b4_open_loop,
    "B5": b5_burst,
    "B6": b6_half_cancel,
    "B7": b7_poisoned,
}
