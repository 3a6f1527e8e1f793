"""Image inputs: one reference (path, URI, URL, base64, bytes or PIL image) → a checked RGB PIL image.

This module is the one boundary where untrusted image input meets Pillow, the filesystem and the network.
Every lower-layer failure (PIL, OSError, binascii, http.client) becomes a `blip_tools.errors` type here.

Order of checks, so that a hostile input costs almost nothing:

1. the encoded size (`max_image_bytes`): `stat` size for files, the base64 *length* before decoding,
   the declared and streamed size for downloads;
2. the header: `Image.open` reads only the header; the format must be in the allowlist and
   width × height within `max_image_pixels` before any pixel is decoded;
3. decoding (first frame only), EXIF orientation, conversion to RGB (alpha over white).

How a string is read (first match wins):

- `data:` → data URI; `file://` → local path; `http://`/`https://` → URL (only with `allow_urls`);
  any other `scheme://` → refused;
- otherwise it is **raw base64** when it is base64-clean (standard or URL-safe alphabet, optional padding,
  whitespace ignored) *and* either decodes to a known image signature (PNG, JPEG, GIF, WebP, BMP, TIFF) or is
  longer than 256 characters;
- otherwise it is a **path** when it looks like one (contains `/` or `\\`, starts with `~` or `.`, or ends in
  an image extension);
- otherwise a base64-clean string is read as base64 (a bare name such as `cat` is therefore not a file:
  write `./cat`), and anything else as a relative path.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import logging
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Final
from urllib.parse import unquote, unquote_to_bytes, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

from blip_tools import _fetch, _prepare
from blip_tools.errors import (
    BlipError,
    ImageTooLarge,
    InvalidImage,
    PathNotAllowed,
    PayloadTooLarge,
    UrlNotAllowed,
)
from blip_tools.results import ImageInfo

if TYPE_CHECKING:
    from blip_tools.settings import BlipSettings

logger = logging.getLogger(__name__)

ImageInput = str | bytes | bytearray | Path | Image.Image
"""Everything `load_image` accepts."""

ALLOWED_FORMATS: Final = ("JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF")
"""Pillow plugins tried when opening; everything else is refused before decoding. (Multi-picture JPEGs open
through the JPEG plugin as format `MPO`; only the first picture is used.)"""

IMAGE_EXTENSIONS: Final = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".mpo"}
    | {".heic", ".heif", ".avif", ".ico", ".svg", ".ppm", ".pgm", ".pbm", ".tga", ".pcx", ".jxl"}
)
"""Suffixes that make a string read as a path (including formats we refuse, for a clear message)."""

BASE64_PATH_THRESHOLD: Final = 256
"""A path-looking, base64-clean string longer than this is read as base64."""

ACCEPTED_FORMS: Final = (
    "an image file path (absolute, ~/..., or relative to the working directory), a file:// URI, "
    "a data:image/<type>;base64,<data> URI, raw base64 of the image file, or an http(s) URL when "
    "BLIP_ALLOW_URLS is on"
)
_FORMATS_TEXT: Final = "JPEG, PNG, WebP, BMP, GIF (first frame) or TIFF"

_SIGNATURES: Final = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")
_MAX_PATH_CHARS: Final = 4096
_B64_CHARS = re.compile(r"[A-Za-z0-9+/_-]*={0,2}")
# `scheme://…`, or a nested `jar:http://…`; a Windows drive letter (`C:\\`) never matches.
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]{0,31}):(?://|[A-Za-z][A-Za-z0-9+.-]{0,31}://)")
_WHITESPACE: Final = " \t\r\n\f\v"
_ORIENTATION_TAG: Final = 0x0112
_TRANSPOSE: Final = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
"""EXIF orientation → the transpose that undoes it (the same table as `ImageOps.exif_transpose`)."""


@dataclass(frozen=True)
class LoadedImage:
    """A decoded, checked image ready for the model, and what we know about where it came from."""

    image: Image.Image
    """RGB, EXIF orientation applied, alpha composited over white."""
    info: ImageInfo
    """Safe source description, size and content hash."""

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of the decoded RGB pixels and size: equal pixels give equal hashes."""
        return self.info.sha256


