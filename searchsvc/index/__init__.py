"""The vector index: one small interface (:mod:`searchsvc.index.base`), a backend per module.

:func:`open_index` is the one way to open the configured backend, for reading or for
writing: the embedded store admits one process at a time, and a reader never waits for a
writer to release it, while a writer queues behind another writer.
"""

from __future__ import annotations

from typing import Literal

from searchsvc.core.config import Settings
from searchsvc.index.base import IndexPoint, SearchHit, VectorIndex, point_id_for
from searchsvc.index.edge import EdgeIndex
from searchsvc.index.server import QdrantServerIndex

__all__ = [
    "EdgeIndex",
    "IndexMode",
    "IndexPoint",
    "QdrantServerIndex",
    "SearchHit",
    "VectorIndex",
    "open_index",
    "point_id_for",
]

IndexMode = Literal["read", "write"]


def open_index(settings: Settings, mode: IndexMode) -> VectorIndex:
    """The configured backend: a Qdrant server if ``qdrant_url`` is set, else the embedded
    store. ``mode="write"`` waits up to ``SEARCHSVC_INDEX_LOCK_WAIT_S`` for another process
    to release an embedded store (two ingests run one after the other); ``"read"`` fails
    at once, naming the holder (a query must not hang behind an ingest)."""
    if settings.qdrant_url:
        return QdrantServerIndex.from_url(settings.qdrant_url, settings.qdrant_api_key or None)
    wait_s = settings.index_lock_wait_s if mode == "write" else 0.0
    return EdgeIndex(settings.qdrant_path, wait_s=wait_s)
