"""`ImageIndex`: a persistent, incremental SQLite index of a folder tree's images for text and image search.

Each image row holds its path, size, mtime, a SHA-256 of the file bytes, a hash of the decoded pixels, the
pooled embedding (float32), the per-query-token embeddings (float16, for exact ITC scores) and an optional
caption. Runs are incremental: a file whose size, mtime and ctime are unchanged is skipped; a changed one is
hashed and re-embedded only if its bytes changed (or reuses the vectors of an identical file already indexed);
files gone from disk are removed. Vectors are recorded under the retrieval model's name (a local checkpoint folder
as its real path); for a local folder, a fingerprint of the weights the runtime loaded from it is recorded too
(`Blip2Runtime.retrieval_fingerprint`), so vectors made by weights since replaced in that folder count as another
model's: search leaves them out, the next run re-embeds them.
A run reads each file once: the bytes it hashes are the bytes the model embeds and captions (held for one chunk
at a time), so the stored hash always describes what was embedded. Every chunk of work is committed, so a run
can be interrupted and resumed, and the database is in WAL mode, so searches (from any thread or process) see
committed rows while a run goes on. An index file this process may not write (a
read-only mount, another user's file, a folder where SQLite cannot create its -wal/-shm files) is opened read-only:
it is searched as usual, and writing to it raises `IndexReadOnly`.

Search is brute force over normalised vectors with numpy: the pooled vectors pick candidates, then the exact
ITC score (max over query tokens, as `Blip2Service.score`) ranks them; an optional ITM re-rank scores the top k
with the matching head. The vectors are cached in memory and reloaded when the database changes.
"""

from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import contextlib
import functools
import hashlib
import inspect
import logging
import numbers
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, ParamSpec, TypeVar

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field, field_serializer

from .errors import (
    BlipError,
    ImageTooLarge,
    IndexBusy,
    IndexDamaged,
    IndexReadOnly,
    InvalidImage,
    InvalidInput,
    PathNotAllowed,
    PayloadTooLarge,
)
from .images import _check_allowed, _read_file, describe_ref
from .images import display_name as _display  # bytes of a name that are not UTF-8 as \xNN
from .results import CaptionResult, EmbeddingResult
from .runtime import model_key

if TYPE_CHECKING:
    from .images import ImageInput
    from .service import Blip2Service
    from .settings import BlipSettings

logger = logging.getLogger(__name__)

INDEXED_EXTENSIONS: Final = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif", ".tif", ".tiff", ".mpo"}
)
"""File suffixes an index run picks up (the formats `load_image` accepts)."""

SCHEMA_VERSION: Final = 1
_MAX_REPORTED_ERRORS: Final = 50
_PREFILTER_MIN: Final = 64
"""Text search scores at least this many pooled-vector candidates exactly (max over query tokens)."""
_BUSY_TIMEOUT_S: Final = 30.0
"""How long a connection waits for another writer's lock before the call fails with `IndexBusy`."""
_BUSY_RETRY_S: Final = 5.0
"""The `retry_after_s` an `IndexBusy` gives."""
_IMMUTABLE: Final = "&immutable=1"
"""Appended to a read-only connection's URI while no -wal file exists: SQLite then creates no files, takes no locks."""