# ---------------------------------------------------------------------------------------------- public API


def load_image(ref: ImageInput, settings: BlipSettings) -> LoadedImage:
    """Read, check and decode one image reference into an RGB PIL image.

    Args:
        ref: a path (`str` or `Path`), `file://` URI, `data:` URI, raw base64, http(s) URL, encoded image
            `bytes`, or a `PIL.Image.Image`.
        settings: limits (`max_image_bytes`, `max_image_pixels`), `allowed_dirs`, `allow_urls`, `url_timeout_s`.

    Raises:
        InvalidImage: undecodable, truncated or empty data, a format outside the allowlist, a missing file or
            a directory, an unrecognised string.
        ImageTooLarge: more pixels than `max_image_pixels` (read from the header, before decoding).
        PayloadTooLarge: more encoded bytes than `max_image_bytes` (checked before reading or decoding).
        PathNotAllowed: outside `allowed_dirs`, or a FIFO, device or socket.
        UrlNotAllowed: URLs disabled, or a refused scheme, host, address or redirect.
    """
    kind = _classify(ref) if isinstance(ref, str) else ""
    source = _describe_str(ref, kind) if isinstance(ref, str) else describe_ref(ref)
    try:
        if isinstance(ref, Image.Image):
            image = _from_pil(ref, settings)
        elif isinstance(ref, (bytes, bytearray)):
            _check_byte_count(len(ref), settings, source)
            image = _decode(bytes(ref), settings, source)
        elif isinstance(ref, Path):
            image = _decode(_read_file(ref, settings, source), settings, source)
        elif isinstance(ref, str):
            image = _decode(_bytes_from_str(ref, kind, settings, source), settings, source)
        else:
            raise InvalidImage(
                f"Unsupported image input of type {type(ref).__name__}; pass {ACCEPTED_FORMS}, "
                "encoded image bytes, or a PIL image."
            )
    except BlipError as exc:
        logger.debug("image %s refused: %s", source, exc)
        raise
    with _prepare.gil_free(image.width * image.height):
        sha256 = pixel_hash(image)
    info = ImageInfo(source=source, width=image.width, height=image.height, sha256=sha256)
    return LoadedImage(image=image, info=info)


