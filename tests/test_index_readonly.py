"""ImageIndex on a read-only file or folder: searching, listing and stats work; writing says it is read-only.

The file is made read-only for real where the test can: `chmod` as a normal user, `chattr +i` as root (which
`chmod` does not stop). Where neither is possible (root without `chattr`), `os.access` reports the `chmod`ed
modes as a normal user would see them, and SQLite still opens the file read-only (`mode=ro`): the tests check
that SQLite itself refuses a write on the index's connection.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from blip_tools import Blip2Service
from blip_tools.cli import main
from blip_tools.index import ImageIndex, IndexReadOnly
from blip_tools.testing import tiny_settings_kwargs

MakeReadOnly = Callable[..., bool]
"""`make_read_only(path, real=True)` → whether the file system itself now refuses writes (False: emulated).

With `real=False` only `os.access` says so: another user's file, which its owner (this test) can still write."""


@pytest.fixture
def make_read_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeReadOnly]:
    """Make a file or folder read-only for this process; undone after the test."""
    undo: list[Callable[[], object]] = []
    emulated: set[str] = set()
    real_access = os.access

    def access(path: Any, mode: int, *args: Any, **kwargs: Any) -> bool:
        if mode & os.W_OK and os.path.abspath(os.fspath(path)) in emulated:
            return False
        return real_access(path, mode, *args, **kwargs)

    def restore(path: Path, mode: int) -> None:
        with contextlib.suppress(FileNotFoundError):  # e.g. a -wal file SQLite removed (the test failed)
            path.chmod(mode)

    def make(path: Path, real: bool = True) -> bool:
        if not real:
            emulated.add(os.path.abspath(path))
            monkeypatch.setattr(os, "access", access)
            return False
        old_mode = stat.S_IMODE(path.stat().st_mode)
        path.chmod(old_mode & ~0o222)
        undo.append(lambda: restore(path, old_mode))
        if os.geteuid() != 0:
            return True
        if shutil.which("chattr") and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode == 0:
            undo.append(lambda: subprocess.run(["chattr", "-i", str(path)], capture_output=True, check=False))
            return True
        emulated.add(os.path.abspath(path))
        monkeypatch.setattr(os, "access", access)
        return False

    yield make
    for step in reversed(undo):
        step()


@pytest.fixture
def built(tmp_path: Path, service: Blip2Service, image_dir: Path) -> Path:
    """An index of the six test images, closed, in a folder of its own (so the folder can be made read-only)."""
    db = tmp_path / "shared" / "index.sqlite"
    with ImageIndex(db, service=service) as index:
        assert index.index(image_dir, captions=False).indexed == 6
    assert sorted(p.name for p in db.parent.iterdir()) == ["index.sqlite"]  # a clean close leaves no -wal/-shm
    return db


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_read_only_index_is_searched_and_refuses_writes(
    built: Path, service: Blip2Service, image_dir: Path, make_read_only: MakeReadOnly, what: str
) -> None:
    """A shared index on a read-only mount, owned by another user (0444), or in a folder this user cannot write:
    search, image search, paths, duplicates and stats work; indexing raises `IndexReadOnly` naming the fix. Nothing
    is written, and no -wal/-shm files are left in the folder."""
    before = _digest(built)
    make_read_only(built if what == "file" else built.parent)
    with ImageIndex(built, service=service) as index:
        result = index.search("a dog", top_k=10)
        assert (len(result.hits), result.searched) == (6, 6)
        own = image_dir.resolve() / "img2.png"
        assert index.search(image=str(own), top_k=1).hits[0].path == str(own)
        assert len(index.paths()) == 6
        assert index.duplicates(threshold=0.999) == []
        assert (index.stats().images, index.stats().stale) == (6, 0)

        with pytest.raises(IndexReadOnly, match=r"is read-only .*BLIP_INDEX_PATH \(--index\)") as caught:
            index.index(image_dir, captions=False)
        assert caught.value.code == "index_read_only"
        # SQLite itself holds the connection read-only (mode=ro), not only our check.
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            index._conn().execute("DELETE FROM images")
        assert index.read_only
    assert _digest(built) == before
    assert sorted(p.name for p in built.parent.iterdir()) == ["index.sqlite"]


