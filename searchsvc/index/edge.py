"""The embedded vector index: qdrant-edge (Qdrant's engine, in-process), one shard per
collection, one process at a time."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import qdrant_edge as qe

from searchsvc.core.errors import IndexBackendError
from searchsvc.index.base import (
    INDEXED_PAYLOAD_FIELDS,
    SCROLL_PAGE,
    IndexPoint,
    SearchHit,
    filter_conditions,
    point_payload,
    points_matrix,
    search_hit,
)

_BATCH = 4096
"""Points per engine call: bounds the memory of one request without slowing bulk loads."""
# EdgeIndex flushes segments to disk at most this often after upserts and deletes (and always
# on optimize and close). A flush costs ~0.1-0.2 s whatever the batch size, so flushing every
# call would cap small-batch ingestion at a few hundred points/s; between flushes qdrant-edge's
# write-ahead log already makes each update survive a crash of the process.
_FLUSH_INTERVAL_S = 1.0

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_ALIASES_FILE = "aliases.json"
_LOCK_FILE = ".lock"
_EDGE_CONFIG_FILE = "edge_config.json"  # written by qdrant-edge into every shard directory


class EdgeIndex:
    """Embedded vector index on qdrant-edge (Qdrant's engine, in-process).

    Layout under ``root``::

        root/.lock            exclusive flock held while this object is open
        root/aliases.json     {"alias": "collection", ...}, replaced atomically
        root/<collection>/    one EdgeShard per collection

    Only one process may open ``root`` at a time (the constructor takes an exclusive lock
    and fails fast if another process holds it); several processes need a Qdrant server.
    Within the process the object may be shared between threads. Names that are aliases
    are resolved for data operations (upsert, search, ...), as a Qdrant server does.

    Durability: every update goes to the shard's write-ahead log first, so it survives the
    process dying; segments are flushed at most once a second during ingestion and always
    on ``optimize``, ``flush`` and ``close``.
    """

    def __init__(self, root: Path, *, wait_s: float = 0.0) -> None:
        """``wait_s``: how long to wait for another process to release the store before
        failing (an ingest queues behind another; a query fails fast)."""
        self.root = Path(root)
        self._mutex = threading.RLock()
        self._shards: dict[str, qe.EdgeShard] = {}
        self._dims: dict[str, int | None] = {}
        self._last_flush: dict[str, float] = {}
        self._closed = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise IndexBackendError(
                f"{self.root}: cannot create the embedded index ({exc})"
            ) from None
        self._lock_fd = self._acquire_lock(self.root / _LOCK_FILE, wait_s)
        try:
            self._aliases = self._read_aliases()
        except BaseException:
            self._release_lock()
            raise

    # -- process lock ------------------------------------------------------------------------

    @staticmethod
    def _acquire_lock(path: Path, wait_s: float = 0.0) -> int:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise IndexBackendError(f"{path}: cannot open the index lock file ({exc})") from None
        deadline = time.monotonic() + wait_s
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    busy = exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)
                    if not busy or time.monotonic() >= deadline:
                        raise
                    time.sleep(0.2)
        except OSError as exc:
            holder = "another process"
            try:
                pid = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
                if pid == str(os.getpid()):
                    holder = f"this process (pid {pid}, another open EdgeIndex)"
                elif pid.isdigit():
                    holder = f"another process (pid {pid})"
            except OSError:
                pass
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise IndexBackendError(
                    f"{path.parent}: the embedded vector index is in use; {holder} holds "
                    f"{path}. The embedded store can be opened by one process at a time: stop "
                    "the other process, or set SEARCHSVC_QDRANT_URL to a Qdrant server to "
                    "share the index between several processes"
                ) from None
            raise IndexBackendError(f"{path}: cannot lock the embedded index ({exc})") from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except OSError:
            pass  # the pid is only a hint for the error message above
        return fd

    def _release_lock(self) -> None:
        fd, self._lock_fd = self._lock_fd, -1
        if fd >= 0:
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close every shard, then release the lock. Safe to call twice."""
        with self._mutex:
            if self._closed:
                return
            self._closed = True
            shards, self._shards = self._shards, {}
            errors = []
            for name, shard in shards.items():
                try:
                    shard.flush()
                    shard.close()
                except Exception as exc:  # close the others, report after
                    errors.append(f"{name!r}: {exc}")
            self._release_lock()
        if errors:
            raise IndexBackendError(f"{self.root}: closing collections failed: {'; '.join(errors)}")

    def __enter__(self) -> EdgeIndex:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- names, shards, aliases --------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise IndexBackendError(f"{self.root}: the embedded vector index is closed")

    def _check_name(self, name: str, what: str = "collection") -> None:
        if not _NAME_RE.match(name) or name == _ALIASES_FILE:
            raise IndexBackendError(
                f"{what} {name!r}: invalid name (letters, digits, '_', '-', '.', "
                "starting with a letter or digit, at most 128 characters)"
            )

    def _shard_dir(self, name: str) -> Path:
        return self.root / name

    def _exists(self, name: str) -> bool:
        return name in self._shards or (self._shard_dir(name) / _EDGE_CONFIG_FILE).is_file()

    def _stored_dim(self, name: str) -> int | None:
        """The vector size the shard was created with (best effort, from its config file)."""
        try:
            config = json.loads((self._shard_dir(name) / _EDGE_CONFIG_FILE).read_text("utf-8"))
            return int(config["vectors"][""]["size"])
        except (OSError, ValueError, KeyError, TypeError):
            return None

    @staticmethod
    def _config(dim: int) -> qe.EdgeConfig:
        return qe.EdgeConfig(vectors=qe.EdgeVectorParams(size=dim, distance=qe.Distance.Cosine))

    def _resolve(self, name: str) -> str:
        """A collection name, or the collection an alias points to."""
        if name in self._shards or name not in self._aliases:
            return name
        return self._aliases[name]

    def _shard(self, name: str) -> tuple[str, qe.EdgeShard]:
        """The open shard of collection (or alias) ``name``; opened once, then cached."""
        self._check_name(name)
        with self._mutex:
            self._check_open()
            collection = self._resolve(name)
            shard = self._shards.get(collection)
            if shard is not None:
                return collection, shard
            if not self._exists(collection):
                where = (
                    f"alias {name!r} -> collection {collection!r}"
                    if collection != name
                    else (f"collection {name!r}")
                )
                raise IndexBackendError(
                    f"{where} does not exist in the embedded index at {self.root}"
                )
            try:
                shard = qe.EdgeShard.load(str(self._shard_dir(collection)))
            except Exception as exc:
                raise IndexBackendError(
                    f"collection {collection!r}: cannot open {self._shard_dir(collection)} ({exc})"
                ) from None
            self._shards[collection] = shard
            self._dims[collection] = self._stored_dim(collection)
            return collection, shard

    def _read_aliases(self) -> dict[str, str]:
        path = self.root / _ALIASES_FILE
        try:
            data = json.loads(path.read_text("utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            raise IndexBackendError(f"{path}: cannot read the alias file ({exc})") from None
        if not isinstance(data, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in data.items()
        ):
            raise IndexBackendError(f"{path}: not an alias file (expected {{alias: collection}})")
        return dict(data)

    def _write_aliases(self, aliases: dict[str, str]) -> None:
        """Replace aliases.json atomically: readers see the old or the new file, never half."""
        path = self.root / _ALIASES_FILE
        tmp = path.with_name(f".{_ALIASES_FILE}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as fh:
                json.dump(aliases, fh, indent=2, sort_keys=True)
                fh.write("\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
            dir_fd = os.open(self.root, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            raise IndexBackendError(f"{path}: cannot write the alias file ({exc})") from None
        self._aliases = aliases

    def _flush_soon(self, name: str, shard: qe.EdgeShard) -> None:
        """Flush unless this collection was flushed less than _FLUSH_INTERVAL_S ago."""
        now = time.monotonic()
        if now - self._last_flush.get(name, -math.inf) >= _FLUSH_INTERVAL_S:
            shard.flush()
            self._last_flush[name] = time.monotonic()

    def flush(self) -> None:
        """Write every open collection's pending changes to its segments now."""
        with self._mutex:
            self._check_open()
            shards = list(self._shards.items())
        for name, shard in shards:
            try:
                shard.flush()
            except Exception as exc:
                raise IndexBackendError(f"collection {name!r}: flush failed ({exc})") from None
            self._last_flush[name] = time.monotonic()

    def _ensure_payload_indexes(self, name: str, shard: qe.EdgeShard) -> None:
        existing = set(shard.info().payload_schema)
        for field in INDEXED_PAYLOAD_FIELDS:
            if field not in existing:
                shard.update(
                    qe.UpdateOperation.create_field_index(field, qe.PayloadSchemaType.Keyword)
                )

    # -- VectorIndex -------------------------------------------------------------------------

    def ensure_collection(self, name: str, dim: int) -> None:
        self._check_name(name)
        if dim <= 0:
            raise IndexBackendError(f"collection {name!r}: dimension must be positive, got {dim}")
        with self._mutex:
            self._check_open()
            if name in self._aliases:
                raise IndexBackendError(
                    f"collection {name!r}: the name is an alias (of {self._aliases[name]!r})"
                )
            path = self._shard_dir(name)
            shard = self._shards.get(name)
            try:
                if shard is not None:
                    stored = self._dims.get(name)
                    if stored is not None and stored != dim:
                        raise IndexBackendError(
                            f"collection {name!r} exists with dimension {stored}, not {dim}"
                        )
                elif self._exists(name):
                    stored = self._stored_dim(name)
                    if stored is not None and stored != dim:
                        raise IndexBackendError(
                            f"collection {name!r} exists with dimension {stored}, not {dim}"
                        )
                    try:  # the engine checks the stored config against this one
                        shard = qe.EdgeShard.load(str(path), self._config(dim))
                    except Exception as exc:
                        raise IndexBackendError(
                            f"collection {name!r} exists with another configuration than "
                            f"cosine/{dim} ({exc})"
                        ) from None
                else:
                    shard = qe.EdgeShard.create(str(path), self._config(dim))
                self._shards[name] = shard
                self._dims[name] = dim
                self._ensure_payload_indexes(name, shard)
                shard.flush()
            except IndexBackendError:
                raise
            except Exception as exc:
                raise IndexBackendError(
                    f"collection {name!r}: cannot create at {path} ({exc})"
                ) from None

    def drop_collection(self, name: str) -> None:
        """Delete the collection and every alias pointing at it; no-op if it does not exist."""
        self._check_name(name)
        with self._mutex:
            self._check_open()
            shard = self._shards.pop(name, None)
            self._dims.pop(name, None)
            self._last_flush.pop(name, None)
            if shard is not None:
                try:
                    shard.close()
                except Exception as exc:
                    raise IndexBackendError(f"collection {name!r}: cannot close ({exc})") from None
            path = self._shard_dir(name)
            if path.is_dir():
                try:
                    shutil.rmtree(path)
                except OSError as exc:
                    raise IndexBackendError(
                        f"collection {name!r}: cannot delete {path} ({exc})"
                    ) from None
            if name in self._aliases.values():
                self._write_aliases({a: c for a, c in self._aliases.items() if c != name})

    def collections(self) -> list[str]:
        with self._mutex:
            self._check_open()
            on_disk = {
                p.name
                for p in self.root.iterdir()
                if p.is_dir() and (p / _EDGE_CONFIG_FILE).is_file()
            }
            return sorted(on_disk | set(self._shards))

    def upsert(self, collection: str, points: Sequence[IndexPoint]) -> None:
        if not points:
            return
        name, shard = self._shard(collection)
        matrix = points_matrix(points, name)
        dim = self._dims.get(name)
        if dim is not None and matrix.shape[1] != dim:
            raise IndexBackendError(
                f"collection {name!r}: vectors have dimension {matrix.shape[1]}, expected {dim}"
            )
        try:
            for start in range(0, len(points), _BATCH):
                chunk = points[start : start + _BATCH]
                rows = matrix[start : start + _BATCH]
                batch = [
                    # Per-row tolist() is the cheapest input for the binding: a numpy row is
                    # read element by element (about 2x slower), a whole-matrix tolist() at
                    # once allocates every float object up front.
                    qe.Point(p.point_id, row.tolist(), point_payload(p))
                    for p, row in zip(chunk, rows, strict=True)
                ]
                shard.update(qe.UpdateOperation.upsert_points(batch))
            self._flush_soon(name, shard)
        except Exception as exc:
            raise IndexBackendError(f"collection {name!r}: upsert failed ({exc})") from None

    def delete(self, collection: str, point_ids: Sequence[str]) -> None:
        if not point_ids:
            return
        name, shard = self._shard(collection)
        try:
            ids: list[qe.PointId] = list(point_ids)
            shard.update(qe.UpdateOperation.delete_points(ids))
            self._flush_soon(name, shard)
        except Exception as exc:
            raise IndexBackendError(f"collection {name!r}: delete failed ({exc})") from None

    def search(
        self,
        collection: str,
        vector: np.ndarray,
        limit: int,
        filters: Mapping[str, str] | None = None,
    ) -> list[SearchHit]:
        conditions = filter_conditions(collection, filters)
        name, shard = self._shard(collection)
        if limit <= 0:
            return []
        query_filter = (
            qe.Filter(
                must=[
                    qe.FieldCondition(key, match=qe.MatchValue(value)) for key, value in conditions
                ]
            )
            if conditions
            else None
        )
        query = np.asarray(vector, dtype=np.float32).reshape(-1).tolist()
        try:
            points = shard.query(
                qe.QueryRequest(
                    limit=limit,
                    query=qe.Query.Nearest(query),
                    filter=query_filter,
                    with_payload=True,
                    with_vector=False,
                )
            )
        except Exception as exc:
            raise IndexBackendError(f"collection {name!r}: search failed ({exc})") from None
        return [search_hit(p.id, p.score, p.payload) for p in points]

    def count(self, collection: str) -> int:
        name, shard = self._shard(collection)
        try:
            return int(shard.count(qe.CountRequest(exact=True)))
        except Exception as exc:
            raise IndexBackendError(f"collection {name!r}: count failed ({exc})") from None

    def iter_point_ids(self, collection: str) -> Iterator[str]:
        name, shard = self._shard(collection)  # fails here, not at the first next()
        return self._scroll_ids(name, shard)

    @staticmethod
    def _scroll_ids(name: str, shard: qe.EdgeShard) -> Iterator[str]:
        offset: qe.PointId | None = None
        while True:
            try:
                records, offset = shard.scroll(
                    qe.ScrollRequest(
                        offset=offset, limit=SCROLL_PAGE, with_payload=False, with_vector=False
                    )
                )
            except Exception as exc:
                raise IndexBackendError(f"collection {name!r}: scroll failed ({exc})") from None
            for record in records:
                yield str(record.id)
            if offset is None:
                return

    def set_alias(self, alias: str, collection: str) -> None:
        self._check_name(alias, "alias")
        self._check_name(collection)
        with self._mutex:
            self._check_open()
            if not self._exists(collection):
                raise IndexBackendError(
                    f"alias {alias!r}: collection {collection!r} does not exist in {self.root}"
                )
            if self._exists(alias):
                raise IndexBackendError(f"alias {alias!r}: a collection has that name")
            self._write_aliases({**self._aliases, alias: collection})

    def resolve_alias(self, alias: str) -> str | None:
        with self._mutex:
            self._check_open()
            return self._aliases.get(alias)

    def optimize(self, collection: str) -> None:
        """Merge segments and build the HNSW graph (blocking); call after a bulk load."""
        name, shard = self._shard(collection)
        try:
            shard.optimize()
            shard.flush()
        except Exception as exc:
            raise IndexBackendError(f"collection {name!r}: optimize failed ({exc})") from None