def read_stream(stream: BinaryIO, settings: BlipSettings, source: str) -> bytes:
    """The encoded image bytes of a binary stream (a pipe on stdin), read to its end but never past the cap.

    At most `max_image_bytes` + 1 bytes are read, so an endless or oversized stream costs no more memory than
    the largest image accepted. Pass the bytes to `load_image` (or the service) to decode them.

    Raises:
        PayloadTooLarge: more than `max_image_bytes` bytes.
        InvalidImage: nothing to read (0 bytes), or the stream could not be read.
    """
    limit = settings.max_image_bytes
    chunks: list[bytes] = []
    total = 0
    try:
        while total <= limit:
            chunk = stream.read(min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise InvalidImage(f"Cannot read {source}: {exc.strerror or exc}.") from exc
    if total > limit:
        raise PayloadTooLarge(
            f"The image {source} is over the {limit}-byte limit (BLIP_MAX_IMAGE_BYTES); "
            "send a smaller or re-compressed image."
        )
    if not total:
        raise InvalidImage(f"The image {source} is empty (0 bytes).")
    return b"".join(chunks)


def describe_ref(ref: ImageInput) -> str:
    """A short, safe description of an image reference for messages and logs (never its bytes or base64)."""
    if isinstance(ref, Image.Image):
        return "PIL image"
    if isinstance(ref, (bytes, bytearray)):
        return f"bytes ({len(ref)})"
    if isinstance(ref, Path):
        return _shorten(str(ref))
    if not isinstance(ref, str):
        return type(ref).__name__
    return _describe_str(ref, _classify(ref))


def _describe_str(ref: str, kind: str) -> str:
    text = ref.strip()
    if kind == "data":
        return f"data URI ({_b64_size(text.partition(',')[2])} bytes)"
    if kind == "base64":
        return f"base64 ({_b64_size(text)} bytes)"
    if kind in ("url", "scheme"):
        return _fetch.safe_url_label(text)
    if kind == "file-uri":
        return _shorten(_file_uri_path(text, strict=False))
    if kind == "empty":
        return "empty string"
    return _shorten(text)


def pixel_hash(image: Image.Image) -> str:
    """Hex SHA-256 over `WIDTHxHEIGHT:` and the RGB pixel bytes (equal pixels → equal hash, any file format)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------- strings


def _classify(ref: str) -> str:
    """Which kind of reference a string is: data, file-uri, url, scheme, base64, path or empty."""
    text = ref.strip()
    if not text:
        return "empty"
    if text[:5].lower() == "data:":
        return "data"
    match = _SCHEME.match(text)
    if match:
        scheme = match.group(1).lower()
        if scheme == "file":
            return "file-uri"
        return "url" if scheme in ("http", "https") else "scheme"
    clean = _b64_clean(text, sample=4096)
    if clean and (len(text) > BASE64_PATH_THRESHOLD or _has_image_signature(text)):
        return "base64"
    if _looks_like_path(text):
        return "path"
    return "base64" if clean else "path"


def _looks_like_path(text: str) -> bool:
    return (
        "/" in text
        or "\\" in text
        or text.startswith(("~", "."))
        or os.path.splitext(text)[1].lower() in IMAGE_EXTENSIONS
    )


def _b64_clean(text: str, *, sample: int | None = None) -> bool:
    """Only base64 characters (either alphabet), whitespace and up to two `=` at the end; a valid length.

    With `sample`, only the first `sample` characters and the tail are scanned (classification must stay
    cheap for huge strings; the full check runs after the size limit, in `_decode_base64`).
    """
    if sample is not None and len(text) > sample + 8:
        head = _compact(text[:sample])
        head = head[: len(head) - len(head) % 4]  # whole quanta, so a '=' cannot sit mid-sample
        tail = _compact(text[-8:])
        return _B64_CHARS.fullmatch(head.rstrip("=")) is not None and _B64_CHARS.fullmatch(tail) is not None
    compact_len = _compact_len(text)
    if compact_len == 0 or compact_len % 4 == 1:
        return False
    # Whitespace-free strings are the common case; avoid copying a large string just to test it.
    body = text if compact_len == len(text) else _compact(text)
    return _B64_CHARS.fullmatch(body) is not None


def _compact_len(text: str) -> int:
    """Length without whitespace, counted in place (no copy of a possibly huge string)."""
    return len(text) - sum(text.count(ch) for ch in _WHITESPACE if ch in text)


def _compact(text: str) -> str:
    return text.translate({ord(ch): None for ch in _WHITESPACE})


def _b64_size(text: str) -> int:
    """Decoded size of a base64 text, computed from its length (no decoding)."""
    n = _compact_len(text)
    padding = 0
    stripped = text.rstrip(_WHITESPACE)
    if stripped.endswith("=="):
        padding = 2
    elif stripped.endswith("="):
        padding = 1
    return max(0, (n * 3) // 4 - padding)


def _has_image_signature(text: str) -> bool:
    """Whether the first bytes the base64 text decodes to are a known image file signature."""
    head = _compact(text[:64])[:16]
    try:
        raw = base64.b64decode(_to_standard_alphabet(head), validate=True)
    except (binascii.Error, ValueError):
        return False
    return has_image_signature(raw)


def has_image_signature(raw: bytes) -> bool:
    """Whether `raw` starts like a file of one of `ALLOWED_FORMATS` (12 bytes or more are needed to tell)."""
    if len(raw) < 12:  # too short to tell an image from a name that happens to be base64-clean
        return False
    if raw.startswith(b"BM"):
        return raw[6:10] == bytes(4)  # BMP's reserved header fields are zero
    return raw.startswith(_SIGNATURES) or (raw[:4] == b"RIFF" and raw[8:12] == b"WEBP")


def _to_standard_alphabet(text: str) -> str:
    """URL-safe → standard alphabet and the `=` padding restored, for `b64decode(validate=True)`."""
    text = text.rstrip("=").replace("-", "+").replace("_", "/")
    return text + "=" * (-len(text) % 4)


def _bytes_from_str(ref: str, kind: str, settings: BlipSettings, source: str) -> bytes:
    """Dispatch a string reference to the reader for its kind (`_classify`) and return the encoded bytes."""
    text = ref.strip()
    if kind == "empty":
        raise InvalidImage(f"The image reference is an empty string; pass {ACCEPTED_FORMS}.")
    if kind == "data":
        return _data_uri_bytes(text, settings, source)
    if kind == "base64":
        return _decode_base64(text, settings, source)
    if kind == "file-uri":
        return _read_file(Path(_file_uri_path(text, strict=True)), settings, source)
    if kind == "scheme":
        raise UrlNotAllowed(
            f"Unsupported URL scheme in {source}: only http and https URLs (when enabled) and file:// URIs "
            f"are accepted; pass {ACCEPTED_FORMS}."
        )
    if kind == "url":
        if not settings.allow_urls:
            raise UrlNotAllowed(
                f"Image URLs are disabled ({source}). Enable them with BLIP_ALLOW_URLS=true (or --allow-urls), "
                "or download the image and pass a file path or base64 data."
            )
        with _prepare.blocking():  # a download: other images go on being prepared meanwhile
            return _fetch.fetch_url(text, max_bytes=settings.max_image_bytes, timeout_s=settings.url_timeout_s)
    return _read_file(Path(ref), settings, source)


def _data_uri_bytes(text: str, settings: BlipSettings, source: str) -> bytes:
    """Decode `data:image/<type>[;base64],<data>`, checking the size from the length first."""
    header, sep, payload = text[5:].partition(",")
    if not sep:
        raise InvalidImage("Malformed data URI: no ',' before the data; expected data:image/png;base64,<data>.")
    params = [p.strip().lower() for p in header.split(";")]
    media = params[0]
    if media and not media.startswith("image/"):
        raise InvalidImage(
            f"The data URI has media type {_shorten(media, 40)!r}; an image/* type is required "
            "(data:image/png;base64,<data>)."
        )
    if "base64" in params[1:]:
        if not _b64_clean(payload):
            raise InvalidImage(
                "The data URI's base64 payload is malformed (characters outside the base64 alphabet, bad "
                "padding or a truncated length); re-encode the image file with base64."
            )
        return _decode_base64(payload, settings, source)
    # Percent-encoded payload: each input character yields at most one byte.
    _check_byte_count(len(payload), settings, source, estimated=True)
    return unquote_to_bytes(payload)


def _decode_base64(text: str, settings: BlipSettings, source: str) -> bytes:
    """Raw base64 (standard or URL-safe, padded or not, whitespace ignored); size checked before decoding."""
    _check_byte_count(_b64_size(text), settings, source, estimated=True)
    compact = _compact(text)
    if _B64_CHARS.fullmatch(compact) is None or len(compact) % 4 == 1:
        raise InvalidImage(
            f"Malformed base64 in {source}: only A–Z, a–z, 0–9, '+/' or '-_' and trailing '=' are allowed, "
            f"and the length must be valid. Pass {ACCEPTED_FORMS}."
        )
    try:
        return base64.b64decode(_to_standard_alphabet(compact), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage(f"Malformed base64 in {source}: {exc}.") from exc


def _file_uri_path(uri: str, *, strict: bool) -> str:
    """The local path of a `file://` URI (percent-decoded; host must be empty or `localhost`)."""
    parts = urlsplit(uri)
    host = (parts.netloc or "").lower()
    if host not in ("", "localhost"):
        if strict:
            raise PathNotAllowed(
                f"file:// URIs must name a local file (file:///path or file://localhost/path), not host "
                f"{_shorten(host, 60)!r}."
            )
        return f"file://{host}/…"
    return unquote(parts.path)


# ---------------------------------------------------------------------------------------------- files


def _read_file(path: Path, settings: BlipSettings, source: str) -> bytes:
    """Read a regular file inside the allowed dirs, never opening a FIFO, device or socket."""
    raw = os.fspath(path)
    if len(raw) > _MAX_PATH_CHARS:
        raise InvalidImage(
            f"The image path {source} is longer than {_MAX_PATH_CHARS} characters; pass {ACCEPTED_FORMS}."
        )
    if not raw.strip():
        raise InvalidImage(f"The image path is empty; pass {ACCEPTED_FORMS}.")
    if "\x00" in raw:
        raise InvalidImage(f"The image path {source} contains a NUL character.")
    try:
        real = Path(os.path.realpath(Path(raw).expanduser()))
    except (OSError, ValueError, RuntimeError) as exc:
        raise InvalidImage(f"Cannot resolve the image path {source}: {exc}.") from exc
    _check_allowed(real, settings, source)
    try:
        info = os.stat(real)
    except FileNotFoundError as exc:
        raise InvalidImage(
            f"Image file not found: {source}"
            + ("" if str(real) == raw else f" (resolved to {_shorten(str(real))})")
            + f". Pass {ACCEPTED_FORMS}."
        ) from exc
    except NotADirectoryError as exc:
        raise InvalidImage(f"Image file not found: {source} (a parent is not a directory).") from exc
    except PermissionError as exc:
        raise InvalidImage(f"Permission denied reading {source}.") from exc
    except OSError as exc:
        raise InvalidImage(f"Cannot read {source}: {exc.strerror or exc}.") from exc
    _check_file_type(info.st_mode, source)
    _check_byte_count(info.st_size, settings, source)
    if info.st_size == 0:
        raise InvalidImage(f"The image file {source} is empty (0 bytes).")
    return _read_regular(real, info, settings, source)


def _check_allowed(real: Path, settings: BlipSettings, source: str) -> None:
    """With `allowed_dirs` set, the resolved path must lie inside one of them (component-wise)."""
    if not settings.allowed_dirs:
        return
    for allowed in settings.allowed_dirs:
        if real.is_relative_to(Path(os.path.realpath(allowed))):
            return
    dirs = ", ".join(_shorten(str(d), 80) for d in settings.allowed_dirs)
    raise PathNotAllowed(
        f"The image path {source} is outside the allowed directories ({dirs}). Move the image into one of "
        "them, or add its directory to BLIP_ALLOWED_DIRS (or --allowed-dir)."
    )


def _check_file_type(mode: int, source: str) -> None:
    """Directories are a mistake (InvalidImage); FIFOs, devices and sockets are refused (PathNotAllowed)."""
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise InvalidImage(
            f"{source} is a directory, not an image file; pass one image file (for a folder: the index_images or "
            "caption_images tool, or `blip-tools caption DIR` / `blip-tools index DIR`)."
        )
    kind = "FIFO" if stat.S_ISFIFO(mode) else "socket" if stat.S_ISSOCK(mode) else "device or special file"
    raise PathNotAllowed(f"{source} is a {kind}, not a regular file; only regular image files are read.")


def _read_regular(real: Path, expected: os.stat_result, settings: BlipSettings, source: str) -> bytes:
    """Open without following a final symlink and without blocking, re-check what was opened, read ≤ the cap."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(real, flags)
    except OSError as exc:
        raise InvalidImage(f"Cannot open {source}: {exc.strerror or exc}.") from exc
    try:
        opened = os.fstat(fd)
        # The path may have been swapped between stat and open (TOCTOU): insist on the same regular file.
        if not stat.S_ISREG(opened.st_mode) or (opened.st_dev, opened.st_ino) != (expected.st_dev, expected.st_ino):
            raise PathNotAllowed(f"{source} changed while it was being opened; refused.")
        _check_opened_location(fd, settings, source)
        limit = settings.max_image_bytes
        chunks: list[bytes] = []
        total = 0
        while True:
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise PayloadTooLarge(
                    f"{source} grew past the {limit}-byte limit (BLIP_MAX_IMAGE_BYTES) while being read."
                )
        return b"".join(chunks)
    except OSError as exc:
        raise InvalidImage(f"Cannot read {source}: {exc.strerror or exc}.") from exc
    finally:
        os.close(fd)


def _check_opened_location(fd: int, settings: BlipSettings, source: str) -> None:
    """Where the kernel says the open file lies must be inside the allowed dirs too.

    Closes the race where a parent directory is swapped for a symlink between `realpath` and `open`
    (Linux `/proc/self/fd`; elsewhere the stat/fstat identity check above is what we have).
    """
    if not settings.allowed_dirs:
        return
    try:
        where = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return
    if where.startswith("/"):
        _check_allowed(Path(where), settings, source)


# ---------------------------------------------------------------------------------------------- decoding


def _check_byte_count(n: int, settings: BlipSettings, source: str, *, estimated: bool = False) -> None:
    limit = settings.max_image_bytes
    if n > limit:
        what = "decodes to about" if estimated else "is"
        raise PayloadTooLarge(
            f"The image {source} {what} {n} bytes, over the {limit}-byte limit (BLIP_MAX_IMAGE_BYTES); "
            "send a smaller or re-compressed image."
        )


def _check_pixels(width: int, height: int, settings: BlipSettings, source: str) -> None:
    if width <= 0 or height <= 0:
        raise InvalidImage(f"The image {source} has a degenerate size {width}×{height}.")
    limit = settings.max_image_pixels
    if width * height > limit:
        raise ImageTooLarge(
            f"The image {source} is {width}×{height} = {width * height} pixels, over the {limit}-pixel limit "
            "(BLIP_MAX_IMAGE_PIXELS); downscale it first."
        )


def _decode(data: bytes, settings: BlipSettings, source: str) -> Image.Image:
    """Header → format and pixel checks → decode first frame → orientation → RGB."""
    if not data:
        raise InvalidImage(f"The image {source} is empty (0 bytes).")
    try:
        im = Image.open(io.BytesIO(data), formats=ALLOWED_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageTooLarge(
            f"The image {source} declares far more pixels than allowed (Pillow: {exc}); downscale it first."
        ) from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(_unidentified_message(data, source)) from exc
    except Exception as exc:  # Pillow's plugins raise many types on hostile headers
        raise InvalidImage(f"The image {source} has a corrupt header ({type(exc).__name__}).") from exc
    with im, _prepare.gil_free(im.width * im.height):
        _check_pixels(im.width, im.height, settings, source)
        try:
            im.load()  # first frame only: animated GIF/WebP/APNG are never iterated
            orientation = _orientation(im)
            rgb = _to_rgb(im)
        except Image.DecompressionBombError as exc:
            raise ImageTooLarge(f"The image {source} is too large to decode ({exc}).") from exc
        except BlipError:
            raise
        except Exception as exc:
            raise InvalidImage(
                f"The image {source} could not be decoded ({_reason(exc)}); it may be truncated or corrupt."
            ) from exc
    return _apply_orientation(rgb, orientation)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return _shorten(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, 160)


def _unidentified_message(data: bytes, source: str) -> str:
    """Name the format when Pillow knows it but we do not allow it; otherwise say it is not an image."""
    name = None
    try:
        with Image.open(io.BytesIO(data)) as probe:  # header only; never loaded
            name = probe.format
    except Exception:  # not an image at all; any failure just means "unknown"
        name = None
    if name:
        return f"The image {source} is {name}, which is not accepted; use {_FORMATS_TEXT} (convert it, e.g. to PNG)."
    hint = (
        " A bare name without '/' or an extension is read as base64; write ./name for a file."
        if (source.startswith("base64"))
        else ""
    )
    return (
        f"{source} is not a recognised image (accepted: {_FORMATS_TEXT}). If it was meant as a reference, "
        f"pass {ACCEPTED_FORMS}.{hint}"
    )


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1–8), or 1 when absent or unreadable (corrupt EXIF must not fail the image)."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in _TRANSPOSE else 1
    except Exception:
        logger.debug("unreadable EXIF ignored", exc_info=True)
        return 1


def _apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    method = _TRANSPOSE.get(orientation)
    return im if method is None else im.transpose(method)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Every Pillow mode → RGB: alpha and transparency keys composited over white, deep images rescaled."""
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        return _deep_to_rgb(im)
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    if not has_alpha:
        return im.copy() if mode == "RGB" else im.convert("RGB")
    if mode == "La":
        im = im.convert("LA")  # Pillow has no direct La → RGBA conversion
    rgba = im.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")


def _deep_to_rgb(im: Image.Image) -> Image.Image:
    """16/32-bit integer and float images → 8-bit gray → RGB, keeping their look (no clipping to white).

    A transparency key (a 16-bit PNG's tRNS value) turns its pixels white, as for 8-bit images.
    """
    raw = np.asarray(im)
    key = im.info.get("transparency")
    keyed = raw == key if isinstance(key, int | float) and not isinstance(key, bool) else None
    values: np.ndarray = np.nan_to_num(raw.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    visible = values if keyed is None else values[~keyed]
    lo, hi = (float(visible.min()), float(visible.max())) if visible.size else (0.0, 0.0)
    if raw.dtype.kind == "f" and lo >= 0.0 and hi <= 1.0:
        scale, offset = 255.0, 0.0  # normalised float data
    elif lo >= 0.0 and hi <= 255.0 and not im.mode.startswith("I;16"):
        scale, offset = 1.0, 0.0  # already 8-bit range
    elif lo >= 0.0 and hi <= 65535.0 and raw.dtype.kind != "f":
        scale, offset = 1.0 / 257.0, 0.0  # 16-bit data (PNG/TIFF 16-bit gray)
    else:
        scale, offset = (255.0 / (hi - lo) if hi > lo else 0.0), lo  # anything else: stretch its range
    scaled = (values - offset) * scale
    gray = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if keyed is not None:
        gray[keyed] = 255
    return Image.fromarray(gray, "L").convert("RGB")


def _from_pil(im: Image.Image, settings: BlipSettings) -> Image.Image:
    """A caller's PIL image: same pixel limit, orientation and RGB conversion; the caller's object is untouched."""
    _check_pixels(im.width, im.height, settings, "PIL image")
    try:
        im.load()
        orientation = _orientation(im)
        rgb = _to_rgb(im)
    except Exception as exc:
        raise InvalidImage(f"The PIL image could not be converted to RGB ({_reason(exc)}).") from exc
    return _apply_orientation(rgb, orientation)


def display_name(text: str) -> str:
    """`text` safe for JSON and terminals: bytes of a file name that are not UTF-8 are shown as `\\xNN`.

    Python keeps such bytes in a `str` as lone surrogates (PEP 383); no JSON encoder accepts those, and `\\xNN`
    (not `?`) still tells such names apart.
    """
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no byte made (not from argv or a folder listing)
        return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _shorten(text: str, limit: int = 160) -> str:
    """Printable and at most `limit` characters (paths in messages can be long or hostile)."""
    text = "".join(ch if ch.isprintable() else "?" for ch in display_name(text[: limit + 1]))
    return text if len(text) <= limit else text[: limit - 1] + "…"


__all__ = [
    "ACCEPTED_FORMS",
    "ALLOWED_FORMATS",
    "ImageInput",
    "LoadedImage",
    "describe_ref",
    "display_name",
    "has_image_signature",
    "load_image",
    "pixel_hash",
    "read_stream",
]