def test_changes_still_in_the_wal_file_are_searched(
    tmp_path: Path, service: Blip2Service, image_dir: Path, make_read_only: MakeReadOnly
) -> None:
    """A copy taken while a writer had the index open (rows only in its -wal file) is read with those rows."""
    db = tmp_path / "live" / "index.sqlite"
    copy = tmp_path / "copy" / "index.sqlite"
    copy.parent.mkdir()
    with ImageIndex(db, service=service) as writer:
        writer.index(image_dir, captions=False)
        wal = Path(f"{db}-wal")
        assert wal.stat().st_size > 0
        shutil.copyfile(db, copy)
        shutil.copyfile(wal, Path(f"{copy}-wal"))
    make_read_only(copy)
    make_read_only(Path(f"{copy}-wal"))
    with ImageIndex(copy, service=service) as index:
        assert len(index.search("a dog", top_k=10).hits) == 6
        assert index.read_only


def test_a_reader_follows_the_owner_writing_meanwhile(
    built: Path, service: Blip2Service, image_dir: Path, make_read_only: MakeReadOnly
) -> None:
    """Opened with no -wal file, the index is read as immutable (no files created). When its owner writes meanwhile,
    the next search reads through the owner's -wal and -shm files: it sees the change, never a half-written file."""
    make_read_only(built.parent, real=False)
    with ImageIndex(built, service=service) as index:
        assert len(index.search("a dog", top_k=10).hits) == 6
        assert index._uri is not None and index._uri.endswith("immutable=1")
        gone = str(image_dir.resolve() / "img4.png")
        owner = sqlite3.connect(built, isolation_level=None)
        try:
            owner.execute("PRAGMA journal_mode=WAL")
            owner.execute("BEGIN IMMEDIATE")
            owner.execute("DELETE FROM images WHERE path = ?", (gone,))
            owner.execute("UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'generation'")
            owner.execute("COMMIT")
            assert Path(f"{built}-wal").stat().st_size > 0
            hits = index.search("a dog", top_k=10).hits
            assert len(hits) == 5 and gone not in {h.path for h in hits}
            assert index._uri is not None and not index._uri.endswith("immutable=1")
        finally:
            owner.close()
        assert len(index.search("a dog", top_k=10).hits) == 5
        assert index.read_only


def test_changes_in_the_wal_file_of_a_read_only_folder_are_not_silently_skipped(
    tmp_path: Path, service: Blip2Service, image_dir: Path, make_read_only: MakeReadOnly
) -> None:
    """Reading a -wal file takes a -shm file SQLite cannot create in a read-only folder: reading the database file
    alone would miss those rows, so opening says to copy the index instead."""
    db = tmp_path / "live" / "index.sqlite"
    copy = tmp_path / "copy" / "index.sqlite"
    copy.parent.mkdir()
    with ImageIndex(db, service=service) as writer:
        writer.index(image_dir, captions=False)
        shutil.copyfile(db, copy)
        shutil.copyfile(f"{db}-wal", f"{copy}-wal")
    if not make_read_only(copy.parent):
        pytest.skip("needs a folder the file system refuses to write (chmod as a normal user, or chattr as root)")
    with pytest.raises(IndexReadOnly, match=r"its -wal file holds changes .*Copy the index with its -wal file"):
        ImageIndex(copy, service=service)


def test_a_file_sqlite_may_not_write_is_opened_read_only(
    built: Path, service: Blip2Service, image_dir: Path, make_read_only: MakeReadOnly, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Permissions the access check does not foresee (an ACL, a network file system): SQLite's refusal to write
    opens the index read-only too."""
    if not make_read_only(built):
        pytest.skip("needs a file the file system refuses to write (chmod as a normal user, or chattr as root)")
    monkeypatch.setattr("blip_tools.index._read_only_reason", lambda path: None, raising=False)
    with ImageIndex(built, service=service) as index:
        assert len(index.search("a dog", top_k=10).hits) == 6
        with pytest.raises(IndexReadOnly, match="SQLite may not write it"):
            index.index(image_dir, captions=False)
        assert index.read_only


def test_cli_searches_a_read_only_index_and_refuses_to_index_it(
    built: Path,
    tiny_checkpoint: Path,
    image_dir: Path,
    make_read_only: MakeReadOnly,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("BLIP_REMOTE_URL", "BLIP_ALLOWED_DIRS", "BLIP_INDEX_PATH"):
        monkeypatch.delenv(name, raising=False)
    for name, value in tiny_settings_kwargs(tiny_checkpoint).items():
        monkeypatch.setenv(f"BLIP_{name.upper()}", value)
    make_read_only(built.parent)
    make_read_only(built)
    previous = Blip2Service._shared
    try:
        assert main(["search", "a dog", "--index", str(built), "--top-k", "3"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("Top 3 of 6 images for 'a dog':"), out
        assert main(["index", str(image_dir), "--index", str(built)]) == 2
    finally:
        Blip2Service.set_shared(previous)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith(f"error: The image index {built} is read-only"), err
