"""Content-addressed store of model-ready pixels, shared by every worker.

At ingest each image is decoded once and its preprocessed pixels (short side resized,
centre-cropped, uint8) are kept here, keyed by content hash and size. The reranker then reads
a few KB per candidate instead of decoding a full-size original per query.

One interface (:class:`PixelStore`), a backend per deployment, chosen by
``SEARCHSVC_PIXEL_STORE`` (:func:`open_pixel_store`):

- ``sqlite`` (the embedded default, :class:`SqlitePixelStore`): ONE SQLite file
  (``pixels.sqlite3`` in the media folder), raw ``S * S * 3`` bytes per row, written a
  task's batch per transaction. Several processes of one host may write and read at once
  (WAL mode and a busy timeout). The first store was a file per image, written to a
  temporary name and renamed: measured in an ingest of 8,000 images here (2 cores, embed
  forward stubbed out), its writes cost 0.4 ms of CPU per image (mostly kernel time
  creating files), as much as a fifth of the small profile's forward, and a million-image
  catalog made a million files. PNG encoding was measured before that and cost more CPU
  than the embedding itself;
- ``postgresql`` (a cluster, :class:`DatabasePixelStore`): the ``pixels`` table of the
  cluster's database (``SEARCHSVC_DATABASE_URL``, migration ``0004``), which every host
  reaches over the network, so workers on different machines share no file.

Every backend is content-addressed and idempotent: a key stored holds the same pixels, so
a second write of it (a resent task, two ingests of one image) changes nothing.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql

from searchsvc.core.errors import ConfigError, ImageError
from searchsvc.storage.db import StoredPixels

if TYPE_CHECKING:
    from searchsvc.core.config import Settings
    from searchsvc.storage.db import Database

BUSY_TIMEOUT_S = 60.0
FILE_NAME = "pixels.sqlite3"
DELETE_BATCH = 500
"""Keys removed per statement (SQLite allows at most 999 bound parameters by default)."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS pixels (
    content_hash TEXT NOT NULL,
    size INTEGER NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (content_hash, size)
) WITHOUT ROWID
"""


class StoredKey(NamedTuple):
    """One stored row: whose pixels, at which size, how many bytes."""

    content_hash: str
    size: int
    nbytes: int


class PixelStore(ABC):
    """``cache_bytes``: decoded pixels of recently read images are kept in memory (LRU, up to
    this many bytes), since popular products come back query after query. Every method is
    safe to call from several threads."""

    def __init__(self, *, cache_bytes: int = 256 * 1024 * 1024) -> None:
        self._cache: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()
        self._cache_bytes = cache_bytes
        self._cached = 0
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ backends
    @abstractmethod
    def _insert(self, rows: Sequence[tuple[str, int, bytes]]) -> None:
        """Store ``(content_hash, size, data)`` rows in one transaction, keys already
        stored left as they are."""

    @abstractmethod
    def _fetch(self, content_hash: str, size: int) -> bytes | None:
        """The stored bytes, or None. Raises the backend's own error when unreadable."""

    @abstractmethod
    def has(self, content_hash: str, size: int) -> bool: ...

    @abstractmethod
    def keys(self) -> Iterator[StoredKey]:
        """Every stored row's key and size in bytes, streamed (memory does not grow with
        the count)."""

    @abstractmethod
    def _delete(self, content_hashes: Sequence[str]) -> int:
        """Remove every size of these hashes; returns the rows removed."""

    @abstractmethod
    def describe(self) -> str:
        """Where the pixels live (no credentials)."""

    @abstractmethod
    def close(self) -> None:
        """Release connections (the store reopens on its next use)."""

    # ------------------------------------------------------------------ shared
    def put_many(self, items: Iterable[tuple[str, np.ndarray]]) -> None:
        """Store several images in one transaction: all of them or, on an error, none."""
        rows = [(digest, *_encoded(pixels)) for digest, pixels in items]
        if rows:
            # Content-addressed: a key already stored holds the same pixels, so it stays.
            self._insert(rows)

    def delete(self, content_hashes: Iterable[str]) -> int:
        """Remove the pixels of these images at every size (missing ones are skipped), in
        batches; returns the rows removed."""
        hashes = sorted(set(content_hashes))
        removed = 0
        for start in range(0, len(hashes), DELETE_BATCH):
            removed += self._delete(hashes[start : start + DELETE_BATCH])
        with self._lock:
            gone = set(hashes)
            for key in [k for k in self._cache if k[0] in gone]:
                self._cached -= self._cache.pop(key).nbytes
        return removed

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
        source = f"{self.describe()}:{content_hash}@{size}"
        try:
            data = self._fetch(content_hash, size)
        except (sqlite3.Error, sa.exc.SQLAlchemyError) as exc:
            reason = " ".join(str(getattr(exc, "orig", exc)).split())
            raise ImageError(source, f"unreadable pixel store ({reason})") from None
        if data is None:
            raise ImageError(
                f"{content_hash}@{size}", "preprocessed pixels not found (re-run ingest)"
            )
        if len(data) != size * size * 3:
            raise ImageError(
                source, f"stored pixels hold {len(data)} bytes, expected {size}x{size}x3"
            )
        return np.frombuffer(data, dtype=np.uint8).reshape(size, size, 3)


