"""ImageIndex noticing change a size+mtime check misses: a file replaced keeping its timestamps, a checkpoint
folder rewritten in place, and an index an older blip-tools made (hashed once, then stable)."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip_tools import Blip2Service, BlipSettings
from blip_tools.index import ImageIndex
from blip_tools.testing import build_tiny_checkpoint, tiny_settings_kwargs


def _pixels(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(40, 48, 3), dtype=np.uint8), "RGB")


def _embeds(service: Blip2Service) -> int:
    task = service.stats().per_task.get("embed_image")
    return task.requests if task else 0


@pytest.fixture
def bitmaps(tmp_path: Path) -> Path:
    """Four BMPs of one size in bytes (same dimensions, uncompressed), so one can replace another unnoticed."""
    folder = tmp_path / "bitmaps"
    folder.mkdir()
    for i in range(4):
        _pixels(500 + i).save(folder / f"b{i}.bmp")
    return folder


def test_a_file_replaced_keeping_its_size_and_mtime_is_embedded_again(
    tmp_path: Path, bitmaps: Path, service: Blip2Service
) -> None:
    """`cp -p other.bmp b0.bmp` (or rsync -t, a restore, an app that keeps timestamps): same size and mtime, new
    bytes. The new ctime gives it away: it is hashed and, its bytes being new, re-embedded; search finds the new
    picture there."""
    with ImageIndex(tmp_path / "index.sqlite", service=service) as index:
        index.index(bitmaps, captions=False)
        target = bitmaps / "b0.bmp"
        other = tmp_path / "other.bmp"
        _pixels(9999).save(other)
        st = target.stat()
        assert other.stat().st_size == st.st_size
        shutil.copyfile(other, target)
        os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # what `cp -p` from a file of that mtime leaves
        assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)

        before = _embeds(service)
        report = index.index(bitmaps, captions=False)
        assert (report.embedded, report.unchanged) == (1, 3)
        assert _embeds(service) == before + 1
        best = index.search(image=str(other), top_k=1).hits[0]
        assert best.path == str(target.resolve()) and best.score == pytest.approx(1.0, abs=1e-4)

        # Only the ctime changed (chmod): hashed, same bytes, nothing embedded; then stable.
        before = _embeds(service)  # the image query above was embedded too
        target.chmod(0o600)
        touched = index.index(bitmaps, captions=False)
        assert (touched.embedded, touched.reused, touched.unchanged) == (0, 1, 3)
        assert index.index(bitmaps, captions=False).unchanged == 4
        assert _embeds(service) == before


def test_an_index_an_older_version_made_is_hashed_once_then_stable(
    tmp_path: Path, bitmaps: Path, service: Blip2Service
) -> None:
    """An index file from before ctimes and weight fingerprints were recorded (no ctime_ns column, no fingerprint)
    is upgraded in place: its vectors are kept, each file is hashed once, nothing is re-embedded, and the run after
    finds everything unchanged."""
    db = tmp_path / "index.sqlite"
    with ImageIndex(db, service=service) as index:
        index.index(bitmaps, captions=False)
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("ALTER TABLE images DROP COLUMN ctime_ns")
        conn.execute("DELETE FROM meta WHERE key LIKE 'weights:%'")

    before = _embeds(service)
    with ImageIndex(db, service=service) as index:
        assert index.stats().images == 4 and index.stats().stale == 0
        assert len(index.search("a dog", top_k=10).hits) == 4
        first = index.index(bitmaps, captions=False)
        assert (first.embedded, first.reused, first.indexed) == (0, 4, 4)
        second = index.index(bitmaps, captions=False)
        assert (second.embedded, second.reused, second.unchanged) == (0, 0, 4)
    assert _embeds(service) == before


def test_a_checkpoint_rewritten_in_place_is_another_model(
    tmp_path: Path, tiny_checkpoint: Path, settings: BlipSettings, image_dir: Path
) -> None:
    """A checkpoint folder rewritten in place with other weights of the same shapes (a new fine-tune into the same
    folder, another model copied over it keeping timestamps) keeps its name, but its old vectors are stale: search
    leaves them out instead of mixing them with the new model's queries, and the next run re-embeds them."""
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, ckpt)
    local = settings.model_copy(update=tiny_settings_kwargs(ckpt))
    db = tmp_path / "index.sqlite"
    with Blip2Service(local) as svc, ImageIndex(db, service=svc) as index:
        assert index.index(image_dir, captions=False).embedded == 6
        assert index.index(image_dir, captions=False).unchanged == 6
    retrieval = ckpt / "retrieval"
    old = {p.name: p.read_bytes() for p in retrieval.iterdir()}

    # Same shapes, other weights; even each file's size and mtime kept (as `cp -p` of files with those mtimes).
    stats = {p.name: p.stat() for p in retrieval.iterdir()}
    build_tiny_checkpoint(ckpt, seed=7)
    for path in retrieval.iterdir():
        assert path.stat().st_size == stats[path.name].st_size
        os.utime(path, ns=(stats[path.name].st_atime_ns, stats[path.name].st_mtime_ns))
    assert old != {p.name: p.read_bytes() for p in retrieval.iterdir()}

    with Blip2Service(local) as svc, ImageIndex(db, service=svc) as index:
        assert index.retrieval_model == str(retrieval.resolve())  # the name is unchanged
        assert (index.stats().images, index.stats().stale) == (0, 6)
        assert index.search("a dog", top_k=10).hits == []
        assert index.search(image=str(image_dir / "img0.png"), top_k=10).hits == []
        report = index.index(image_dir, captions=False)
        assert (report.embedded, report.reused, report.indexed) == (6, 0, 6)
        assert (index.stats().images, index.stats().stale) == (6, 0)
        best = index.search(image=str(image_dir / "img0.png"), top_k=1).hits[0]
        assert best.path == str((image_dir / "img0.png").resolve())
        assert best.score == pytest.approx(1.0, abs=1e-4)  # the new model's vectors, not the old one's
        assert index.index(image_dir, captions=False).unchanged == 6


def test_a_large_weights_file_is_sampled_not_read_whole(tmp_path: Path) -> None:
    """A change anywhere in the sampled pieces changes the fingerprint; a hub id has none."""
    from blip_tools.runtime import _weights_fingerprint

    folder = tmp_path / "model"
    folder.mkdir()
    weights = folder / "model.safetensors"
    data = bytearray(np.random.default_rng(0).integers(0, 256, size=3 << 20, dtype=np.uint8).tobytes())
    weights.write_bytes(data)
    st = weights.stat()
    first = _weights_fingerprint(str(folder.resolve()))
    data[-1] ^= 0xFF  # the last piece is sampled
    weights.write_bytes(data)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _weights_fingerprint(str(folder.resolve())) not in (None, first)
    assert _weights_fingerprint("Salesforce/blip2-itm-vit-g") is None
