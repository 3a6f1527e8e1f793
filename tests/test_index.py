"""ImageIndex on the tiny checkpoint: incremental indexing, search, restart, resume, duplicates, allowed dirs."""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
from PIL import Image

from blip_tools import Blip2Service, BlipSettings
from blip_tools.errors import IndexDamaged, InvalidInput, PathNotAllowed
from blip_tools.index import ImageIndex, IndexReport


def _pixels(seed: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8), "RGB")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """30 distinct PNGs: 24 in the folder, 6 in a subfolder."""
    root = tmp_path / "photos"
    (root / "sub").mkdir(parents=True)
    for i in range(30):
        folder = root / "sub" if i >= 24 else root
        _pixels(1000 + i).save(folder / f"p{i:02d}.png")
    return root


@pytest.fixture
def index(tmp_path: Path, service: Blip2Service) -> Any:
    idx = ImageIndex(tmp_path / "db" / "index.sqlite", service=service)
    yield idx
    idx.close()


def _embeds(service: Blip2Service) -> int:
    task = service.stats().per_task.get("embed_image")
    return task.requests if task else 0


def test_index_then_text_search_ranks_everything(index: ImageIndex, photos: Path, service: Blip2Service) -> None:
    seen: list[tuple[int, int]] = []
    report = index.index(photos, on_progress=lambda d, t: seen.append((d, t)))
    assert (report.scanned, report.embedded, report.captioned, report.indexed) == (30, 30, 30, 30)
    assert report.complete and report.failed == 0 and report.removed == 0
    assert seen[0] == (0, 30) and seen[-1] == (30, 30)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)

    result = index.search("a dog on a beach", top_k=50)
    assert len(result.hits) == 30 and result.searched == 30
    scores = [h.score for h in result.hits]
    assert scores == sorted(scores, reverse=True)
    assert {Path(h.path).name for h in result.hits} == {f"p{i:02d}.png" for i in range(30)}
    assert all(h.caption is not None and h.width == 48 and h.height == 40 for h in result.hits)
    # The score is the service's ITC (max over query tokens); query vectors are stored as float16.
    top = result.hits[0]
    expected = service.score(top.path, ["a dog on a beach"]).scores[0].itc
    assert top.itc == pytest.approx(expected, abs=2e-3)
    assert "1. " in result.summary()


def test_image_query_ranks_its_own_file_first(index: ImageIndex, photos: Path) -> None:
    index.index(photos, captions=False)
    for name in ("p03.png", "p17.png", "sub/p27.png"):
        target = photos / name
        hits = index.search(image=str(target), top_k=3).hits
        assert hits[0].path == str(target.resolve())
        assert hits[0].score == pytest.approx(1.0, abs=1e-4)
        assert hits[1].score < hits[0].score


def test_incremental_runs_touch_change_delete(index: ImageIndex, photos: Path, service: Blip2Service) -> None:
    index.index(photos, captions=False)
    before = _embeds(service)
    second = index.index(photos, captions=False)
    assert (second.embedded, second.unchanged, second.reused) == (0, 30, 0)
    assert _embeds(service) == before

    # A new mtime with the same bytes: hashed, not re-embedded.
    touched = photos / "p05.png"
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    third = index.index(photos, captions=False)
    assert (third.embedded, third.reused, third.unchanged) == (0, 1, 29)
    assert _embeds(service) == before

    # New content: only that file is re-embedded, and search sees the new pixels.
    _pixels(7777).save(touched)
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    fourth = index.index(photos, captions=False)
    assert (fourth.embedded, fourth.unchanged) == (1, 29)
    assert _embeds(service) == before + 1
    replacement = photos.parent / "replacement.png"
    _pixels(7777).save(replacement)
    assert index.search(image=str(replacement), top_k=1).hits[0].path == str(touched.resolve())

    # Deleted: removed from the index and from results.
    (photos / "p06.png").unlink()
    fifth = index.index(photos, captions=False)
    assert (fifth.removed, fifth.embedded, fifth.indexed) == (1, 0, 29)
    assert str((photos / "p06.png").resolve()) not in {h.path for h in index.search("x", top_k=50).hits}


def test_database_survives_restart(tmp_path: Path, photos: Path, service: Blip2Service) -> None:
    db = tmp_path / "restart.sqlite"
    with ImageIndex(db, service=service) as first:
        first.index(photos, captions=False)
        expected = [h.path for h in first.search("a red car", top_k=5).hits]
    before = _embeds(service)
    with ImageIndex(db, service=service) as again:
        assert again.stats().images == 30
        assert [h.path for h in again.search("a red car", top_k=5).hits] == expected
        assert again.index(photos, captions=False).embedded == 0
    assert _embeds(service) == before


