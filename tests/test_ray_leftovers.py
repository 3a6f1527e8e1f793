"""Ray Serve leftovers of the HTTP audit: refusals beyond `max_queued_requests` carry a retry hint (HTTP 503
`Retry-After` from Ray's proxy, `Overloaded.retry_after_s` for handle callers), and Ray's warning per refused
request is thinned to one line per interval with the count of the others.

One small Ray instance for the module: one replica taking one request at a time, one more queued per caller, so
a handful of concurrent calls is enough to be refused.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from _testlib import local_ray_serve  # noqa: E402

from blip_tools import BlipSettings  # noqa: E402
from blip_tools.errors import Overloaded  # noqa: E402
from blip_tools.ray_serve import RayServeClient, RayServeConfig, build_app  # noqa: E402

RETRY_AFTER_S = 3.0
BURST = 12


@pytest.fixture(scope="module")
def small_ray_app(tiny_checkpoint: Path) -> Iterator[dict[str, Any]]:
    """Ray on 2 CPUs, Serve's proxy on a free loopback port, 1 replica: 1 request at a time, 1 queued per caller."""
    from blip_tools.testing import tiny_settings_kwargs

    with local_ray_serve() as port:
        settings = BlipSettings(**tiny_settings_kwargs(tiny_checkpoint), max_wait_ms=5.0)
        config = RayServeConfig(
            num_replicas=1,
            num_cpus=0.5,
            max_ongoing_requests=1,
            max_queued_requests=1,
            retry_after_s=RETRY_AFTER_S,
        )
        handle = serve.run(build_app(settings, config), name=config.name, route_prefix="/")
        yield {"handle": handle, "base": f"http://127.0.0.1:{port}"}


@pytest.fixture
def image() -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(3).integers(0, 256, size=(40, 48, 3), dtype=np.uint8), "RGB")


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_handle_refusals_carry_the_retry_hint_and_log_a_line_per_interval(
    small_ray_app: dict[str, Any], image: Any
) -> None:
    """A burst through `RayServeClient`: refused calls are `Overloaded` with the configured hint (Ray's default
    was none, read as 1 s), and Ray's router, which warns once per refusal, writes one line plus one summary."""
    from blip_tools.ray_serve import RefusalLogLimiter

    serve_logger = logging.getLogger("ray.serve")
    # The limiter is per process: one that an earlier test's refusals went through (test_ray.py's overload test)
    # may still be in its quiet interval (up to 2 x 10 s after them), where this burst's first refusal is counted,
    # not logged, or may hold a count it has yet to log. Log that count now and let the client install a fresh one.
    for earlier in [f for f in serve_logger.filters if isinstance(f, RefusalLogLimiter)]:
        earlier.flush()
        serve_logger.removeFilter(earlier)
    client = RayServeClient(small_ray_app["handle"])
    assert any(isinstance(f, RefusalLogLimiter) for f in serve_logger.filters)
    lines = _Lines()
    level = serve_logger.level
    serve_logger.setLevel(logging.WARNING)  # `ray.init(logging_level="ERROR")` would hide the warnings altogether
    serve_logger.addHandler(lines)
    try:

        async def burst() -> list[Any]:
            calls = [client.acaption(image, max_new_tokens=20) for _ in range(BURST)]
            return list(await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout=120))

        outcomes = asyncio.run(burst())
        refused = [o for o in outcomes if isinstance(o, Overloaded)]
        assert len(refused) >= 4, outcomes
        assert all(not isinstance(o, BaseException) or isinstance(o, Overloaded) for o in outcomes), outcomes
        assert {o.retry_after_s for o in refused} == {RETRY_AFTER_S}
        dropped = [m for m in lines.messages if "dropped due to backpressure" in m]
        assert 1 <= len(dropped) <= 2, dropped  # the first refusal as Ray wrote it (and maybe a summary already)

        from blip_tools.ray_serve import limit_refusal_warnings

        limit_refusal_warnings().flush()  # the summary of the rest, without waiting for the interval to end
    finally:
        serve_logger.removeHandler(lines)
        serve_logger.setLevel(level)
    dropped = [m for m in lines.messages if "dropped due to backpressure" in m]
    summaries = [m for m in dropped if "more requests dropped" in m]
    assert summaries, dropped
    counted = sum(int(m.split()[0]) for m in summaries) + len(dropped) - len(summaries)
    assert counted == len(refused)  # every refusal is accounted for


