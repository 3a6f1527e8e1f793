"""The project's exception tree. Lower-layer errors (PIL, torch, OSError) are mapped to these at one boundary."""

from __future__ import annotations


class BlipError(Exception):
    """Base of every error blip-tools raises on purpose; its message is safe to show a user or a model."""

    code: str = "blip_error"


class InvalidInput(BlipError, ValueError):
    """A request's arguments are wrong (bad parameter, empty text, unknown option)."""

    code = "invalid_input"


class InvalidImage(InvalidInput):
    """The image could not be read or decoded, or its format is not allowed."""

    code = "invalid_image"


class ImageTooLarge(InvalidImage):
    """The image has more pixels than `max_image_pixels` allows."""

    code = "image_too_large"


class PayloadTooLarge(InvalidImage):
    """The encoded image (file, download or base64) is larger than `max_image_bytes`."""

    code = "payload_too_large"


class PathNotAllowed(InvalidImage):
    """The path lies outside every directory in `allowed_dirs`, or is not a regular file."""

    code = "path_not_allowed"


class UrlNotAllowed(InvalidImage):
    """URLs are disabled, or the URL's scheme or address is refused."""

    code = "url_not_allowed"


class Overloaded(BlipError):
    """The request queue is full; retry after `retry_after_s` seconds."""

    code = "overloaded"

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class RequestTimeout(BlipError, TimeoutError):
    """The request waited longer than its deadline and was dropped before it ran."""

    code = "request_timeout"


class ModelNotAvailable(BlipError):
    """The configured checkpoint could not be found or loaded."""

    code = "model_not_available"


class CapabilityUnavailable(BlipError):
    """The loaded model cannot do what was asked (e.g. embeddings without a retrieval checkpoint)."""

    code = "capability_unavailable"


class InferenceError(BlipError):
    """The model failed while running this request."""

    code = "inference_error"


class IndexDamaged(BlipError):
    """The image index file is damaged, is not a blip-tools index, or has another schema version: rebuild it."""

    code = "index_damaged"


class IndexBusy(Overloaded):
    """Another process kept the image index locked past the busy timeout; retry when it is done writing."""

    code = "index_busy"


class IndexReadOnly(BlipError):
    """The image index file, or its folder, is read-only here: it can be searched, not written."""

    code = "index_read_only"


class ServiceClosed(BlipError):
    """The service is shut down and accepts no more requests."""

    code = "service_closed"


__all__ = [
    "BlipError",
    "CapabilityUnavailable",
    "ImageTooLarge",
    "IndexBusy",
    "IndexDamaged",
    "IndexReadOnly",
    "InferenceError",
    "InvalidImage",
    "InvalidInput",
    "ModelNotAvailable",
    "Overloaded",
    "PathNotAllowed",
    "PayloadTooLarge",
    "RequestTimeout",
    "ServiceClosed",
    "UrlNotAllowed",
]