class SqlitePixelStore(PixelStore):
    """The pixels in one SQLite file under ``root`` (one host's processes share it)."""

    def __init__(self, root: Path, *, cache_bytes: int = 256 * 1024 * 1024) -> None:
        super().__init__(cache_bytes=cache_bytes)
        self.root = root
        self.path = root / FILE_NAME
        # Writers of this process queue here rather than in SQLite's busy handler, which
        # polls with sleeps of up to 100 ms.
        self._write_lock = threading.Lock()
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []

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
        with self._lock:
            connections, self._connections = self._connections, []
        for connection in connections:
            try:
                connection.close()
            except sqlite3.ProgrammingError:  # pragma: no cover - closed from another thread
                pass
        self._local = threading.local()

    def describe(self) -> str:
        return str(self.path)

    def _insert(self, rows: Sequence[tuple[str, int, bytes]]) -> None:
        connection = self._connection()
        with self._write_lock:
            connection.execute("BEGIN IMMEDIATE")
            try:
                connection.executemany(
                    "INSERT OR IGNORE INTO pixels (content_hash, size, data) VALUES (?, ?, ?)",
                    rows,
                )
            except BaseException:
                connection.execute("ROLLBACK")
                raise
            connection.execute("COMMIT")

    def has(self, content_hash: str, size: int) -> bool:
        row = (
            self._connection()
            .execute(
                "SELECT 1 FROM pixels WHERE content_hash = ? AND size = ?", (content_hash, size)
            )
            .fetchone()
        )
        return row is not None

    def _fetch(self, content_hash: str, size: int) -> bytes | None:
        row = (
            self._connection()
            .execute(
                "SELECT data FROM pixels WHERE content_hash = ? AND size = ?",
                (content_hash, size),
            )
            .fetchone()
        )
        return None if row is None else bytes(row[0])

    def keys(self) -> Iterator[StoredKey]:
        # A connection of its own: the cursor stays open while the caller iterates.
        self.root.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S)
        try:
            connection.execute(_SCHEMA)
            for digest, size, nbytes in connection.execute(
                "SELECT content_hash, size, length(data) FROM pixels"
            ):
                yield StoredKey(str(digest), int(size), int(nbytes))
        finally:
            connection.close()

    def _delete(self, content_hashes: Sequence[str]) -> int:
        connection = self._connection()
        marks = ", ".join("?" for _ in content_hashes)
        with self._write_lock:
            cursor = connection.execute(
                f"DELETE FROM pixels WHERE content_hash IN ({marks})",  # noqa: S608 (marks only)
                tuple(content_hashes),
            )
        return int(cursor.rowcount)


