"""`/metrics`: parsed with prometheus_client's own parser; counters and histograms move after real requests
(console API, MCP over HTTP, the service itself), errors are counted by type, rejections and queue depth show
while the worker is held, and every app has its own registry."""

from __future__ import annotations

import concurrent.futures
from typing import Any

import httpx
import pytest
from _web_testlib import MAX_QUEUE, WebServer, png_bytes, poll, shape_image
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from blip_tools.errors import Overloaded
from mcp_server.metrics import BlipMetrics, LiveWindow, percentile

EXPECTED_FAMILIES = {
    "blip_up": "gauge",
    "blip_requests": "counter",
    "blip_batches": "counter",
    "blip_request_failures": "counter",
    "blip_completed_requests": "counter",
    "blip_rejected_requests": "counter",
    "blip_cancelled_requests": "counter",
    "blip_expired_requests": "counter",
    "blip_batch_retries": "counter",
    "blip_cache_hits": "counter",
    "blip_cache_misses": "counter",
    "blip_queue_depth": "gauge",
    "blip_queue_capacity": "gauge",
    "blip_max_batch_size": "gauge",
    "blip_model_load_seconds": "gauge",
    "blip_models_loaded": "gauge",
    "blip_uptime_seconds": "gauge",
    "blip_model_info": "gauge",  # an Info metric reads back as a gauge in the text format
    "blip_batch_size": "histogram",
    "blip_batch_execution_seconds": "histogram",
    "blip_queue_wait_seconds": "histogram",
    "blip_request_duration_seconds": "histogram",
    "blip_errors": "counter",
}


def caption_upload(srv: WebServer, seed: int) -> httpx.Response:
    with srv.client() as http:
        return http.post(
            "/ui/api/caption?max_new_tokens=6",
            content=png_bytes(shape_image(seed)),
            headers=srv.headers(**{"Content-Type": "image/png"}),
        )


def test_metrics_needs_the_token_and_parses(web_server: WebServer) -> None:
    with web_server.client() as http:
        missing = http.get("/metrics")
        ok = http.get("/metrics", headers=web_server.headers())
    assert missing.status_code == 401
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith("text/plain")
    assert "access-control-allow-origin" not in ok.headers
    families = {f.name: f for f in text_string_to_metric_families(ok.text)}
    for name, kind in EXPECTED_FAMILIES.items():
        assert name in families, f"{name} missing from /metrics"
        assert families[name].type == kind, (name, families[name].type)
    assert all(name.startswith("blip_") for name in families)
    up = families["blip_up"].samples[0].value
    assert up == 1.0
    assert families["blip_models_loaded"].samples[0].value >= 1
    assert families["blip_model_load_seconds"].samples[0].value > 0
    assert families["blip_queue_capacity"].samples[0].value == MAX_QUEUE
    info = families["blip_model_info"].samples[0].labels
    assert info["device"] == "cpu" and info["dtype"] == "float32"


def test_counters_and_histograms_move_after_console_requests(web_server: WebServer) -> None:
    srv = web_server
    caption = {"task": "caption"}
    before = {
        "requests": srv.sample("blip_requests_total", caption),
        "batches": srv.sample("blip_batches_total", caption),
        "completed": srv.sample("blip_completed_requests_total"),
        "batch_count": srv.sample("blip_batch_size_count", caption),
        "batch_sum": srv.sample("blip_batch_size_sum", caption),
        "wait_count": srv.sample("blip_queue_wait_seconds_count", caption),
        "duration_count": srv.sample("blip_request_duration_seconds_count", caption),
        "exec_sum": srv.sample("blip_batch_execution_seconds_sum", caption),
    }
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: caption_upload(srv, i), range(4)))
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert all(r.json()["caption"] is not None for r in responses)
    # The histograms come from the batch listener, which the worker calls just after delivering the batch's results:
    # wait until it has observed all four requests (a batch's request durations are observed last).
    poll(
        lambda: srv.sample("blip_request_duration_seconds_count", caption) >= before["duration_count"] + 4,
        what="the batch listener to observe the four requests",
    )

    assert srv.sample("blip_requests_total", caption) == before["requests"] + 4
    assert srv.sample("blip_completed_requests_total") >= before["completed"] + 4
    batches = srv.sample("blip_batches_total", caption) - before["batches"]
    assert 1 <= batches <= 4
    # The histogram saw the same batches, and their sizes add up to the four requests.
    assert srv.sample("blip_batch_size_count", caption) - before["batch_count"] == batches
    assert srv.sample("blip_batch_size_sum", caption) - before["batch_sum"] == 4
    assert srv.sample("blip_queue_wait_seconds_count", caption) - before["wait_count"] == 4
    assert srv.sample("blip_request_duration_seconds_count", caption) - before["duration_count"] == 4
    assert srv.sample("blip_batch_execution_seconds_sum", caption) > before["exec_sum"]
    # Cumulative buckets: the +Inf bucket equals the count.
    assert srv.sample("blip_batch_size_bucket", {"task": "caption", "le": "+Inf"}) == srv.sample(
        "blip_batch_size_count", caption
    )


