"""Prometheus metrics for the HTTP server (`/metrics`) and the live window the web dashboard plots.

`BlipMetrics` owns one `CollectorRegistry` per app (never the global one, so tests and several servers in one
process do not clash). Two sources feed it:

* the service's batch listener (`Blip2Service.add_listener`): histograms of batch size, batch execution time,
  per-request queue wait and model-side duration, by task — and the dashboard's one-second buckets;
* `Blip2Service.stats()`, read at scrape time by a custom collector: requests, batches, failures by task,
  rejections, cancellations, expiries, queue depth, cache hits, model load time, uptime.

Errors returned to callers are counted by their `BlipError.code` and interface (`count_error`), so
`blip_errors_total{type="invalid_image"}` covers bad inputs that never reached the model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

if TYPE_CHECKING:
    from blip_tools.batching import BatchEvent
    from blip_tools.service import Blip2Service

logger = logging.getLogger(__name__)

METRICS_PATH = "/metrics"

SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
"""Histogram buckets for queue wait, batch execution and request duration (1 ms … 60 s)."""

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
"""Histogram buckets for requests per batch."""

QUEUE_SAMPLE_S = 0.25
"""How often the running app samples the queue depth for the dashboard."""

LIVE_WINDOW_S = 300
"""Seconds of one-second buckets the dashboard can plot."""

_SAMPLES_PER_BUCKET = 512
"""Latency samples kept per second (reservoir sampling beyond that), for the dashboard's percentiles."""


# ---------------------------------------------------------------------------------------------- live window
@dataclass
class _Bucket:
    """What happened in one wall-clock second."""

    t: int
    completed: int = 0
    failed: int = 0
    batches: int = 0
    batch_items: int = 0
    max_batch: int = 0
    queue_depth: int = 0
    latencies: list[float] = field(default_factory=list)
    seen: int = 0


def percentile(sorted_values: list[float], q: float) -> float | None:
    """The `q`-quantile (0..1) of sorted values by linear interpolation; None when empty."""
    if not sorted_values:
        return None
    pos = (len(sorted_values) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


class LiveWindow:
    """One-second buckets of throughput, batch sizes, queue depth and latency samples for the last few minutes.

    Fed from the model worker thread (`record_batch`) and a sampler (`record_queue_depth`); read by the
    dashboard API (`snapshot`). Thread-safe.
    """

    def __init__(self, window_s: int = LIVE_WINDOW_S, clock: Callable[[], float] = time.time) -> None:
        self.window_s = window_s
        self._clock = clock
        self._buckets: deque[_Bucket] = deque()
        self._lock = threading.Lock()
        self._rng = random.Random(0)

    def _bucket(self, now: float) -> _Bucket:
        """The bucket for `now` (created, and old ones dropped, as time moves on). Caller holds the lock."""
        t = int(now)
        if not self._buckets or self._buckets[-1].t < t:
            self._buckets.append(_Bucket(t))
            while self._buckets and self._buckets[0].t <= t - self.window_s:
                self._buckets.popleft()
        return self._buckets[-1]

    def record_batch(self, size: int, latencies_s: Iterable[float], failed: int, final: bool) -> None:
        """Count one batch; `final` batches (not split for a retry) also count their requests and latencies.

        `latencies_s` has one value per request of the batch, `failed` of which failed. The dashboard's latency
        percentiles are those of successful requests: when every request of the call failed (a lone request
        that raised, often at once, or a handler returning the wrong number of results) none of its latencies is
        kept. A batch where only some failed keeps them all: the event does not say which ones failed, and they
        all took the batch's full forward pass, so they do not pull the percentiles down.
        """
        values = list(latencies_s)
        with self._lock:
            b = self._bucket(self._clock())
            b.batches += 1
            b.batch_items += size
            b.max_batch = max(b.max_batch, size)
            if not final:
                return
            b.failed += failed
            if failed >= len(values):
                return  # nothing succeeded: no latency sample, no completed request
            for value in values:
                b.completed += 1
                b.seen += 1
                if len(b.latencies) < _SAMPLES_PER_BUCKET:
                    b.latencies.append(value)
                else:
                    j = self._rng.randrange(b.seen)
                    if j < _SAMPLES_PER_BUCKET:
                        b.latencies[j] = value
            b.completed -= failed

    def record_queue_depth(self, depth: int) -> None:
        """Keep the highest queue depth seen in the current second."""
        with self._lock:
            b = self._bucket(self._clock())
            b.queue_depth = max(b.queue_depth, depth)

    def snapshot(self, window_s: int = 120, recent_s: int = 10) -> dict[str, Any]:
        """Per-second series over the last `window_s` seconds (gaps filled with zeros) and window percentiles.

        Latencies are model-side (queue wait + batch execution) in milliseconds, of successful requests only (see
        `record_batch`; refusals before the queue, such as `Overloaded` or invalid input, never have one); `null`
        where a second had none. The summary's `failed` counts the requests that failed on the model.
        The summary also gives the throughput over the last `recent_s` seconds (the current one included).
        """
        window_s = max(5, min(int(window_s), self.window_s))
        now = self._clock()
        end = int(now)
        start = end - window_s + 1
        with self._lock:
            by_t = {b.t: b for b in self._buckets if b.t >= start}
            series: list[dict[str, Any]] = []
            all_latencies: list[float] = []
            completed = failed = 0
            recent = sum(b.completed for t, b in by_t.items() if t > end - recent_s)
            for t in range(start, end + 1):
                b = by_t.get(t)
                if b is None:
                    series.append(
                        {"t": t, "throughput": 0, "failed": 0, "batches": 0, "mean_batch": None, "max_batch": 0,
                         "queue_depth": 0, "p50_ms": None, "p90_ms": None, "p99_ms": None}
                    )  # fmt: skip
                    continue
                lat = sorted(b.latencies)
                all_latencies.extend(lat)
                completed += b.completed
                failed += b.failed
                series.append(
                    {
                        "t": t,
                        "throughput": b.completed,
                        "failed": b.failed,
                        "batches": b.batches,
                        "mean_batch": round(b.batch_items / b.batches, 3) if b.batches else None,
                        "max_batch": b.max_batch,
                        "queue_depth": b.queue_depth,
                        **{f"p{q}_ms": _ms(percentile(lat, q / 100)) for q in (50, 90, 99)},
                    }
                )
        all_latencies.sort()
        return {
            "now": now,
            "window_s": window_s,
            "series": series,
            "summary": {
                "completed": completed,
                "failed": failed,
                "latency_of": "successful requests",
                "throughput_per_s": round(completed / window_s, 3),
                "recent_s": recent_s,
                "recent_per_s": round(recent / recent_s, 3),
                **{f"p{q}_ms": _ms(percentile(all_latencies, q / 100)) for q in (50, 90, 99)},
            },
        }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000.0, 3)


