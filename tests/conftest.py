"""Shared fixtures: the tiny checkpoint (built once per session), settings, a started service, test images."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from blip_tools._prepare import PreparePool

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _limit_threads() -> None:
    import torch

    # 2-core CI machines: oversubscription made runs ~7x slower.
    torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random BLIP-2 captioner + retrieval model, written with save_pretrained."""
    from blip_tools.testing import build_tiny_checkpoint

    _limit_threads()
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def settings(tiny_checkpoint: Path):  # type: ignore[no-untyped-def]
    """Settings that load the tiny checkpoint on CPU in float32 (deterministic greedy decoding)."""
    from blip_tools import BlipSettings
    from blip_tools.testing import tiny_settings_kwargs

    return BlipSettings(**tiny_settings_kwargs(tiny_checkpoint), max_wait_ms=2.0)


@pytest.fixture(scope="session")
def service(settings):  # type: ignore[no-untyped-def]
    """A started service on the tiny checkpoint, shared by the whole session."""
    from blip_tools import Blip2Service

    svc = Blip2Service(settings).start()
    yield svc
    svc.close()


def _image(seed: int, size: tuple[int, int] = (48, 40)):  # type: ignore[no-untyped-def]
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB")


@pytest.fixture
def one_slot(monkeypatch: pytest.MonkeyPatch) -> Iterator[PreparePool]:
    """The process's preparation pool with one slot, whatever this machine has."""
    from blip_tools import _prepare

    pool = _prepare.PreparePool(1, "blip-prepare-test")
    monkeypatch.setattr(_prepare, "_pool", pool)
    yield pool


@pytest.fixture
def make_image() -> Callable[..., object]:
    """`make_image(seed, size=(w, h))` → a distinct random RGB PIL image."""
    return _image


@pytest.fixture
def image_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder with six distinct PNG files (img0.png … img5.png)."""
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(6):
        _image(100 + i).save(folder / f"img{i}.png")
    yield folder


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every checked file read in this process (`images._read_file`: the index, the service, an in-process
    daemon), counted by path."""
    from blip_tools import images
    from blip_tools import index as index_module

    counted: Counter[str] = Counter()
    real = images._read_file

    def counting(path: Path, settings: object, source: str) -> bytes:
        counted[os.fspath(path)] += 1
        return real(path, settings, source)  # type: ignore[arg-type]

    monkeypatch.setattr(images, "_read_file", counting)
    monkeypatch.setattr(index_module, "_read_file", counting)
    return counted


@pytest.fixture
def tiny_env(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """`BLIP_*` variables pointing at the tiny checkpoint (also returned, for a child process); the process-wide
    service is put back afterwards. For the command-line tests."""
    from blip_tools import Blip2Service
    from blip_tools.testing import tiny_settings_kwargs

    for name in ("BLIP_REMOTE_URL", "BLIP_ALLOWED_DIRS", "BLIP_MAX_BATCH_SIZE", "BLIP_MAX_IMAGE_BYTES"):
        monkeypatch.delenv(name, raising=False)
    env = {f"BLIP_{name.upper()}": value for name, value in tiny_settings_kwargs(tiny_checkpoint).items()}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    previous = Blip2Service._shared
    yield env
    Blip2Service.set_shared(previous)


@pytest.fixture
def no_model_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if any model loads (for commands that must fail on their images first)."""
    from blip_tools.runtime import Blip2Runtime

    def refuse(self: Blip2Runtime) -> None:
        raise AssertionError("a model was loaded for a command whose images do not exist")

    monkeypatch.setattr(Blip2Runtime, "load_captioner", refuse)
    monkeypatch.setattr(Blip2Runtime, "load_retrieval", refuse)
