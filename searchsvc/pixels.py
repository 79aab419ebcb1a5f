"""Content-addressed store of model-ready pixels, shared by every worker.

At ingest each image is decoded once and its preprocessed pixels (short side resized,
centre-cropped, uint8) are kept here, keyed by content hash and size. The reranker then reads
a few-KB PNG per candidate instead of decoding a full-size original per query.
"""

from __future__ import annotations

import io
import os
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np
from PIL import Image

from searchsvc.errors import ImageError


class PixelStore:
    """``cache_bytes``: decoded pixels of recently read images are kept in memory (LRU, up to
    this many bytes), since popular products come back query after query."""

    def __init__(self, root: Path, *, cache_bytes: int = 256 * 1024 * 1024) -> None:
        self.root = root
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()

    def path_for(self, content_hash: str, size: int) -> Path:
        return self.root / "pixels" / str(size) / content_hash[:2] / f"{content_hash}.png"

    def has(self, content_hash: str, size: int) -> bool:
        return self.path_for(content_hash, size).is_file()

    def put(self, content_hash: str, pixels: np.ndarray) -> Path:
        """Store (S, S, 3) uint8 pixels; a no-op when already stored (same hash, same bytes)."""
        size = pixels.shape[0]
        target = self.path_for(content_hash, size)
        if target.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        # Level 1: these files are written once per image at ingest and read per query;
        # the fastest compression keeps ingest cheap and they stay small.
        Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(buffer.getvalue())
            os.replace(tmp, target)  # atomic: readers never see half a file
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return target

    def get(self, content_hash: str, size: int) -> np.ndarray:
        key = (content_hash, size)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        pixels = self._read(content_hash, size)
        pixels.flags.writeable = False  # shared by every caller of the cache
        with self._lock:
            if key not in self._cache and pixels.nbytes <= self._cache_bytes:
                self._cache[key] = pixels
                self._cached += pixels.nbytes
                while self._cached > self._cache_bytes:
                    _, evicted = self._cache.popitem(last=False)
                    self._cached -= evicted.nbytes
        return pixels

    def _read(self, content_hash: str, size: int) -> np.ndarray:
        path = self.path_for(content_hash, size)
        try:
            with Image.open(path) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
        except FileNotFoundError:
            raise ImageError(path.name, "preprocessed pixels not found (re-run ingest)") from None
        except OSError as exc:
            raise ImageError(str(path), f"unreadable preprocessed pixels ({exc})") from None
        if pixels.shape != (size, size, 3):
            raise ImageError(str(path), f"stored pixels have shape {pixels.shape}")
        return pixels
