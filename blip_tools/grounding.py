"""Grounding: where in an image a text matches, as an ITM Grad-CAM heatmap and a peak box.

The method is LAVIS's `compute_gradcam` for BLIP-2: run the image-text matching (ITM) head on the pair with the
Q-Former's cross-attention probabilities recorded, backpropagate the "match" logit to one cross-attention layer
(the middle one, LAVIS's block 6 of 12), and weight each attention probability by its positive gradient. Averaged
over heads and query tokens this gives one value per vision patch (the CLS token dropped), laid out on the
patch grid, normalised to [0, 1] and upsampled to the image's size.

`gradcam_batch` runs on the model worker thread (it needs gradients: `torch.enable_grad()` inside);
`build_locate_result` turns its output into a `LocateResult` on the caller's thread.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw
from pydantic import BaseModel, Field, PrivateAttr

from .errors import InferenceError
from .results import ImageInfo, Timing

if TYPE_CHECKING:
    from .runtime import Blip2Runtime, ImageItem

logger = logging.getLogger(__name__)

BOX_THRESHOLD = 0.5
"""Grid cells at or above this fraction of the peak, connected to the peak, make up the box."""

MAX_PAIRS_PER_BACKWARD = 8
"""Pairs per forward/backward pass: Grad-CAM keeps activations for the backward, so batches are capped."""


class LocateResult(BaseModel):
    """Where a text matches in an image: a Grad-CAM heatmap over the image, its peak and a box around the peak.

    `heatmap` (a float32 array of the image's height × width, values in [0, 1]) and `overlay_png()` are Python
    only; the JSON form carries the heatmap on the vision patch grid (`grid`), from which `heatmap` is rebuilt.
    """

    text: str = Field(description="The text that was located.")
    itm_probability: float = Field(description="Image-text matching probability that the text fits the image.")
    box: list[int] = Field(
        description="[x0, y0, x1, y1] in pixels around the peak region (x1, y1 exclusive), inside the image."
    )
    peak: list[int] = Field(
        description="[x, y] pixel where the heatmap is highest inside the peak grid cell (always inside `box`)."
    )
    grid: list[list[float]] = Field(
        description="The heatmap on the vision patch grid (rows top to bottom), values in [0, 1]."
    )
    layer: int = Field(description="Q-Former layer whose cross-attention was used.")
    image: ImageInfo
    timing: Timing = Field(default_factory=Timing)

    _heatmap: npt.NDArray[np.float32] | None = PrivateAttr(default=None)
    _grid: npt.NDArray[np.float32] | None = PrivateAttr(default=None)
    """The grid as computed (`grid` holds it rounded to 4 decimals); None when rebuilt from JSON."""
    _image: Image.Image | None = PrivateAttr(default=None)
    _image_source: Callable[[], Image.Image] | None = PrivateAttr(default=None)
    """Decodes the image when `overlay_png` first needs it (a daemon's result: no decode unless asked for)."""

    @property
    def heatmap(self) -> npt.NDArray[np.float32]:
        """The heatmap at the image's size: shape (height, width), float32, values in [0, 1]."""
        if self._heatmap is None:  # upsampled once, when first asked for: a 40-megapixel image's is 160 MB
            self._heatmap = upsample(self._exact_grid(), self.image.width, self.image.height)
        return self._heatmap

    def _exact_grid(self) -> npt.NDArray[np.float32]:
        return self._grid if self._grid is not None else np.asarray(self.grid, dtype=np.float32)

    def summary(self) -> str:
        """A one-line description for a model or a terminal."""
        x0, y0, x1, y1 = self.box
        w, h = self.image.width, self.image.height
        share = 100.0 * (x1 - x0) * (y1 - y0) / max(w * h, 1)
        return (
            f"'{self.text}' matches best around pixel ({self.peak[0]}, {self.peak[1]}); box [{x0}, {y0}, {x1}, {y1}] "
            f"covers {share:.0f}% of the {w}x{h} image; ITM match probability {self.itm_probability:.3f}."
        )

    def overlay_png(self, *, alpha: float = 0.6, max_side: int | None = 1024, draw_box: bool = True) -> bytes:
        """The heatmap blended over the image (jet colours, hot = match) with the box drawn, as PNG bytes.

        Args:
            alpha: opacity of the colours at the hottest point (0 shows only the image).
            max_side: downscale so neither side exceeds this (keeps tool replies small); None keeps the size.
            draw_box: outline `box` in white.
        """
        if self._image is None and self._image_source is not None:
            self._image = self._image_source()  # a BlipError here says why the image cannot be had
            self._image_source = None
        if self._image is None:
            raise InferenceError("This LocateResult has no image attached (it was rebuilt from JSON).")
        image = self._image.convert("RGB")
        full_width, full_height = image.size
        if max_side is not None and max(image.size) > max_side:
            # Scaled down first, the heatmap drawn at the output size: blending at full size and scaling the
            # result took 8 s and 2.7 GB for a 40-megapixel image (float32 copies of it), for a 1024-pixel PNG.
            scale = max_side / max(image.size)
            image = image.resize(
                (max(1, round(full_width * scale)), max(1, round(full_height * scale))),
                Image.Resampling.BILINEAR,
                reducing_gap=3.0,
            )
            heat = upsample(self._exact_grid(), image.width, image.height)
        else:
            heat = self.heatmap
        base = np.asarray(image, dtype=np.float32) / 255.0
        weight = (np.clip(alpha, 0.0, 1.0) * np.power(heat, 0.7))[..., None]
        blended = (1.0 - weight) * base + weight * _jet(heat)
        out = Image.fromarray((np.clip(blended, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), "RGB")
        if draw_box:
            sx, sy = out.width / full_width, out.height / full_height
            x0, y0 = math.floor(self.box[0] * sx), math.floor(self.box[1] * sy)
            x1, y1 = max(math.ceil(self.box[2] * sx), x0 + 1), max(math.ceil(self.box[3] * sy), y0 + 1)
            width = max(1, round(min(out.size) / 150))
            ImageDraw.Draw(out).rectangle((x0, y0, x1 - 1, y1 - 1), outline=(255, 255, 255), width=width)
        buffer = io.BytesIO()
        out.save(buffer, format="PNG", optimize=False)
        return buffer.getvalue()


def _jet(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The classic jet colour map (blue → cyan → yellow → red) for values in [0, 1], shape (..., 3)."""
    r = np.clip(1.5 - np.abs(4.0 * x - 3.0), 0.0, 1.0)
    g = np.clip(1.5 - np.abs(4.0 * x - 2.0), 0.0, 1.0)
    b = np.clip(1.5 - np.abs(4.0 * x - 1.0), 0.0, 1.0)
    return np.stack([r, g, b], axis=-1).astype(np.float32)


# ---------------------------------------------------------------------------------------------- worker side


def gradcam_layer(qformer: Any) -> tuple[int, int]:
    """(Q-Former layer index, its position among the cross-attention layers) used for Grad-CAM.

    LAVIS uses block 6 of BLIP-2's 12 Q-Former layers; we take the cross-attention layer nearest the middle.
    """
    layers = [i for i, layer in enumerate(qformer.encoder.layer) if getattr(layer, "has_cross_attention", False)]
    if not layers:
        raise InferenceError("The retrieval model's Q-Former has no cross-attention layer; cannot locate.")
    middle = len(qformer.encoder.layer) // 2
    position = min(range(len(layers)), key=lambda k: (abs(layers[k] - middle), -layers[k]))
    return layers[position], position


@contextlib.contextmanager
def _eager_attention(module: Any) -> Iterator[None]:
    """Eager attention while inside (SDPA does not return attention probabilities); restored afterwards."""
    previous = module.config._attn_implementation
    if previous == "eager":
        yield
        return
    module.set_attn_implementation("eager")
    try:
        yield
    finally:
        module.set_attn_implementation(previous)


def gradcam_batch(
    runtime: Blip2Runtime, images: Sequence[ImageItem], texts: Sequence[str]
) -> list[tuple[npt.NDArray[np.float32], float, int]]:
    """Grad-CAM grids for (image, text) pairs: one (grid g×g in [0, 1], ITM probability, layer) per pair.

    Runs on the model worker thread. Pairs go through in chunks of `MAX_PAIRS_PER_BACKWARD`; each pair's
    gradients are independent of the others in its chunk (no cross-sample interaction in the Q-Former).
    """
    out: list[tuple[npt.NDArray[np.float32], float, int]] = []
    for start in range(0, len(images), MAX_PAIRS_PER_BACKWARD):
        stop = start + MAX_PAIRS_PER_BACKWARD
        out.extend(_gradcam_chunk(runtime, images[start:stop], texts[start:stop]))
    return out


def _gradcam_chunk(
    runtime: Blip2Runtime, images: Sequence[ImageItem], texts: Sequence[str]
) -> list[tuple[npt.NDArray[np.float32], float, int]]:
    import torch

    model = runtime.load_retrieval().model
    qformer = model.qformer
    layer, position = gradcam_layer(qformer)
    with torch.no_grad():
        vision = runtime._vision_embeds(images)
    # Cached features may be inference-mode tensors, which autograd refuses to save: work on a plain copy.
    vision = vision.detach().clone()
    tokens = vision.shape[1] - 1
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise InferenceError(f"Cannot lay {tokens} vision patches on a square grid for the heatmap.")
    with torch.enable_grad(), _eager_attention(qformer):
        enc = runtime._tokenize(texts)
        query_tokens = model.query_tokens.expand(vision.shape[0], -1, -1)
        n_query = query_tokens.shape[1]
        query_mask = torch.ones(query_tokens.shape[:-1], dtype=torch.long, device=query_tokens.device)
        embeds = model.embeddings(input_ids=enc["input_ids"], query_embeds=query_tokens).detach().requires_grad_(True)
        result = qformer(
            query_embeds=embeds,
            query_length=n_query,
            attention_mask=torch.cat([query_mask, enc["attention_mask"]], dim=1),
            encoder_hidden_states=vision,
            encoder_attention_mask=torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device),
            output_attentions=True,
            return_dict=True,
        )
        cross = result.cross_attentions
        if cross is None or len(cross) <= position or cross[position] is None:
            raise InferenceError("The Q-Former did not return cross-attention probabilities; cannot locate.")
        attention = cross[position]  # (B, heads, queries, 1 + patches)
        hidden = result.last_hidden_state[:, :n_query, :].to(model.itm_head.weight.dtype)
        logits = model.itm_head(hidden).mean(dim=1).float()  # (B, 2)
        (grads,) = torch.autograd.grad(logits[:, 1].sum(), attention)
    with torch.no_grad():
        cam = attention.detach().float()[..., 1:] * grads.float()[..., 1:].clamp(min=0)
        cam = cam.mean(dim=(1, 2)).reshape(-1, side, side)  # heads and queries averaged → (B, g, g)
        probs = torch.softmax(logits.detach(), dim=-1)[:, 1].tolist()
    grids = cam.cpu().numpy().astype(np.float32)
    return [(_normalise(grids[i]), float(probs[i]), layer) for i in range(len(images))]


def _normalise(grid: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Clamp at 0 and min-max scale to [0, 1]; an all-flat map (no evidence) becomes zeros."""
    grid = np.nan_to_num(np.maximum(grid, 0.0), nan=0.0, posinf=0.0).astype(np.float32)
    low, high = float(grid.min()), float(grid.max())
    if high - low <= 1e-12:
        return np.zeros_like(grid)
    return ((grid - low) / (high - low)).astype(np.float32)


# ---------------------------------------------------------------------------------------------- caller side


def upsample(
    grid: npt.NDArray[np.float32], width: int, height: int, region: tuple[int, int, int, int] | None = None
) -> npt.NDArray[np.float32]:
    """Bilinear upsampling of a [0, 1] grid to (height, width), still in [0, 1].

    `region` = (x0, y0, x1, y1): only those pixels (x1, y1 exclusive) of that map, computed alone.
    """
    image = Image.fromarray(np.ascontiguousarray(grid, dtype=np.float32), mode="F")
    if region is None:
        resized = image.resize((width, height), Image.Resampling.BILINEAR)
    else:
        x0, y0, x1, y1 = region
        rows, cols = grid.shape
        box = (x0 * cols / width, y0 * rows / height, x1 * cols / width, y1 * rows / height)
        resized = image.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=box)
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)


def peak_box(grid: npt.NDArray[np.float32], width: int, height: int, threshold: float = BOX_THRESHOLD) -> list[int]:
    """The pixel box of the grid cells ≥ `threshold` × peak that are 4-connected to the peak cell.

    A flat (all-zero) grid has no peak: the box is the whole image.
    """
    rows, cols = grid.shape
    if float(grid.max()) <= 0.0:
        return [0, 0, width, height]
    peak = np.unravel_index(int(np.argmax(grid)), grid.shape)
    hot = grid >= threshold * float(grid.max())
    seen = {(int(peak[0]), int(peak[1]))}
    stack = list(seen)
    while stack:
        r, c = stack.pop()
        for nr, nc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1)):
            if 0 <= nr < rows and 0 <= nc < cols and hot[nr, nc] and (nr, nc) not in seen:
                seen.add((nr, nc))
                stack.append((nr, nc))
    r0, r1 = min(r for r, _ in seen), max(r for r, _ in seen)
    c0, c1 = min(c for _, c in seen), max(c for _, c in seen)
    x0, x1 = _cell_span(c0, c1, cols, width)
    y0, y1 = _cell_span(r0, r1, rows, height)
    return [x0, y0, x1, y1]


