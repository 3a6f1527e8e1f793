"""How the project's errors answer over HTTP: one table from error code to status, and the JSON error response.

Every `blip_tools.errors` code has a deliberate entry (a test checks that none falls through to the default):

- the request itself is wrong: 400 (`invalid_input`), 422 (`invalid_image`: well-formed, but not an image we
  take), 413 (too large), 403 (a path or URL that is not allowed);
- the server cannot serve it now, and the same request will work later: 503 (`overloaded` and `index_busy` with
  `Retry-After`, `service_closed`, `model_not_available`), 504 (`request_timeout`: it waited in the queue past
  its deadline);
- the server cannot do it at all: 501 (`capability_unavailable`);
- the request is fine but the image index's state conflicts with it: 409 (`index_damaged`; `index_read_only`,
  indexing into an index this server may only read). Retrying unchanged cannot help and no automatic retry should
  (as clients and proxies do on 5xx); the body says how to rebuild the index (or where to copy it), and the
  console's user can then send the same request again;
- the model failed on this request, or anything else: 500.

The console API's own routing errors use the same body: `not_found` (404) for a path under `/ui/api/` that names no
endpoint, `method_not_allowed` (405, with `Allow`) for an endpoint called with another method.

A subclass without an entry of its own answers as its nearest listed base class (e.g. `RemoteService`'s
`RequestTooLarge` as `payload_too_large`).
"""

from __future__ import annotations

from collections.abc import Iterable
from types import MappingProxyType

from starlette.responses import JSONResponse

from blip_tools.errors import BlipError, Overloaded

STATUS_BY_CODE = MappingProxyType(
    {
        "invalid_input": 400,
        "invalid_image": 422,
        "image_too_large": 413,
        "payload_too_large": 413,
        "path_not_allowed": 403,
        "url_not_allowed": 403,
        "overloaded": 503,
        "index_busy": 503,
        "service_closed": 503,
        "model_not_available": 503,
        "request_timeout": 504,
        "capability_unavailable": 501,
        "index_damaged": 409,
        "index_read_only": 409,
        "inference_error": 500,
        "blip_error": 500,
        "not_found": 404,
        "method_not_allowed": 405,
    }
)
"""`BlipError.code` → HTTP status."""


class NotFound(BlipError):
    """No console API endpoint at this path (HTTP 404)."""

    code = "not_found"


class MethodNotAllowed(BlipError):
    """A console API endpoint called with a method it does not take (HTTP 405); `allow` lists those it takes."""

    code = "method_not_allowed"

    def __init__(self, message: str, allow: Iterable[str]) -> None:
        super().__init__(message)
        self.allow = tuple(allow)


def status_for(exc: BlipError) -> int:
    """The HTTP status for one of our errors: its own code's, else that of the nearest base class listed."""
    for cls in type(exc).__mro__:
        status = STATUS_BY_CODE.get(getattr(cls, "code", ""))
        if status is not None:
            return status
    return 500


def retry_after(exc: BlipError) -> str | None:
    """The `Retry-After` header (whole seconds, at least 1) for an error that says when to retry, else None."""
    if isinstance(exc, Overloaded):
        return str(max(1, round(exc.retry_after_s)))
    return None


def error_response(exc: BlipError) -> JSONResponse:
    """`{"error": <code>, "message": <text>}` with the error's status (and `Retry-After` or `Allow` when it has one)."""
    headers = {}
    hint = retry_after(exc)
    if hint is not None:
        headers["Retry-After"] = hint
    if isinstance(exc, MethodNotAllowed):
        headers["Allow"] = ", ".join(exc.allow)
    return JSONResponse(
        {"error": exc.code, "message": str(exc).strip() or type(exc).__name__},
        status_code=status_for(exc),
        headers=headers,
    )


__all__ = ["STATUS_BY_CODE", "MethodNotAllowed", "NotFound", "error_response", "retry_after", "status_for"]
