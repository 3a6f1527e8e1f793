"""Fixtures for the LangChain tests: a toolkit on the shared tiny-checkpoint service and an image file."""

from __future__ import annotations

from pathlib import Path

import pytest

from blip_tools.langchain import Blip2Toolkit


@pytest.fixture(scope="session")
def lc_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path of one PNG test image, for tool examples (session-scoped so tool tests share it)."""
    import numpy as np
    from PIL import Image

    path: Path = tmp_path_factory.mktemp("lc") / "photo.png"
    rng = np.random.default_rng(7)
    Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8), "RGB").save(path)
    return str(path)


@pytest.fixture(scope="session")
def toolkit(service) -> Blip2Toolkit:  # type: ignore[no-untyped-def]
    """All tools bound to the session's tiny-checkpoint service."""
    return Blip2Toolkit(service=service)


@pytest.fixture(scope="session")
def tools(toolkit: Blip2Toolkit) -> dict:  # type: ignore[type-arg]
    """The toolkit's tools by name."""
    return {t.name: t for t in toolkit.get_tools()}
