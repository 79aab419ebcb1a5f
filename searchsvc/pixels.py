"""Content-addressed store of model-ready pixels, shared by every worker.

At ingest each image is decoded once and its preprocessed pixels (short side resized,
centre-cropped, uint8) are kept here, keyed by content hash and size. The reranker then reads
a few KB per candidate instead of decoding a full-size original per query.

Files hold the raw pixels (``S * S * 3`` bytes, row-major RGB; the size is in the path):
measured at ingest, encoding PNGs cost more CPU than the embedding itself on a small model,
and on photos PNG saved little space.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

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
        self._folders: set[Path] = set()

    def path_for(self, content_hash: str, size: int) -> Path:
        return self.root / "pixels" / str(size) / content_hash[:2] / f"{content_hash}.rgb"

    def has(self, content_hash: str, size: int) -> bool:
        return self.path_for(content_hash, size).is_file()

    def put(self, content_hash: str, pixels: np.ndarray) -> Path:
        """Store (S, S, 3) uint8 pixels; a no-op when already stored (same hash, same bytes)."""
        size = pixels.shape[0]
        target = self.path_for(content_hash, size)
        if target.is_file():
            return target
        if target.parent not in self._folders:  # one mkdir per folder, not per image
            target.parent.mkdir(parents=True, exist_ok=True)
            self._folders.add(target.parent)
        if pixels.shape != (size, size, 3) or pixels.dtype != np.uint8:
            raise ValueError(f"expected (S, S, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
        # A name no other writer uses (process and thread), then an atomic rename: readers
        # never see half a file, and two writers of the same image both succeed.
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            with open(tmp, "wb") as handle:
                handle.write(np.ascontiguousarray(pixels).tobytes())
            os.replace(tmp, target)
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
            data = path.read_bytes()
        except FileNotFoundError:
            raise ImageError(path.name, "preprocessed pixels not found (re-run ingest)") from None
        except OSError as exc:
            raise ImageError(str(path), f"unreadable preprocessed pixels ({exc})") from None
        if len(data) != size * size * 3:
            raise ImageError(
                str(path), f"stored pixels hold {len(data)} bytes, expected {size}x{size}x3"
            )
        return np.frombuffer(data, dtype=np.uint8).reshape(size, size, 3)
