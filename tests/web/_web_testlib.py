"""Helpers for the metrics and web console tests (imported by conftest and the test modules): readable test
pictures, bounded polling, a gate that holds the model worker, and the handle of the running server."""

from __future__ import annotations

import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _testlib import WAIT_S as WAIT_S  # shared; re-exported for the tests here
from _testlib import poll as poll

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "test-artifacts" / "web"
TOKEN = "web-test-token-0123456789abcdef"
MAX_IMAGE_BYTES = 200_000
MAX_QUEUE = 4

SHAPES = [
    ("red circle", (220, 40, 40), "ellipse"),
    ("blue square", (40, 80, 220), "rectangle"),
    ("green triangle", (40, 170, 70), "triangle"),
    ("orange circle", (240, 150, 30), "ellipse"),
    ("purple square", (130, 60, 190), "rectangle"),
    ("teal triangle", (20, 150, 150), "triangle"),
    ("yellow circle", (235, 200, 40), "ellipse"),
    ("grey square", (120, 120, 130), "rectangle"),
]


def shape_image(index: int, size: tuple[int, int] = (160, 120)) -> Any:
    """A readable test picture: a coloured shape on a soft gradient (distinct per index)."""
    import numpy as np
    from PIL import Image, ImageDraw

    _, colour, kind = SHAPES[index % len(SHAPES)]
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([200 + 40 * x / w, 215 + 25 * y / h, 235 - 20 * x / w], axis=-1).clip(0, 255).astype(np.uint8)
    image = Image.fromarray(base, "RGB")
    draw = ImageDraw.Draw(image)
    ox, oy = 20 + (index * 17) % 40, 15 + (index * 11) % 30
    box = (ox, oy, ox + 80, oy + 70)
    if kind == "ellipse":
        draw.ellipse(box, fill=colour)
    elif kind == "rectangle":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([(ox + 40, oy), (ox + 80, oy + 70), (ox, oy + 70)], fill=colour)
    return image


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class Gate:
    """Holds the model worker inside `runtime.generate` while closed, so requests queue deterministically."""

    def __init__(self, service: Any) -> None:
        self._generate = service.runtime.generate
        self.open_event = threading.Event()
        self.open_event.set()
        self.entered = threading.Event()
        service.runtime.generate = self

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        if not self.open_event.wait(timeout=WAIT_S):
            raise RuntimeError("the test gate was never opened")
        return self._generate(*args, **kwargs)


@dataclass
class WebServer:
    """The running server and what tests need to talk to it."""

    base: str
    port: int
    service: Any
    app: Any
    gate: Gate
    gallery_dir: Path
    outside_file: Path
    index_path: Path
    token: str = TOKEN
    artifacts: Path = ARTIFACTS

    def headers(self, **extra: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}", **extra}

    def client(self, **kwargs: Any) -> Any:
        import httpx

        return httpx.Client(base_url=self.base, timeout=60.0, **kwargs)

    def metrics_text(self) -> str:
        with self.client() as http:
            r = http.get("/metrics", headers=self.headers())
        assert r.status_code == 200, r.text
        return r.text

    def sample(self, name: str, labels: dict[str, str] | None = None) -> float:
        """The value of one sample in a fresh scrape (0.0 when it is not there yet)."""
        from prometheus_client.parser import text_string_to_metric_families

        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in (labels or {}).items()):
                    return float(s.value)
        return 0.0
