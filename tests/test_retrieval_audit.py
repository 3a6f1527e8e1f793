"""Embeddings, image-text scores and locate checked against transformers itself and against each other.

On the tiny checkpoint in float32: the service's image/text embeddings, ITC similarity (max over query tokens)
and ITM probability ("match" is index 1) equal `Blip2ForImageTextRetrieval`'s own outputs; one by one, batched
and concurrent calls give the same numbers; odd texts and images give a result or a typed error; and the
`locate` peak, box and heatmap are in the displayed image's coordinates.
"""

from __future__ import annotations

import concurrent.futures
import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from blip_tools import Blip2Service, BlipSettings
from blip_tools.errors import InvalidInput
from blip_tools.grounding import _cell_span, build_locate_result, peak_box, upsample
from blip_tools.results import ImageInfo

TEXTS = ["a dog", "A Red car on the street", "two cats laying on a blanket near a window", "Dog", "dog dog"]


def _pixels(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> Iterator[tuple[Any, Any]]:
    """transformers' own retrieval model and processor for the tiny checkpoint, in float32."""
    import torch
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    folder = tiny_checkpoint / "retrieval"
    model = Blip2ForImageTextRetrieval.from_pretrained(folder, dtype=torch.float32).eval()
    yield model, AutoProcessor.from_pretrained(folder)


def test_embeddings_and_scores_equal_transformers(service: Blip2Service, reference: tuple[Any, Any]) -> None:
    """The documented forward (`use_image_text_matching_head=False/True`) against `embed_*` and `score`.

    The text goes through the tokenizer alone here, as the service feeds it, so the model is told there are no
    `<image>` placeholders to drop; the processor's own path is checked in the next test.
    """

    model, processor = reference
    placeholder = model.config.image_token_index
    model.config.image_token_index = None
    try:
        _compare_with_transformers(service, model, processor)
    finally:
        model.config.image_token_index = placeholder


def _compare_with_transformers(service: Blip2Service, model: Any, processor: Any) -> None:
    import torch

    for seed, size in ((1, (48, 40)), (2, (30, 70)), (3, (100, 20))):
        image = _pixels(seed, size)
        inputs = dict(processor.tokenizer(TEXTS, padding=True, return_tensors="pt"))
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            itc = model(pixel_values=pixels, **inputs, use_image_text_matching_head=False)
            itm = model(pixel_values=pixels.expand(len(TEXTS), -1, -1, -1), **inputs, use_image_text_matching_head=True)
        embedded = service.embed_images([image], include_query_vectors=True)[0]
        queries = itc.image_embeds[0].numpy()  # (Q, D), each query token normalised
        np.testing.assert_allclose(np.asarray(embedded.query_vectors), queries, atol=1e-5)
        pooled = queries.mean(axis=0)
        np.testing.assert_allclose(embedded.vector, pooled / np.linalg.norm(pooled), atol=1e-5)
        texts = np.asarray([r.vector for r in service.embed_texts(TEXTS)])
        np.testing.assert_allclose(texts, itc.text_embeds.numpy(), atol=1e-5)
        scored = service.score(image, TEXTS).scores
        np.testing.assert_allclose([s.itc for s in scored], itc.logits_per_image.reshape(-1).numpy(), atol=1e-5)
        match = torch.softmax(itm.logits_per_image, dim=1)[:, 1].numpy()
        np.testing.assert_allclose([s.itm_probability for s in scored], match, atol=1e-5)
        # Lower-casing is the tokenizer's (uncased BERT), as in transformers.
        assert texts[0] == pytest.approx(service.embed_texts(["A DOG"])[0].vector, abs=1e-6)


def test_transformers_processor_path_on_the_tiny_checkpoint_equals_score(
    service: Blip2Service, reference: tuple[Any, Any]
) -> None:
    """transformers' documented `model(**processor(images=..., text=...))` gives `score`'s numbers on the tiny
    checkpoint too: its processor puts `<image>` placeholders before the text, which the model drops only when its
    config has their id (it had none, and ITC came out 0.58 where -0.20 is right)."""
    import torch

    model, processor = reference
    image = _pixels(4, (48, 40))
    scored = service.score(image, TEXTS).scores
    with torch.no_grad():
        for text, got in zip(TEXTS, scored, strict=True):
            inputs = processor(images=image, text=text, return_tensors="pt")
            itc = model(**inputs, use_image_text_matching_head=False).logits_per_image
            itm = model(**inputs, use_image_text_matching_head=True).logits_per_image
            assert float(itc) == pytest.approx(got.itc, abs=1e-5)
            assert float(torch.softmax(itm, dim=1)[0, 1]) == pytest.approx(got.itm_probability, abs=1e-5)


def test_one_by_one_batched_and_concurrent_calls_agree(settings: BlipSettings) -> None:
    images = [_pixels(10 + i, (30 + 7 * i, 50 - 3 * i)) for i in range(5)]
    texts = ["a", "a dog on a bike", "two cats laying on a blanket near a window with the sun", "red", "dog " * 40]
    with Blip2Service(settings.model_copy(update={"max_wait_ms": 30.0, "feature_cache_size": 0})).start() as svc:
        one_image = [svc.embed_images([im])[0].vector for im in images]
        one_text = [svc.embed_texts([t])[0].vector for t in texts]
        np.testing.assert_allclose([r.vector for r in svc.embed_images(images)], one_image, atol=1e-6)
        np.testing.assert_allclose([r.vector for r in svc.embed_texts(texts)], one_text, atol=1e-6)
        scores = {i: [(s.itc, s.itm_probability) for s in svc.score(im, texts).scores] for i, im in enumerate(images)}
        single = [(s.itc, s.itm_probability) for t in texts for s in svc.score(images[0], [t]).scores]
        np.testing.assert_allclose(single, scores[0], atol=1e-6)
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            scored = [pool.submit(svc.score, images[k % 5], texts[k % 4 : k % 4 + 2]) for k in range(30)]
            embedded = [pool.submit(svc.embed_texts, [texts[k % 5]]) for k in range(20)]
            pictured = [pool.submit(svc.embed_images, [images[k % 5]]) for k in range(20)]
            for k, future in enumerate(scored):
                got = [(s.itc, s.itm_probability) for s in future.result().scores]
                np.testing.assert_allclose(got, scores[k % 5][k % 4 : k % 4 + 2], atol=1e-6)
            for k, future in enumerate(embedded):
                np.testing.assert_allclose(future.result()[0].vector, one_text[k % 5], atol=1e-6)
            for k, future in enumerate(pictured):
                np.testing.assert_allclose(future.result()[0].vector, one_image[k % 5], atol=1e-6)
        assert max(svc.stats().batch_size_histogram) > 1  # some calls did share a batch


@pytest.mark.parametrize("text", ["\x00\x01", "\u200b", " \x7f\t", "\ufffd"])
def test_text_of_only_control_characters_is_invalid_input(service: Blip2Service, text: str) -> None:
    """The tokenizer drops control and format characters: such a text was embedded as the empty text (which
    is refused when given as "")."""
    image = _pixels(4, (40, 30))
    for call in (
        lambda: service.embed_texts([text]),
        lambda: service.score(image, ["a dog", text]),
        lambda: service.locate(image, text),
    ):
        with pytest.raises(InvalidInput, match="non-empty"):
            call()
    assert service.embed_texts(["a\x00dog"])[0].vector == service.embed_texts(["adog"])[0].vector


def test_long_text_reads_its_first_64_tokens(service: Blip2Service, make_image: Callable[..., Any]) -> None:
    image = make_image(5)
    long, cut = "dog " * 500, "dog " * 62  # [CLS] + 62 + [SEP] = 64 tokens
    assert service.embed_texts([long])[0].vector == pytest.approx(service.embed_texts([cut])[0].vector, abs=1e-6)
    assert service.embed_texts([long])[0].vector != pytest.approx(service.embed_texts(["dog " * 30])[0].vector)
    a, b = service.score(image, [long, cut]).scores
    assert (a.itc, a.itm_probability) == pytest.approx((b.itc, b.itm_probability), abs=1e-6)
    assert service.locate(image, long).grid == service.locate(image, cut).grid


def test_leading_whitespace_does_not_use_up_the_characters_read(service: Blip2Service) -> None:
    """Texts were cut at 4,096 characters before stripping: a text after 5,000 blanks or newlines was refused
    as empty."""
    vector = service.embed_texts(["a dog"])[0].vector
    assert service.embed_texts([" " * 5000 + "a dog"])[0].vector == pytest.approx(vector, abs=1e-6)
    assert service.embed_texts(["\n" * 5000 + "a dog  "])[0].vector == pytest.approx(vector, abs=1e-6)


@pytest.fixture(scope="module")
def short_positions(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny retrieval model with only 32 text positions in its Q-Former (fewer than the 64 tokens read)."""
    import torch
    from transformers import AutoProcessor, Blip2ForImageTextRetrieval

    source = tiny_checkpoint / "retrieval"
    config = Blip2ForImageTextRetrieval.from_pretrained(source).config
    config.qformer_config.max_position_embeddings = 32
    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("short") / "retrieval"
    Blip2ForImageTextRetrieval(config).eval().save_pretrained(folder)
    AutoProcessor.from_pretrained(source).save_pretrained(folder)
    return folder


def test_long_text_fits_a_qformer_with_fewer_positions(settings: BlipSettings, short_positions: Path) -> None:
    """Tokens were cut at 64 whatever the model: past its 32 positions the forward failed, and with it every
    other text in the batch (`InferenceError` for all of its callers)."""
    image = _pixels(6, (40, 30))
    update = {"retrieval_model": str(short_positions), "max_wait_ms": 30.0}
    with Blip2Service(settings.model_copy(update=update)).start() as svc:
        long, cut = "dog " * 100, "dog " * 30  # [CLS] + 30 + [SEP] = 32 tokens
        vectors = [r.vector for r in svc.embed_texts(["a cat", long, cut])]
        assert vectors[1] == pytest.approx(vectors[2], abs=1e-6)
        a, b = svc.score(image, [long, cut]).scores
        assert (a.itc, a.itm_probability) == pytest.approx((b.itc, b.itm_probability), abs=1e-6)
        assert svc.locate(image, long).grid == svc.locate(image, cut).grid


@pytest.mark.parametrize("texts", [["a dog", "a dog", "a cat"], ["🐶 à la crème 中文", "a dog"]])
def test_duplicate_and_unicode_texts(service: Blip2Service, texts: list[str]) -> None:
    image = _pixels(7, (50, 40))
    scores = service.score(image, texts).scores
    assert [s.text for s in scores] == texts
    for s, t in zip(scores, texts, strict=True):
        alone = service.score(image, [t]).scores[0]
        assert (s.itc, s.itm_probability) == pytest.approx((alone.itc, alone.itm_probability), abs=1e-6)
        assert -1.0 <= s.itc <= 1.0 and 0.0 <= s.itm_probability <= 1.0


def test_score_takes_at_most_64_texts(service: Blip2Service) -> None:
    image = _pixels(8, (40, 30))
    assert len(service.score(image, ["a dog"] * 64).scores) == 64
    with pytest.raises(InvalidInput, match="at most 64 texts"):
        service.score(image, ["a dog"] * 65)


def _odd_images() -> dict[str, Image.Image]:
    base = _pixels(9, (48, 40))
    deep = np.random.default_rng(1).integers(0, 65535, (40, 48)).astype(np.uint16)
    return {
        "1x1": Image.new("RGB", (1, 1), (200, 10, 10)),
        "4000x1": Image.new("RGB", (4000, 1), (10, 200, 10)),
        "1x4000": Image.new("RGB", (1, 4000), (10, 10, 200)),
        "L": base.convert("L"),
        "RGBA": base.convert("RGBA"),
        "P": base.convert("P"),
        "I;16": Image.fromarray(deep),
    }


@pytest.mark.parametrize("name", list(_odd_images()))
def test_odd_images_embed_score_and_locate(service: Blip2Service, name: str) -> None:
    image = _odd_images()[name]
    vector = np.asarray(service.embed_images([image])[0].vector)
    assert np.isfinite(vector).all() and np.linalg.norm(vector) == pytest.approx(1.0, abs=1e-5)
    score = service.score(image, ["a dog"]).scores[0]
    assert -1.0 <= score.itc <= 1.0 and 0.0 <= score.itm_probability <= 1.0
    where = service.locate(image, "a dog")
    width, height = image.size
    assert where.heatmap.shape == (height, width)
    x0, y0, x1, y1 = where.box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    assert x0 <= where.peak[0] < x1 and y0 <= where.peak[1] < y1


def _info(width: int, height: int) -> ImageInfo:
    return ImageInfo(source="test", width=width, height=height, sha256="0" * 64)


def test_peak_lies_in_the_box_and_the_peak_cell() -> None:
    """Bilinear upsampling rendered the peak cell's centre below its value and an edge cell at its full value,
    so the peak was reported in the bottom-right cell, outside the box grown from the peak cell."""
    grid = np.array(
        [[0.2, 0.3, 0.2, 0.1], [0.3, 1.0, 0.3, 0.2], [0.1, 0.3, 0.5, 0.6], [0.1, 0.2, 0.7, 0.98]], dtype=np.float32
    )
    for width, height in ((300, 11), (11, 300), (5, 3), (1, 1), (640, 480)):
        result = build_locate_result(Image.new("RGB", (width, height)), _info(width, height), "x", grid, 0.5, 1)
        x0, y0, x1, y1 = result.box
        assert result.box == peak_box(grid, width, height)
        px, py = result.peak
        assert x0 <= px < x1 and y0 <= py < y1, (width, height, result.box, result.peak)
        # within the peak cell (column 1, row 1 of 4)
        assert min(width // 4, width - 1) <= px < max(-(-width // 2), 1)
        assert min(height // 4, height - 1) <= py < max(-(-height // 2), 1)


def test_flat_grid_is_the_whole_image() -> None:
    """A phrase with no evidence anywhere (all-zero Grad-CAM) gives the whole image and its centre."""
    grid = np.zeros((4, 4), dtype=np.float32)
    result = build_locate_result(Image.new("RGB", (60, 30)), _info(60, 30), "x", grid, 0.1, 1)
    assert result.box == [0, 0, 60, 30] and result.peak == [30, 15]
    assert float(result.heatmap.max()) == 0.0 and result.heatmap.shape == (30, 60)
    assert upsample(grid, 60, 30).shape == (30, 60)


@pytest.mark.parametrize("orientation", [2, 3, 5, 6, 7, 8])
def test_locate_on_an_exif_rotated_jpeg_is_in_displayed_coordinates(service: Blip2Service, orientation: int) -> None:
    from PIL import ImageOps

    shown = _pixels(11, (60, 30))
    undo = {
        2: Image.Transpose.FLIP_LEFT_RIGHT,
        3: Image.Transpose.ROTATE_180,
        5: Image.Transpose.TRANSPOSE,
        6: Image.Transpose.ROTATE_90,
        7: Image.Transpose.TRANSVERSE,
        8: Image.Transpose.ROTATE_270,
    }[orientation]
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    shown.transpose(undo).save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    data = buffer.getvalue()
    displayed = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert displayed.size == (60, 30)
    from_file, from_pixels = service.locate(data, "a dog"), service.locate(displayed, "a dog")
    assert (from_file.image.width, from_file.image.height) == (60, 30)
    assert from_file.heatmap.shape == (30, 60)
    assert from_file.grid == from_pixels.grid
    assert from_file.box == from_pixels.box and from_file.peak == from_pixels.peak


def test_locate_is_deterministic_and_in_range(service: Blip2Service) -> None:
    image = _pixels(12, (301, 97))
    first, second = service.locate(image, "zzz qqq"), service.locate(image, "zzz qqq")
    assert first.grid == second.grid and first.box == second.box and first.peak == second.peak
    assert first.itm_probability == second.itm_probability
    assert float(first.heatmap.min()) >= 0.0 and float(first.heatmap.max()) <= 1.0
    grid = np.asarray(first.grid)
    assert grid.min() >= 0.0 and grid.max() <= 1.0


def test_overlay_of_a_large_image_is_drawn_at_the_output_size(service: Blip2Service) -> None:
    """The overlay was blended at full size and then scaled down: 8 s and 2.7 GB of float32 copies for a
    40-megapixel image, to send a 512-pixel PNG. Now no full-size heatmap is made unless `heatmap` is read."""
    image = Image.new("RGB", (3000, 1500), (0, 0, 0))
    result = service.locate(image, "a dog")
    assert result._heatmap is None  # nothing upsampled to 3000 x 1500 yet
    overlay = Image.open(io.BytesIO(result.overlay_png(max_side=300)))
    assert overlay.size == (300, 150) and result._heatmap is None
    x0, y0, x1, y1 = result.box
    assert overlay.getpixel((x0 // 10, y0 // 10)) == (255, 255, 255)  # the box's corner, scaled
    assert overlay.getpixel((-(-x1 // 10) - 1, -(-y1 // 10) - 1)) == (255, 255, 255)
    full = Image.open(io.BytesIO(result.overlay_png(max_side=None)))
    assert full.size == (3000, 1500) and result.heatmap.shape == (1500, 3000)
    grid = np.asarray(result.grid)
    row, col = np.unravel_index(int(np.argmax(grid)), grid.shape)
    cx0, cx1 = _cell_span(int(col), int(col), grid.shape[1], 3000)
    cy0, cy1 = _cell_span(int(row), int(row), grid.shape[0], 1500)
    px, py = result.peak
    assert cx0 <= px < cx1 and cy0 <= py < cy1
    assert float(result.heatmap[py, px]) == pytest.approx(float(result.heatmap[cy0:cy1, cx0:cx1].max()), abs=1e-5)
