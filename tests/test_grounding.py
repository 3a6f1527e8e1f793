"""Grounding (`Blip2Service.locate`): ITM Grad-CAM heatmap, peak box and overlay on the tiny checkpoint."""

from __future__ import annotations

import io
import threading
from types import SimpleNamespace
from typing import Any

import anyio
import numpy as np
import pytest
from PIL import Image

from blip_tools import Blip2Service
from blip_tools.errors import InvalidImage, InvalidInput
from blip_tools.grounding import LocateResult, gradcam_layer, peak_box, upsample


def _pixels(seed: int, size: tuple[int, int]) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.mark.parametrize("size", [(48, 40), (301, 97), (17, 230)])
def test_heatmap_has_image_size_values_in_unit_range_and_box_inside(service: Blip2Service, size: Any) -> None:
    image = _pixels(3, size)
    result = service.locate(image, "a red ball on the grass")
    width, height = size
    assert result.heatmap.shape == (height, width) and result.heatmap.dtype == np.float32
    assert float(result.heatmap.min()) >= 0.0 and float(result.heatmap.max()) <= 1.0
    assert float(result.heatmap.max()) > 0.5  # normalised: the peak region reaches (close to) 1
    x0, y0, x1, y1 = result.box
    assert 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
    px, py = result.peak
    assert 0 <= px < width and 0 <= py < height
    grid = np.asarray(result.grid)
    assert grid.shape == (4, 4) and grid.min() >= 0.0 and grid.max() == pytest.approx(1.0)
    assert result.image.width == width and result.layer == 1
    assert (result.image.width, result.image.height) == size


def test_itm_probability_matches_score(service: Blip2Service) -> None:
    image = _pixels(11, (64, 64))
    located = service.locate(image, "two dogs")
    scored = service.score(image, ["two dogs"]).scores[0]
    assert located.itm_probability == pytest.approx(scored.itm_probability, abs=1e-4)


def test_heatmap_depends_on_text_and_image(service: Blip2Service) -> None:
    image = _pixels(5, (48, 48))
    a = np.asarray(service.locate(image, "a cat").grid)
    b = np.asarray(service.locate(image, "a bright yellow car parked on the street").grid)
    c = np.asarray(service.locate(_pixels(6, (48, 48)), "a cat").grid)
    assert not np.allclose(a, b) and not np.allclose(a, c)
    assert np.array_equal(a, np.asarray(service.locate(image, "a cat").grid))  # deterministic


def test_batched_locate_equals_one_by_one(service: Blip2Service) -> None:
    pairs = [(_pixels(20 + i, (40 + i, 36)), f"object number {i}") for i in range(6)]
    alone = [np.asarray(service.locate(img, text).grid) for img, text in pairs]
    together: list[Any] = [None] * len(pairs)
    start = threading.Barrier(len(pairs))

    def run(i: int) -> None:
        start.wait(timeout=10)
        together[i] = np.asarray(service.locate(*pairs[i]).grid)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(pairs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-4)


def test_overlay_png_and_json(service: Blip2Service, tmp_path: Any) -> None:
    path = tmp_path / "pic.png"
    _pixels(9, (80, 60)).save(path)
    result = service.locate(str(path), "a window")
    png = result.overlay_png()
    overlay = Image.open(io.BytesIO(png))
    assert overlay.format == "PNG" and overlay.size == (80, 60)
    assert Image.open(io.BytesIO(result.overlay_png(max_side=40))).size == (40, 30)
    data = result.model_dump(mode="json")
    assert "heatmap" not in data and data["box"] == result.box and data["image"]["source"].endswith("pic.png")
    rebuilt = LocateResult.model_validate_json(result.model_dump_json())
    assert rebuilt.box == result.box
    assert "matches best around pixel" in result.summary()


def test_bad_inputs(service: Blip2Service, tmp_path: Any) -> None:
    with pytest.raises(InvalidInput):
        service.locate(_pixels(1, (32, 32)), "   ")
    with pytest.raises(InvalidImage):
        service.locate(str(tmp_path / "missing.png"), "a cat")
    assert "locate" in service.model_info().capabilities


async def test_alocate(service: Blip2Service) -> None:
    image = _pixels(4, (50, 30))
    with anyio.fail_after(30):
        result = await service.alocate(image, "a boat")
    assert result.heatmap.shape == (30, 50)
    np.testing.assert_allclose(np.asarray(result.grid), np.asarray(service.locate(image, "a boat").grid), atol=1e-4)


def test_peak_box_is_the_connected_hot_region() -> None:
    grid = np.zeros((4, 4), dtype=np.float32)
    grid[1, 1], grid[1, 2], grid[2, 2] = 1.0, 0.7, 0.6
    grid[3, 0] = 0.9  # hot but not connected to the peak
    assert peak_box(grid, 40, 80) == [10, 20, 30, 60]
    assert peak_box(np.zeros((4, 4), dtype=np.float32), 40, 80) == [0, 0, 40, 80]
    up = upsample(grid, 7, 5)
    assert up.shape == (5, 7) and up.min() >= 0.0 and up.max() <= 1.0


def test_gradcam_layer_is_the_middle_cross_attention_layer() -> None:
    def qformer(flags: list[bool]) -> Any:
        layers = [SimpleNamespace(has_cross_attention=f) for f in flags]
        return SimpleNamespace(encoder=SimpleNamespace(layer=layers))

    # BLIP-2: 12 layers, cross-attention every 2nd → layer 6 (LAVIS's block_num=6), 4th cross-attention output.
    assert gradcam_layer(qformer([i % 2 == 0 for i in range(12)])) == (6, 3)
    assert gradcam_layer(qformer([True, True])) == (1, 1)


def test_cli_locate_checks_the_output_folder_before_the_model_work(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import blip_tools.cli.collections as collections_cli
    from blip_tools.cli import main

    image = tmp_path / "a.png"
    _pixels(1, (48, 40)).save(image)

    def no_model(*_args: object) -> None:
        raise AssertionError("the model was loaded before the output path was checked")

    monkeypatch.setattr(collections_cli, "service_from_args", no_model)
    assert main(["locate", str(image), "a cat", "-o", str(tmp_path / "missing" / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err
    assert main(["locate", str(image), "a cat", "-o", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
