"""The console's HTTP side without a browser: what is public and what needs the token, Host/Origin checks,
no CORS, the playground API on uploaded bytes, the gallery API (search, thumbnails only for indexed files,
grounding overlay), folder indexing and the dashboard's live series."""

from __future__ import annotations

import base64
import io
from typing import Any

from _web_testlib import SHAPES, WebServer, png_bytes, poll, shape_image
from PIL import Image


def test_page_and_static_files_are_public_and_locked_down(web_server: WebServer) -> None:
    with web_server.client() as http:
        page = http.get("/ui")
        slash = http.get("/ui/", follow_redirects=False)
        script = http.get("/ui/static/app.js")
        style = http.get("/ui/static/app.css")
        missing = http.get("/ui/static/nope.js")
        api = http.get("/ui/api/info")
    assert page.status_code == 200 and "<title>blip-tools console</title>" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "http" not in csp
    assert page.headers["x-frame-options"] == "DENY"
    assert slash.status_code == 308 and slash.headers["location"].endswith("/ui")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert missing.status_code == 401  # unknown paths are not public: default-deny
    assert api.status_code == 401
    # Nothing is loaded from elsewhere: no CDN, no external fonts.
    for text in (page.text, script.text, style.text):
        assert "https://" not in text and "http://" not in text and "//cdn" not in text


def test_api_needs_the_token_and_rejects_other_origins_and_hosts(web_server: WebServer) -> None:
    srv = web_server
    with srv.client() as http:
        wrong = http.get("/ui/api/info", headers={"Authorization": "Bearer wrong-token-0123456789"})
        ok = http.get("/ui/api/info", headers=srv.headers())
        same_origin = http.get("/ui/api/info", headers=srv.headers(Origin=srv.base))
        evil_origin = http.post(
            "/ui/api/caption", content=png_bytes(shape_image(0)), headers=srv.headers(Origin="http://evil.example")
        )
        evil_host = http.get("/ui/api/info", headers=srv.headers(Host="evil.example"))
        evil_page = http.get("/ui", headers={"Host": "rebind.evil.example"})
    assert wrong.status_code == 401
    assert ok.status_code == 200
    info = ok.json()
    assert info["token_required"] is True and info["status"] == "ok" and info["max_image_bytes"] == 200_000
    assert info["model"]["device"] == "cpu"
    assert same_origin.status_code == 200
    assert "access-control-allow-origin" not in same_origin.headers
    assert evil_origin.status_code == 403
    assert evil_host.status_code == 421
    assert evil_page.status_code == 421  # DNS rebinding cannot even load the page


def test_playground_caption_answer_score_locate_on_uploaded_bytes(web_server: WebServer) -> None:
    srv = web_server
    image = png_bytes(shape_image(1))
    headers = srv.headers(**{"Content-Type": "image/png"})
    with srv.client() as http:
        caption = http.post("/ui/api/caption?max_new_tokens=5&num_beams=2&num_return_sequences=2", content=image,
                            headers=headers)  # fmt: skip
        answer = http.post("/ui/api/answer", params={"question": "what colour is it?"}, content=image, headers=headers)
        score = http.post("/ui/api/score", params=[("text", "a blue square"), ("text", "a red circle")], content=image,
                          headers=headers)  # fmt: skip
        locate = http.post("/ui/api/locate", params={"text": "a blue square"}, content=image, headers=headers)
        bad_param = http.post("/ui/api/caption?max_new_tokens=zero", content=image, headers=headers)
        no_question = http.post("/ui/api/answer", content=image, headers=headers)
    assert caption.status_code == 200, caption.text
    body = caption.json()
    assert len(body["captions"]) == 2 and body["image"]["width"] == 160 and body["timing"]["total_ms"] > 0
    assert all(0.0 <= c["confidence"] <= 1.0 for c in body["captions"])
    assert answer.status_code == 200 and answer.json()["question"] == "what colour is it?"
    assert score.status_code == 200
    assert [s["text"] for s in score.json()["scores"]] == ["a blue square", "a red circle"]
    assert locate.status_code == 200, locate.text
    result = locate.json()
    assert result["overlay"].startswith("data:image/png;base64,")
    overlay = Image.open(io.BytesIO(base64.b64decode(result["overlay"].split(",", 1)[1])))
    assert overlay.size == (160, 120)
    x0, y0, x1, y1 = result["box"]
    assert 0 <= x0 < x1 <= 160 and 0 <= y0 < y1 <= 120
    assert bad_param.status_code == 400 and "max_new_tokens" in bad_param.json()["message"]
    assert no_question.status_code == 400 and no_question.json()["error"] == "invalid_input"