def test_default_path_comes_from_settings(tmp_path: Path, settings: BlipSettings) -> None:
    custom = settings.model_copy(update={"index_path": tmp_path / "env" / "idx.sqlite"})
    with Blip2Service(custom) as svc, ImageIndex(service=svc) as idx:
        assert idx.path == tmp_path / "env" / "idx.sqlite"
        assert idx.path.exists()


def test_interrupted_run_resumes(index: ImageIndex, photos: Path) -> None:
    class Stop(Exception):
        pass

    def interrupt(done: int, total: int) -> None:
        if done >= 10:
            raise Stop

    with pytest.raises(Stop):
        index.index(photos, captions=False, chunk_size=8, on_progress=interrupt)
    kept = index.stats().images
    assert 8 <= kept < 30  # finished chunks were committed, the rest was not started
    resumed = index.index(photos, captions=False, chunk_size=8)
    assert resumed.complete and resumed.embedded == 30 - kept and resumed.unchanged == kept
    assert resumed.indexed == 30


def test_stop_event_ends_the_run_early(index: ImageIndex, photos: Path) -> None:
    stop = threading.Event()
    report = index.index(photos, captions=False, chunk_size=4, stop=stop, on_progress=lambda d, t: d > 0 and stop.set())
    assert not report.complete and report.embedded == 4 and report.indexed == 4
    assert index.index(photos, captions=False).indexed == 30


def test_search_while_indexing_sees_committed_rows(index: ImageIndex, photos: Path) -> None:
    counts: list[int] = []
    errors: list[BaseException] = []
    report: list[IndexReport] = []

    def run() -> None:
        try:
            report.append(index.index(photos, captions=False, chunk_size=3))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    while worker.is_alive():
        counts.append(len(index.search("anything", top_k=50).hits))
    worker.join(timeout=60)
    assert not errors and report and report[0].complete
    counts.append(len(index.search("anything", top_k=50).hits))
    assert counts == sorted(counts) and counts[-1] == 30


def test_folder_filter_and_non_recursive(index: ImageIndex, photos: Path) -> None:
    top = index.index(photos, recursive=False, captions=False)
    assert (top.scanned, top.indexed) == (24, 24)
    index.index(photos, captions=False)
    sub = photos / "sub"
    hits = index.search("a cat", top_k=50, directory=sub).hits
    assert {Path(h.path).name for h in hits} == {f"p{i}.png" for i in range(24, 30)}
    assert len(index.search("a cat", top_k=50, directory=photos).hits) == 30
    assert index.paths(sub) == sorted(str((sub / f"p{i}.png").resolve()) for i in range(24, 30))
    # Re-indexing only the top level keeps the subfolder's rows.
    assert index.index(photos, recursive=False, captions=False).removed == 0
    assert index.stats().images == 30


def test_rerank_orders_by_itm(index: ImageIndex, photos: Path) -> None:
    index.index(photos, captions=False)
    result = index.search("a small boat", top_k=5, rerank=True)
    assert result.reranked and len(result.hits) == 5
    probs = [h.itm_probability for h in result.hits]
    assert all(p is not None and 0.0 <= p <= 1.0 for p in probs)
    assert [h.score for h in result.hits] == sorted((h.score for h in result.hits), reverse=True)
    assert all(h.score == h.itm_probability for h in result.hits)


def test_exact_duplicates_group_together(index: ImageIndex, photos: Path) -> None:
    shutil.copy(photos / "p02.png", photos / "copy of p02.png")
    _pixels(1002).save(photos / "p02-again.bmp")  # same pixels, other format and bytes
    report = index.index(photos, captions=False)
    assert report.reused == 1  # the byte-identical copy reused the vectors
    groups = index.duplicates(threshold=0.9999)
    names = [sorted(Path(p).name for p in g.paths) for g in groups]
    assert ["copy of p02.png", "p02-again.bmp", "p02.png"] in names
    group = groups[names.index(["copy of p02.png", "p02-again.bmp", "p02.png"])]
    assert group.exact and group.min_similarity == pytest.approx(1.0, abs=1e-5)
    assert all(not g.exact for g in groups if g is not group)


