"""Console API leftovers of the HTTP audit: an unknown path or a wrong method under `/ui/api/` answers the API's
JSON error (404 `not_found`, 405 `method_not_allowed` with `Allow`), counted like the API's other errors, while
`/mcp` and the static files keep their own answers; the dashboard's latency percentiles are those of successful
requests, so fast failures do not drag them down."""

from __future__ import annotations

import pytest
from _web_testlib import WebServer

from mcp_server.metrics import BlipMetrics, LiveWindow


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/ui/api/nope"),
        ("POST", "/ui/api/nope/deeper?x=1"),
        ("GET", "/ui/api/"),
        ("GET", "/ui/api"),
        ("GET", "/ui/api/info/"),  # Starlette used to redirect this one (307) to /ui/api/info
    ],
)
def test_an_unknown_api_path_is_a_json_404(web_server: WebServer, method: str, path: str) -> None:
    srv = web_server
    before = srv.sample("blip_errors_total", {"interface": "ui", "type": "not_found"})
    with srv.client() as http:
        r = http.request(method, path, headers=srv.headers(), follow_redirects=False)
    assert r.status_code == 404, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["error"] == "not_found" and path.split("?")[0] in body["message"]
    assert srv.sample("blip_errors_total", {"interface": "ui", "type": "not_found"}) == before + 1


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [
        ("POST", "/ui/api/info", "GET, HEAD"),
        ("DELETE", "/ui/api/dashboard", "GET, HEAD"),
        ("GET", "/ui/api/caption", "POST"),
        ("PUT", "/ui/api/index", "POST"),
    ],
)
def test_a_wrong_method_is_a_json_405_with_allow(web_server: WebServer, method: str, path: str, allow: str) -> None:
    srv = web_server
    before = srv.sample("blip_errors_total", {"interface": "ui", "type": "method_not_allowed"})
    with srv.client() as http:
        r = http.request(method, path, headers=srv.headers(**{"Content-Type": "application/json"}), content=b"{}")
    assert r.status_code == 405, r.text
    assert r.headers["allow"] == allow
    body = r.json()
    assert body["error"] == "method_not_allowed" and method in body["message"] and path in body["message"]
    assert srv.sample("blip_errors_total", {"interface": "ui", "type": "method_not_allowed"}) == before + 1


def test_the_catch_all_changes_nothing_outside_the_api(web_server: WebServer) -> None:
    """The endpoints still answer; the token still comes first; `/mcp` and other paths keep their own statuses."""
    srv = web_server
    with srv.client() as http:
        assert http.get("/ui/api/info", headers=srv.headers()).status_code == 200
        assert http.head("/ui/api/info", headers=srv.headers()).status_code == 200
        assert http.get("/ui/api/nope").status_code == 401  # no token: refused before any route
        assert http.get("/ui/static/app.js").status_code == 200
        elsewhere = http.get("/ui/other", headers=srv.headers())
        mcp = http.put("/mcp", headers=srv.headers(), content=b"{}")
    assert elsewhere.status_code == 404 and not elsewhere.headers["content-type"].startswith("application/json")
    assert mcp.status_code in (400, 405) and "method_not_allowed" not in mcp.text


# ---------------------------------------------------------------------------------------------- latency percentiles
def test_percentiles_leave_out_requests_that_failed_outright() -> None:
    """Three lone requests that failed in 1 ms and three served in 100-300 ms: the percentiles are the served ones'.
    (Before: 1 ms samples were mixed in, p50 50.5 ms.)"""
    now = [2000.5]
    window = LiveWindow(window_s=60, clock=lambda: now[0])
    for _ in range(3):
        window.record_batch(1, [0.001], failed=1, final=True)
    window.record_batch(3, [0.1, 0.2, 0.3], failed=0, final=True)
    snap = window.snapshot(10)
    summary = snap["summary"]
    assert summary["p50_ms"] == pytest.approx(200.0) and summary["p99_ms"] == pytest.approx(298.0)
    assert summary["completed"] == 3 and summary["failed"] == 3
    assert summary["latency_of"] == "successful requests"
    second = {p["t"]: p for p in snap["series"]}[2000]
    assert second["p50_ms"] == pytest.approx(200.0) and second["throughput"] == 3 and second["failed"] == 3


def test_a_second_with_only_failures_has_no_latency() -> None:
    """Through the batch listener: a wrong-length handler result fails the whole batch; no percentile at all."""
    from blip_tools.batching import BatchEvent

    metrics = BlipMetrics(lambda: None)
    metrics.observe(BatchEvent(key=("caption",), task="caption", size=2, queue_wait_s=(0.0005, 0.0004),
                               exec_s=0.0005, failed=2, retried=False))  # fmt: skip
    summary = metrics.live.snapshot(10)["summary"]
    assert summary["p50_ms"] is None and summary["completed"] == 0 and summary["failed"] == 2