def _cell_span(first: int, last: int, cells: int, size: int) -> tuple[int, int]:
    """The pixels [start, stop) that grid cells first..last cover along a side of `size` pixels (never empty)."""
    start = min(math.floor(first * size / cells), size - 1)
    return start, max(min(math.ceil((last + 1) * size / cells), size), start + 1)


def peak_pixel(grid: npt.NDArray[np.float32], width: int, height: int) -> list[int]:
    """[x, y]: the hottest heatmap pixel inside the grid's peak cell, the cell `peak_box` grows its box from.

    Not the heatmap's own maximum: bilinear upsampling samples pixel centres, which seldom hit a cell's centre,
    and clamps at the borders, so a slightly cooler cell at the image's edge can come out hotter than the peak
    cell (a 300 x 11 image: the peak was reported in another cell, outside the box). A flat grid (no evidence)
    has no peak: the image's centre.
    """
    rows, cols = grid.shape
    if float(grid.max()) <= 0.0:
        return [width // 2, height // 2]
    row, col = (int(v) for v in np.unravel_index(int(np.argmax(grid)), grid.shape))
    x0, x1 = _cell_span(col, col, cols, width)
    y0, y1 = _cell_span(row, row, rows, height)
    cell = upsample(grid, width, height, (x0, y0, x1, y1))  # the heatmap's pixels there, without the rest
    dy, dx = np.unravel_index(int(np.argmax(cell)), cell.shape)
    return [x0 + int(dx), y0 + int(dy)]


def build_locate_result(
    image: Image.Image,
    info: ImageInfo,
    text: str,
    grid: npt.NDArray[np.float32],
    itm_probability: float,
    layer: int,
    timing: Timing | None = None,
) -> LocateResult:
    """A Grad-CAM grid's peak and box on the image (caller thread); the heatmap is upsampled when first used."""
    width, height = image.size
    result = LocateResult(
        text=text,
        itm_probability=float(itm_probability),
        box=peak_box(grid, width, height),
        peak=peak_pixel(grid, width, height),
        grid=[[round(float(v), 4) for v in row] for row in grid],
        layer=layer,
        image=info,
        timing=timing or Timing(),
    )
    result._grid = np.asarray(grid, dtype=np.float32)
    result._image = image
    return result


__all__ = ["LocateResult", "build_locate_result", "gradcam_batch", "peak_box", "peak_pixel", "upsample"]