def test_cache_hits_move_on_a_repeated_image(web_server: WebServer) -> None:
    srv = web_server
    image = png_bytes(shape_image(5, size=(90, 70)))
    with srv.client() as http:
        first = http.post("/ui/api/answer?question=what%20shape", content=image, headers=srv.headers())
        hits = srv.sample("blip_cache_hits_total", {"cache": "features"})
        second = http.post("/ui/api/answer?question=what%20colour", content=image, headers=srv.headers())
    assert first.status_code == 200 and second.status_code == 200, (first.text, second.text)
    assert srv.sample("blip_cache_hits_total", {"cache": "features"}) >= hits + 1
    assert srv.sample("blip_cache_hits_total", {"cache": "prefix"}) >= 1
    assert srv.sample("blip_cache_misses_total", {"cache": "prefix"}) >= 1  # the first question's


def test_errors_are_counted_by_type_and_interface(web_server: WebServer) -> None:
    srv = web_server
    invalid = {"interface": "ui", "type": "invalid_image"}
    too_large = {"interface": "ui", "type": "payload_too_large"}
    before_invalid, before_large = srv.sample("blip_errors_total", invalid), srv.sample("blip_errors_total", too_large)
    with srv.client() as http:
        bad = http.post("/ui/api/caption", content=b"this is not an image", headers=srv.headers())
        big = http.post("/ui/api/caption", content=b"\x89PNG" + b"\0" * 250_000, headers=srv.headers())
    assert bad.status_code == 422 and bad.json()["error"] == "invalid_image"
    assert big.status_code == 413 and big.json()["error"] == "payload_too_large"
    assert "max_image_bytes" in big.json()["message"]
    assert srv.sample("blip_errors_total", invalid) == before_invalid + 1
    assert srv.sample("blip_errors_total", too_large) == before_large + 1


def test_uploads_over_the_whole_body_limit_get_the_json_error_and_are_counted(web_server: WebServer) -> None:
    """Past the server's body limit (not only past max_image_bytes) the console still answers its documented
    `{"error": "payload_too_large", ...}` JSON, declared length or streamed, and counts it; /mcp keeps its own 413."""
    srv = web_server
    too_large = {"interface": "ui", "type": "payload_too_large"}
    with srv.client() as http:
        limit = http.get("/ui/api/info", headers=srv.headers()).json()["body_limit"]
        huge = b"\x89PNG" + b"\0" * (limit + 10_000)
        before = srv.sample("blip_errors_total", too_large)
        declared = http.post("/ui/api/caption", content=huge, headers=srv.headers())

        def chunks() -> Any:
            for start in range(0, len(huge), 64 * 1024):
                yield huge[start : start + 64 * 1024]

        streamed = http.post("/ui/api/score?text=a", content=chunks(), headers=srv.headers())
        mcp = http.post("/mcp", content=huge, headers=srv.headers(**{"Content-Type": "application/json"}))
    for response in (declared, streamed):
        assert response.status_code == 413, response.text
        assert response.headers["content-type"].startswith("application/json")
        body = response.json()
        assert body["error"] == "payload_too_large" and "max_image_bytes" in body["message"], body
    assert srv.sample("blip_errors_total", too_large) == before + 2
    assert mcp.status_code == 413


@pytest.mark.anyio
async def test_mcp_tool_errors_and_calls_reach_the_same_metrics(web_server: WebServer) -> None:
    import anyio
    import httpx2
    from mcp import Client
    from mcp.client.streamable_http import streamable_http_client

    srv = web_server
    labels = {"interface": "mcp", "type": "path_not_allowed"}
    before_err = srv.sample("blip_errors_total", labels)
    before_req = srv.sample("blip_requests_total", {"task": "caption"})
    path = str(next(srv.gallery_dir.iterdir()))
    with anyio.fail_after(60):
        async with (
            httpx2.AsyncClient(headers=srv.headers(), timeout=httpx2.Timeout(60.0)) as http,
            Client(streamable_http_client(f"{srv.base}/mcp", http_client=http)) as client,
        ):
            good = await client.call_tool("caption_image", {"image": path, "max_new_tokens": 5})
            bad = await client.call_tool("caption_image", {"image": "/etc/hostname"})
    assert not good.is_error
    assert bad.is_error
    assert srv.sample("blip_requests_total", {"task": "caption"}) == before_req + 1
    assert srv.sample("blip_errors_total", labels) == before_err + 1