def test_http_refusals_from_rays_proxy_carry_retry_after(small_ray_app: dict[str, Any], image: Any) -> None:
    """While the replica works on a long call, a burst of HTTP requests is refused by Ray's proxy: each 503 says
    when to retry (what `RemoteService` reads into `Overloaded.retry_after_s`)."""
    import httpx

    handle = small_ray_app["handle"]

    async def scenario() -> list[httpx.Response]:
        busy = handle.caption.remote(image, None, max_new_tokens=200, min_new_tokens=200)
        await asyncio.sleep(0.3)  # the replica's one slot is taken
        limits = httpx.Limits(max_connections=BURST)
        async with httpx.AsyncClient(base_url=small_ray_app["base"], timeout=60, limits=limits) as http:
            answers = await asyncio.gather(*(http.get("/healthz") for _ in range(BURST)))
        await busy
        return list(answers)

    started = time.monotonic()
    answers = asyncio.run(asyncio.wait_for(scenario(), timeout=120))
    refused = [a for a in answers if a.status_code == 503]
    assert refused, [a.status_code for a in answers]
    assert {a.headers.get("retry-after") for a in refused} == {"3"}, [dict(a.headers) for a in refused]
    assert all(a.status_code in (200, 503) for a in answers)
    assert time.monotonic() - started < 120


def test_the_limiter_passes_other_records_and_counts_a_burst() -> None:
    """Unit check without Ray: one line, the rest counted into one summary; other warnings untouched."""
    from blip_tools.ray_serve import RefusalLogLimiter

    now = [100.0]
    test_logger = logging.getLogger("blip-tools-test.refusals")
    test_logger.propagate = False
    lines = _Lines()
    test_logger.addHandler(lines)
    limiter = RefusalLogLimiter(5.0, logger_name=test_logger.name, clock=lambda: now[0])
    test_logger.addFilter(limiter)
    try:
        for i in range(50):
            test_logger.warning(
                "Request dropped due to backpressure (num_queued_requests=%d, max_queued_requests=1).", i
            )
            test_logger.warning("something else %d", i)
        limiter.flush()
        now[0] = 106.0  # a quiet interval later: the next refusal is a line of its own again
        test_logger.warning("Request dropped due to backpressure (num_queued_requests=1, max_queued_requests=1).")
        limiter.flush()  # nothing counted: no summary
    finally:
        test_logger.removeFilter(limiter)
        test_logger.removeHandler(lines)
    dropped = [m for m in lines.messages if "backpressure" in m]
    assert len([m for m in lines.messages if m.startswith("something else")]) == 50
    assert len(dropped) == 3, dropped
    assert dropped[0].startswith("Request dropped") and "num_queued_requests=0" in dropped[0]
    assert dropped[1].startswith("49 more requests dropped") and "num_queued_requests=49" in dropped[1]
    assert dropped[2].startswith("Request dropped")


def test_serve_ray_retry_after_flag_is_checked_before_ray_starts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`blip-tools serve-ray --retry-after SECONDS` sets `RayServeConfig.retry_after_s`; a negative value is a usage
    error (exit 2) before any Ray work."""
    from _testlib import run_cli

    started: list[Any] = []
    monkeypatch.setattr(ray, "init", lambda *args, **kwargs: started.append(args))
    code, _, err = run_cli(capsys, "serve-ray", "--demo", "--retry-after", "-1")
    assert code == 2 and "retry_after_s must be None or a number of seconds >= 0" in err, err
    assert not started
