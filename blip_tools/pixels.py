"""Image → pixel values: a direct path that gives the BLIP image processor's exact output at a fraction of its cost.

The transformers processor validates its keyword arguments, round-trips the image through numpy and PIL and
normalises channel by channel on every call: about 0.5 ms of Python per image, paid by every request in the
preparation threads (where, under the GIL, it competes with the model worker). For the common configuration (PIL
backend, fixed height × width resize, rescale, normalise) `fast_pixels` returns a function doing the same
arithmetic in the same dtypes, so the tensors are bit-identical; any other configuration keeps the processor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ._prepare import gil_free

if TYPE_CHECKING:
    import torch
    from PIL import Image

PixelFn = Callable[["Image.Image"], "torch.Tensor"]


def processor_pixels(image_processor: Any) -> PixelFn:
    """The fastest exact way to turn an RGB PIL image into a (1, 3, H, W) float tensor for this processor."""
    return fast_pixels(image_processor) or (
        lambda image: image_processor(images=image, return_tensors="pt")["pixel_values"]
    )


def fast_pixels(image_processor: Any) -> PixelFn | None:
    """A direct pixel function equal to `image_processor`'s output, or None where its settings aren't covered."""
    import numpy as np
    import torch
    from transformers.image_processing_backends import PilBackend

    ip: Any = image_processor
    size = _fields(getattr(ip, "size", None))
    height, width = size.get("height"), size.get("width")
    if not (isinstance(height, int) and isinstance(width, int)):
        return None
    plain = (
        isinstance(image_processor, PilBackend)
        and ip.do_resize
        and not any(value for name, value in size.items() if name not in ("height", "width"))
        and not getattr(ip, "do_center_crop", False)
        and not getattr(ip, "do_pad", False)
        and getattr(ip, "reducing_gap", None) is None
        and ip.do_rescale
        and ip.do_normalize
        and _three(ip.image_mean)
        and _three(ip.image_std)
    )
    if not plain:
        return None
    resample = int(ip.resample) if ip.resample is not None else 2  # the backend's default is BILINEAR (2)
    # The processor's arithmetic, in its order and dtypes (rescale in float64, cast to float32, then
    # (x - mean) / std in float32), done once for each of the 256 values of each channel: a lookup table.
    levels = (np.arange(256, dtype=np.float64) * float(ip.rescale_factor)).astype(np.float32)
    mean = np.array(ip.image_mean, dtype=np.float32)[:, None]
    std = np.array(ip.image_std, dtype=np.float32)[:, None]
    table = (levels[None, :] - mean) / std  # (3, 256) float32
    channel = np.arange(3)[:, None, None]

    def pixels(image: Image.Image) -> torch.Tensor:
        with gil_free(image.width * image.height):
            rgb = image if image.mode == "RGB" else image.convert("RGB")
            resized = np.asarray(rgb.resize((width, height), resample=resample))  # (H, W, 3) uint8
        return torch.from_numpy(table[channel, resized.transpose(2, 0, 1)])[None]

    return pixels


def _fields(size: Any) -> dict[str, Any]:
    """A processor's `size` (a dict, or transformers' SizeDict dataclass) as a plain dict."""
    if isinstance(size, Mapping):
        return dict(size)
    if dataclasses.is_dataclass(size) and not isinstance(size, type):
        return {f.name: getattr(size, f.name) for f in dataclasses.fields(size)}
    return {}


def _three(values: Any) -> bool:
    return isinstance(values, Sequence) and len(values) == 3
