"""The console's HTTP statuses for the project's errors: one deliberate entry per error code, and a damaged image
index answered as a conflict (409) whose body says how to rebuild it, not as an anonymous server error."""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blip_tools import errors as blip_errors
from blip_tools.errors import BlipError

TOKEN = "console-errors-token-0123456789"


def _error_classes() -> list[type[BlipError]]:
    return [
        cls
        for cls in vars(blip_errors).values()
        if inspect.isclass(cls) and issubclass(cls, BlipError) and cls.__module__ == blip_errors.__name__
    ]


def test_every_error_code_has_a_deliberate_status() -> None:
    from mcp_server.web.errors import STATUS_BY_CODE

    missing = sorted(cls.code for cls in _error_classes() if cls.code not in STATUS_BY_CODE)
    assert not missing, f"give these error codes an HTTP status in mcp_server/web/errors.py: {missing}"


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (blip_errors.InvalidInput("num_beams must be >= 1, got 0"), 400),
        (blip_errors.InvalidImage("not an image"), 422),
        (blip_errors.PayloadTooLarge("too many bytes"), 413),
        (blip_errors.ImageTooLarge("too many pixels"), 413),
        (blip_errors.PathNotAllowed("/etc/passwd"), 403),
        (blip_errors.UrlNotAllowed("http://10.0.0.1/"), 403),
        (blip_errors.Overloaded("full", retry_after_s=2.4), 503),
        (blip_errors.ServiceClosed("closed"), 503),
        (blip_errors.ModelNotAvailable("no checkpoint"), 503),
        (blip_errors.RequestTimeout("waited too long"), 504),
        (blip_errors.CapabilityUnavailable("no retrieval model"), 501),
        (blip_errors.IndexDamaged("damaged: delete it and index again"), 409),
        (blip_errors.InferenceError("boom"), 500),
        (BlipError("the index is busy"), 500),
    ],
)
def test_status_and_retry_after_per_error(error: BlipError, status: int) -> None:
    from mcp_server.web.errors import error_response, status_for

    response = error_response(error)
    assert status_for(error) == status == response.status_code
    assert response.headers.get("retry-after") == ("2" if isinstance(error, blip_errors.Overloaded) else None)
    assert response.body.decode().startswith(f'{{"error":"{error.code}","message":')


def test_a_subclass_answers_as_its_nearest_listed_base() -> None:
    from blip_tools.remote import RequestTooLarge
    from mcp_server.web.errors import status_for

    class NewKindOfBadPath(blip_errors.PathNotAllowed):
        code = "some_new_code"

    assert status_for(RequestTooLarge("refused whole")) == 413
    assert status_for(NewKindOfBadPath("refused")) == 403


# ---------------------------------------------------------------------------------------------- a damaged index
@pytest.fixture
def damaged_console(tiny_checkpoint: Path, tmp_path: Path) -> Iterator[Any]:
    """The full HTTP app (MCP, /metrics, /ui) whose image index file is not a database at all."""
    from starlette.testclient import TestClient

    from blip_tools import Blip2Service, BlipSettings
    from blip_tools.testing import tiny_settings_kwargs
    from mcp_server import create_server
    from mcp_server.http import HttpConfig
    from mcp_server.web import build_app

    damaged = tmp_path / "index.sqlite"
    damaged.write_bytes(b"hello world" * 100)
    pics = tmp_path / "pics"
    pics.mkdir()
    settings = BlipSettings(**tiny_settings_kwargs(tiny_checkpoint), index_path=damaged, allowed_dirs=[tmp_path])
    with Blip2Service(settings) as service:
        app = build_app(create_server(service), HttpConfig(host="127.0.0.1", port=8765, token=TOKEN))
        headers = {"Authorization": f"Bearer {TOKEN}"}
        with TestClient(app, base_url="http://127.0.0.1:8765", headers=headers) as client:
            client.pics = pics  # type: ignore[attr-defined]
            client.damaged = damaged  # type: ignore[attr-defined]
            yield client


def test_a_damaged_index_is_a_409_that_says_how_to_rebuild(
    damaged_console: Any, caplog: pytest.LogCaptureFixture
) -> None:
    http = damaged_console
    with caplog.at_level(logging.WARNING, logger="mcp_server.web.console"):
        search = http.get("/ui/api/search", params={"q": "a dog"})
        index = http.post("/ui/api/index", json={"directory": str(http.pics)})
        thumb = http.get("/ui/api/thumb", params={"path": str(http.pics / "x.png")})
    for response in (search, index, thumb):
        assert response.status_code == 409, (response.request.url, response.text)
        body = response.json()
        assert body["error"] == "index_damaged"
        assert "is damaged or is not a blip-tools index" in body["message"]
        assert "Delete it" in body["message"] and "index your folders again to rebuild it" in body["message"]
        assert "retry-after" not in response.headers
    assert sum("is damaged" in record.getMessage() for record in caplog.records) == 3  # the operator is told too
    # Counted once each, and the rest of the console still answers.
    metrics = http.get("/metrics").text
    assert 'blip_errors_total{interface="ui",type="index_damaged"} 3.0' in metrics
    assert http.get("/ui/api/info").status_code == 200
    # Doing what the message says (delete the file, index again) works without restarting the server.
    http.damaged.unlink()
    rebuilt = http.post("/ui/api/index", json={"directory": str(http.pics)})
    assert rebuilt.status_code == 200, rebuilt.text
    assert http.get("/ui/api/search", params={"q": "a dog"}).status_code == 200