ProgressFn = Callable[[int, int], Any]
_P = ParamSpec("_P")
_R = TypeVar("_R")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS images (
    path TEXT PRIMARY KEY,
    dir TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER,
    file_sha256 TEXT,
    pixel_sha256 TEXT,
    width INTEGER,
    height INTEGER,
    model TEXT,
    dim INTEGER,
    embedding BLOB,
    query_vectors BLOB,
    caption TEXT,
    caption_confidence REAL,
    caption_model TEXT,
    error TEXT,
    indexed_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS images_file_sha256 ON images (file_sha256);
CREATE INDEX IF NOT EXISTS images_dir ON images (dir);
"""
_COLUMNS: Final = frozenset(
    {
        "path", "dir", "size", "mtime_ns", "file_sha256", "pixel_sha256", "width", "height", "model", "dim",
        "embedding", "query_vectors", "caption", "caption_confidence", "caption_model", "error", "indexed_at",
    }
)  # fmt: skip
_ADDED_COLUMNS: Final = {"ctime_ns": "INTEGER"}
"""Columns added since schema version 1 (NULL in rows an older blip-tools wrote), added to an older file on open.

Additive, so the schema version stays 1: an older blip-tools still reads and writes the file (leaving these NULL,
which only makes the next run of this version hash those files once more)."""
_WEIGHTS_KEY: Final = "weights:"
"""Meta key prefix: `weights:<model name>` holds the fingerprint of the local checkpoint that made its vectors."""


# ---------------------------------------------------------------------------------------------- results


class IndexFailure(BaseModel):
    """A file that could not be indexed (or captioned), and why."""

    path: str
    error: str

    @field_serializer("path", "error", when_used="json")
    def _json_text(self, value: str) -> str:
        return _display(value)


class IndexReport(BaseModel):
    """What one index run did. Run it again to resume when `complete` is false."""

    directory: str = Field(description="The indexed directory (resolved).")
    index_path: str = Field(description="The SQLite database file.")
    scanned: int = Field(description="Image files found.")
    embedded: int = Field(description="Files sent through the model for an embedding this run.")
    captioned: int = Field(description="Files captioned this run.")
    reused: int = Field(description="Changed or new files whose bytes were already indexed: vectors reused.")
    unchanged: int = Field(description="Files skipped because size and mtime were unchanged.")
    removed: int = Field(description="Rows removed because their file is gone.")
    failed: int = Field(
        description="Files that could not be read or embedded (kept as failures until they change; a file a "
        "setting refused, or the system could not read, is tried again next run)."
    )
    errors: list[IndexFailure] = Field(
        default_factory=list,
        description="Failures of this run (first 50): files, and folders that could not be listed (their images stay "
        "indexed).",
    )
    indexed: int = Field(description="Searchable images under the directory after the run.")
    complete: bool = Field(description="False when the run was stopped early; the next run resumes it.")
    elapsed_s: float

    @field_serializer("directory", when_used="json")
    def _json_directory(self, value: str) -> str:
        return _display(value)

    def summary(self) -> str:
        """One line for a model or a terminal."""
        state = "done" if self.complete else "stopped early (run again to resume)"
        return (
            f"Indexed {_display(self.directory)}: {self.indexed} searchable images; this run embedded {self.embedded}, "
            f"captioned {self.captioned}, reused {self.reused}, skipped {self.unchanged} unchanged, removed "
            f"{self.removed}, {self.failed} failed; {state} in {self.elapsed_s:.1f}s."
        )


class SearchHit(BaseModel):
    """One search result."""

    path: str
    score: float = Field(description="What the ranking used: ITC cosine, or the ITM probability after a re-rank.")
    itc: float = Field(description="Contrastive similarity: max over query tokens (text) or pooled cosine (image).")
    itm_probability: float | None = Field(default=None, description="Matching-head probability (re-rank only).")
    caption: str | None = None
    width: int | None = None
    height: int | None = None

    @field_serializer("path", when_used="json")
    def _json_path(self, value: str) -> str:
        return _display(value)


class SearchResult(BaseModel):
    """Ranked images for a text or an image query."""

    query: str | None = Field(default=None, description="The text query, if any.")
    image: str | None = Field(default=None, description="The query image (description), if any.")
    directory: str | None = Field(default=None, description="Folder filter (resolved), if any.")
    hits: list[SearchHit]
    searched: int = Field(description="Images compared.")
    reranked: bool = False
    elapsed_ms: float = 0.0

    @field_serializer("directory", when_used="json")
    def _json_directory(self, value: str | None) -> str | None:
        return None if value is None else _display(value)

    def summary(self) -> str:
        """Short text for a model: one line per hit."""
        what = f"'{self.query}'" if self.query is not None else f"images like {self.image}"
        if not self.hits:
            return (
                f"No indexed images match {what} (searched {self.searched}). "
                "Index a folder first (index_images, or blip-tools index DIR)."
            )
        lines = [f"Top {len(self.hits)} of {self.searched} images for {what}:"]
        for i, hit in enumerate(self.hits, 1):
            caption = f" — {hit.caption}" if hit.caption else ""
            lines.append(f"{i}. {_display(hit.path)} (score {hit.score:.3f}){caption}")
        return "\n".join(lines)


class DuplicateGroup(BaseModel):
    """Images that look the same: cosine similarity at or above the threshold (or identical pixels)."""

    paths: list[str]
    exact: bool = Field(description="All members have identical decoded pixels.")
    min_similarity: float = Field(description="Lowest pairwise cosine similarity inside the group.")

    @field_serializer("paths", when_used="json")
    def _json_paths(self, value: list[str]) -> list[str]:
        return [_display(p) for p in value]


class IndexStats(BaseModel):
    """Counts of what the index file holds."""

    index_path: str
    images: int = Field(description="Searchable images (embedded with the current retrieval model).")
    captioned: int
    failed: int
    stale: int = Field(description="Rows embedded with another retrieval model (re-embedded on the next run).")
    size_bytes: int


# ---------------------------------------------------------------------------------------------- internals


@dataclass
class _Matrix:
    """The searchable vectors, sorted by path so a folder is one contiguous slice."""

    generation: str
    model: str | None
    """The model name whose vectors these are (None: none, its weights were replaced)."""
    rowids: npt.NDArray[np.int64]
    paths: list[str]
    vectors: npt.NDArray[np.float32]


@dataclass
class _Todo:
    path: str
    size: int
    mtime_ns: int
    ctime_ns: int
    row: sqlite3.Row | None
    caption_only: bool = False


def _dir_range(directory: str) -> tuple[str, str]:
    """All paths under `directory` sort in [lo, hi): '/' + 1 is '0' (and likewise for '\\')."""
    sep = os.sep
    return directory.rstrip(sep) + sep, directory.rstrip(sep) + chr(ord(sep) + 1)


def _read_checked(path: str, settings: BlipSettings) -> bytes:
    """A file's bytes, read with the checks of every image read (allowed dirs, regular file, size cap).

    Raises:
        InvalidImage: (or a leaf: PathNotAllowed, PayloadTooLarge) the file may not or cannot be read.
    """
    ref = Path(path)
    return _read_file(ref, settings, describe_ref(ref))


def _file_error(exc: BlipError, path: str, data: bytes | None) -> str:
    """The text of a file's error that names the file, also when the model was given the file's bytes.

    The service calls bytes `bytes (N)`; that label becomes the file's, so the text reads as it does for a path.
    A text that still does not name the file (a daemon says `data URI (N bytes)`) gets the file's name in front.
    """
    label = describe_ref(Path(path))
    text = str(exc) or type(exc).__name__
    if data is not None:
        text = text.replace(describe_ref(data), label, 1)
    if label not in text:
        text = f"{label}: {text}"
    return text[:500]


def _sends_paths(service: Blip2Service) -> bool:
    """Whether the model must get paths, not the bytes the index read: a daemon's client told to send paths.

    `RemoteService(send_files="never")` means the daemon reads the files itself; every other service (a local one,
    or a daemon's client that sends data anyway) gets the bytes, so a run reads each file once.
    """
    from .remote import RemoteService

    return isinstance(service, RemoteService) and service.send_files == "never"


def _db_text(value: str) -> str | bytes:
    """A value SQLite can bind, for SQL that wraps it in `CAST(? AS TEXT)`.

    A file name that is not valid UTF-8 reaches us with lone surrogates (PEP 383), which `sqlite3` refuses to
    bind; it is stored as the bytes of its "surrogatepass" encoding instead, and `_read_text` (the
    connections' text factory) turns them back into the same `str`, so the stored path still opens the file.
    That encoding keeps code-point order, so SQLite's sort and range queries agree with Python's.
    """
    if value.isascii():
        return value
    try:
        value.encode("utf-8")
        return value
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogatepass")


_read_text: Final = functools.partial(str, encoding="utf-8", errors="surrogatepass")
"""Text factory of every connection: the inverse of `_db_text`."""


def _db_failure(path: Path, exc: sqlite3.Error) -> BlipError:
    """One message per kind of SQLite failure, telling the user what to do."""
    name = str(getattr(exc, "sqlite_errorname", "") or "")
    if name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
        return IndexBusy(
            f"The image index {path} is busy ({exc}): another process has been writing to it for over "
            f"{_BUSY_TIMEOUT_S:g} s. Retry after {_BUSY_RETRY_S:g} s, or when it is done.",
            retry_after_s=_BUSY_RETRY_S,
        )
    if name.startswith("SQLITE_READONLY"):
        return _read_only(path, str(exc))
    if name.startswith(("SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_IOERR", "SQLITE_FULL")):
        return BlipError(
            f"Cannot read or write the image index {path} ({exc}). Check the file's permissions and the free disk "
            "space, or set BLIP_INDEX_PATH (--index) to a writable location."
        )
    return _damaged(path, str(exc))


def _damaged(path: Path, reason: str) -> IndexDamaged:
    return IndexDamaged(
        f"The image index {path} is damaged or is not a blip-tools index ({reason}). Delete it (with its -wal and "
        "-shm files) or point BLIP_INDEX_PATH (--index) at a new file, then index your folders again to rebuild it."
    )


def _read_only(path: Path, why: str) -> IndexReadOnly:
    return IndexReadOnly(
        f"The image index {path} is read-only ({why}): it can be searched, but not written (indexing folders, "
        "removing entries). To index, copy it (with its -wal file, if any) to a writable folder and point "
        "BLIP_INDEX_PATH (--index) at the copy, or give this process write permission on the file and its folder."
    )


def _read_only_reason(path: Path) -> str | None:
    """Why this process cannot write the existing index file `path`, or None when it can.

    SQLite in WAL mode also writes a `-wal` and a `-shm` file next to the database, so the folder must take new
    files unless both already exist and are writable. (`os.access` answers for this process: root may write a
    0444 file, nobody may write on a read-only mount.)
    """
    if not os.access(path, os.W_OK):
        return "the file is not writable"
    sidecars = (Path(f"{path}-wal"), Path(f"{path}-shm"))
    if not os.access(path.parent, os.W_OK) and not all(os.access(p, os.W_OK) for p in sidecars):
        return "its folder is not writable, and SQLite needs to create the -wal and -shm files there"
    return None


def _sqlite_cause(exc: BaseException) -> sqlite3.Error | None:
    """The SQLite error behind `exc`: itself, or the cause a `BlipError` was raised from."""
    for candidate in (exc, exc.__cause__):
        if isinstance(candidate, sqlite3.Error):
            return candidate
    return None


def _refused_write(exc: BaseException) -> bool:
    """Whether SQLite failed because it may not write (or create) the database, its folder or its -wal/-shm."""
    cause = _sqlite_cause(exc)
    name = str(getattr(cause, "sqlite_errorname", "") or "")
    return name.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM"))


def _maps_db_errors(method: Callable[_P, _R]) -> Callable[_P, _R]:
    """Turn any SQLite error raised inside an `ImageIndex` method into a `BlipError` that says what to do.

    A damaged or foreign file gives `IndexDamaged`, a busy one `IndexBusy`, a write to a read-only one
    `IndexReadOnly`, an unreadable or full one a plain `BlipError`.
    """

    @functools.wraps(method)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return method(*args, **kwargs)
        except sqlite3.Error as exc:
            raise _db_failure(getattr(args[0], "path", Path("?")), exc) from exc

    return wrapper


def _unchanged(row: sqlite3.Row | None, st: os.stat_result) -> bool:
    """Whether a file's stat matches its row: size, mtime, and ctime (a file replaced by one of the same size and
    mtime, by `cp -p`, `rsync -t`, a restore or an app that keeps timestamps, has a new ctime, which no tool can set
    back). A row without a ctime (written by an older blip-tools) does not match: the file is hashed once."""
    return (
        row is not None
        and row["size"] == st.st_size
        and row["mtime_ns"] == st.st_mtime_ns
        and row["ctime_ns"] == st.st_ctime_ns
    )


def folder_without_nul(path: str | None) -> str | None:
    """A tool's folder argument, refused (ValueError, for a pydantic validator) when it holds a NUL character.

    The OS cannot take one, so the interfaces refuse it in their argument schemas, naming the argument;
    `ImageIndex` itself refuses it too (`InvalidInput`), for callers that bypass a schema.
    """
    if path is not None and "\x00" in path:
        raise ValueError("a folder path cannot contain a NUL character")
    return path


def _check_top_k(top_k: object) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or int(top_k) < 1:
        raise InvalidInput(f"top_k must be an integer >= 1, got {top_k!r}")
    return int(top_k)


def _refused_by_setting(exc: InvalidImage) -> bool:
    """Whether a setting refused the file (`allowed_dirs`, `max_image_bytes`, `max_image_pixels`), not its content.

    Such a failure is not remembered: the file is tried again next run, so widening the setting is enough.
    """
    return isinstance(exc, (PathNotAllowed, PayloadTooLarge, ImageTooLarge))


def _short(exc: BaseException) -> str:
    return str(exc)[:500] or type(exc).__name__


class _DeferredProgress:
    """Calls the user's progress callback; an exception from it stops the run after the current chunk is saved."""

    def __init__(self, fn: ProgressFn | None, total: int) -> None:
        self.fn = fn
        self.total = total
        self.last = -1
        self.error: BaseException | None = None

    def __call__(self, done: int) -> None:
        if self.fn is None or self.error is not None or done <= self.last:
            return
        self.last = done
        try:
            self.fn(done, self.total)
        except BaseException as exc:  # re-raised once the chunk is committed
            self.error = exc


_SHARED_LOCK = threading.Lock()
"""Guards `Blip2Service._image_index`, where `for_service` keeps each service's index."""


# ---------------------------------------------------------------------------------------------- the index


class ImageIndex:
    """A persistent image index over `Blip2Service` embeddings: index folders, search by text or image.

    Args:
        path: the SQLite file (created with its folder). Default: `settings.resolved_index_path()`
            (`BLIP_INDEX_PATH`, else `~/.cache/blip-tools/index.sqlite`).
        service: the model service (default `Blip2Service.shared()`). Its settings' `allowed_dirs` apply to
            every directory indexed or searched and every file read.

    A file this process may not write (read-only permissions or mount, or a folder where SQLite cannot create
    the `-wal`/`-shm` files) is opened read-only (`read_only`): searching, listing and stats work; indexing
    raises `IndexReadOnly`.

    Thread-safe: each thread gets its own connection; index runs are serialised; searches run concurrently.
    """

    @_maps_db_errors
    def __init__(self, path: str | Path | None = None, *, service: Blip2Service | None = None) -> None:
        if service is None:
            from .service import Blip2Service

            service = Blip2Service.shared()
        from .remote import RemoteService

        if isinstance(service, RemoteService) and not service.started:
            service.start()  # the daemon's checkpoint names, so rows are tagged with the model that made them
        self.service = service
        self.settings = service.settings
        # A daemon names its checkpoints as paths on its own machine: those are not resolved here.
        remote = isinstance(service, RemoteService)
        self.retrieval_model = self.settings.retrieval_model if remote else model_key(self.settings.retrieval_model)
        """The name this index records its vectors under (a local checkpoint folder as its real path)."""
        self._caption_model = self.settings.model if remote else model_key(self.settings.model)
        self._runtime = None if remote else service.runtime
        """Where the fingerprint of the retrieval weights comes from (None: a daemon's, which records none)."""
        self.path = Path(path).expanduser() if path is not None else self.settings.resolved_index_path()
        self._local = threading.local()
        self._connections: list[tuple[threading.Thread, sqlite3.Connection]] = []
        """Every open connection with the thread it belongs to; a thread that ended has its connection closed."""
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()
        self._matrix: _Matrix | None = None
        self._closed = False
        self.read_only = False
        """True when this process may not write the file: searches work, `index` raises `IndexReadOnly`."""
        self._read_only_why = ""
        self._uri: str | None = None
        """The `file:` URI read-only connections open (None: connections open the path read-write)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BlipError(f"Cannot create the folder for the image index {self.path}: {exc}") from exc
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    def _open(self) -> None:
        """Open the file read-write (creating the tables), or read-only when this process may not write it."""
        why = _read_only_reason(self.path) if self.path.is_file() else None
        if why is None:
            try:
                self._open_schema()
                return
            except (sqlite3.Error, BlipError) as exc:
                # Permissions `os.access` did not foresee (an ACL, a network file system): read it if we can.
                if not (self.path.is_file() and _refused_write(exc)):
                    raise
                why = f"SQLite may not write it: {_sqlite_cause(exc)}"
                self._drop_connections()
        self.read_only = True
        self._read_only_why = why
        base = Path(os.path.abspath(self.path)).as_uri() + "?mode=ro"
        wal = Path(f"{self.path}-wal")
        if wal.exists():
            # A writer may have changes in the -wal file: read them through SQLite's shared memory (-shm file).
            self._uri = base
            try:
                self._open_schema()
                return
            except (sqlite3.Error, BlipError) as exc:
                if not _refused_write(exc):
                    raise
                if wal.stat().st_size > 0:  # SQLite cannot create the -shm file there, and needs it to read these
                    raise IndexReadOnly(
                        f"The image index {self.path} is read-only ({why}) and its -wal file holds changes that "
                        "SQLite cannot read without creating a -shm file there. Copy the index with its -wal file to "
                        "a writable folder and point BLIP_INDEX_PATH (--index) at the copy."
                    ) from exc
                self._drop_connections()
        # No changes outside the file itself: read it as immutable, so SQLite creates no -wal and -shm files (it
        # cannot in a read-only folder, and in a shared one would leave them behind, owned by this user, in the
        # way of the index's owner) and takes no locks. `_follow_writer` switches when a writer comes.
        self._uri = base + _IMMUTABLE
        self._open_schema()
        logger.info("the image index %s is read-only (%s): opened as immutable", self.path, why)

    def _follow_writer(self) -> None:
        """Keep a read-only index's view current: read through SQLite's -wal and -shm files while they exist.

        An immutable read sees only the database file: once another process (the index's owner) writes, its
        changes sit in the -wal file, and its checkpoints rewrite the file under an immutable reader. So while both
        files exist, connections read through them (`mode=ro`); once the -wal file is gone, immutable again. Each
        thread reopens its connection at its next `_conn()`.
        """
        if self._uri is None:
            return
        base = self._uri.removesuffix(_IMMUTABLE)
        wal, shm = Path(f"{self.path}-wal"), Path(f"{self.path}-shm")
        if not wal.exists():
            self._uri = base + _IMMUTABLE
        elif shm.exists():
            self._uri = base

    def _open_schema(self) -> None:
        """Create the tables if new (read-write only); refuse a file that is not a blip-tools index of this version."""
        conn = self._conn()
        if not self.read_only:
            with self._write(conn):
                # Statement by statement: executescript() would commit outside our transaction.
                for statement in filter(None, (s.strip() for s in _SCHEMA.split(";"))):
                    conn.execute(statement)
                have = {row[1] for row in conn.execute("PRAGMA table_info(images)")}
                for name, kind in _ADDED_COLUMNS.items():
                    if name not in have:  # a file an older blip-tools made: its rows get NULL
                        conn.execute(f"ALTER TABLE images ADD COLUMN {name} {kind}")
                conn.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
                )
        missing = _COLUMNS - {row[1] for row in conn.execute("PRAGMA table_info(images)")}
        if missing:
            raise _damaged(self.path, f"its images table lacks the columns {', '.join(sorted(missing))}")
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        if row is None:
            raise _damaged(self.path, "it records no schema version")
        version = row[0]
        if not isinstance(version, str) or not version.isdigit():
            raise _damaged(self.path, f"schema version {version!r} is not a number")
        if int(version) != SCHEMA_VERSION:
            raise IndexDamaged(
                f"The image index {self.path} has schema version {version}; this blip-tools expects "
                f"{SCHEMA_VERSION}. Point BLIP_INDEX_PATH at a new file or delete this one to rebuild it."
            )

    @classmethod
    def for_service(cls, service: Blip2Service | None = None) -> ImageIndex:
        """The index at the service's default path (`BLIP_INDEX_PATH`), one per service, shared by the interfaces."""
        if service is None:
            from .service import Blip2Service

            service = Blip2Service.shared()
        # Kept on the service, not in a map keyed by it: the index holds its service, so a WeakKeyDictionary entry
        # would keep a dropped private service (and its model) alive for good; this cycle the collector frees.
        with _SHARED_LOCK:
            index = service._image_index
            if index is None or index._closed:
                index = service._image_index = cls(service=service)
            return index

    # ------------------------------------------------------------------ connections and transactions
    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise BlipError(f"The image index {self.path} is closed; open a new ImageIndex.")
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None and getattr(self._local, "uri", None) != self._uri:
            # A read-only index switched how it reads (`_follow_writer`): this thread's connection reopens.
            with self._lock:
                self._connections = [(t, c) for t, c in self._connections if c is not conn]
            with contextlib.suppress(sqlite3.Error):
                conn.close()
            conn = None
        if conn is None:
            try:
                if self._uri is None:
                    conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
                else:
                    conn = sqlite3.connect(
                        self._uri, timeout=30.0, isolation_level=None, check_same_thread=False, uri=True
                    )
            except sqlite3.Error as exc:
                raise _db_failure(self.path, exc) from exc
            try:
                conn.row_factory = sqlite3.Row
                conn.text_factory = _read_text
                if self._uri is None:  # a read-only connection reads the file in whatever mode it was left
                    conn.execute("PRAGMA journal_mode=WAL")
                    conn.execute("PRAGMA synchronous=NORMAL")
                conn.execute(f"PRAGMA busy_timeout={int(_BUSY_TIMEOUT_S * 1000)}")
            except sqlite3.Error as exc:
                conn.close()
                raise _db_failure(self.path, exc) from exc
            self._local.conn = conn
            self._local.uri = self._uri
            with self._lock:
                # Threads come and go (asyncio.run's executors, short-lived workers): close the connections of
                # those that ended, so an index searched from many threads does not hold a file per thread.
                ended = [c for thread, c in self._connections if not thread.is_alive()]
                self._connections = [(t, c) for t, c in self._connections if t.is_alive()]
                self._connections.append((threading.current_thread(), conn))
            for old in ended:
                with contextlib.suppress(sqlite3.Error):
                    old.close()
        return conn

    @contextlib.contextmanager
    def _write(self, conn: sqlite3.Connection) -> Iterator[None]:
        """One write transaction that bumps the generation counter, so searchers reload their vectors."""
        if self.read_only:
            raise _read_only(self.path, self._read_only_why)
        try:
            try:
                # Inside the `try` that rolls back: a Ctrl-C pressed while this waits for another writer (up to 30 s)
                # is raised as it returns, with the transaction begun, which would hold the write lock for good.
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise _db_failure(self.path, exc) from exc
            yield
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('generation', '1') "
                "ON CONFLICT(key) DO UPDATE SET value = CAST(value AS INTEGER) + 1"
            )
            conn.execute("COMMIT")
        except BaseException:
            # Not `contextlib.suppress`: its `__enter__` is a Python call, where a second Ctrl-C would land first.
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:  # keep the original error (a damaged file, or a closed connection, refuses both)
                pass
            raise

    def _drop_connections(self) -> None:
        """Close every connection; the next `_conn()` opens a new one (with the current `_uri`)."""
        with self._lock:
            for _, conn in self._connections:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
            self._connections.clear()
            self._local = threading.local()
            self._matrix = None

    def close(self) -> None:
        """Close every connection this object opened (the file stays)."""
        self._closed = True
        self._drop_connections()

    def __enter__(self) -> ImageIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ paths
    def _resolve_dir(self, directory: str | Path) -> str:
        """The real path of a directory that exists and lies inside `allowed_dirs`."""
        if not isinstance(directory, (str, Path)) or not str(directory).strip():
            raise InvalidInput("directory must be a non-empty path to a folder of images")
        try:
            os.fsencode(directory)  # a NUL, or a lone surrogate no file name can hold (non-UTF-8 names round-trip)
            raw = Path(directory).expanduser()
            real = Path(os.path.realpath(raw))
        except (ValueError, UnicodeError, RuntimeError) as exc:  # RuntimeError: `~user` of no such user
            raise InvalidInput(
                f"directory is not a usable path ({type(exc).__name__}: {exc}); pass the folder that holds the images."
            ) from exc
        _check_allowed(real, self.settings, str(directory))
        if not real.is_dir():
            raise InvalidInput(f"{directory} is not a directory; pass the folder that holds the images.")
        return str(real)

    def _allowed_ranges(self, directory: str | None) -> list[tuple[str, str]] | None:
        """Path ranges a search may return: the folder filter and/or the allowed dirs (None: everything)."""
        ranges: list[tuple[str, str]] = []
        if directory is not None:
            ranges.append(_dir_range(directory))
        elif self.settings.allowed_dirs:
            ranges.extend(_dir_range(os.path.realpath(d)) for d in self.settings.allowed_dirs)
        return ranges or None

    def _scan(self, directory: str, recursive: bool) -> tuple[dict[str, os.stat_result], dict[str, str]]:
        """Image files under `directory` (hidden names skipped, directory symlinks not followed).

        Returns the files found and the folders or files that could not be listed or stat'ed, with why: what
        they hold is unknown this run, so their rows are kept, not removed as deleted.

        Raises:
            InvalidInput: `directory` itself cannot be listed.
        """
        found: dict[str, os.stat_result] = {}
        unreadable: dict[str, str] = {}
        stack = [directory]
        while stack:
            current = stack.pop()
            try:
                entries = list(os.scandir(current))
            except OSError as exc:
                if current == directory:
                    raise InvalidInput(
                        f"Cannot list the folder {_display(directory)}: {exc.strerror or exc}. Check its permissions."
                    ) from exc
                logger.warning("cannot list %r: %s", current, exc)
                unreadable[current] = f"cannot list this folder ({exc.strerror or exc}); its indexed images are kept"
                continue
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if recursive:
                            stack.append(entry.path)
                    elif Path(entry.name).suffix.lower() in INDEXED_EXTENSIONS and entry.is_file():
                        found[entry.path] = entry.stat()
                except OSError as exc:
                    logger.warning("cannot stat %r: %s", entry.path, exc)
                    unreadable[entry.path] = f"cannot stat this file ({exc.strerror or exc}); its index entry is kept"
        return found, unreadable

    # ------------------------------------------------------------------ indexing
    @_maps_db_errors
    def index(
        self,
        directory: str | Path,
        *,
        recursive: bool = True,
        captions: bool = True,
        on_progress: ProgressFn | None = None,
        stop: threading.Event | None = None,
        chunk_size: int | None = None,
    ) -> IndexReport:
        """Bring the index of `directory` up to date: embed new and changed images, drop deleted ones.

        Args:
            directory: folder to index (must lie inside `allowed_dirs` when that is set).
            recursive: include subfolders (hidden files and folders are skipped; folder symlinks not followed).
            captions: also caption each image (slower: one generation per image); captions are shown in search
                results. Images indexed without a caption get one on a later run with `captions=True`.
            on_progress: `on_progress(done, total)` over the files that need work. If it raises, the run stops
                after the current chunk is saved and the exception propagates; the next run resumes.
            stop: set this event to stop after the current chunk (the report says `complete=False`).
            chunk_size: files per committed chunk (default 4 × `max_batch_size`).
        """
        began = time.monotonic()
        if self.read_only:
            raise _read_only(self.path, self._read_only_why)
        root = self._resolve_dir(directory)
        chunk = max(1, chunk_size if chunk_size is not None else 4 * self.settings.max_batch_size)
        model = self.retrieval_model
        with self._run_lock:
            conn = self._conn()
            if not self._weights_current(conn, claimed=True):
                with self._write(conn):
                    self._claim_weights(conn)
            found, unreadable = self._scan(root, recursive)
            lo, hi = _dir_range(root)
            rows = {
                row["path"]: row
                for row in conn.execute(
                    "SELECT path, dir, size, mtime_ns, ctime_ns, file_sha256, model, embedding IS NOT NULL AS has_vec, "
                    "caption IS NOT NULL AS has_caption, caption_model, error FROM images "
                    "WHERE path >= CAST(? AS TEXT) AND path < CAST(? AS TEXT)",
                    (_db_text(lo), _db_text(hi)),
                )
                if recursive or row["dir"] == root
            }
            # Rows of vanished files are removed after the new files are done: a renamed or moved file
            # finds its old row by hash and reuses its vectors and caption.
            hidden = [_dir_range(p)[0] for p in unreadable]  # whatever is under these is unknown, not gone
            gone = [p for p in rows if p not in found and p not in unreadable and not p.startswith(tuple(hidden))]
            report = IndexReport(
                directory=root,
                index_path=str(self.path),
                scanned=len(found),
                embedded=0,
                captioned=0,
                reused=0,
                unchanged=0,
                removed=len(gone),
                failed=0,
                indexed=0,
                complete=True,
                elapsed_s=0.0,
            )
            for path, why in list(unreadable.items())[:_MAX_REPORTED_ERRORS]:
                report.errors.append(IndexFailure(path=path, error=why))
            todo: list[_Todo] = []
            for path in sorted(found):
                st = found[path]
                row = rows.get(path)
                same_stat = _unchanged(row, st)
                if same_stat and row is not None and row["error"] is not None:
                    report.failed += 1  # unchanged file that failed before: not retried until it changes
                elif same_stat and row is not None and row["has_vec"] and row["model"] == model:
                    if captions and (not row["has_caption"] or row["caption_model"] != self._caption_model):
                        todo.append(_Todo(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, row, caption_only=True))
                    else:
                        report.unchanged += 1
                else:
                    todo.append(_Todo(path, st.st_size, st.st_mtime_ns, st.st_ctime_ns, row))
            progress = _DeferredProgress(on_progress, len(todo))
            done = 0
            dims_checked: set[int] = set()
            progress(0)
            for start in range(0, len(todo), chunk):
                if stop is not None and stop.is_set():
                    report.complete = False
                    break
                part = todo[start : start + chunk]
                self._index_chunk(conn, root, part, captions, report, progress, done, dims_checked)
                done += len(part)
                progress(done)
                if progress.error is not None:
                    report.complete = False
                    break
            if gone:
                with self._write(conn):
                    conn.executemany("DELETE FROM images WHERE path = CAST(? AS TEXT)", [(_db_text(p),) for p in gone])
            report.indexed = int(
                conn.execute(
                    "SELECT COUNT(*) FROM images WHERE path >= CAST(? AS TEXT) AND path < CAST(? AS TEXT) "
                    "AND embedding IS NOT NULL AND model = ?" + ("" if recursive else " AND dir = CAST(? AS TEXT)"),
                    (_db_text(lo), _db_text(hi), model)
                    if recursive
                    else (_db_text(lo), _db_text(hi), model, _db_text(root)),
                ).fetchone()[0]
            )
            report.elapsed_s = round(time.monotonic() - began, 3)
            logger.info("%s", report.summary())
            if progress.error is not None:
                raise progress.error
            return report

    def _index_chunk(
        self,
        conn: sqlite3.Connection,
        root: str,
        part: list[_Todo],
        captions: bool,
        report: IndexReport,
        progress: _DeferredProgress,
        done_before: int,
        dims_checked: set[int],
    ) -> None:
        """Hash, reuse or embed, optionally caption, then commit one chunk of files.

        Each file is read once, for its hash; the model gets those bytes, not the path, so it reads nothing again
        (unless the service is a daemon's client that must send paths). Files that are only captioned (their
        vectors are current) are not hashed: the caption reads them once.
        """
        model = self.retrieval_model
        now = time.time()
        writes: dict[str, dict[str, Any]] = {}
        to_embed: list[_Todo] = []
        to_caption: list[str] = []
        pending: dict[str, _Todo] = {}
        aliases: list[tuple[_Todo, _Todo]] = []
        copied: list[str] = []  # files given the vectors of an identical file indexed before (by the weights then)
        # The bytes read for hashing, of the files the model still has to see; dropped with the chunk.
        encoded: dict[str, bytes] = {}
        keep_bytes = not _sends_paths(self.service)

        def hold(path: str, data: bytes) -> None:
            if keep_bytes:
                encoded[path] = data

        def model_input(path: str) -> bytes | Path:
            data = encoded.get(path)
            return Path(path) if data is None else data

        def fail(item: _Todo, message: str, *, refused: bool = False) -> None:
            report.failed += 1
            if len(report.errors) < _MAX_REPORTED_ERRORS:
                report.errors.append(IndexFailure(path=item.path, error=message))
            writes[item.path] = {"error": message, "embedding": None, "query_vectors": None, "file_sha256": None}
            if refused:  # a setting or the system refused the file, not its content (here or a daemon's): retry
                writes[item.path]["mtime_ns"] = -1  # matches no file's mtime

        for item in part:
            if item.caption_only:
                to_caption.append(item.path)
                continue
            try:
                data = _read_checked(item.path, self.settings)
            except InvalidImage as exc:  # outside the allowed dirs, too large, unreadable: as load_image says
                # The system could not read it (permissions, an I/O error): fixing that changes no size or mtime.
                unreadable = isinstance(exc.__cause__, OSError)  # `_read_file` does no decoding: never the content
                fail(item, _short(exc), refused=_refused_by_setting(exc) or unreadable)
                continue
            digest = hashlib.sha256(data).hexdigest()
            if (
                item.row is not None
                and item.row["file_sha256"] == digest
                and item.row["has_vec"]
                and item.row["model"] == model
            ):
                # Touched (new mtime) but the same bytes: keep the vectors.
                writes[item.path] = {"file_sha256": digest}
                report.reused += 1
                if captions and (not item.row["has_caption"] or item.row["caption_model"] != self._caption_model):
                    to_caption.append(item.path)
                    hold(item.path, data)
                continue
            twin = conn.execute(
                "SELECT pixel_sha256, width, height, dim, embedding, query_vectors, caption, caption_confidence, "
                "caption_model FROM images WHERE file_sha256 = ? AND model = ? AND embedding IS NOT NULL LIMIT 1",
                (digest, model),
            ).fetchone()
            if twin is not None:
                writes[item.path] = {**dict(twin), "file_sha256": digest, "model": model, "error": None}
                copied.append(item.path)
                report.reused += 1
                if captions and (twin["caption"] is None or twin["caption_model"] != self._caption_model):
                    to_caption.append(item.path)
                    hold(item.path, data)
                continue
            first = pending.get(digest)
            if first is not None:  # the same bytes earlier in this chunk: copy its vectors once they exist
                aliases.append((item, first))
                continue
            pending[digest] = item
            writes[item.path] = {"file_sha256": digest}
            to_embed.append(item)
            hold(item.path, data)

        if to_embed:
            last_stage_is_embed = not captions
            results = self.service.embed_images(
                [model_input(item.path) for item in to_embed],
                include_query_vectors=True,
                return_exceptions=True,
                on_progress=(lambda d, _t: progress(done_before + d)) if last_stage_is_embed else None,
            )
            for item, result in zip(to_embed, results, strict=True):
                if isinstance(result, InvalidImage):  # this file's fault: remembered until the file changes
                    message = _file_error(result, item.path, encoded.pop(item.path, None))
                    fail(item, message, refused=_refused_by_setting(result))
                    continue
                if isinstance(result, BlipError):  # the model or service failed: stop; finished chunks are kept
                    raise result
                assert isinstance(result, EmbeddingResult)
                if len(result.vector) not in dims_checked:  # once per run: it scans the table
                    self._check_dim(conn, len(result.vector))
                    dims_checked.add(len(result.vector))
                writes[item.path].update(self._embedding_columns(result))
                report.embedded += 1
                if captions:
                    to_caption.append(item.path)

        if to_caption:
            offset = done_before + len(part) - len(to_caption)
            captioned = self.service.caption_batch(
                [model_input(p) for p in to_caption],
                return_exceptions=True,
                on_progress=lambda d, _t: progress(offset + d),
            )
            for path, outcome in zip(to_caption, captioned, strict=True):
                if isinstance(outcome, BlipError) and not isinstance(outcome, InvalidImage):
                    raise outcome
                if isinstance(outcome, BlipError):
                    if len(report.errors) < _MAX_REPORTED_ERRORS:
                        message = _file_error(outcome, path, encoded.get(path))
                        report.errors.append(IndexFailure(path=path, error=f"caption failed: {message}"))
                    continue
                assert isinstance(outcome, CaptionResult)
                writes.setdefault(path, {}).update(
                    caption=outcome.caption,
                    caption_confidence=float(outcome.captions[0].confidence),
                    caption_model=self._caption_model,
                )
                report.captioned += 1

        for item, first in aliases:
            source = writes.get(first.path, {})
            if source.get("embedding") is None:
                fail(item, source.get("error") or "the identical file could not be embedded")
                continue
            writes[item.path] = dict(source)
            report.reused += 1

        by_path = {item.path: item for item in part}
        with self._write(conn):
            # Another process with other weights under this name may have run meanwhile, or the model loaded (for
            # this chunk) other weights than its folder held when the run began: vectors copied from a file indexed
            # by the weights recorded before are then those weights', so they are stale too.
            stale = self._claim_weights(conn)
            if stale is not None:
                for path in copied:
                    writes[path]["model"] = stale
            for path, columns in writes.items():
                item = by_path[path]
                self._upsert(conn, root, item, columns, now)

    def _weights(self) -> str | None:
        """The fingerprint of the local retrieval checkpoint that embeds here (None: a hub id or a daemon's model).

        The runtime's: that of the weights it loaded, as their folder was then (however it was rewritten since),
        or, before it loads them, the folder's as it is now. Asked for anew at each use, since the model may load
        (or, not loaded yet, its folder change) while the index is open.
        """
        return self._runtime.retrieval_fingerprint() if self._runtime is not None else None

    def _weights_current(self, conn: sqlite3.Connection, *, claimed: bool = False) -> bool:
        """False when the vectors under this model's name were made by other weights (its folder was replaced).

        With `claimed`, also False when no fingerprint is recorded yet (an index run then records it).
        An index made before fingerprints were recorded has none: its vectors count as this model's.
        """
        weights = self._weights()
        if weights is None:
            return True
        recorded = self._recorded_weights(conn)
        return recorded == weights if recorded is not None else not claimed

    def _recorded_weights(self, conn: sqlite3.Connection) -> str | None:
        """The fingerprint recorded for this model's name (None: none yet)."""
        row = conn.execute(
            "SELECT value FROM meta WHERE key = CAST(? AS TEXT)", (_db_text(_WEIGHTS_KEY + self.retrieval_model),)
        ).fetchone()
        return None if row is None else str(row[0])

    def _claim_weights(self, conn: sqlite3.Connection) -> str | None:
        """Inside a write: record this model's fingerprint; vectors of other weights under its name become stale.

        They are relabelled as another model's, so they take the path of a model change: search leaves them out,
        `stats().stale` counts them, an index run re-embeds them (and neither reuses them for an identical file).
        Returns the name they were relabelled with (None: nothing was).
        """
        weights = self._weights()
        if weights is None:
            return None
        recorded = self._recorded_weights(conn)
        if recorded == weights:
            return None
        stale = None
        if recorded is not None:
            logger.info("the checkpoint %r was replaced: its images will be embedded again", self.retrieval_model)
            stale = f"{self.retrieval_model} (weights {recorded[:16]})"
            conn.execute(
                "UPDATE images SET model = CAST(? AS TEXT) WHERE model = CAST(? AS TEXT)",
                (_db_text(stale), _db_text(self.retrieval_model)),
            )
        conn.execute(
            "INSERT INTO meta (key, value) VALUES (CAST(? AS TEXT), ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (_db_text(_WEIGHTS_KEY + self.retrieval_model), weights),
        )
        return stale

    def _current_model(self, conn: sqlite3.Connection) -> str | None:
        """The model name whose vectors search uses: None (no row) when they were made by replaced weights."""
        return self.retrieval_model if self._weights_current(conn) else None

    def _check_dim(self, conn: sqlite3.Connection, dim: int) -> None:
        """Refuse vectors whose size differs from those already stored under the same model name.

        Raises:
            IndexDamaged: the checkpoint under this name was replaced by another model; its old vectors cannot be
                told apart from new ones, so the index must be rebuilt (mixing them would make every search fail).
        """
        row = conn.execute(
            "SELECT dim FROM images WHERE model = ? AND embedding IS NOT NULL AND dim != ? LIMIT 1",
            (self.retrieval_model, dim),
        ).fetchone()
        if row is not None:
            raise self._model_changed(row["dim"], dim)

    def _model_changed(self, stored: object, dim: int) -> IndexDamaged:
        return IndexDamaged(
            f"The image index {self.path} holds {stored}-dimensional vectors of the retrieval model "
            f"{_display(self.retrieval_model)}, which now gives {dim}-dimensional ones: the checkpoint under that name "
            "was replaced by another model. Delete the index (with its -wal and -shm files) or point BLIP_INDEX_PATH "
            "(--index) at a new file, then index your folders again to rebuild it."
        )

    def _embedding_columns(self, result: EmbeddingResult) -> dict[str, Any]:
        vector = np.asarray(result.vector, dtype=np.float32)
        query = np.asarray(result.query_vectors or [result.vector], dtype=np.float16)
        info = result.image
        return {
            "pixel_sha256": info.sha256 if info else None,
            "width": info.width if info else None,
            "height": info.height if info else None,
            "model": self.retrieval_model,
            "dim": int(vector.shape[0]),
            "embedding": vector.tobytes(),
            "query_vectors": query.tobytes(),
            "error": None,
            # A new embedding means new content: an old caption no longer applies.
            "caption": None,
            "caption_confidence": None,
            "caption_model": None,
        }

    @staticmethod
    def _upsert(conn: sqlite3.Connection, root: str, item: _Todo, columns: dict[str, Any], now: float) -> None:
        base = {
            "path": item.path,
            "dir": os.path.dirname(item.path),
            "size": item.size,
            "mtime_ns": item.mtime_ns,
            "ctime_ns": item.ctime_ns,
        }
        values = {**base, **columns, "indexed_at": now}
        names = list(values)
        bound = [_db_text(v) if isinstance(v, str) else v for v in values.values()]
        marks = ", ".join(
            "CAST(? AS TEXT)" if isinstance(b, bytes) and isinstance(v, str) else "?"
            for b, v in zip(bound, values.values(), strict=True)
        )
        updates = ", ".join(f"{n} = excluded.{n}" for n in names if n != "path")
        conn.execute(
            f"INSERT INTO images ({', '.join(names)}) VALUES ({marks}) ON CONFLICT(path) DO UPDATE SET {updates}",
            bound,
        )

    async def aindex(
        self,
        directory: str | Path,
        *,
        recursive: bool = True,
        captions: bool = True,
        on_progress: ProgressFn | None = None,
        chunk_size: int | None = None,
    ) -> IndexReport:
        """Async `index`: runs in a thread; `on_progress` may be a coroutine function (e.g. MCP progress).

        Cancelling the awaiting task stops the run after its current chunk is saved.
        """
        loop = asyncio.get_running_loop()
        stop = threading.Event()
        sent: list[concurrent.futures.Future[Any]] = []

        def relay(done: int, total: int) -> None:
            if on_progress is None:
                return
            if inspect.iscoroutinefunction(on_progress):
                sent.append(asyncio.run_coroutine_threadsafe(on_progress(done, total), loop))
            else:
                loop.call_soon_threadsafe(on_progress, done, total)

        task = asyncio.ensure_future(
            asyncio.to_thread(
                self.index,
                directory,
                recursive=recursive,
                captions=captions,
                on_progress=relay,
                stop=stop,
                chunk_size=chunk_size,
            )
        )
        try:
            report = await asyncio.shield(task)
        except asyncio.CancelledError:
            stop.set()
            raise
        # Deliver every progress notification before the result (clients drop progress after the response).
        for outcome in await asyncio.gather(*(asyncio.wrap_future(f) for f in sent), return_exceptions=True):
            if isinstance(outcome, BaseException):
                logger.warning("progress callback failed: %s", outcome)
        return report

    # ------------------------------------------------------------------ search
    def _load_matrix(self) -> _Matrix:
        """The cached vectors, reloaded when another write (from any connection) bumped the generation."""
        self._follow_writer()
        conn = self._conn()
        # The recorded fingerprint changes only in a write, which bumps the generation; the runtime's changes when
        # it loads the model (or, not loaded yet, when its folder is rewritten), which the model name tells.
        current = self._current_model(conn)
        row = conn.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()
        generation = row[0] if row is not None else "0"
        cached = self._matrix
        if cached is not None and cached.generation == generation and cached.model == current:
            return cached
        rows = conn.execute(
            "SELECT rowid, path, dim, embedding FROM images WHERE embedding IS NOT NULL AND model IS ? ORDER BY path",
            (current,),
        ).fetchall()
        dims = {r["dim"] for r in rows}
        if not all(isinstance(d, int) and d > 0 for d in dims):
            raise _damaged(self.path, f"embedding sizes {sorted(map(repr, dims))} are not positive integers")
        if len(dims) > 1:  # one model gives one size; a re-index would skip these unchanged rows, so rebuild
            raise _damaged(self.path, f"one model's embeddings have the sizes {sorted(dims)}")
        dim = dims.pop() if dims else 0
        for r in rows:
            blob = r["embedding"]
            if not isinstance(blob, bytes) or len(blob) != 4 * dim:
                raise _damaged(self.path, f"the stored embedding of {_display(r['path'])} does not hold {dim} floats")
        vectors = (
            np.frombuffer(b"".join(r["embedding"] for r in rows), dtype=np.float32).reshape(len(rows), dim)
            if rows
            else np.zeros((0, 0), dtype=np.float32)
        )
        matrix = _Matrix(
            generation=generation,
            model=current,
            rowids=np.fromiter((r["rowid"] for r in rows), dtype=np.int64, count=len(rows)),
            paths=[r["path"] for r in rows],
            vectors=vectors,
        )
        self._matrix = matrix
        return matrix

    @staticmethod
    def _candidates(matrix: _Matrix, ranges: list[tuple[str, str]] | None) -> npt.NDArray[np.int64]:
        """Row positions inside the path ranges (contiguous slices of the path-sorted matrix)."""
        if ranges is None:
            return np.arange(len(matrix.paths), dtype=np.int64)
        parts = [
            np.arange(bisect.bisect_left(matrix.paths, lo), bisect.bisect_left(matrix.paths, hi), dtype=np.int64)
            for lo, hi in ranges
        ]
        return np.unique(np.concatenate(parts)) if parts else np.zeros(0, dtype=np.int64)

    @_maps_db_errors
    def search_vector(
        self,
        vector: Sequence[float] | npt.NDArray[np.float32],
        *,
        top_k: int = 10,
        directory: str | Path | None = None,
        text_query: bool = False,
    ) -> tuple[list[SearchHit], int]:
        """Nearest images to a normalised vector in the shared space → (hits, images compared).

        With `text_query`, the pooled vectors pick `max(64, 5 × top_k)` candidates and the exact ITC score
        (max over each image's query-token vectors) ranks them; otherwise the pooled cosine ranks directly.
        """
        top_k = _check_top_k(top_k)
        root = self._resolve_dir(directory) if directory is not None else None
        return self._search_matrix(self._load_matrix(), vector, top_k, root, text_query)

    def _search_matrix(
        self,
        matrix: _Matrix,
        vector: Sequence[float] | npt.NDArray[np.float32],
        top_k: int,
        root: str | None,
        text_query: bool,
    ) -> tuple[list[SearchHit], int]:
        """`search_vector` over vectors already loaded, with checked arguments (`root`: a resolved folder)."""
        positions = self._candidates(matrix, self._allowed_ranges(root))
        if positions.size == 0:
            return [], 0
        query = np.asarray(vector, dtype=np.float32).reshape(-1)
        if query.shape[0] != matrix.vectors.shape[1]:
            raise InvalidInput(
                f"The query vector has {query.shape[0]} dimensions; the index holds {matrix.vectors.shape[1]}."
            )
        contiguous = positions.size == positions[-1] - positions[0] + 1
        block = (
            matrix.vectors[positions[0] : positions[-1] + 1] if contiguous else matrix.vectors[positions]
        )  # a slice is a view: no copy for one folder
        scores = block @ query
        keep = min(positions.size, max(_PREFILTER_MIN, 5 * top_k) if text_query else top_k)
        best = np.argpartition(-scores, keep - 1)[:keep] if keep < positions.size else np.arange(positions.size)
        chosen = positions[best]
        scored: dict[int, float] = dict(zip(matrix.rowids[chosen].tolist(), scores[best].tolist(), strict=True))
        if text_query:
            scored = self._exact_itc(scored, query)
        ranked = sorted(scored.items(), key=lambda item: -item[1])
        details = self._details([rowid for rowid, _ in ranked])  # small columns only: cheap
        hits: list[SearchHit] = []
        for rowid, score in ranked:
            row = details.get(rowid)
            if row is None:  # removed since the matrix was loaded
                continue
            hits.append(
                SearchHit(
                    path=row["path"],
                    score=float(score),
                    itc=float(score),
                    caption=row["caption"],
                    width=row["width"],
                    height=row["height"],
                )
            )
            if len(hits) == top_k:
                break
        hits.sort(key=lambda h: (-h.score, h.path))
        return hits, int(positions.size)

    def _exact_itc(self, scored: dict[int, float], query: npt.NDArray[np.float32]) -> dict[int, float]:
        """Re-score candidates with the exact ITC (max over each image's stored query-token vectors)."""
        rowids = list(scored)
        blobs: dict[int, bytes] = {}
        conn = self._conn()
        for start in range(0, len(rowids), 500):
            part = rowids[start : start + 500]
            marks = ", ".join("?" for _ in part)
            for row in conn.execute(f"SELECT rowid, query_vectors FROM images WHERE rowid IN ({marks})", part):
                if row["query_vectors"] is not None:
                    blobs[int(row["rowid"])] = row["query_vectors"]
        per_row = {len(b) if isinstance(b, bytes) else -1 for b in blobs.values()}
        if len(per_row) != 1:  # no query vectors stored (or mixed shapes): keep the pooled cosine
            return scored
        length = per_row.pop()
        if length <= 0 or length % (2 * query.shape[0]):
            raise _damaged(
                self.path, f"stored query-token vectors of {length} bytes do not fit dimension {query.shape[0]}"
            )
        ids = list(blobs)
        stacked = np.frombuffer(b"".join(blobs[i] for i in ids), dtype=np.float16).reshape(len(ids), -1, query.shape[0])
        exact = (stacked.astype(np.float32) @ query).max(axis=1).tolist()
        return {**scored, **dict(zip(ids, exact, strict=True))}

    def _details(self, rowids: list[int]) -> dict[int, sqlite3.Row]:
        if not rowids:
            return {}
        columns = "rowid, path, caption, width, height"
        conn = self._conn()
        out: dict[int, sqlite3.Row] = {}
        for start in range(0, len(rowids), 500):
            part = rowids[start : start + 500]
            marks = ", ".join("?" for _ in part)
            for row in conn.execute(f"SELECT {columns} FROM images WHERE rowid IN ({marks})", part):
                out[int(row["rowid"])] = row
        return out

    @_maps_db_errors
    def search(
        self,
        query: str | None = None,
        *,
        image: ImageInput | None = None,
        top_k: int = 10,
        directory: str | Path | None = None,
        rerank: bool = False,
    ) -> SearchResult:
        """Find indexed images by a text (ITC, optional ITM re-rank of the top k) or by an example image.

        Args:
            query: what to look for, e.g. "a dog on a beach". Give this or `image`.
            image: an example image (any form `load_image` takes); returns its nearest neighbours.
            top_k: how many results.
            directory: only images under this folder (inside `allowed_dirs`).
            rerank: re-score the top k with the ITM head (text queries; slower, usually more precise).
        """
        began = time.monotonic()
        if (query is None) == (image is None):
            raise InvalidInput("search needs exactly one of a text query or an example image")
        if query is not None and (not isinstance(query, str) or not query.strip()):
            raise InvalidInput("the search text must be a non-empty string, e.g. 'a dog on a beach'")
        top_k = _check_top_k(top_k)
        root = self._resolve_dir(directory) if directory is not None else None
        if query is not None:
            vector = self.service.embed_texts([query])[0].vector
        else:
            assert image is not None
            first = self.service.embed_images([image])[0]
            assert isinstance(first, EmbeddingResult)
            vector = first.vector
        matrix = self._load_matrix()  # once, after the model is loaded for the query: its weights pick the vectors
        stored = matrix.vectors
        if stored.shape[0] and stored.shape[1] != len(vector):  # not the caller's input: the model changed
            raise self._model_changed(stored.shape[1], len(vector))
        hits, searched = self._search_matrix(matrix, vector, top_k, root, query is not None)
        reranked = False
        if rerank and query is not None and hits:
            hits = self._rerank(query, hits)
            reranked = True
        return SearchResult(
            query=query,
            image=describe_ref(image) if image is not None else None,
            directory=root,
            hits=hits,
            searched=searched,
            reranked=reranked,
            elapsed_ms=round((time.monotonic() - began) * 1000.0, 3),
        )

    def _rerank(self, query: str, hits: list[SearchHit]) -> list[SearchHit]:
        """Score each hit with the ITM head (concurrently, so the service batches them) and sort by it."""

        def one(hit: SearchHit) -> float | None:
            try:
                return self.service.score(Path(hit.path), [query]).scores[0].itm_probability
            except BlipError as exc:  # e.g. the file changed or vanished since it was indexed
                logger.info("re-rank skipped %r: %s", hit.path, exc)
                return None

        with concurrent.futures.ThreadPoolExecutor(max_workers=min(len(hits), 16)) as pool:
            probabilities = list(pool.map(one, hits))
        for hit, p in zip(hits, probabilities, strict=True):
            hit.itm_probability = p
            hit.score = p if p is not None else -1.0
        return sorted(hits, key=lambda h: (-h.score, h.path))

    async def asearch(
        self,
        query: str | None = None,
        *,
        image: ImageInput | None = None,
        top_k: int = 10,
        directory: str | Path | None = None,
        rerank: bool = False,
    ) -> SearchResult:
        """Async `search` (runs in a thread; the model calls go through the shared batcher)."""
        return await asyncio.to_thread(self.search, query, image=image, top_k=top_k, directory=directory, rerank=rerank)

    # ------------------------------------------------------------------ near-duplicates and stats
    @_maps_db_errors
    def duplicates(
        self, *, threshold: float = 0.95, directory: str | Path | None = None, block: int = 2048
    ) -> list[DuplicateGroup]:
        """Groups of images whose embeddings have cosine similarity >= `threshold` (identical pixels always group).

        Brute force in blocks of rows (O(n²) dot products, O(block × n) memory): fine up to tens of thousands.
        """
        if not -1.0 <= threshold <= 1.0:
            raise InvalidInput(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
        root = self._resolve_dir(directory) if directory is not None else None
        matrix = self._load_matrix()
        positions = self._candidates(matrix, self._allowed_ranges(root))
        n = int(positions.size)
        if n < 2:
            return []
        vectors = matrix.vectors[positions]
        parent = list(range(n))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        def union(i: int, j: int) -> None:
            ri, rj = find(i), find(j)
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)

        for start in range(0, n, block):
            sims = vectors[start : start + block] @ vectors.T
            rows, cols = np.nonzero(sims >= threshold - 1e-6)
            for r, c in zip(rows.tolist(), cols.tolist(), strict=True):
                if start + r < c:
                    union(start + r, c)
        details = self._pixel_hashes(matrix.rowids[positions].tolist())
        by_hash: dict[str, int] = {}
        for i, rowid in enumerate(matrix.rowids[positions].tolist()):
            digest = details.get(rowid)
            if digest is not None:
                union(i, by_hash.setdefault(digest, i))
        members: dict[int, list[int]] = {}
        for i in range(n):
            members.setdefault(find(i), []).append(i)
        groups: list[DuplicateGroup] = []
        for idx in members.values():
            if len(idx) < 2:
                continue
            sub = vectors[idx] @ vectors[idx].T
            hashes = {details.get(int(matrix.rowids[positions[i]])) for i in idx}
            groups.append(
                DuplicateGroup(
                    paths=sorted(matrix.paths[int(positions[i])] for i in idx),
                    exact=len(hashes) == 1 and None not in hashes,
                    min_similarity=round(float(sub.min()), 6),
                )
            )
        groups.sort(key=lambda g: (-len(g.paths), g.paths[0]))
        return groups

    def _pixel_hashes(self, rowids: list[int]) -> dict[int, str]:
        out: dict[int, str] = {}
        conn = self._conn()
        for start in range(0, len(rowids), 500):
            part = rowids[start : start + 500]
            marks = ", ".join("?" for _ in part)
            for row in conn.execute(f"SELECT rowid, pixel_sha256 FROM images WHERE rowid IN ({marks})", part):
                if row["pixel_sha256"]:
                    out[int(row["rowid"])] = row["pixel_sha256"]
        return out

    @_maps_db_errors
    def stats(self) -> IndexStats:
        """How many images the index holds, captioned, failed and stale."""
        conn = self._conn()
        model = self._current_model(conn)
        row = conn.execute(
            "SELECT SUM(embedding IS NOT NULL AND model IS ?) AS images, "
            "SUM(embedding IS NOT NULL AND model IS ? AND caption IS NOT NULL) AS captioned, "
            "SUM(error IS NOT NULL) AS failed, SUM(embedding IS NOT NULL AND model IS NOT ?) AS stale FROM images",
            (model, model, model),
        ).fetchone()
        size = sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists())
        return IndexStats(
            index_path=str(self.path),
            images=int(row["images"] or 0),
            captioned=int(row["captioned"] or 0),
            failed=int(row["failed"] or 0),
            stale=int(row["stale"] or 0),
            size_bytes=size,
        )

    @_maps_db_errors
    def paths(self, directory: str | Path | None = None) -> list[str]:
        """Paths of the searchable images (optionally under a folder), sorted."""
        root = self._resolve_dir(directory) if directory is not None else None
        matrix = self._load_matrix()
        return [matrix.paths[int(i)] for i in self._candidates(matrix, self._allowed_ranges(root))]


__all__ = [
    "DuplicateGroup",
    "ImageIndex",
    "IndexFailure",
    "IndexReadOnly",
    "IndexReport",
    "IndexStats",
    "SearchHit",
    "SearchResult",
    "folder_without_nul",
]
