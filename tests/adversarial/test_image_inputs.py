"""Adversarial image inputs (issue 9): bombs, limit edges, foreign formats, truncation, every mode, EXIF,
degenerate sizes, fuzzed bytes, malformed base64, path escapes and special files.

Every case must end in a `blip_tools.errors` type (or a correct image) within a second.
"""

from __future__ import annotations

import base64
import io
import os
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from blip_tools.errors import (
    BlipError,
    ImageTooLarge,
    InvalidImage,
    PathNotAllowed,
    PayloadTooLarge,
)
from blip_tools.images import load_image
from blip_tools.settings import BlipSettings

# Pillow warns (corrupt EXIF, deprecated formats, bomb sizes) on exactly the inputs this module feeds it.
pytestmark = pytest.mark.filterwarnings(
    "ignore::UserWarning:PIL.*", "ignore::DeprecationWarning:PIL.*", "ignore::PIL.Image.DecompressionBombWarning"
)


def make_settings(**overrides: Any) -> BlipSettings:
    return BlipSettings(**overrides)


def encode(im: Image.Image, fmt: str = "PNG", **params: Any) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **params)
    return buf.getvalue()


def gradient(size: tuple[int, int] = (6, 4)) -> Image.Image:
    """An RGB image whose every pixel differs, so any flip or rotation changes the bytes."""
    w, h = size
    im = Image.new("RGB", size)
    im.putdata([((x * 40) % 256, (y * 60) % 256, (x * 7 + y * 13) % 256) for y in range(h) for x in range(w)])
    return im


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_header_only(width: int, height: int, color_type: int = 2) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IEND", b"")


def many_frame_gif(frames: int) -> bytes:
    """A 1×1 GIF with `frames` frames, written by hand (saving thousands of frames with Pillow is slow)."""
    head = b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\x00\x00\x00\xff\xff\xff"
    loop = b"\x21\xff\x0bNETSCAPE2.0\x03\x01\x00\x00\x00"
    frame = (
        b"\x21\xf9\x04\x00\x01\x00\x00\x00" + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    )
    return head + loop + frame * frames + b"\x3b"


