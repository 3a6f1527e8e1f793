"""One run at a time per output folder: an advisory lock that a fine-tuning run holds from start to end.

`RunLock.acquire(out)` creates `out` (and its missing parents) and takes an exclusive `flock` on
`out/.finetune.lock` without waiting: a second run into the same folder, started at the same moment or hours
later, fails at once with `InvalidInput` instead of interleaving its checkpoints and export with the first's.
The OS drops a `flock` when the process holding it dies, however it dies (Ctrl-C, the OOM killer, `kill -9`),
so a killed run never blocks the next one: its lock file stays behind and the next run takes it over.

The lock file is a dot-file at the top of the output folder, which is also the model folder: `from_pretrained`,
the service and its weights fingerprint read only the files they know, so it is harmless there while a run
holds it, and `release()` deletes it (still holding the lock; `acquire` checks that the file it locked is still
the one at that path, so a run that opened it just before it was deleted locks the next one instead).

Windows has no `flock`; `msvcrt.locking` locks byte ranges of a file that then cannot be deleted while open,
which is not the same thing: there, runs into one folder are not locked against each other.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import suppress
from pathlib import Path

from ..errors import InvalidInput

try:
    import fcntl
except ImportError:  # Windows: see above
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

LOCK_FILE = ".finetune.lock"
"""Held (flock) by the run writing into the folder; it names the process (`PID HOST`)."""


def busy(folder: Path) -> InvalidInput:
    """The error of a run refused because another one holds `folder`."""
    holder = ""
    with suppress(OSError, ValueError):
        pid, _, host = (folder / LOCK_FILE).read_text(encoding="utf-8").strip().partition(" ")
        if pid.isdigit():
            holder = f" (process {pid}" + (f" on {host}" if host else "") + ")"
    return InvalidInput(
        f"Another fine-tuning run{holder} is using the output folder {folder}: wait for it to end, or choose "
        "another output folder (--out)."
    )


def held_elsewhere(folder: Path) -> bool:
    """Whether a run holds the lock of `folder` now. Opens an existing lock file only: creates nothing."""
    if fcntl is None:
        return False
    try:
        fd = os.open(folder / LOCK_FILE, os.O_RDWR)  # a writable descriptor: NFS locks need one
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released at once by the close below
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


class RunLock:
    """The lock of one output folder, held until `release()`."""

    def __init__(self, folder: Path, fd: int | None, created: list[Path]) -> None:
        self.folder = folder
        self._fd = fd
        self.created = created
        """The folders `acquire` created (the output folder and its missing parents), outermost first."""

    @classmethod
    def acquire(cls, folder: Path) -> RunLock:
        """Create `folder` if needed and lock it; `InvalidInput` (`busy`) at once if another run holds it."""
        created = _make_folders(folder)
        try:
            fd = _lock(folder) if fcntl is not None else None
        except BaseException:
            _remove_empty(created)
            raise
        return cls(folder, fd, created)

    def release(self, *, keep_folder: bool = True) -> None:
        """Delete the lock file and unlock; without `keep_folder`, also remove the folders `acquire` created, if
        they are empty (a run that stopped before writing anything leaves no folder behind)."""
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                path = self.folder / LOCK_FILE
                with suppress(OSError):
                    if _same_file(fd, path):
                        path.unlink()
            finally:  # also on a Ctrl-C: a descriptor taken off `self` but left open keeps the folder locked
                os.close(fd)
        if not keep_folder:
            _remove_empty(self.created)


def _lock(folder: Path) -> int:
    path = folder / LOCK_FILE
    for _ in range(100):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise InvalidInput(f"Cannot write the output folder {folder}: {exc.strerror or exc} ({path}).") from exc
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise busy(folder) from None
            except OSError as exc:  # ENOLCK, EOPNOTSUPP: a filesystem without locks (some network shares)
                logger.warning(
                    "cannot lock %s (%s): another fine-tuning run into %s would not be noticed",
                    path, exc.strerror or exc, folder,
                )  # fmt: skip
                return fd
            if _same_file(fd, path):
                with suppress(OSError):
                    os.ftruncate(fd, 0)
                    os.write(fd, f"{os.getpid()} {socket.gethostname()}\n".encode())
                return fd
        except BaseException:  # busy, or a Ctrl-C: neither the descriptor nor its lock may outlive this call
            os.close(fd)
            raise
        os.close(fd)  # the run that held it deleted it as it ended: lock the file at that path now
    raise InvalidInput(f"Cannot lock the output folder {folder}: {path} keeps being replaced.")


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open `fd` is the file at `path` now (not one deleted or replaced since it was opened)."""
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _make_folders(folder: Path) -> list[Path]:
    """Create `folder` and its missing parents; return the ones this call created, outermost first."""
    missing = []
    current = folder.absolute()
    while not current.exists() and current != current.parent:
        missing.append(current)
        current = current.parent
    created: list[Path] = []
    for path in reversed(missing):
        try:
            os.mkdir(path)
        except FileExistsError:  # made meanwhile by someone else: not ours to remove
            continue
        except OSError as exc:
            _remove_empty(created)
            raise InvalidInput(f"Cannot create the output folder {folder}: {exc.strerror or exc} ({path}).") from exc
        created.append(path)
    return created


def _remove_empty(created: list[Path]) -> None:
    for path in reversed(created):
        try:
            os.rmdir(path)
        except OSError:  # not empty (or gone): keep it and what holds it
            return


__all__ = ["LOCK_FILE", "RunLock", "busy", "held_elsewhere"]