def test_bad_files_are_reported_once(index: ImageIndex, photos: Path, service: Blip2Service) -> None:
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    first = index.index(photos, captions=False)
    assert first.failed == 1 and first.indexed == 30
    assert first.errors[0].path.endswith("broken.png") and "broken.png" in first.errors[0].error
    assert "bytes (" not in first.errors[0].error  # the model got the bytes, but the message names the file
    before = _embeds(service)
    second = index.index(photos, captions=False)
    assert second.failed == 1 and second.embedded == 0 and _embeds(service) == before
    assert index.stats().failed == 1


def test_allowed_dirs_are_enforced(tmp_path: Path, photos: Path, settings: BlipSettings) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    _pixels(5).save(inside / "ok.png")
    (inside / "escape.png").symlink_to(photos / "p00.png")  # points outside the allowed dir
    restricted = settings.model_copy(update={"allowed_dirs": [inside.resolve()]})
    with Blip2Service(restricted) as svc, ImageIndex(tmp_path / "r.sqlite", service=svc) as idx:
        with pytest.raises(PathNotAllowed):
            idx.index(photos)
        with pytest.raises(PathNotAllowed):
            idx.index(inside / ".." / "photos")
        report = idx.index(inside, captions=False)
        assert (report.indexed, report.failed) == (1, 1)
        assert "outside the allowed" in report.errors[0].error
        with pytest.raises(PathNotAllowed):
            idx.search("a cat", directory=photos)
        with pytest.raises(PathNotAllowed):
            idx.search(image=str(photos / "p01.png"))
        assert [Path(h.path).name for h in idx.search("a cat").hits] == ["ok.png"]


def test_a_refused_path_is_retried_once_the_setting_allows_it(
    tmp_path: Path, photos: Path, settings: BlipSettings
) -> None:
    """A file refused by a setting (allowed dirs) is not remembered as broken: a later run with the setting
    widened indexes it, though the file itself never changed. A broken file is remembered until it changes."""
    inside = tmp_path / "inside"
    inside.mkdir()
    _pixels(5).save(inside / "ok.png")
    (inside / "escape.png").symlink_to(photos / "p00.png")
    (inside / "broken.png").write_bytes(b"not an image")
    db = tmp_path / "r.sqlite"
    restricted = settings.model_copy(update={"allowed_dirs": [inside.resolve()]})
    with Blip2Service(restricted) as svc, ImageIndex(db, service=svc) as idx:
        report = idx.index(inside, captions=False)
        assert (report.indexed, report.failed) == (1, 2)
        again = idx.index(inside, captions=False)  # the setting still refuses it: tried (and refused) again
        assert (again.embedded, again.failed, again.unchanged) == (0, 2, 1)
        assert {Path(e.path).name for e in again.errors} == {"escape.png"}  # broken.png is remembered, not re-read
    widened = settings.model_copy(update={"allowed_dirs": [inside.resolve(), photos.resolve()]})
    with Blip2Service(widened) as svc, ImageIndex(db, service=svc) as idx:
        report = idx.index(inside, captions=False)
        assert (report.embedded, report.failed, report.indexed) == (1, 1, 2)
        assert sorted(Path(h.path).name for h in idx.search("a cat", top_k=5).hits) == ["escape.png", "ok.png"]


def test_search_arguments_are_checked(index: ImageIndex, photos: Path) -> None:
    with pytest.raises(InvalidInput):
        index.search()
    with pytest.raises(InvalidInput):
        index.search("text", image=str(photos / "p00.png"))
    with pytest.raises(InvalidInput):
        index.search("   ")
    with pytest.raises(InvalidInput):
        index.search("a cat", top_k=0)
    with pytest.raises(InvalidInput):
        index.index(photos / "p00.png")
    assert index.search("nothing indexed yet").hits == []


@pytest.mark.parametrize("directory", ["\x00", "photos\x00", "\ud800", "/tmp/\ud800x"])
def test_a_folder_path_no_file_system_can_hold_is_invalid_input(index: ImageIndex, directory: str) -> None:
    """A NUL or a lone surrogate in `directory` used to escape as a bare ValueError / UnicodeEncodeError."""
    with pytest.raises(InvalidInput, match="directory is not a usable path"):
        index.index(directory)
    with pytest.raises(InvalidInput, match="directory is not a usable path"):
        index.search("a cat", directory=directory)