# ---------------------------------------------------------------------------------------------- collectors
class _StatsCollector(Collector):
    """Reads `Blip2Service.stats()` at scrape time: counters and gauges the service already keeps."""

    def __init__(self, source: Callable[[], Blip2Service | None], status: Callable[[], str]) -> None:
        self._source = source
        self._status = status

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("blip_up", "1 when the model is loaded and the service serves requests, else 0.")
        status = self._status()
        up.add_metric([], 1.0 if status == "ok" else 0.0)
        yield up
        service = self._source()
        if service is None:
            return
        s = service.stats()

        requests = CounterMetricFamily("blip_requests", "Requests accepted into the queue, by task.", labels=["task"])
        batches = CounterMetricFamily("blip_batches", "Forward passes (batches) run, by task.", labels=["task"])
        failures = CounterMetricFamily(
            "blip_request_failures", "Requests that reached the model and failed, by task.", labels=["task"]
        )
        for task, ts in sorted(s.per_task.items()):
            requests.add_metric([task], ts.requests)
            batches.add_metric([task], ts.batches)
            failures.add_metric([task], ts.errors)
        yield from (requests, batches, failures)

        for name, doc, value in (
            ("blip_completed_requests", "Requests that finished (successfully or not) on the model.", s.completed),
            ("blip_rejected_requests", "Requests refused at once because the queue was full (Overloaded).", s.rejected),
            ("blip_cancelled_requests", "Requests cancelled by their caller before they ran.", s.cancelled),
            ("blip_expired_requests", "Requests dropped after their deadline (RequestTimeout).", s.expired),
            ("blip_batch_retries", "Batches split and retried after a failure or out-of-memory.", s.retries),
        ):
            family = CounterMetricFamily(name, doc)
            family.add_metric([], value)
            yield family

        hits = CounterMetricFamily(
            "blip_cache_hits", "Cache hits: image features, and the image-prefix KV cache.", labels=["cache"]
        )
        hits.add_metric(["features"], s.cache_hits)
        hits.add_metric(["prefix"], s.prefix_cache_hits)
        yield hits
        misses = CounterMetricFamily(
            "blip_cache_misses", "Cache misses: image features, and the image-prefix KV cache.", labels=["cache"]
        )
        misses.add_metric(["features"], s.cache_misses)
        misses.add_metric(["prefix"], s.prefix_cache_misses)
        yield misses

        info = service.model_info()
        gauges: tuple[tuple[str, str, float], ...] = (
            ("blip_queue_depth", "Requests waiting in the queue right now.", float(s.queue_depth)),
            ("blip_queue_capacity", "Queue size at which requests are rejected (BLIP_MAX_QUEUE).",
             float(info.limits.get("max_queue", 0))),
            ("blip_max_batch_size", "Most requests per forward pass (BLIP_MAX_BATCH_SIZE).",
             float(info.limits.get("max_batch_size", 0))),
            ("blip_model_load_seconds", "Seconds spent loading checkpoints in this process.", s.model_load_s),
            ("blip_models_loaded", "Checkpoints loaded in this process.", float(s.models_loaded)),
            ("blip_uptime_seconds", "Seconds since the service was created.", s.uptime_s),
        )  # fmt: skip
        for name, doc, number in gauges:
            gauge = GaugeMetricFamily(name, doc)
            gauge.add_metric([], number)
            yield gauge
        model = InfoMetricFamily("blip_model", "The checkpoints, device and dtype the service runs.")
        model.add_metric(
            [],
            {
                "model": info.model,
                "retrieval_model": info.retrieval_model,
                "device": info.device,
                "dtype": info.dtype,
                "retrieval_loaded": str(info.retrieval_loaded).lower(),
            },
        )
        yield model


