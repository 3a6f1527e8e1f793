"""The console API as a real client meets it: a client that gives up leaves the queue, and an upload sent the
wrong way (a multipart form) is told how to send it."""

from __future__ import annotations

import concurrent.futures

import httpx
import pytest
from _web_testlib import WebServer, png_bytes, poll, shape_image

from mcp_server.web.errors import STATUS_BY_CODE


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


def test_an_image_sent_as_a_form_is_told_to_go_as_the_raw_body(web_server: WebServer) -> None:
    """`curl -F file=@photo.jpg` (multipart) is the usual first try; the answer says what to send instead."""
    srv = web_server
    labels = {"interface": "ui", "type": "invalid_image"}
    before = srv.sample("blip_errors_total", labels)
    with srv.client() as http:
        form = http.post(
            "/ui/api/caption", files={"file": ("a.png", png_bytes(shape_image(4)), "image/png")}, headers=srv.headers()
        )
        raw = http.post("/ui/api/caption?max_new_tokens=4", content=png_bytes(shape_image(4)), headers=srv.headers())
    assert form.status_code == 422, form.text
    assert form.json()["error"] == "invalid_image"
    assert "--data-binary" in form.json()["message"] and "multipart" in form.json()["message"]
    assert srv.sample("blip_errors_total", labels) == before + 1
    assert raw.status_code == 200, raw.text


def test_a_thumbnail_of_an_indexed_file_that_is_gone_is_a_missing_image_not_a_refusal(
    web_server: WebServer,
) -> None:
    """403 `path_not_allowed` is for paths the console must not serve; a stale index entry is a 422 that says to
    re-index (as `?path=` on the playground answers for the same file)."""
    srv = web_server
    folder = srv.outside_file.parent / "soon-gone"
    folder.mkdir()
    picture = folder / "gone.png"
    shape_image(7).save(picture)
    with srv.client() as http:
        indexed = http.post("/ui/api/index", json={"directory": str(folder), "captions": False}, headers=srv.headers())
        assert indexed.status_code == 200, indexed.text
        picture.unlink()
        try:
            thumb = http.get("/ui/api/thumb", params={"path": str(picture)}, headers=srv.headers())
            caption = http.post("/ui/api/caption", params={"path": str(picture)}, headers=srv.headers())
        finally:  # drop the stale entry: other tests count the index's hits
            http.post("/ui/api/index", json={"directory": str(folder)}, headers=srv.headers())
    assert thumb.status_code == 422, thumb.text
    assert thumb.json()["error"] == "invalid_image" and "re-index" in thumb.json()["message"]
    assert caption.status_code == 422 and caption.json()["error"] == "invalid_image"


def test_index_flags_must_be_json_booleans(web_server: WebServer) -> None:
    """`"captions": "false"` must not quietly caption every image (a non-empty text is truthy in Python)."""
    srv = web_server
    with srv.client() as http:
        answers = [
            http.post("/ui/api/index", json={"directory": str(srv.gallery_dir), name: value}, headers=srv.headers())
            for name, value in (("captions", "false"), ("recursive", "no"), ("captions", None))
        ]
    for response in answers:
        assert response.status_code == 400, response.text
        assert response.json()["error"] == "invalid_input" and "true or false" in response.json()["message"]
    assert '"false"' in answers[0].json()["message"]


def test_an_unexpected_failure_is_still_a_json_error_and_the_server_serves_on(
    web_server: WebServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug below the console (here: the index failing with a plain RuntimeError) answers the API's JSON error,
    500 `blip_error`, counted; the connection and the server keep serving."""
    srv = web_server
    labels = {"interface": "ui", "type": "blip_error"}
    before = srv.sample("blip_errors_total", labels)

    def broken() -> None:
        raise RuntimeError("simulated bug")

    monkeypatch.setattr(srv.app.state.console._running.gallery, "index", broken)
    with srv.client() as http:
        failed = http.get("/ui/api/search", params={"q": "a dog"}, headers=srv.headers())
        monkeypatch.undo()
        again = http.get("/ui/api/search", params={"q": "a dog"}, headers=srv.headers())  # same connection
        # A real one: `~user` of a user that does not exist made pathlib raise RuntimeError in the index.
        no_user = http.post("/ui/api/index", json={"directory": "~no-such-user-h51/pictures"}, headers=srv.headers())
    assert failed.status_code == 500, failed.text
    assert failed.headers["content-type"].startswith("application/json")
    assert failed.json()["error"] == "blip_error" and "RuntimeError" in failed.json()["message"]
    assert "simulated bug" not in failed.json()["message"]  # details go to the log, not to the caller
    assert again.status_code == 200, again.text
    assert no_user.headers["content-type"].startswith("application/json"), no_user.text
    assert no_user.status_code == STATUS_BY_CODE[no_user.json()["error"]]
    assert srv.sample("blip_errors_total", labels) >= before + 1
