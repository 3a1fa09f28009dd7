"""Image files of an index, served by id only.

The path comes from the image's metadata (`item`), relative paths against the directory the
service was started in (as `query --show` opens them). It is resolved (symlinks followed) and
served only when it lies under one of the allowed roots; anything else is "not found", so a
crafted id or a symlink cannot reach other files. Thumbnails are made with Pillow once and kept
in a bounded LRU cache; ETags come from the resolved path, size and mtime of the file.
"""
from __future__ import annotations

import hashlib
import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from PIL import Image

from engine.contact_sheet import fit

logger = logging.getLogger(__name__)

THUMB_SIZES = (64, 128, 160, 256, 512)   # the only thumbnail sizes made (bounds the cache keys)
CACHE_BYTES = 64 * 2**20                 # thumbnail cache budget
CACHE_CONTROL = "public, max-age=31536000, immutable"  # URLs carry the index generation


class ImageStore:
    def __init__(self, items: list[str], roots: list[Path], base: Path | None = None,
                 cache_bytes: int = CACHE_BYTES):
        self.items, self.base = items, (base or Path.cwd())
        self.roots = [Path(r).resolve() for r in roots]
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[tuple[int, int], tuple[bytes, str]] = OrderedDict()
        self._cached = 0
        self._lock = threading.Lock()   # handlers run on a thread pool

    def path(self, image_id: int) -> Path | None:
        """The file of image `image_id` if it exists under an allowed root, else None."""
        if not 0 <= image_id < len(self.items):
            return None
        p = Path(self.items[image_id])
        try:
            real = (p if p.is_absolute() else self.base / p).resolve(strict=True)
        except (OSError, RuntimeError):  # missing file, symlink loop
            return None
        if not real.is_file() or not any(real.is_relative_to(r) for r in self.roots):
            logger.debug("image %d: %s is outside the allowed roots", image_id, real)
            return None
        return real

    @staticmethod
    def etag(path: Path, size: int = 0) -> str:
        st = path.stat()
        key = f"{path}:{st.st_size}:{st.st_mtime_ns}:{size}".encode()
        return '"' + hashlib.sha256(key).hexdigest()[:20] + '"'

    def thumbnail(self, image_id: int, path: Path, size: int) -> tuple[bytes, str]:
        """(PNG bytes, ETag) of the image scaled to fit size×size; raises OSError if unreadable."""
        tag = self.etag(path, size)
        with self._lock:
            hit = self._cache.get((image_id, size))
            if hit and hit[1] == tag:
                self._cache.move_to_end((image_id, size))
                return hit
        with Image.open(path) as img:
            img.load()
            small = fit(img.convert("RGB"), size)
        buf = io.BytesIO()
        small.save(buf, "PNG")
        entry = (buf.getvalue(), tag)
        with self._lock:
            old = self._cache.pop((image_id, size), None)
            self._cached += len(entry[0]) - (len(old[0]) if old else 0)
            self._cache[(image_id, size)] = entry
            while self._cached > self.cache_bytes and self._cache:
                _, (data, _) = self._cache.popitem(last=False)
                self._cached -= len(data)
        return entry

    @property
    def cached_bytes(self) -> int:
        return self._cached