class BlipMetrics:
    """The metrics of one HTTP app: its own registry, the batch listener, error counts and the live window.

    Args:
        source: returns the running service, or None while none runs (scrapes then show only `blip_up`).
        status: returns the service status (`ok`, `loading`, `error`, `closed`).
        registry: the registry to fill (default: a new private one).
    """

    def __init__(
        self,
        source: Callable[[], Blip2Service | None],
        status: Callable[[], str] = lambda: "ok",
        *,
        registry: CollectorRegistry | None = None,
        window_s: int = LIVE_WINDOW_S,
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.live = LiveWindow(window_s)
        self._source = source
        self._attached: set[int] = set()
        self._lock = threading.Lock()
        self._active = True
        self.registry.register(_StatsCollector(source, status))
        self.batch_size = Histogram(
            "blip_batch_size",
            "Requests per forward pass (batch), by task.",
            ["task"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=self.registry,
        )
        self.batch_execution = Histogram(
            "blip_batch_execution_seconds",
            "Seconds one batch took on the model, by task.",
            ["task"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "blip_queue_wait_seconds",
            "Seconds a request waited in the queue before its batch started, by task.",
            ["task"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.request_duration = Histogram(
            "blip_request_duration_seconds",
            "Model-side seconds per request (queue wait + batch execution), by task.",
            ["task"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.errors = Counter(
            "blip_errors",
            "Errors returned to callers, by interface (mcp, ui) and error type (BlipError code).",
            ["interface", "type"],
            registry=self.registry,
        )

    # ------------------------------------------------------------------ feeding
    def attach(self, service: Blip2Service) -> None:
        """Listen to `service`'s batches (once per service; the listener goes quiet after `close`)."""
        with self._lock:
            if id(service) in self._attached:
                return
            self._attached.add(id(service))
            self._active = True
        service.add_listener(self.observe)

    def close(self) -> None:
        """Stop counting batches (the service keeps the listener; it becomes a no-op)."""
        with self._lock:
            self._active = False
            self._attached.clear()

    def observe(self, event: BatchEvent) -> None:
        """The batch listener: histograms and the live window (runs on the model worker thread)."""
        if not self._active:
            return
        task = event.task
        final = not event.split
        self.batch_size.labels(task).observe(event.size)
        self.batch_execution.labels(task).observe(event.exec_s)
        latencies = [w + event.exec_s for w in event.queue_wait_s] if final else []
        if final:
            wait, duration = self.queue_wait.labels(task), self.request_duration.labels(task)
            for w, total in zip(event.queue_wait_s, latencies, strict=True):
                wait.observe(w)
                duration.observe(total)
        self.live.record_batch(event.size, latencies, event.failed, final)

    def sample_queue_depth(self) -> None:
        """Record the current queue depth in the live window (called by a sampler a few times a second)."""
        service = self._source()
        if service is not None and not service.closed:
            self.live.record_queue_depth(service.stats().queue_depth)

    def count_error(self, exc: BaseException, interface: str) -> None:
        """Count one error returned to a caller, labelled with its `BlipError.code` (else the class name)."""
        code = getattr(exc, "code", None) or type(exc).__name__
        self.errors.labels(interface, str(code)).inc()

    @contextlib.asynccontextmanager
    async def running(self, service: Blip2Service) -> AsyncIterator[None]:
        """While the app runs: listen to `service`, count MCP tool errors, sample the queue depth."""
        from ._common import add_error_observer

        self.attach(service)
        remove = add_error_observer(lambda exc: self.count_error(exc, "mcp"))
        sampler = asyncio.create_task(self._sample_queue_forever(), name="blip-metrics-queue-sampler")
        try:
            yield
        finally:
            remove()
            sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sampler
            self.close()

    async def _sample_queue_forever(self) -> None:
        while True:
            try:
                self.sample_queue_depth()
            except Exception:  # a failed sample must not end the sampler
                logger.debug("queue depth sample failed", exc_info=True)
            await asyncio.sleep(QUEUE_SAMPLE_S)

    # ------------------------------------------------------------------ exposition
    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    async def endpoint(self, request: Request) -> Response:
        """`GET /metrics`."""
        return Response(self.render(), media_type=CONTENT_TYPE_LATEST)

    def route(self, path: str = METRICS_PATH) -> Route:
        """The `/metrics` route (behind the app's Host/Origin and token checks like every route)."""
        return Route(path, self.endpoint, methods=["GET"], name="metrics")


__all__ = [
    "BATCH_SIZE_BUCKETS",
    "METRICS_PATH",
    "SECONDS_BUCKETS",
    "BlipMetrics",
    "LiveWindow",
    "percentile",
]
