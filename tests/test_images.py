"""`blip_tools.images.load_image`: every input form, conversions, limits and bad inputs → typed errors, fast."""

from __future__ import annotations

import base64
import io
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageOps

from blip_tools import images
from blip_tools.errors import (
    BlipError,
    ImageTooLarge,
    InvalidImage,
    PathNotAllowed,
    PayloadTooLarge,
    UrlNotAllowed,
)
from blip_tools.images import LoadedImage, describe_ref, load_image
from blip_tools.settings import BlipSettings


def make_settings(**overrides: Any) -> BlipSettings:
    """Settings for image tests only (no model is loaded here)."""
    return BlipSettings(**overrides)


def encode(im: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def pattern(size: tuple[int, int] = (24, 16)) -> Image.Image:
    """An RGB image with a distinct colour in each quadrant, so flips and rotations are visible."""
    w, h = size
    im = Image.new("RGB", size, (255, 0, 0))
    im.paste((0, 255, 0), (w // 2, 0, w, h // 2))
    im.paste((0, 0, 255), (0, h // 2, w // 2, h))
    im.paste((255, 255, 0), (w // 2, h // 2, w, h))
    return im


def png_header_only(width: int, height: int) -> bytes:
    """A tiny PNG: signature, a valid IHDR (with CRC) claiming width×height, then IEND — no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """Run `fn`, returning (result or raised BlipError, seconds)."""
    start = time.perf_counter()
    try:
        result: Any = fn()
    except BlipError as exc:
        result = exc
    return result, time.perf_counter() - start


def assert_fast_error(fn: Callable[[], Any], kind: type[BlipError], limit_s: float = 1.0) -> BlipError:
    result, seconds = timed(fn)
    assert isinstance(result, kind), f"expected {kind.__name__}, got {result!r}"
    assert seconds < limit_s, f"{kind.__name__} took {seconds:.3f}s"
    return result


# ------------------------------------------------------------------------------------------- input forms


def test_every_input_form_gives_the_same_pixels(tmp_path: Path) -> None:
    im = pattern()
    data = encode(im)
    path = tmp_path / "pic.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    urlsafe = base64.urlsafe_b64encode(data).decode()
    refs: dict[str, images.ImageInput] = {
        "path str": str(path),
        "Path": path,
        "file uri": path.as_uri(),
        "file uri localhost": "file://localhost" + str(path),
        "data uri": "data:image/png;base64," + b64,
        "raw base64": b64,
        "url-safe base64 without padding": urlsafe.rstrip("="),
        "base64 wrapped with newlines": "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)) + "\n",
        "bytes": data,
        "bytearray": bytearray(data),
        "PIL": im,
    }
    s = make_settings()
    hashes = set()
    for name, ref in refs.items():
        loaded = load_image(ref, s)
        assert isinstance(loaded, LoadedImage), name
        assert loaded.image.mode == "RGB", name
        assert loaded.image.size == im.size, name
        assert loaded.image.tobytes() == im.tobytes(), name
        assert loaded.info.width == 24 and loaded.info.height == 16
        hashes.add(loaded.sha256)
    assert len(hashes) == 1


def test_sources_are_short_and_never_carry_the_data(tmp_path: Path) -> None:
    data = encode(pattern())
    b64 = base64.b64encode(data).decode()
    s = make_settings()
    assert load_image(b64, s).info.source == f"base64 ({len(data)} bytes)"
    assert load_image("data:image/png;base64," + b64, s).info.source == f"data URI ({len(data)} bytes)"
    assert load_image(data, s).info.source == f"bytes ({len(data)})"
    assert load_image(pattern(), s).info.source == "PIL image"
    assert describe_ref("https://user:pw@example.com/secret/path?token=abc") == "https://example.com/…"
    assert b64[:40] not in describe_ref(b64)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    assert load_image(str(path), s).info.source == str(path)


def test_a_name_with_bytes_that_are_not_utf8_is_shown_with_x_escapes(tmp_path: Path) -> None:
    """Such a name (a lone surrogate in Python, PEP 383) shows as `caf\\xe9.png` in every result, as the index
    shows it: it was `caf?.png` (`ask --json`, MCP results), which named no file and told such names apart less."""
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    with open(raw, "wb") as handle:
        handle.write(encode(pattern()))
    source = load_image(os.fsdecode(raw), make_settings()).info.source
    assert source == str(tmp_path) + "/caf\\xe9.png"
    assert source.encode("utf-8")  # JSON-safe


def test_equal_pixels_give_equal_hash_across_formats_and_names(tmp_path: Path) -> None:
    im = pattern()
    (tmp_path / "one.png").write_bytes(encode(im, "PNG"))
    (tmp_path / "two.bmp").write_bytes(encode(im, "BMP"))
    (tmp_path / "three.tiff").write_bytes(encode(im, "TIFF"))
    s = make_settings()
    hashes = {load_image(tmp_path / n, s).sha256 for n in ("one.png", "two.bmp", "three.tiff")}
    assert len(hashes) == 1
    other = pattern()
    other.putpixel((0, 0), (1, 2, 3))
    assert load_image(other, s).sha256 not in hashes
    # Same bytes, different shape: the size is part of the hash.
    flat = Image.frombytes("RGB", (im.width * im.height, 1), im.tobytes())
    assert load_image(flat, s).sha256 not in hashes


def test_exif_orientation_is_applied() -> None:
    im = pattern((40, 20))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = encode(im, "JPEG", exif=exif.tobytes(), quality=95)
    loaded = load_image(data, make_settings())
    assert loaded.image.size == (20, 40)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert loaded.image.tobytes() == expected.tobytes()
    # Top-left of the displayed image is the original's bottom-left quadrant (blue).
    r, g, b = loaded.image.getpixel((2, 2))  # type: ignore[misc]
    assert b > 200 and r < 60 and g < 60


def test_alpha_is_composited_over_white() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    rgba.putpixel((1, 1), (255, 0, 0, 255))
    rgba.putpixel((2, 2), (0, 0, 0, 128))
    s = make_settings()
    for ref in (rgba, encode(rgba, "PNG"), encode(rgba, "WEBP", lossless=True)):
        out = load_image(ref, s).image
        assert out.getpixel((0, 0)) == (255, 255, 255)
        assert out.getpixel((1, 1)) == (255, 0, 0)
        assert out.getpixel((2, 2)) in {(127, 127, 127), (126, 126, 126), (128, 128, 128)}


@pytest.mark.parametrize("mode", ["1", "L", "P", "RGB", "RGBA", "LA", "PA", "CMYK", "I", "I;16", "F", "YCbCr"])
def test_pil_modes_become_rgb(mode: str) -> None:
    im = Image.new(mode, (3, 2))
    loaded = load_image(im, make_settings())
    assert loaded.image.mode == "RGB" and loaded.image.size == (3, 2)
    assert im.mode == mode  # the caller's image is untouched


def test_sixteen_bit_gray_keeps_its_tones() -> None:
    im = Image.new("I;16", (3, 1))
    for x, value in enumerate((0, 32896, 65535)):
        im.putpixel((x, 0), value)
    out = load_image(encode(im, "PNG"), make_settings()).image
    assert [out.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]


def test_returned_image_is_a_copy_of_a_pil_input() -> None:
    im = pattern()
    loaded = load_image(im, make_settings())
    im.putpixel((0, 0), (9, 9, 9))
    assert loaded.image.getpixel((0, 0)) == (255, 0, 0)


# ------------------------------------------------------------------------------------------------ limits


def test_header_claiming_30000_by_30000_is_too_large_fast() -> None:
    data = png_header_only(30000, 30000)
    assert len(data) < 100
    err = assert_fast_error(lambda: load_image(data, make_settings()), ImageTooLarge)
    assert "pixel" in str(err).lower()


def test_pixel_limit_is_read_from_the_header() -> None:
    # 7000×7000 = 49 MP: over our 40 MP default but under Pillow's own bomb threshold.
    assert_fast_error(lambda: load_image(png_header_only(7000, 7000), make_settings()), ImageTooLarge)
    s = make_settings(max_image_pixels=100)
    assert load_image(encode(Image.new("RGB", (10, 10))), s).image.size == (10, 10)
    assert_fast_error(lambda: load_image(encode(Image.new("RGB", (1, 101))), s), ImageTooLarge)
    assert_fast_error(lambda: load_image(Image.new("RGB", (11, 10)), s), ImageTooLarge)


def test_byte_limit_for_files_bytes_and_base64(tmp_path: Path) -> None:
    data = encode(pattern())
    path = tmp_path / "p.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    exact = make_settings(max_image_bytes=len(data))
    under = make_settings(max_image_bytes=len(data) - 1)
    for ref in (data, path, str(path), b64, "data:image/png;base64," + b64):
        load_image(ref, exact)
        assert_fast_error(lambda ref=ref: load_image(ref, under), PayloadTooLarge)  # type: ignore[misc]


def test_oversize_base64_is_refused_from_its_length_without_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    decoded_lengths: list[int] = []
    real_decode = base64.b64decode

    def spy(data: Any, *args: Any, **kwargs: Any) -> bytes:
        decoded_lengths.append(len(data))
        return real_decode(data, *args, **kwargs)

    monkeypatch.setattr(images.base64, "b64decode", spy)
    huge = "iVBORw0KGgo" + "A" * 40_000_000 + "="  # ~30 MB once decoded
    s = make_settings(max_image_bytes=20_000_000)
    uri = "data:image/png;base64," + huge
    # The spy is the proof; the time bound is loose because a busy 2-core CI box can stall 40 MB strings.
    err = assert_fast_error(lambda: load_image(huge, s), PayloadTooLarge, 2.0)
    assert "20000000" in str(err)
    assert all(n <= 64 for n in decoded_lengths), decoded_lengths  # at most a signature sniff of the head
    err = assert_fast_error(lambda: load_image(uri, s), PayloadTooLarge, 2.0)
    assert all(n <= 64 for n in decoded_lengths), decoded_lengths


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "text",
    [
        "!!!!not base64!!!!",
        "iVBORw0KGgo=AAAA",  # padding in the middle
        "data:image/png;base64,@@@@",
        "data:image/png;base64,iVBORw0KGgoA",  # length ≡ 1 (mod 4)
        "data:image/png,",  # empty payload
        "data:image/png;base64",  # no comma
        "data:text/html;base64,PGh0bWw+",  # not an image type
        "QUJD",  # valid base64, not an image
    ],
)
def test_malformed_base64_and_data_uris(text: str) -> None:
    assert_fast_error(lambda: load_image(text, make_settings()), InvalidImage)


def test_unrecognised_string_lists_the_accepted_forms() -> None:
    err = assert_fast_error(lambda: load_image("no such thing here", make_settings()), InvalidImage)
    assert "data:image/" in str(err) and "base64" in str(err) and "path" in str(err)
    err = assert_fast_error(lambda: load_image("   ", make_settings()), InvalidImage)
    assert "empty" in str(err)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    err = assert_fast_error(lambda: load_image(str(tmp_path / "missing.png"), make_settings()), InvalidImage)
    assert "not found" in str(err)
    err = assert_fast_error(lambda: load_image(tmp_path, make_settings()), InvalidImage)
    assert not isinstance(err, PathNotAllowed) and "directory" in str(err)
    (tmp_path / "empty.png").write_bytes(b"")
    assert_fast_error(lambda: load_image(tmp_path / "empty.png", make_settings()), InvalidImage)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    box: list[Any] = []
    worker = threading.Thread(target=lambda: box.append(timed(lambda: load_image(fifo, make_settings()))))
    worker.start()
    worker.join(5.0)
    if worker.is_alive():  # unblock the reader so the test process can exit, then fail
        with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "wb"):
            pass
        pytest.fail("load_image blocked on a FIFO")
    result, seconds = box[0]
    assert isinstance(result, PathNotAllowed) and seconds < 1.0
    assert "FIFO" in str(result)


def test_traversal_symlink_escape_and_sibling_prefix(tmp_path: Path) -> None:
    allowed = tmp_path / "data"
    allowed.mkdir()
    sibling = tmp_path / "data2"
    sibling.mkdir()
    good = encode(pattern())
    (allowed / "ok.png").write_bytes(good)
    (tmp_path / "secret.png").write_bytes(good)
    (sibling / "x.png").write_bytes(good)
    (allowed / "link.png").symlink_to(tmp_path / "secret.png")
    s = make_settings(allowed_dirs=[allowed])
    assert load_image(allowed / "ok.png", s).image.size == (24, 16)
    for ref in (
        f"{allowed}/../secret.png",
        allowed / "link.png",
        sibling / "x.png",
        str(tmp_path / "secret.png"),
        (allowed / ".." / "secret.png").as_uri(),
    ):
        err = assert_fast_error(lambda ref=ref: load_image(ref, s), PathNotAllowed)  # type: ignore[misc]
        assert "BLIP_ALLOWED_DIRS" in str(err)


def test_truncated_and_non_image_bytes() -> None:
    s = make_settings()
    png = encode(pattern((64, 64)))
    jpeg = encode(pattern((64, 64)), "JPEG")
    for data in (png[: len(png) // 2], png[:40], jpeg[: len(jpeg) // 2], jpeg[:200], b"GIF89a", b"hello world"):
        assert_fast_error(lambda data=data: load_image(data, s), InvalidImage)  # type: ignore[misc]
    assert_fast_error(lambda: load_image(b"", s), InvalidImage)


def test_urls_are_refused_unless_enabled() -> None:
    s = make_settings()
    assert not s.allow_urls
    for url in ("https://example.com/cat.png", "http://93.184.216.34/x.png"):
        err = assert_fast_error(lambda url=url: load_image(url, s), UrlNotAllowed)  # type: ignore[misc]
        assert "BLIP_ALLOW_URLS" in str(err)
    assert_fast_error(lambda: load_image("ftp://example.com/cat.png", s), UrlNotAllowed)


def test_unsupported_python_type() -> None:
    assert_fast_error(lambda: load_image(123, make_settings()), InvalidImage)  # type: ignore[arg-type]


def test_next_good_request_works_after_failures(tmp_path: Path) -> None:
    s = make_settings(allowed_dirs=[tmp_path])
    for bad in (png_header_only(30000, 30000), b"junk", "/etc/passwd", "data:image/png;base64,@@"):
        with pytest.raises(BlipError):
            load_image(bad, s)
    assert load_image(encode(pattern()), s).image.size == (24, 16)
