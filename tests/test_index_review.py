"""ImageIndex as a user meets it: checkpoints named by relative paths, model changes, odd arguments."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from blip_tools import Blip2Service, BlipSettings
from blip_tools.errors import IndexDamaged
from blip_tools.index import ImageIndex


def _embeds(service: Blip2Service) -> int:
    task = service.stats().per_task.get("embed_image")
    return task.requests if task else 0


def test_a_checkpoint_folder_is_one_model_however_it_is_named(
    tmp_path: Path,
    tiny_checkpoint: Path,
    settings: BlipSettings,
    service: Blip2Service,
    image_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The same folder named relatively (from its parent) and absolutely is one model: nothing is re-embedded or
    re-captioned, nothing is stale. The same relative name from another working directory, where it means another
    folder, is another model: its vectors are not mixed with the first folder's."""
    db = tmp_path / "index.sqlite"
    monkeypatch.chdir(tiny_checkpoint.parent)
    relative = settings.model_copy(
        update={"model": f"{tiny_checkpoint.name}/captioner", "retrieval_model": f"{tiny_checkpoint.name}/retrieval"}
    )
    with Blip2Service(relative) as svc, ImageIndex(db, service=svc) as index:
        assert index.index(image_dir).embedded == 6

    before = _embeds(service)
    with ImageIndex(db, service=service) as index:  # the absolute paths of the same folders
        assert index.stats().stale == 0
        report = index.index(image_dir)
        assert (report.embedded, report.captioned, report.unchanged) == (0, 0, 6)
        assert len(index.search("a dog", top_k=10).hits) == 6
    assert _embeds(service) == before

    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(tiny_checkpoint, elsewhere / tiny_checkpoint.name)
    monkeypatch.chdir(elsewhere)
    with Blip2Service(relative) as svc, ImageIndex(db, service=svc) as index:
        assert index.stats().stale == 6
        assert index.search("a dog", top_k=10).hits == []
        assert index.retrieval_model == str((elsewhere / tiny_checkpoint.name / "retrieval").resolve())


def _pretend_another_model_made(db: Path, dim: int) -> None:
    """Rewrite every stored vector with `dim` dimensions, as a checkpoint of another size under the same name would."""
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        for (rowid,) in conn.execute("SELECT rowid FROM images WHERE embedding IS NOT NULL").fetchall():
            vector = np.full(dim, dim**-0.5, dtype=np.float32)
            queries = np.tile(vector, (4, 1)).astype(np.float16)
            conn.execute(
                "UPDATE images SET dim = ?, embedding = ?, query_vectors = ? WHERE rowid = ?",
                (dim, vector.tobytes(), queries.tobytes(), rowid),
            )


def test_a_checkpoint_replaced_by_one_of_another_size_says_to_rebuild(
    tmp_path: Path, service: Blip2Service, image_dir: Path, make_image: Any
) -> None:
    """Search names the cause (not the caller's input), and an index run refuses to mix the two sizes, which would
    leave every search failing."""
    db = tmp_path / "index.sqlite"
    with ImageIndex(db, service=service) as index:
        index.index(image_dir, captions=False)
    _pretend_another_model_made(db, 8)
    make_image(999).save(image_dir / "new.png")
    with ImageIndex(db, service=service) as index:
        for call in (lambda: index.search("a dog"), lambda: index.search(image=str(image_dir / "img0.png"))):
            with pytest.raises(IndexDamaged, match=r"holds 8-dimensional vectors .* replaced by another model"):
                call()
        with pytest.raises(IndexDamaged, match=r"holds 8-dimensional vectors .* replaced by another model"):
            index.index(image_dir, captions=False)
        assert [row[0] for row in index._conn().execute("SELECT DISTINCT dim FROM images")] == [8]
        with pytest.raises(IndexDamaged, match=r"replaced by another model"):
            index.search("a dog")