def test_a_folder_with_a_non_utf8_name_is_still_a_folder(index: ImageIndex, tmp_path: Path) -> None:
    """Names with undecodable bytes arrive as surrogate escapes (\udc80-\udcff) and must keep working."""
    folder = tmp_path / os.fsdecode(b"caf\xe9")
    folder.mkdir()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(folder / "red.png")
    assert index.index(str(folder), captions=False).indexed == 1
    assert len(index.search("red", directory=str(folder)).hits) == 1


async def test_async_index_reports_progress_and_searches(index: ImageIndex, photos: Path) -> None:
    seen: list[tuple[int, int]] = []

    async def progress(done: int, total: int) -> None:
        seen.append((done, total))

    with anyio.fail_after(60):
        report = await index.aindex(photos, captions=False, chunk_size=10, on_progress=progress)
        result = await index.asearch("a tree", top_k=3)
    assert report.indexed == 30 and len(result.hits) == 3
    # Every progress notification was delivered before aindex returned.
    assert seen[-1] == (30, 30) and [d for d, _ in seen] == sorted(d for d, _ in seen)


def test_text_scores_are_exact_itc_over_query_tokens(tmp_path: Path, settings: BlipSettings) -> None:
    """With distinct query-token vectors (the tiny model's coincide), text scores are the max over them."""
    import sqlite3

    rng = np.random.default_rng(0)
    dim, n_query, n = 16, 4, 40
    queries = rng.standard_normal((n, n_query, dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=-1, keepdims=True)
    pooled = queries.mean(axis=1)
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    folder = tmp_path / "synthetic"
    folder.mkdir()
    with Blip2Service(settings) as svc, ImageIndex(tmp_path / "s.sqlite", service=svc) as idx:
        conn = sqlite3.connect(idx.path)
        with conn:
            conn.executemany(
                "INSERT INTO images (path, dir, size, mtime_ns, model, dim, embedding, query_vectors, indexed_at) "
                "VALUES (?, ?, 1, 1, ?, ?, ?, ?, 0)",
                [
                    (
                        str(folder / f"{i}.png"),
                        str(folder),
                        settings.retrieval_model,
                        dim,
                        pooled[i].tobytes(),
                        queries[i].astype(np.float16).tobytes(),
                    )
                    for i in range(n)
                ],
            )
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('generation', 'synthetic')")
        conn.close()
        text = rng.standard_normal(dim).astype(np.float32)
        text /= np.linalg.norm(text)
        exact = (queries.astype(np.float16).astype(np.float32) @ text).max(axis=1)
        hits, searched = idx.search_vector(text, top_k=5, text_query=True)
        assert searched == n
        assert [h.path for h in hits] == [str(folder / f"{i}.png") for i in np.argsort(-exact)[:5]]
        assert [h.score for h in hits] == pytest.approx(np.sort(exact)[::-1][:5].tolist(), abs=1e-5)
        # Image queries rank by the pooled cosine.
        nearest, _ = idx.search_vector(pooled[7], top_k=1)
        assert nearest[0].path == str(folder / "7.png")


def test_file_name_that_is_not_utf8_is_indexed_and_round_trips(index: ImageIndex, photos: Path) -> None:
    raw = os.fsencode(photos) + b"/bad\xff.png"
    with open(raw, "wb") as handle:
        _pixels(4242).save(handle, format="PNG")
    first = index.index(photos, captions=True)
    assert (first.failed, first.embedded, first.indexed) == (0, 31, 31)
    stored = [p for p in index.paths() if not p.isascii()]
    assert [os.fsencode(p) for p in stored] == [raw]  # the stored path opens the real file
    hit = index.search(image=raw.decode(errors="surrogateescape"), top_k=1).hits[0]
    assert os.fsencode(hit.path) == raw and hit.caption is not None
    # JSON (MCP, --json) cannot carry the raw bytes: they are shown escaped.
    assert "bad\\\\xff.png" in index.search("a cat", top_k=50).model_dump_json()
    assert "bad\\xff.png" in index.search("a cat", top_k=50).summary()
    assert index.index(photos).unchanged == 31
    os.unlink(raw)
    assert (index.index(photos).removed, index.stats().images) == (1, 30)


def test_renamed_or_moved_files_reuse_their_vectors_and_captions(
    index: ImageIndex, photos: Path, service: Blip2Service
) -> None:
    index.index(photos)
    before = _embeds(service)
    captions = {Path(h.path).name: h.caption for h in index.search("a cat", top_k=50).hits}
    (photos / "moved").mkdir()
    for i in range(3):
        (photos / f"p{i:02d}.png").rename(photos / "moved" / f"p{i:02d}.png")
    (photos / "p03.png").rename(photos / "renamed.png")
    report = index.index(photos)
    assert (report.embedded, report.captioned, report.reused, report.removed) == (0, 0, 4, 4)
    assert _embeds(service) == before and report.indexed == 30
    after = {h.path: h.caption for h in index.search("a cat", top_k=50).hits}
    assert after[str((photos / "renamed.png").resolve())] == captions["p03.png"]
    assert after[str((photos / "moved" / "p01.png").resolve())] == captions["p01.png"]
    assert str((photos / "p03.png").resolve()) not in after


def test_every_file_read_is_checked_even_when_its_bytes_are_already_indexed(
    tmp_path: Path, photos: Path, settings: BlipSettings
) -> None:
    inside = tmp_path / "inside"
    inside.mkdir()
    shutil.copy(photos / "p00.png", inside / "mine.png")
    (inside / "link.png").symlink_to(photos / "p00.png")  # same bytes as mine.png, but outside
    restricted = settings.model_copy(update={"allowed_dirs": [inside.resolve()]})
    with Blip2Service(restricted) as svc, ImageIndex(tmp_path / "r.sqlite", service=svc) as idx:
        report = idx.index(inside, captions=False)
        assert idx.paths() == [str((inside / "mine.png").resolve())]
        assert report.failed == 1
    # The size limit applies to the hash read too: a copy of an indexed file over the limit is refused.
    db = tmp_path / "s.sqlite"
    with Blip2Service(settings) as svc, ImageIndex(db, service=svc) as idx:
        idx.index(inside, captions=False)
    shutil.copy(inside / "mine.png", inside / "copy.png")
    small = settings.model_copy(update={"max_image_bytes": 100})
    with Blip2Service(small) as svc, ImageIndex(db, service=svc) as idx:
        report = idx.index(inside, captions=False)
        assert report.reused == 0 and "copy.png" in {Path(e.path).name for e in report.errors}
        assert any("limit" in e.error for e in report.errors if e.path.endswith("copy.png"))


def _damage(db: Path, how: str) -> None:
    import sqlite3

    if how == "garbage":
        db.write_bytes(b"hello world" * 100)
    elif how == "other app":
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("CREATE TABLE images (id INTEGER, name TEXT)")
    elif how == "schema version":
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("UPDATE meta SET value = 'abc' WHERE key = 'schema_version'")
    elif how == "embedding size":
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("UPDATE images SET embedding = x'00112233' WHERE rowid = 1")
    elif how == "mixed sizes":
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("UPDATE images SET dim = 2, embedding = zeroblob(8) WHERE rowid = 1")
    elif how == "newer schema":
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    elif how == "query vectors size":
        with contextlib.closing(sqlite3.connect(db)) as conn, conn:
            conn.execute("UPDATE images SET query_vectors = x'0011223344'")
    elif how.startswith("page"):
        with contextlib.closing(sqlite3.connect(db)) as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        with open(db, "r+b") as handle:
            handle.seek(4096 * int(how[4:]))
            handle.write(b"\xa5" * 4096)


@pytest.mark.parametrize(
    "how",
    ["garbage", "other app", "schema version", "embedding size", "mixed sizes", "query vectors size", "page1", "page3"],
)
def test_damaged_index_file_gives_a_typed_error_that_says_to_rebuild(
    tmp_path: Path, photos: Path, service: Blip2Service, how: str
) -> None:
    db = tmp_path / "damaged.sqlite"
    if how != "garbage" and how != "other app":
        with ImageIndex(db, service=service) as idx:
            idx.index(photos, recursive=False, captions=False)
    _damage(db, how)
    with (
        pytest.raises(IndexDamaged, match=r"damaged or is not a blip-tools index.*Delete it") as caught,
        ImageIndex(db, service=service) as idx,
    ):
        idx.search("a dog")
        idx.stats()
        idx.index(photos, recursive=False, captions=False)
    assert caught.value.code == "index_damaged"


def test_index_of_another_schema_version_is_damaged_and_says_to_rebuild(
    tmp_path: Path, photos: Path, service: Blip2Service
) -> None:
    db = tmp_path / "future.sqlite"
    with ImageIndex(db, service=service):
        pass
    _damage(db, "newer schema")
    with pytest.raises(IndexDamaged, match=r"schema version 99; this blip-tools expects 1.*rebuild it"):
        ImageIndex(db, service=service)


def test_a_run_reads_each_file_once(index: ImageIndex, photos: Path, reads: Counter[str]) -> None:
    first = index.index(photos)  # hash, embed and caption every file
    assert (first.embedded, first.captioned) == (30, 30)
    assert len(reads) == 30 and set(reads.values()) == {1}

    reads.clear()
    assert index.index(photos).unchanged == 30
    assert not reads  # unchanged size and mtime: not read at all

    reads.clear()
    _pixels(4242).save(photos / "p07.png")  # new bytes: read once, embedded and captioned from them
    shutil.copy(photos / "p08.png", photos / "copy.png")  # known bytes: read once to hash, vectors reused
    again = index.index(photos)
    assert (again.embedded, again.captioned, again.reused) == (1, 1, 1)
    assert reads == Counter({str((photos / "p07.png").resolve()): 1, str((photos / "copy.png").resolve()): 1})


def test_captions_added_later_read_each_file_once(index: ImageIndex, photos: Path, reads: Counter[str]) -> None:
    index.index(photos, recursive=False, captions=False)
    assert len(reads) == 24 and set(reads.values()) == {1}
    reads.clear()
    st = (photos / "p01.png").stat()  # touched, same bytes: hashed, and captioned from the same read
    os.utime(photos / "p01.png", ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    report = index.index(photos, recursive=False)
    assert (report.embedded, report.captioned, report.reused) == (0, 24, 1)
    assert len(reads) == 24 and set(reads.values()) == {1}


def test_top_k_must_be_a_positive_integer(index: ImageIndex, photos: Path) -> None:
    index.index(photos, recursive=False, captions=False)
    for bad in ("3", 2.5, True, 0, -1, None):
        with pytest.raises(InvalidInput, match="top_k must be an integer >= 1"):
            index.search("a cat", top_k=bad)  # type: ignore[arg-type]
    assert len(index.search("a cat", top_k=np.int64(2)).hits) == 2  # type: ignore[arg-type]


def test_searches_from_many_short_lived_threads_do_not_keep_a_connection_each(index: ImageIndex, photos: Path) -> None:
    """Each thread gets its own SQLite connection; once the thread has ended, the next new one closes it."""
    import asyncio
    import os
    import threading

    index.index(photos, captions=False)
    index.search("a photo", top_k=1)
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(40):
        thread = threading.Thread(target=index.search, args=("a photo",), kwargs={"top_k": 1})
        thread.start()
        thread.join()
    for _ in range(10):
        asyncio.run(index.asearch("a photo", top_k=1))  # each run's executor threads end with it
    assert len(index._connections) <= 3  # this thread, plus the last short-lived thread(s) not yet pruned
    assert len(os.listdir("/proc/self/fd")) <= fds + 6
    assert index.search("a photo", top_k=1)  # still serving on this thread's own connection


def test_a_file_name_cannot_forge_log_lines(
    index: ImageIndex, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Names are logged quoted (%r): a newline in one used to start a line of its own in the log."""
    folder = tmp_path / "forged"
    folder.mkdir()
    loop = folder / "a\nCRITICAL forged line.png"
    loop.symlink_to(loop)  # a symlink to itself: stat fails, and the scan logs the name
    with caplog.at_level("WARNING", logger="blip_tools.index"):
        index.index(str(folder), captions=False)
    messages = [r.getMessage() for r in caplog.records if "forged" in r.getMessage()]
    assert messages and all("\n" not in m for m in messages), messages


def test_an_index_locked_by_another_writer_is_index_busy(
    tmp_path: Path, service: Blip2Service, photos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It was a plain BlipError (the console answered 500); it is an Overloaded with a retry time (503)."""
    import sqlite3

    import blip_tools.index as index_module
    from blip_tools.errors import IndexBusy, Overloaded

    monkeypatch.setattr(index_module, "_BUSY_TIMEOUT_S", 0.2)
    db = tmp_path / "busy.sqlite"
    with ImageIndex(db, service=service) as idx:
        idx.index(photos, captions=False, recursive=False)
        other = sqlite3.connect(db, isolation_level=None)
        other.execute("BEGIN EXCLUSIVE")  # another process writing
        try:
            with pytest.raises(IndexBusy, match="busy") as info:
                ImageIndex(db, service=service).search("a cat")
            assert isinstance(info.value, Overloaded) and info.value.retry_after_s == 5.0
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert idx.search("a cat").hits  # free again
