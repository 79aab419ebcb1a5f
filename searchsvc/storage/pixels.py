"""Content-addressed store of model-ready pixels, shared by every worker.

At ingest each image is decoded once and its preprocessed pixels (short side resized,
centre-cropped, uint8) are kept here, keyed by content hash and size. The reranker then reads
a few KB per candidate instead of decoding a full-size original per query.

The pixels live in ONE SQLite file (``pixels.sqlite3`` in the media folder), raw
``S * S * 3`` bytes per row, written a task's batch per transaction. The first store was a
file per image, written to a temporary name and renamed: measured in an ingest of 8,000
images here (2 cores, embed forward stubbed out), its writes cost 0.4 ms of CPU per image
(mostly kernel time creating files), as much as a fifth of the small profile's forward, and
a million-image catalog made a million files. PNG encoding was measured before that and
cost more CPU than the embedding itself.

Several processes may write and read at once (SQLite's WAL mode and busy timeout); the
media folder must then be on a local file system that they share (SQLite's locks do not
hold over NFS).
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from searchsvc.core.errors import ImageError

BUSY_TIMEOUT_S = 60.0
FILE_NAME = "pixels.sqlite3"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pixels (
    content_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (content_hash, size)
) WITHOUT ROWID
"""


class PixelStore:
    """``cache_bytes``: decoded pixels of recently read images are kept in memory (LRU, up to
    this many bytes), since popular products come back query after query."""

    def __init__(self, root: Path, *, cache_bytes: int = 256 * 1024 * 1024) -> None:
        self.root = root
        self.path = root / FILE_NAME
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()
        # Writers of this process queue here rather than in SQLite's busy handler, which
        # polls with sleeps of up to 100 ms.
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []

    # ------------------------------------------------------------------ connections
    def _connection(self) -> sqlite3.Connection:
        """This thread's connection (a process forked after it was opened opens its own)."""
        held: tuple[int, sqlite3.Connection] | None = getattr(self._local, "held", None)
        if held is not None and held[0] == os.getpid():
            return held[1]
        self.root.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA journal_mode = WAL")
        # NORMAL in WAL mode never corrupts the file; a power cut may lose the last commits,
        # and ingest re-sends whatever it had not marked indexed.
        connection.execute("PRAGMA synchronous = NORMAL")
        connection.execute(_SCHEMA)
        self._local.held = (os.getpid(), connection)
        with self._lock:
            self._connections.append(connection)
        return connection

    def close(self) -> None:
        """Close every connection this process opened (threads reopen on their next use)."""
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.close()
            except sqlite3.ProgrammingError:  # pragma: no cover - closed from another thread
                pass
        self._local = threading.local()

    # ------------------------------------------------------------------ writing
    def put_many(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        """Store several images in one transaction: all of them or, on an error, none."""
        rows = [(digest, *_encoded(pixels)) for digest, pixels in items]
        if not rows:
            return
        connection = self._connection()
        with self._write_lock:
            connection.execute("BEGIN IMMEDIATE")
            try:
                # Content-addressed: a key already stored holds the same pixels, so it stays.
                connection.executemany(
                    "INSERT OR IGNORE INTO pixels (content_hash, size, data) VALUES (?, ?, ?)",
                    rows,
                )
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    # ------------------------------------------------------------------ reading
    def has(self, content_hash: str, size: int) -> bool:
        row = (
            self._connection()
            .execute(
                "SELECT 1 FROM pixels WHERE content_hash = ? AND size = ?", (content_hash, size)
            )
            .fetchone()
        )
        return row is not None

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
        source = f"{self.path.name}:{content_hash}@{size}"
        try:
            row = (
                self._connection()
                .execute(
                    "SELECT data FROM pixels WHERE content_hash = ? AND size = ?",
                    (content_hash, size),
                )
                .fetchone()
            )
        except sqlite3.Error as exc:
            raise ImageError(source, f"unreadable pixel store ({exc})") from None
        if row is None:
            raise ImageError(
                f"{content_hash}@{size}", "preprocessed pixels not found (re-run ingest)"
            )
        data = bytes(row[0])
        if len(data) != size * size * 3:
            raise ImageError(
                source, f"stored pixels hold {len(data)} bytes, expected {size}x{size}x3"
            )
        return np.frombuffer(data, dtype=np.uint8).reshape(size, size, 3)


def _encoded(pixels: np.ndarray) -> tuple[int, bytes]:
    size = pixels.shape[0] if pixels.ndim == 3 else -1
    if pixels.shape != (size, size, 3) or pixels.dtype != np.uint8:
        raise ValueError(f"expected (S, S, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    return size, np.ascontiguousarray(pixels).tobytes()
