"""ImageIndex recording the fingerprint of the retrieval weights that made its vectors: the weights the runtime loaded,
not whatever their folder holds when the index opens; and a search loading the stored vectors once."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from blip_tools import Blip2Service, BlipSettings
from blip_tools.index import ImageIndex
from blip_tools.runtime import Blip2Runtime, _weights_fingerprint
from blip_tools.testing import build_tiny_checkpoint, tiny_settings_kwargs


@pytest.fixture
def ckpt(tmp_path: Path, tiny_checkpoint: Path) -> Path:
    """A private copy of the tiny checkpoint, so a test may rewrite it."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, folder)
    return folder


def _local(settings: BlipSettings, ckpt: Path) -> BlipSettings:
    return settings.model_copy(update=tiny_settings_kwargs(ckpt))


def _rewrite(ckpt: Path) -> None:
    """Other weights of the same shapes written over the folder in place (a new fine-tune saved into it)."""
    retrieval = ckpt / "retrieval"
    sizes = {p.name: p.stat().st_size for p in retrieval.iterdir()}
    old = {p.name: p.read_bytes() for p in retrieval.iterdir()}
    build_tiny_checkpoint(ckpt, seed=7)
    assert {p.name: p.stat().st_size for p in retrieval.iterdir()} == sizes
    assert {p.name: p.read_bytes() for p in retrieval.iterdir()} != old


def _recorded(db: Path, retrieval: Path) -> str | None:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (f"weights:{retrieval.resolve()}",)).fetchone()
    return None if row is None else str(row[0])


def test_an_index_opened_after_the_folder_was_rewritten_records_the_loaded_weights(
    tmp_path: Path, ckpt: Path, settings: BlipSettings, image_dir: Path
) -> None:
    """A long-running service loaded the retrieval model; then its folder was rewritten in place; then an index
    opened. The service still embeds with the weights in memory, so those are what the index records: a later
    process, which loads the new weights, finds the vectors stale instead of mixing them with its own."""
    local = _local(settings, ckpt)
    retrieval = ckpt / "retrieval"
    db = tmp_path / "index.sqlite"
    loaded = _weights_fingerprint(str(retrieval))
    with Blip2Service(local) as svc:
        svc.embed_texts(["a dog"])  # loads the retrieval model
        assert svc.runtime.retrieval_fingerprint() == loaded
        _rewrite(ckpt)
        rewritten = _weights_fingerprint(str(retrieval))
        assert rewritten not in (None, loaded)
        assert svc.runtime.retrieval_fingerprint() == loaded  # the model in memory did not change

        with ImageIndex(db, service=svc) as index:
            assert index.index(image_dir, captions=False).embedded == 6
            assert _recorded(db, retrieval) == loaded
            best = index.search(image=str(image_dir / "img0.png"), top_k=1).hits[0]
            assert best.path == str((image_dir / "img0.png").resolve())
            assert best.score == pytest.approx(1.0, abs=1e-4)

    with Blip2Service(local) as svc, ImageIndex(db, service=svc) as index:
        # Before it loads anything, the index goes by the folder as it is, which a load would read.
        assert (index.stats().images, index.stats().stale) == (0, 6)
        assert index.paths() == []
        assert not svc.runtime.retrieval_loaded and svc.stats().models_loaded == 0
        assert index.search(image=str(image_dir / "img0.png"), top_k=10).hits == []
        assert svc.runtime.retrieval_fingerprint() == rewritten
        report = index.index(image_dir, captions=False)
        assert (report.embedded, report.reused, report.indexed) == (6, 0, 6)
        assert _recorded(db, retrieval) == rewritten
        assert (index.stats().images, index.stats().stale) == (6, 0)


