"""ImageIndex as a user meets it: checkpoints named by relative paths, model changes, odd arguments."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from blip_tools import Blip2Service, BlipSettings
from blip_tools.errors import IndexDamaged, InvalidInput
from blip_tools.index import ImageIndex


@pytest.fixture
def index_at(tmp_path: Path, service: Blip2Service) -> Iterator[ImageIndex]:
    with ImageIndex(tmp_path / "index.sqlite", service=service) as index:
        yield index


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


def test_a_file_refused_by_a_size_setting_is_tried_again_once_the_setting_allows_it(
    tmp_path: Path, settings: BlipSettings, service: Blip2Service, make_image: Any
) -> None:
    """`max_image_bytes` and `max_image_pixels` are settings, like `allowed_dirs`: raising them is enough, the
    refused files need no touch to be indexed on the next run."""
    folder = tmp_path / "photos"
    folder.mkdir()
    make_image(1).save(folder / "small.png")  # 48 x 40, about 6 KB
    make_image(2, size=(200, 200)).save(folder / "heavy.png")  # about 120 KB of noise
    Image.new("RGB", (200, 40), "red").save(folder / "wide.png")  # 8,000 pixels in a few hundred bytes
    tight = settings.model_copy(update={"max_image_bytes": 50_000, "max_image_pixels": 5_000})
    db = tmp_path / "index.sqlite"
    with Blip2Service(tight) as svc, ImageIndex(db, service=svc) as index:
        report = index.index(folder, captions=False)
        assert (report.embedded, report.failed) == (1, 2)
        assert {Path(f.path).name for f in report.errors} == {"heavy.png", "wide.png"}
    with ImageIndex(db, service=service) as index:
        report = index.index(folder, captions=False)
        assert (report.embedded, report.unchanged, report.failed) == (2, 1, 0)
        assert {Path(p).name for p in index.paths()} == {"small.png", "heavy.png", "wide.png"}


def test_a_file_the_system_could_not_read_is_tried_again_without_changing(
    index_at: ImageIndex, image_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Permission denied (or an I/O error) is not the file's content: once `chmod` fixes it (no new size or mtime),
    the next run indexes the file. A corrupt file is still remembered until it changes."""
    image_dir = image_dir.resolve()
    locked = image_dir / "img3.png"
    (image_dir / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    real_open = os.open

    def refusing(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.fspath(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_open(path, flags, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(os, "open", refusing)
        report = index_at.index(image_dir, captions=False)
    assert (report.embedded, report.failed) == (5, 2)
    assert "Permission denied" in {Path(f.path).name: f.error for f in report.errors}["img3.png"]

    report = index_at.index(image_dir, captions=False)
    assert (report.embedded, report.unchanged, report.failed, report.errors) == (1, 5, 1, [])
    assert str(locked) in index_at.paths()


def test_a_folder_that_cannot_be_listed_keeps_its_images(
    index_at: ImageIndex, image_dir: Path, make_image: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A subfolder the run cannot list (permissions, a network drive's hiccup) is unknown, not empty: its rows stay
    and the report names it. The folder itself unlistable is an error, not an empty folder whose rows all go."""
    root = image_dir.resolve()
    sub = root / "sub"
    sub.mkdir()
    make_image(50).save(sub / "deep.png")
    assert index_at.index(root, captions=False).indexed == 7
    refused: set[str] = set()
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if os.fspath(path) in refused:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    refused.add(str(sub))
    report = index_at.index(root, captions=False)
    assert (report.removed, report.indexed) == (0, 7)
    assert [(f.path, "Permission denied" in f.error) for f in report.errors] == [(str(sub), True)]

    refused.add(str(root))
    with pytest.raises(InvalidInput, match=r"Cannot list the folder .*Permission denied"):
        index_at.index(root, captions=False)
    refused.clear()
    assert len(index_at.paths()) == 7


def test_a_home_folder_of_no_such_user_is_invalid_input(index_at: ImageIndex) -> None:
    """`~nouser/photos` (expanduser raises RuntimeError) is a typed error, on every interface that indexes or
    searches a folder (the console answered a plain-text 500 and dropped the connection)."""
    with pytest.raises(InvalidInput, match="not a usable path"):
        index_at.index("~no-such-user-blip-tools/photos")
    with pytest.raises(InvalidInput, match="not a usable path"):
        index_at.search("a dog", directory="~no-such-user-blip-tools/photos")
