"""Crash-safe writes into a run's output folder, and the one place where a failed write becomes `InvalidInput`.

Every file or folder is first written under a temporary name in the folder it belongs in and moved into place
with `os.replace` (atomic within one filesystem) only once complete. A crash, Ctrl-C or full disk mid-write
leaves the previous version as it was, never a half-written one, and the temporary is removed on the way out;
only a hard kill leaves a dot-named temporary behind, which the next write of the same kind removes.

A full disk does not always surface as an `OSError`: `torch.save` raises `RuntimeError("... unexpected pos N
vs M")` and safetensors a `SafetensorError("... No space left on device (os error 28)")`. `writing()` maps
those too, so a full disk ends a run with one actionable line, not a traceback.

Everything written gets the permissions a file created there normally gets (0666, or 0777 for a folder, less the
umask): safetensors writes its file through a private temporary (mode 0600), which would otherwise make the
model unreadable to another user, e.g. the service account that serves it (`normal_modes`).
"""

from __future__ import annotations

import errno
import filecmp
import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ..errors import BlipError, InvalidInput

STAGING_PREFIX = ".export-"
"""The export is staged in `out_dir/.export-XXXX/` and its files are moved into `out_dir` once all are written."""
_CONFIG = "config.json"
"""`from_pretrained` reads it first: a folder without it is no model yet."""
_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json", ".bin", ".bin.index.json")
# torch.save reports a short write as "unexpected pos N vs M" (or "file write failed"): a full disk or quota.
_FULL_HINTS = ("no space left", "os error 28", "disk quota", "os error 122", "unexpected pos", "file write failed")
_IO_HINTS = (*_FULL_HINTS, "os error", "i/o error")
_LOW_SPACE = 16 * 2**20
"""Free bytes below which a non-`OSError` failure of a write is taken for a full disk."""


def _looks_like_io(exc: BaseException, where: Path) -> bool:
    """Whether `exc`, raised while writing under `where`, is a failed write (full disk, I/O error), not a bug."""
    if isinstance(exc, OSError):
        return True
    if isinstance(exc, BlipError) or not isinstance(exc, Exception):
        return False
    if any(hint in str(exc).lower() for hint in _IO_HINTS):
        return True
    return _free_bytes(where) < _LOW_SPACE


def _free_bytes(where: Path) -> int:
    for folder in (where, *where.parents):
        with suppress(OSError):
            return shutil.disk_usage(folder).free
    return 1 << 62


def _disk_full(exc: BaseException, where: Path) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return True
    return any(hint in str(exc).lower() for hint in _FULL_HINTS) or _free_bytes(where) < _LOW_SPACE


def write_error(what: str, where: Path, exc: BaseException, resume: str) -> InvalidInput:
    """The one-line error for a failed write of `what` under `where`: why, and what to do (`resume` says what a
    `--resume` then does)."""
    if _disk_full(exc, where):
        reason, fix = "the disk is full", "Free disk space on that drive"
    else:
        detail = exc.strerror if isinstance(exc, OSError) and exc.strerror else f"{type(exc).__name__}: {exc}"
        filename = getattr(exc, "filename", None)
        reason, fix = " ".join(detail.split())[:200] + (f" ({filename})" if filename else ""), "Fix that"
    return InvalidInput(
        f"Could not write {what} to {where}: {reason}. {fix} and run the same command with --resume (resume=True) "
        f"{resume}, or start again with another output folder (--out)."
    )


@contextmanager
def writing(what: str, where: Path, resume: str) -> Iterator[None]:
    """Map a failed write inside the block to `write_error(...)`; anything else (and Ctrl-C) passes through."""
    try:
        yield
    except Exception as exc:
        if not _looks_like_io(exc, where):
            raise
        raise write_error(what, where, exc, resume) from exc


def replace_text(path: Path, text: str) -> None:
    """Write `text` to `path` through `path.tmp` and `os.replace`: readers see the old file or the new, never half."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())  # a small file: durable before it replaces the old one
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            tmp.unlink()
        raise


@contextmanager
def staged_folder(out_dir: Path) -> Iterator[Path]:
    """A fresh staging folder inside `out_dir`; removed on the way out, whether the block finished or failed.

    Inside, not beside, `out_dir`: it is then on the same filesystem however `out_dir` is mounted (a Docker
    volume, a network share), so `install()` can rename; and it needs no write permission on the parent.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(STAGING_PREFIX + "*"):  # left by a hard kill during an earlier export of this run
        shutil.rmtree(stale, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
    try:
        yield stage
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def normal_modes(folder: Path) -> None:
    """Give every file and folder under `folder` (itself included) the mode a newly created one gets there.

    That mode is found by creating a folder inside `folder` (`os.mkdir(..., 0o777)`, so the umask and any
    default ACL apply) and reading it back, not with `os.umask()`, which sets the process-wide umask to read it
    and so races with threads that create files meanwhile.
    """
    probe = folder / f"{STAGING_PREFIX}mode-{os.getpid()}-{threading.get_ident()}"
    with suppress(OSError):  # left by a hard kill of this very process id and thread: an empty folder
        os.rmdir(probe)
    os.mkdir(probe, 0o777)
    try:
        dir_mode = stat.S_IMODE(os.stat(probe).st_mode)
    finally:
        os.rmdir(probe)
    file_mode = dir_mode & 0o666
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            path = os.path.join(root, name)
            if not os.path.islink(path):
                os.chmod(path, file_mode)
    os.chmod(folder, dir_mode)


def install(stage: Path, out_dir: Path) -> None:
    """Move every file of the complete `stage` into `out_dir` (renames: no data is copied, nothing can fill up).

    A file identical to the one `out_dir` already holds (the configs and tokenizer of an earlier export of the
    same run, which a resume requires to start from the same base) stays as it is, and the weights go last: a
    run exported again then changes its folder with one atomic rename of the weights, so a crash or Ctrl-C
    between two renames cannot leave new weights beside an older config. The first export into a folder moves
    `config.json` last, after the weights: until that one rename the folder holds no `config.json`, so nothing
    takes it for a model while it is half-moved. (Moving one staged folder into place is not an option: `out_dir`
    is the model folder and already holds the run's checkpoints, metrics.json and lock.) Weight files of an
    earlier export that this one did not write (another sharding) are removed afterwards, as `save_pretrained`
    does when it writes over a folder; nothing else in `out_dir` is touched.
    """
    names = {child.name for child in stage.iterdir()}
    first = not (out_dir / _CONFIG).exists()

    def order(name: str) -> tuple[bool, bool, bool, str]:
        return (first and name == _CONFIG, name.endswith(_WEIGHT_SUFFIXES), name.endswith(".index.json"), name)

    for name in sorted(names, key=order):
        source, target = stage / name, out_dir / name
        if not name.endswith(_WEIGHT_SUFFIXES) and _same_file(source, target):
            continue
        if target.is_dir():  # os.replace cannot put anything over a non-empty folder
            shutil.rmtree(target)
        os.replace(source, target)
    for child in out_dir.iterdir():
        stale = child.name not in names and child.name.startswith(("model", "pytorch_model"))
        if stale and child.is_file() and child.name.endswith(_WEIGHT_SUFFIXES):
            child.unlink()


def _same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` are files with the same bytes (small ones: configs, tokenizers)."""
    try:
        return a.is_file() and b.is_file() and filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


__all__ = ["STAGING_PREFIX", "install", "normal_modes", "replace_text", "staged_folder", "write_error", "writing"]