class DatabasePixelStore(PixelStore):
    """The pixels in the ``pixels`` table of the cluster's PostgreSQL database (created by
    the schema migrations): every host reads and writes them over the network."""

    KEYS_PAGE = 1000

    def __init__(self, engine: sa.Engine, *, cache_bytes: int = 256 * 1024 * 1024) -> None:
        super().__init__(cache_bytes=cache_bytes)
        if engine.dialect.name != "postgresql":
            raise ConfigError(
                "SEARCHSVC_PIXEL_STORE=postgresql: SEARCHSVC_DATABASE_URL must name a "
                f"PostgreSQL database, got a {engine.dialect.name} one"
            )
        self.engine = engine
        self._table: sa.Table = StoredPixels.__table__  # type: ignore[assignment]

    def describe(self) -> str:
        return f"postgresql:{self.engine.url.render_as_string(hide_password=True)}#pixels"

    def close(self) -> None:
        """The engine belongs to the caller's :class:`~searchsvc.storage.db.Database`."""

    def _insert(self, rows: Sequence[tuple[str, int, bytes]]) -> None:
        # Sorted: two writers inserting overlapping keys take their row locks in the same
        # order, so they wait for each other instead of deadlocking.
        values = [
            {"content_hash": digest, "size": size, "data": data}
            for digest, size, data in sorted(rows, key=lambda r: (r[0], r[1]))
        ]
        statement = postgresql.insert(self._table).on_conflict_do_nothing(
            index_elements=["content_hash", "size"]
        )
        with self.engine.begin() as connection:
            connection.execute(statement, values)

    def has(self, content_hash: str, size: int) -> bool:
        table = self._table
        with self.engine.connect() as connection:
            row = connection.execute(
                sa.select(sa.literal(1)).where(
                    table.c.content_hash == content_hash, table.c.size == size
                )
            ).first()
        return row is not None

    def _fetch(self, content_hash: str, size: int) -> bytes | None:
        table = self._table
        with self.engine.connect() as connection:
            data = connection.execute(
                sa.select(table.c.data).where(
                    table.c.content_hash == content_hash, table.c.size == size
                )
            ).scalar()
        return None if data is None else bytes(data)

    def keys(self) -> Iterator[StoredKey]:
        # Keyset pages: no cursor held open across the caller's work, memory of one page.
        table = self._table
        after: tuple[str, int] = ("", -1)
        while True:
            with self.engine.connect() as connection:
                page = connection.execute(
                    sa.select(table.c.content_hash, table.c.size, sa.func.length(table.c.data))
                    .where(sa.tuple_(table.c.content_hash, table.c.size) > sa.tuple_(*after))
                    .order_by(table.c.content_hash, table.c.size)
                    .limit(self.KEYS_PAGE)
                ).all()
            if not page:
                return
            for digest, size, nbytes in page:
                yield StoredKey(str(digest), int(size), int(nbytes))
            after = (str(page[-1][0]), int(page[-1][1]))

    def _delete(self, content_hashes: Sequence[str]) -> int:
        table = self._table
        with self.engine.begin() as connection:
            result = connection.execute(
                sa.delete(table).where(table.c.content_hash.in_(list(content_hashes)))
            )
        return int(result.rowcount)


def open_pixel_store(
    settings: Settings, db: Database, *, cache_bytes: int = 256 * 1024 * 1024
) -> PixelStore:
    """The pixel store ``SEARCHSVC_PIXEL_STORE`` names: the media folder's SQLite file, or
    the ``pixels`` table of ``db`` (the cluster's PostgreSQL)."""
    if settings.pixel_store == "postgresql":
        return DatabasePixelStore(db.engine, cache_bytes=cache_bytes)
    return SqlitePixelStore(settings.media_dir, cache_bytes=cache_bytes)


def _encoded(pixels: np.ndarray) -> tuple[int, bytes]:
    size = pixels.shape[0] if pixels.ndim == 3 else -1
    if pixels.shape != (size, size, 3) or pixels.dtype != np.uint8:
        raise ValueError(f"expected (S, S, 3) uint8 pixels, got {pixels.shape} {pixels.dtype}")
    return size, np.ascontiguousarray(pixels).tobytes()
