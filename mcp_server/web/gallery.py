"""The search gallery's server side: the image index the console searches, and thumbnails of indexed files only.

The index is the one the MCP tools use (`ImageIndex.for_service`: the `BLIP_INDEX_PATH` file, one object per
service), opened lazily. A thumbnail is served only for a path the index holds (and `load_image` re-checks
`allowed_dirs` and the size limits), so the thumbnail route cannot be used to read arbitrary files.
"""

from __future__ import annotations

import asyncio
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from pathlib import Path

from blip_tools.errors import InvalidImage, PathNotAllowed
from blip_tools.images import load_image
from blip_tools.index import ImageIndex
from blip_tools.service import Blip2Service

logger = logging.getLogger(__name__)

THUMB_SIDES = (128, 256, 512)
"""Thumbnail sizes the API serves (longest side, pixels)."""

_PATHS_TTL_S = 2.0
"""How long the set of indexed paths is reused before it is read again (writes by this app clear it at once)."""

_THUMB_CACHE_ENTRIES = 512


class Gallery:
    """The console's view of one image index: lazy opening, indexed-path checks and a thumbnail cache."""

    def __init__(self, service: Blip2Service) -> None:
        self.service = service
        self.index_path = service.settings.resolved_index_path()
        self._index: ImageIndex | None = None
        self._lock = threading.Lock()
        self._paths: frozenset[str] = frozenset()
        self._paths_at = -1e9
        self._thumbs: OrderedDict[tuple[str, int, int, int], bytes] = OrderedDict()
        self._thumbs_lock = threading.Lock()

    def index(self) -> ImageIndex:
        """The open index (created on first use, in the caller's thread: call it from a worker thread)."""
        with self._lock:
            if self._index is None:
                self._index = ImageIndex.for_service(self.service)
            return self._index

    def close(self) -> None:
        """Let go of the index (shared with the MCP tools, so it is not closed here) and the thumbnails."""
        with self._lock:
            self._index = None
        with self._thumbs_lock:
            self._thumbs.clear()

    def changed(self) -> None:
        """Forget the cached path set (after an index run from this app)."""
        self._paths_at = -1e9

    def indexed_paths(self) -> frozenset[str]:
        """Paths the index can return (inside `allowed_dirs`), cached for a couple of seconds."""
        now = time.monotonic()
        if now - self._paths_at > _PATHS_TTL_S:
            self._paths = frozenset(self.index().paths())
            self._paths_at = now
        return self._paths

    def check_indexed(self, path: str) -> Path:
        """`path` as a `Path` when the index holds it; `PathNotAllowed` otherwise (no file is touched)."""
        if path not in self.indexed_paths():
            raise PathNotAllowed(
                "The console only serves images from the search index; index their folder first "
                "(blip-tools index DIR, or the gallery's Index button)."
            )
        return Path(path)

    def thumbnail(self, path: str, side: int) -> bytes:
        """A JPEG thumbnail (longest side `side`) of an indexed image, cached by path, size and mtime."""
        real = self.check_indexed(path)
        try:
            st = os.stat(real)
        except OSError as exc:  # allowed, but stale: not a refusal (403) but a missing image, as the service says
            message = f"The indexed file {path} is gone or unreadable ({exc.strerror}); re-index its folder."
            raise InvalidImage(message) from exc
        key = (path, st.st_mtime_ns, st.st_size, side)
        with self._thumbs_lock:
            cached = self._thumbs.get(key)
            if cached is not None:
                self._thumbs.move_to_end(key)
                return cached
        image = load_image(real, self.service.settings).image  # allowed_dirs and limits checked again
        image.thumbnail((side, side))
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=85)
        data = buffer.getvalue()
        with self._thumbs_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > _THUMB_CACHE_ENTRIES:
                self._thumbs.popitem(last=False)
        return data

    async def athumbnail(self, path: str, side: int) -> bytes:
        """Async `thumbnail` (decoding runs in a thread)."""
        return await asyncio.to_thread(self.thumbnail, path, side)


__all__ = ["THUMB_SIDES", "Gallery"]