def test_rejections_and_queue_depth_while_the_worker_is_held(web_server: WebServer) -> None:
    srv = web_server
    service = srv.service
    rejected_before = srv.sample("blip_rejected_requests_total")
    images = [shape_image(i, size=(64, 48)) for i in range(MAX_QUEUE + 4)]
    srv.gate.open_event.clear()
    srv.gate.entered.clear()
    pool = concurrent.futures.ThreadPoolExecutor(MAX_QUEUE + 4)
    try:
        blocker = pool.submit(service.caption, images[0], max_new_tokens=3)
        assert srv.gate.entered.wait(30), "the blocker never reached the model"
        queued = [pool.submit(service.caption, img, max_new_tokens=3) for img in images[1 : MAX_QUEUE + 1]]
        poll(lambda: service.stats().queue_depth == MAX_QUEUE, what="a full queue")
        assert srv.sample("blip_queue_depth") == MAX_QUEUE
        for img in images[MAX_QUEUE + 1 :]:
            with pytest.raises(Overloaded):
                service.caption(img, max_new_tokens=3)
        with srv.client() as http:
            overloaded = http.post(
                "/ui/api/caption", content=png_bytes(images[-1]), headers=srv.headers(**{"Content-Type": "image/png"})
            )
        assert overloaded.status_code == 503 and overloaded.json()["error"] == "overloaded"
        assert int(overloaded.headers["retry-after"]) >= 1
        assert srv.sample("blip_rejected_requests_total") == rejected_before + 4
        assert srv.sample("blip_errors_total", {"interface": "ui", "type": "overloaded"}) >= 1
    finally:
        srv.gate.open_event.set()
    assert blocker.result(timeout=60).caption is not None
    assert all(f.result(timeout=60).caption is not None for f in queued)
    pool.shutdown()
    poll(lambda: srv.sample("blip_queue_depth") == 0, what="the queue to drain")


def test_each_app_has_its_own_registry() -> None:
    first = BlipMetrics(lambda: None, lambda: "starting")
    second = BlipMetrics(lambda: None, lambda: "starting")
    assert first.registry is not second.registry
    first.batch_size.labels("caption").observe(3)
    second.errors.labels("ui", "invalid_input").inc()
    one = {s.name: s for f in text_string_to_metric_families(first.render().decode()) for s in f.samples}
    two = {s.name: s for f in text_string_to_metric_families(second.render().decode()) for s in f.samples}
    assert one["blip_batch_size_count"].value == 1 and "blip_batch_size_count" not in two
    assert two["blip_errors_total"].value == 1 and "blip_errors_total" not in one
    assert one["blip_up"].value == 0.0  # no service yet
    assert not any(name.startswith("blip_") for name in REGISTRY._names_to_collectors)


def test_live_window_series_and_percentiles() -> None:
    now = [1000.2]
    window = LiveWindow(window_s=60, clock=lambda: now[0])
    window.record_batch(4, [0.010, 0.020, 0.030, 0.040], failed=1, final=True)
    window.record_queue_depth(3)
    now[0] = 1002.5
    window.record_batch(2, [], failed=0, final=False)  # a split batch: counted as a batch, requests not yet
    window.record_batch(2, [0.100, 0.200], failed=0, final=True)
    snap: dict[str, Any] = window.snapshot(10)
    series = {p["t"]: p for p in snap["series"]}
    assert len(snap["series"]) == 10 and max(series) == 1002
    assert series[1000]["throughput"] == 3 and series[1000]["failed"] == 1
    assert series[1000]["queue_depth"] == 3 and series[1000]["mean_batch"] == 4
    assert series[1000]["p50_ms"] == pytest.approx(25.0)
    assert series[1001]["throughput"] == 0 and series[1001]["p50_ms"] is None
    assert series[1002]["batches"] == 2 and series[1002]["throughput"] == 2 and series[1002]["max_batch"] == 2
    assert snap["summary"]["completed"] == 5
    assert snap["summary"]["recent_per_s"] == pytest.approx(0.5)
    assert snap["summary"]["p99_ms"] == pytest.approx(percentile([10, 20, 30, 40, 100, 200], 0.99) or 0, rel=1e-6)
    now[0] = 1100.0  # everything older than the window is dropped
    assert window.snapshot(60)["summary"]["completed"] == 0
    assert percentile([], 0.5) is None