def outcome(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    try:
        result: Any = fn()
    except BlipError as exc:
        result = exc
    return result, time.perf_counter() - start


def expect(fn: Callable[[], Any], kind: type[BlipError], limit_s: float = 1.0) -> BlipError:
    result, seconds = outcome(fn)
    assert isinstance(result, kind), f"expected {kind.__name__}, got {result!r}"
    assert seconds < limit_s, f"took {seconds:.3f}s"
    return result


# ---------------------------------------------------------------------------------------------- bombs


@pytest.mark.parametrize(
    "width,height",
    [(30000, 30000), (100000, 100000), (2**31 - 1, 2**31 - 1), (7000, 7000), (40_000_001, 1), (1, 40_000_001)],
)
def test_header_only_pixel_bombs(width: int, height: int) -> None:
    data = png_header_only(width, height)
    expect(lambda: load_image(data, make_settings()), ImageTooLarge)


def test_pixel_bomb_in_other_formats() -> None:
    # A GIF logical screen and a BMP header claiming 60000×60000.
    gif = (
        b"GIF89a"
        + struct.pack("<HHBBB", 60000, 60000, 0, 0, 0)
        + b"\x2c"
        + struct.pack("<HHHHB", 0, 0, 60000, 60000, 0)
    )
    gif += b"\x02\x02\x44\x01\x00\x3b"
    bmp_info = struct.pack("<IiiHHIIiiII", 40, 60000, 60000, 1, 24, 0, 0, 0, 0, 0, 0)
    bmp = b"BM" + struct.pack("<IHHI", 14 + 40, 0, 0, 14 + 40) + bmp_info
    for data in (gif, bmp):
        result, seconds = outcome(lambda data=data: load_image(data, make_settings()))  # type: ignore[misc]
        assert isinstance(result, (ImageTooLarge, InvalidImage)) and seconds < 1.0, result


def test_gif_with_thousands_of_frames_loads_the_first_frame_fast() -> None:
    data = many_frame_gif(20_000)
    result, seconds = outcome(lambda: load_image(data, make_settings()))
    assert not isinstance(result, BlipError), result
    assert result.image.size == (1, 1) and seconds < 1.0, seconds


def test_animated_webp_and_apng_use_the_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    s = make_settings()
    for fmt, params in (("WEBP", {"lossless": True}), ("PNG", {})):
        data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
        assert load_image(data, s).image.getpixel((4, 4)) == (255, 0, 0)


def test_multi_picture_jpeg_uses_the_first_picture() -> None:
    first, second = Image.new("RGB", (16, 8), (250, 0, 0)), Image.new("RGB", (16, 8), (0, 0, 250))
    data = encode(first, "MPO", save_all=True, append_images=[second], quality=95)
    r, _, b = load_image(data, make_settings()).image.getpixel((8, 4))  # type: ignore[misc]
    assert r > 200 and b < 50


def test_compressed_text_chunk_bomb_is_bounded() -> None:
    # A zTXt chunk inflating to 16 MB (Pillow caps text chunks): refused or ignored, fast either way.
    ztxt = b"Comment\x00\x00" + zlib.compress(b"\0" * 16_000_000, 9)
    good = encode(gradient())
    data = good[:33] + png_chunk(b"zTXt", ztxt) + good[33:]
    result, seconds = outcome(lambda: load_image(data, make_settings()))
    assert seconds < 1.0
    assert isinstance(result, InvalidImage) or result.image.size == (6, 4)


# ------------------------------------------------------------------------------------------- limit edges


def test_pixel_limit_edges() -> None:
    s = make_settings(max_image_pixels=60_000)
    assert load_image(encode(Image.new("L", (1, 60_000))), s).image.size == (1, 60_000)
    expect(lambda: load_image(encode(Image.new("L", (1, 60_001))), s), ImageTooLarge)
    expect(lambda: load_image(encode(Image.new("L", (245, 245))), s), ImageTooLarge)
    assert load_image(Image.new("RGB", (240, 250)), s).image.size == (240, 250)
    expect(lambda: load_image(Image.new("RGB", (241, 250)), s), ImageTooLarge)


def test_byte_limit_edges_for_every_carrier(tmp_path: Path) -> None:
    data = encode(gradient())
    b64 = base64.b64encode(data).decode()
    nopad = base64.urlsafe_b64encode(data).decode().rstrip("=")
    path = tmp_path / "edge.png"
    path.write_bytes(data)
    at = make_settings(max_image_bytes=len(data))
    below = make_settings(max_image_bytes=len(data) - 1)
    for ref in (data, bytearray(data), path, path.as_uri(), b64, nopad, f"data:image/png;base64,{b64}"):
        assert load_image(ref, at).image.size == (6, 4)
        expect(lambda ref=ref: load_image(ref, below), PayloadTooLarge)  # type: ignore[misc]


# --------------------------------------------------------------------------------- formats and truncation


@pytest.mark.parametrize("fmt", ["ICO", "PCX", "PPM", "TGA", "SGI", "XBM", "DDS", "QOI", "IM"])
def test_formats_outside_the_allowlist_are_refused_by_name(fmt: str) -> None:
    im = Image.new("1" if fmt == "XBM" else "RGB", (16, 16))
    try:
        data = encode(im, fmt)
    except (KeyError, OSError, ValueError):
        pytest.skip(f"this Pillow cannot write {fmt}")
    err = expect(lambda: load_image(data, make_settings()), InvalidImage)
    assert type(err) is InvalidImage
    assert "not accepted" in str(err) or "not a recognised image" in str(err)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF"])
def test_truncated_files_of_every_allowed_format(fmt: str) -> None:
    data = encode(gradient((64, 48)), fmt)
    s = make_settings()
    assert load_image(data, s).image.size == (64, 48)
    for cut in (8, 30, len(data) // 3, len(data) // 2, len(data) - 40):
        expect(lambda cut=cut: load_image(data[:cut], s), InvalidImage)  # type: ignore[misc]


@pytest.mark.parametrize(
    "data",
    [b"\x00", b"hello world", b"<svg xmlns='http://www.w3.org/2000/svg'/>", b"%PDF-1.7\n", b"\x89PNG\r\n\x1a\n"],
)
def test_non_images(data: bytes) -> None:
    expect(lambda: load_image(data, make_settings()), InvalidImage)


# --------------------------------------------------------------------------------------------- every mode

ALL_MODES = ["1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "La", "PA"]
ALL_MODES += ["I;16", "I;16B", "I;16L", "I;16N"]


@pytest.mark.parametrize("mode", ALL_MODES)
def test_every_pil_mode_becomes_rgb(mode: str) -> None:
    im = Image.new(mode, (5, 3))
    loaded = load_image(im, make_settings())
    assert loaded.image.mode == "RGB" and loaded.image.size == (5, 3)


@pytest.mark.parametrize(
    "mode,fmt",
    [
        ("1", "PNG"),
        ("L", "PNG"),
        ("LA", "PNG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("I", "TIFF"),
        ("I;16", "PNG"),
        ("I;16", "TIFF"),
        ("F", "TIFF"),
        ("CMYK", "TIFF"),
        ("CMYK", "JPEG"),
        ("L", "JPEG"),
        ("RGBA", "TIFF"),
        ("P", "GIF"),
        ("P", "BMP"),
        ("1", "BMP"),
        ("RGBA", "WEBP"),
    ],
)
def test_every_file_mode_becomes_rgb(mode: str, fmt: str) -> None:
    image = Image.new(mode, (5, 3))
    if mode == "P":  # with a palette: Pillow 10.1-12.1 write an unreadable BMP for a "P" image without one
        image.putpalette([0, 0, 0] * 256)
    loaded = load_image(encode(image, fmt), make_settings())
    assert loaded.image.mode == "RGB" and loaded.image.size == (5, 3)


def test_transparency_keys_and_deep_values_render_sensibly() -> None:
    s = make_settings()
    p = Image.new("P", (2, 1), 0)
    p.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    out = load_image(encode(p, "PNG"), s).image
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (200, 100, 50)
    la = Image.new("LA", (1, 1), (0, 0))
    assert load_image(encode(la, "PNG"), s).image.getpixel((0, 0)) == (255, 255, 255)
    f = Image.new("F", (2, 1))
    f.putpixel((0, 0), 0.0)
    f.putpixel((1, 0), 1.0)
    out = load_image(f, s).image
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)
    big = Image.new("I", (2, 1))
    big.putpixel((0, 0), -5_000_000)
    big.putpixel((1, 0), 5_000_000)
    out = load_image(big, s).image
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)
    deep = Image.new("I;16", (3, 1))
    for x, value in enumerate((1000, 60000, 1000)):
        deep.putpixel((x, 0), value)
    blob = io.BytesIO()
    deep.save(blob, "PNG", transparency=1000)  # a 16-bit gray PNG with a tRNS key, like the 8-bit ones above
    out = load_image(blob.getvalue(), s).image
    assert [out.getpixel((x, 0)) for x in range(3)] == [(255, 255, 255), (233, 233, 233), (255, 255, 255)]


# ------------------------------------------------------------------------------------------------ EXIF


@pytest.mark.parametrize("orientation", range(1, 9))
def test_all_exif_orientations(orientation: int) -> None:
    im = gradient((6, 4))
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(im, "PNG", exif=exif)
    loaded = load_image(data, make_settings())
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert loaded.image.size == expected.size
    assert loaded.image.tobytes() == expected.tobytes()
    assert loaded.image.size == ((4, 6) if orientation >= 5 else (6, 4))


@pytest.mark.parametrize(
    "blob",
    [
        b"Exif\x00\x00garbage-not-tiff",
        b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",  # IFD offset far past the end
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff",  # entry count larger than the data
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x03\x00\x01\x00\x00\x00\x63\x00\x00\x00",  # 99
        b"Exif\x00\x00II*\x00\x08\x00\x00\x00\x01\x00\x12\x01\x02\x00\x04\x00\x00\x00abc\x00",  # string
        b"Exif\x00\x00",
    ],
)
def test_corrupt_exif_does_not_fail_the_image(blob: bytes) -> None:
    data = encode(gradient((8, 8)), "JPEG", exif=blob)
    loaded = load_image(data, make_settings())
    assert loaded.image.size == (8, 8)


# -------------------------------------------------------------------------------------- degenerate sizes


def test_degenerate_sizes() -> None:
    s = make_settings()
    assert load_image(encode(Image.new("RGB", (1, 1))), s).image.size == (1, 1)
    assert load_image(encode(Image.new("RGB", (1, 60000))), s).image.size == (1, 60000)
    assert load_image(encode(Image.new("RGB", (60000, 1)), "GIF"), s).image.size == (60000, 1)
    for data in (png_header_only(0, 10), png_header_only(10, 0), png_header_only(0, 0)):
        expect(lambda data=data: load_image(data, s), InvalidImage)  # type: ignore[misc]
    expect(lambda: load_image(Image.new("RGB", (0, 0)), s), InvalidImage)
    expect(lambda: load_image(Image.new("RGB", (0, 5)), s), InvalidImage)


# ------------------------------------------------------------------------------------- fuzzing (Hypothesis)

_SEEDS = [
    encode(gradient((9, 7)), "PNG"),
    encode(gradient((9, 7)), "JPEG"),
    encode(gradient((9, 7)), "GIF"),
    encode(gradient((9, 7)), "BMP"),
    encode(gradient((9, 7)), "TIFF"),
    encode(gradient((9, 7)), "WEBP"),
    encode(Image.new("RGBA", (5, 5)), "PNG"),
    encode(gradient((9, 7)), "TIFF", compression="tiff_deflate"),
]
_FUZZ_SETTINGS = make_settings(max_image_pixels=1_000_000, max_image_bytes=1_000_000)


def _check_only_our_errors(data: bytes) -> None:
    start = time.perf_counter()
    try:
        loaded = load_image(data, _FUZZ_SETTINGS)
    except BlipError as exc:
        event(type(exc).__name__)
    else:
        event("decoded")
        assert loaded.image.mode == "RGB"
        assert loaded.image.width * loaded.image.height <= 1_000_000
    assert time.perf_counter() - start < 1.0


@hsettings(max_examples=100, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=4096))
def test_random_bytes_only_raise_our_errors(data: bytes) -> None:
    _check_only_our_errors(data)


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(_SEEDS)))
    for _ in range(draw(st.integers(1, 8))):
        op = draw(st.sampled_from(["flip", "flip", "set", "set", "insert", "dup", "cut"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":  # keep at least half, so most cases still reach the decoder
            del data[max(pos, len(data) // 2) :]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "dup":
            data[pos:pos] = data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


@hsettings(max_examples=150, deadline=1000, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_images())
def test_mutated_images_only_raise_our_errors(data: bytes) -> None:
    _check_only_our_errors(data)


@hsettings(max_examples=100, deadline=1000)
@given(st.text(max_size=300))
def test_random_strings_only_raise_our_errors(text: str) -> None:
    # allowed_dirs points at an empty folder, so no string can read a real file.
    try:
        loaded = load_image(text, _STRING_FUZZ_SETTINGS)
    except BlipError as exc:
        event(type(exc).__name__)
    else:  # only a string that is base64 of a real image can get here
        assert loaded.image.mode == "RGB" and loaded.info.source.startswith(("base64", "data URI"))


_STRING_FUZZ_SETTINGS = make_settings(allowed_dirs=[Path(__file__).parent / "no-such-allowed-dir"])


# ------------------------------------------------------------------------------------------------ base64


@pytest.mark.parametrize(
    "text",
    [
        "iVBORw0KGgo",  # signature only
        "iVBORw0KGgoAAAANSUhEUg===",  # three '='
        "iVBORw0KGgo=AAAANSUhEUg==",  # '=' in the middle
        "iVBORw0KGgo#AAANSUhEUg==",
        "iVBORw0KGgoA",  # length ≡ 1 (mod 4)
        "iVBORw0K\x00GgoAAAANSUhEUg==",
        "ïVBORw0KGgoAAAANSUhEUg==",
        "data:image/png;base64,",
        "data:image/png;base64,====",
        "data:;base64,QUJD",
        "data:image/png;charset=utf-8;base64,@@@@",
        "data:image/svg+xml;base64,PHN2Zy8+",  # SVG: an image type, but not an allowed format
        "data:image/png,%89PNG%0D%0A",  # percent-encoded, truncated
    ],
)
def test_malformed_base64_variants(text: str) -> None:
    expect(lambda: load_image(text, make_settings()), InvalidImage)


def test_base64_tolerates_whitespace_padding_and_both_alphabets() -> None:
    data = encode(gradient((30, 30)))
    std = base64.b64encode(data).decode()
    url = base64.urlsafe_b64encode(data).decode()
    s = make_settings()
    wanted = load_image(data, s).sha256
    for text in (std, std.rstrip("="), url, url.rstrip("="), " \n".join([std[:50], std[50:]]), f"\t{std}\r\n"):
        assert load_image(text, s).sha256 == wanted


# ------------------------------------------------------------------------------------------------- paths

_OPENED: list[str] = []
_RECORDING = threading.Event()


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event == "open" and _RECORDING.is_set() and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _OPENED.append(os.fsdecode(args[0]))


_HOOK_INSTALLED: list[bool] = []


@contextmanager
def recording_opens() -> Iterator[list[str]]:
    """Record every path opened (audit event "open") while the block runs. The hook is installed once."""
    if not _HOOK_INSTALLED:
        sys.addaudithook(_audit)
        _HOOK_INSTALLED.append(True)
    _OPENED.clear()
    _RECORDING.set()
    try:
        yield _OPENED
    finally:
        _RECORDING.clear()


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """allowed/ (with images, an inner link and links out), siblings with a shared prefix, and secrets outside."""
    good = encode(gradient())
    allowed = tmp_path / "allowed"
    (allowed / "sub").mkdir(parents=True)
    (allowed / "ok.png").write_bytes(good)
    (allowed / "sub" / "deep.png").write_bytes(good)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(good)
    for sibling in ("allowed2", "allowed-evil", "allowed.bak"):
        (tmp_path / sibling).mkdir()
        (tmp_path / sibling / "x.png").write_bytes(good)
    (allowed / "out.png").symlink_to(outside / "secret.png")
    (allowed / "outdir").symlink_to(outside, target_is_directory=True)
    (allowed / "in.png").symlink_to(allowed / "sub" / "deep.png")
    (allowed / "rel-in.png").symlink_to(Path("sub") / "deep.png")
    (allowed / "loop.png").symlink_to(allowed / "loop.png")
    (outside / "into-allowed.png").symlink_to(allowed / "ok.png")
    return {"root": tmp_path, "allowed": allowed, "outside": outside}


def _escapes(tree: dict[str, Path]) -> list[Any]:
    root, allowed, outside = tree["root"], tree["allowed"], tree["outside"]
    a = str(allowed)
    return [
        f"{a}/../outside/secret.png",
        f"{a}/./../outside/secret.png",
        f"{a}//..//outside//secret.png",
        f"{a}/sub/../../outside/secret.png",
        f"{a}/sub/../../../{root.name}/outside/secret.png",
        str(outside / "secret.png"),
        "file://" + f"{a}/%2e%2e/outside/secret.png",
        "file://" + f"{a}/..%2Foutside%2Fsecret.png",
        "file://localhost" + str(outside / "secret.png"),
        allowed / "out.png",
        str(allowed / "outdir" / "secret.png"),
        root / "allowed2" / "x.png",
        root / "allowed-evil" / "x.png",
        root / "allowed.bak" / "x.png",
        str(root / "allowed2" / "x.png"),
        "/etc/passwd",
        "/etc/hostname",
        "/proc/self/environ",
        "/dev/zero",
        "~/.ssh/id_rsa.png",
        f"{a}/../outside/missing.png",  # missing *and* outside: refused, existence not revealed
    ]


def test_path_escapes_are_refused_and_nothing_outside_is_opened(tree: dict[str, Path]) -> None:
    s = make_settings(allowed_dirs=[tree["allowed"]])
    allowed = tree["allowed"]
    for ref in _escapes(tree):
        with recording_opens() as opened:
            err = expect(lambda ref=ref: load_image(ref, s), PathNotAllowed)  # type: ignore[misc]
        assert opened == [], (ref, opened)
        assert "outside the allowed directories" in str(err)
    # The hook does see our reads: a permitted file is opened exactly where it lies.
    with recording_opens() as opened:
        load_image(allowed / "ok.png", s)
    assert [Path(p) for p in opened] == [allowed / "ok.png"]


def test_symlinks_and_spellings_inside_the_allowed_dir_work(tree: dict[str, Path]) -> None:
    allowed = tree["allowed"]
    s = make_settings(allowed_dirs=[allowed])
    for ref in (
        allowed / "in.png",
        allowed / "rel-in.png",
        f"{allowed}/sub/../ok.png",
        f"{allowed}/./sub//deep.png",
        (allowed / "sub" / "deep.png").as_uri(),
        tree["outside"] / "into-allowed.png",  # a link from outside whose target is inside
    ):
        assert load_image(ref, s).image.size == (6, 4), ref


def test_relative_and_home_paths_resolve_before_the_check(
    tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    allowed, outside = tree["allowed"], tree["outside"]
    s = make_settings(allowed_dirs=[allowed])
    monkeypatch.chdir(allowed / "sub")
    assert load_image("../ok.png", s).image.size == (6, 4)
    expect(lambda: load_image("../../outside/secret.png", s), PathNotAllowed)
    monkeypatch.setenv("HOME", str(outside))
    expect(lambda: load_image("~/secret.png", s), PathNotAllowed)
    monkeypatch.setenv("HOME", str(allowed))
    assert load_image("~/ok.png", s).image.size == (6, 4)


def test_odd_spellings_stay_typed(tree: dict[str, Path]) -> None:
    allowed = tree["allowed"]
    s = make_settings(allowed_dirs=[allowed])
    expect(lambda: load_image(str(allowed / "loop.png"), s), InvalidImage)
    expect(lambda: load_image(f"{allowed}/ok.png\x00/../../outside/secret.png", s), InvalidImage)
    expect(lambda: load_image(f"{allowed}\\..\\outside\\secret.png", s), InvalidImage)  # a literal name
    expect(lambda: load_image("file://evil.example/etc/passwd", s), PathNotAllowed)
    expect(lambda: load_image("/" + "a/" * 3000 + "x.png", s), InvalidImage)


def test_special_files_never_block(tree: dict[str, Path]) -> None:
    allowed = tree["allowed"]
    fifo = allowed / "fifo.png"
    os.mkfifo(fifo)
    sock_path = allowed / "s.png"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(sock_path))
        (allowed / "fifo-link.png").symlink_to(fifo)
        cases: list[tuple[Any, BlipSettings, type[BlipError]]] = [
            (fifo, make_settings(allowed_dirs=[allowed]), PathNotAllowed),
            (allowed / "fifo-link.png", make_settings(allowed_dirs=[allowed]), PathNotAllowed),
            (sock_path, make_settings(allowed_dirs=[allowed]), PathNotAllowed),
            ("/dev/zero", make_settings(allowed_dirs=["/dev"]), PathNotAllowed),
            ("/dev/urandom", make_settings(), PathNotAllowed),
            (allowed / "sub", make_settings(allowed_dirs=[allowed]), InvalidImage),
        ]
        box: list[Any] = []

        def run_all() -> None:
            for ref, s, _ in cases:
                box.append(outcome(lambda ref=ref, s=s: load_image(ref, s)))  # type: ignore[misc]

        worker = threading.Thread(target=run_all, daemon=True)
        worker.start()
        worker.join(10.0)
        if worker.is_alive():
            with open(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK), "wb"):
                pass
            pytest.fail("a special file blocked load_image")
        for (ref, _, kind), (result, seconds) in zip(cases, box, strict=True):
            assert isinstance(result, kind), (ref, result)
            assert seconds < 1.0, (ref, seconds)
    finally:
        server.close()


def test_without_allowed_dirs_any_regular_file_is_read_but_pseudo_files_are_not(tmp_path: Path) -> None:
    s = make_settings()
    (tmp_path / "a.png").write_bytes(encode(gradient()))
    assert load_image(tmp_path / "a.png", s).image.size == (6, 4)
    expect(lambda: load_image("/etc/hostname", s), InvalidImage)  # read, and not an image
    with recording_opens() as opened:
        expect(lambda: load_image("/proc/self/environ", s), InvalidImage)  # size 0: never read
    assert not any(p.startswith("/proc") for p in opened)
