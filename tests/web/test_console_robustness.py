"""The console API as a real client meets it: a client that gives up leaves the queue, and calls the API does not
have answer in its JSON error form, like an upload sent as a form, still say what to do."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from _web_testlib import WebServer, png_bytes, poll, shape_image


def test_a_client_that_goes_away_leaves_the_queue_and_is_counted_as_cancelled(web_server: WebServer) -> None:
    """A closed tab or a script's timeout must not cost the model an answer nobody reads."""
    srv = web_server
    service = srv.service
    cancelled = srv.sample("blip_cancelled_requests_total")
    answered = srv.sample("blip_batch_size_sum", {"task": "answer"})
    srv.gate.open_event.clear()
    srv.gate.entered.clear()
    pool = concurrent.futures.ThreadPoolExecutor(1)
    try:
        blocker = pool.submit(service.caption, shape_image(1, size=(64, 48)), max_new_tokens=3)
        assert srv.gate.entered.wait(30), "the blocker never reached the model"
        with srv.client() as http, pytest.raises(httpx.ReadTimeout):
            http.post(
                "/ui/api/answer?question=what%20is%20it",
                content=png_bytes(shape_image(6, size=(72, 52))),
                headers=srv.headers(),
                timeout=httpx.Timeout(30.0, read=1.5),
            )
        # While the worker is still held, the server has noticed and cancelled the queued request. (The batcher's
        # queue is read directly: a cancelled request only counts once the worker drops it.)
        pending = service._batcher._pending
        poll(lambda: len(pending) == 1 and pending[0].future.cancelled(), timeout_s=10, what="the request cancelled")
    finally:
        srv.gate.open_event.set()
    assert blocker.result(timeout=60).caption is not None
    pool.shutdown()
    poll(lambda: srv.sample("blip_cancelled_requests_total") == cancelled + 1, what="the cancellation counted")
    assert srv.sample("blip_batch_size_sum", {"task": "answer"}) == answered  # it never ran
    with srv.client() as http:  # and the server serves on
        ok = http.post("/ui/api/answer?question=what", content=png_bytes(shape_image(2)), headers=srv.headers())
    assert ok.status_code == 200, ok.text
