"""The direct pixel path gives the transformers image processor's output bit for bit, and steps aside otherwise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from blip_tools.pixels import fast_pixels, processor_pixels


@pytest.fixture(scope="module")
def image_processor(tiny_checkpoint: Path) -> Any:
    return AutoProcessor.from_pretrained(tiny_checkpoint / "captioner").image_processor


def _reference(image_processor: Any, image: Image.Image) -> torch.Tensor:
    out: torch.Tensor = image_processor(images=image, return_tensors="pt")["pixel_values"]
    return out


@pytest.mark.parametrize(
    "size",
    [(48, 40), (32, 32), (7, 300), (640, 480), (1, 1)],
    ids=["small", "exact", "thin", "large", "one-pixel"],
)
@pytest.mark.parametrize("target", [32, 224])
def test_fast_pixels_equal_the_processor_bit_for_bit(image_processor: Any, size: tuple[int, int], target: int) -> None:
    image_processor.size = {"height": target, "width": target + 8}  # non-square target: height/width order matters
    fast = fast_pixels(image_processor)
    assert fast is not None, "the tiny checkpoint's processor (PIL backend) should take the direct path"
    rng = np.random.default_rng(sum(size) + target)
    image = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")
    got, want = fast(image), _reference(image_processor, image)
    assert got.dtype == want.dtype == torch.float32
    assert got.shape == want.shape == (1, 3, target, target + 8)
    assert torch.equal(got, want)


def test_fast_pixels_convert_other_modes_like_the_processor(image_processor: Any) -> None:
    image_processor.size = {"height": 32, "width": 32}
    fast = fast_pixels(image_processor)
    assert fast is not None
    gray = Image.fromarray(np.arange(48 * 40, dtype=np.uint8).reshape(40, 48) % 251, "L")
    assert torch.equal(fast(gray), _reference(image_processor, gray))


@pytest.mark.parametrize(
    "change",
    [
        {"size": {"shortest_edge": 32}},
        {"do_center_crop": True, "crop_size": {"height": 16, "width": 16}},
        {"do_normalize": False},
        {"do_rescale": False},
        {"do_resize": False},
    ],
    ids=["shortest-edge", "center-crop", "no-normalize", "no-rescale", "no-resize"],
)
def test_uncovered_settings_keep_the_processor(tiny_checkpoint: Path, change: dict[str, Any]) -> None:
    ip = AutoProcessor.from_pretrained(tiny_checkpoint / "captioner").image_processor
    for name, value in change.items():
        setattr(ip, name, value)
    assert fast_pixels(ip) is None
    image = Image.fromarray(np.full((20, 30, 3), 128, dtype=np.uint8), "RGB")
    assert torch.equal(processor_pixels(ip)(image), _reference(ip, image))