def test_gallery_search_ranks_indexed_images_with_thumbnails(web_server: WebServer) -> None:
    srv = web_server
    with srv.client() as http:
        found = http.get("/ui/api/search", params={"q": "a red circle", "top_k": 24}, headers=srv.headers())
        assert found.status_code == 200, found.text
        hits = found.json()["hits"]
        assert len(hits) == len(SHAPES)
        scores = [h["score"] for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert all(h["caption"] is not None for h in hits)
        thumb = http.get("/ui/api/thumb", params={"path": hits[0]["path"], "size": 128}, headers=srv.headers())
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
        assert max(Image.open(io.BytesIO(thumb.content)).size) == 128
        no_token = http.get("/ui/api/thumb", params={"path": hits[0]["path"]})
        assert no_token.status_code == 401
        # Only files in the index: an allowed but unindexed file, a system file and a traversal are refused.
        for path in (str(srv.outside_file), "/etc/passwd", f"{srv.gallery_dir}/../not-indexed.png"):
            refused = http.get("/ui/api/thumb", params={"path": path}, headers=srv.headers())
            assert refused.status_code == 403, (path, refused.text)
            assert refused.json()["error"] == "path_not_allowed"
        located = http.post(
            "/ui/api/locate", params={"path": hits[0]["path"], "text": "a red circle"}, headers=srv.headers()
        )
        assert located.status_code == 200 and located.json()["overlay"].startswith("data:image/png")
        not_indexed = http.post(
            "/ui/api/locate", params={"path": str(srv.outside_file), "text": "a circle"}, headers=srv.headers()
        )
        assert not_indexed.status_code == 403


def test_index_a_folder_from_the_console(web_server: WebServer) -> None:
    srv = web_server
    extra = srv.gallery_dir.parent / "extra"
    extra.mkdir(exist_ok=True)
    shape_image(6, size=(100, 80)).save(extra / "extra-yellow.png")
    with srv.client() as http:
        form_post = http.post("/ui/api/index", data={"directory": str(extra)}, headers=srv.headers())
        outside = http.post("/ui/api/index", json={"directory": "/etc"}, headers=srv.headers())
        done = http.post("/ui/api/index", json={"directory": str(extra), "captions": False}, headers=srv.headers())
        again = http.post("/ui/api/index", json={"directory": str(extra), "captions": False}, headers=srv.headers())
        thumb = http.get("/ui/api/thumb", params={"path": str(extra / "extra-yellow.png")}, headers=srv.headers())
    assert form_post.status_code == 400  # JSON only: a cross-site form cannot drive it
    assert outside.status_code == 403 and outside.json()["error"] == "path_not_allowed"
    assert done.status_code == 200, done.text
    assert done.json()["report"]["embedded"] == 1 and "Indexed" in done.json()["summary"]
    assert again.json()["report"]["embedded"] == 0 and again.json()["report"]["unchanged"] == 1
    assert thumb.status_code == 200


def test_dashboard_series_follow_requests(web_server: WebServer) -> None:
    srv = web_server
    with srv.client() as http:
        for i in range(3):
            r = http.post("/ui/api/caption?max_new_tokens=4", content=png_bytes(shape_image(i)), headers=srv.headers())
            assert r.status_code == 200

        def dashboard() -> Any:
            return http.get("/ui/api/dashboard", params={"window": 60}, headers=srv.headers()).json()

        # The live series come from the batch listener, which the worker calls just after delivering a batch's
        # results: the last caption's batch may not be in them yet.
        poll(lambda: sum(p["throughput"] for p in dashboard()["live"]["series"]) >= 3, what="the live series")
        data = dashboard()
    live = data["live"]
    assert data["status"] == "ok" and data["stats"]["requests"] >= 3
    assert len(live["series"]) == 60
    assert sum(p["throughput"] for p in live["series"]) >= 3
    assert live["summary"]["p50_ms"] is not None and live["summary"]["p99_ms"] >= live["summary"]["p50_ms"]