class _RewritingRuntime(Blip2Runtime):
    """A runtime whose retrieval folder is rewritten just before its first load (`during`: during that load)."""

    def __init__(self, settings: BlipSettings, ckpt: Path, *, during: bool = False) -> None:
        super().__init__(settings)
        self.ckpt = ckpt
        self.during = during
        self.rewritten = False

    def _rewrite_once(self) -> None:
        if not self.rewritten:
            self.rewritten = True
            _rewrite(self.ckpt)

    def load_retrieval(self) -> Any:
        if not self.during and not self.loaded(retrieval=True):
            self._rewrite_once()
        return super().load_retrieval()

    def _from_pretrained(self, cls: Any, name: str, parts: Any = ()) -> tuple[Any, Any]:
        loaded = super()._from_pretrained(cls, name, parts)
        if self.during and name == self.settings.retrieval_model:
            self._rewrite_once()
        return loaded


@pytest.fixture
def twins(tmp_path: Path, image_dir: Path) -> Iterator[Path]:
    """A folder with a byte-identical copy of img0.png and one new image."""
    folder = tmp_path / "twins"
    folder.mkdir()
    shutil.copyfile(image_dir / "img0.png", folder / "a.png")
    Image.new("RGB", (48, 40), (200, 30, 90)).save(folder / "b.png")
    yield folder


def test_vectors_copied_from_an_identical_file_are_stale_when_the_run_loads_other_weights(
    tmp_path: Path, ckpt: Path, settings: BlipSettings, image_dir: Path, twins: Path
) -> None:
    """The model is not loaded when a run begins, and its folder is rewritten before the run's first embedding
    loads it. A file identical to one indexed before was given that file's vectors (the old weights'): they must
    not be recorded as the new weights'. They count as stale, and the next run embeds the file."""
    local = _local(settings, ckpt)
    db = tmp_path / "index.sqlite"
    with Blip2Service(local) as svc, ImageIndex(db, service=svc) as index:
        assert index.index(image_dir, captions=False).embedded == 6

    runtime = _RewritingRuntime(local, ckpt)
    with Blip2Service(local, runtime=runtime) as svc, ImageIndex(db, service=svc) as index:
        report = index.index(twins, captions=False)
        assert runtime.rewritten and (report.embedded, report.reused) == (1, 1)
        assert _recorded(db, ckpt / "retrieval") == runtime.retrieval_fingerprint()
        assert index.paths() == [str((twins / "b.png").resolve())]  # only what the loaded weights embedded
        assert (index.stats().images, index.stats().stale) == (1, 7)
        again = index.index(twins, captions=False)
        assert (again.embedded, again.reused, again.indexed) == (1, 0, 2)
        assert index.index(twins, captions=False).unchanged == 2


def test_a_folder_rewritten_while_it_loads_matches_no_other_weights(
    tmp_path: Path, ckpt: Path, settings: BlipSettings, image_dir: Path
) -> None:
    """Which files a load read is unknown when the folder changed under it: its fingerprint matches neither the
    folder before nor after, so its vectors are never taken for another load's."""
    local = _local(settings, ckpt)
    retrieval = ckpt / "retrieval"
    before = _weights_fingerprint(str(retrieval))
    runtime = _RewritingRuntime(local, ckpt, during=True)
    runtime.load_retrieval()
    assert runtime.rewritten
    fingerprint = runtime.retrieval_fingerprint()
    assert fingerprint is not None
    assert fingerprint not in (before, _weights_fingerprint(str(retrieval)))


def test_a_search_loads_the_stored_vectors_once(
    tmp_path: Path, service: Blip2Service, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    load = ImageIndex._load_matrix

    def counted(self: ImageIndex) -> Any:
        calls.append(1)
        return load(self)

    monkeypatch.setattr(ImageIndex, "_load_matrix", counted)
    with ImageIndex(tmp_path / "index.sqlite", service=service) as index:
        index.index(image_dir, captions=False)
        for kwargs in ({"query": "a dog"}, {"image": str(image_dir / "img1.png")}):
            calls.clear()
            assert index.search(**kwargs, top_k=3).hits
            assert len(calls) == 1, kwargs
