"""Exact nearest neighbours in bounded memory: per-query top-k by cosine distance, a chunk
of queries at a time.

A dense ``Q x G`` float64 distance matrix and its int64 argsort cost 16 bytes x Q x G: a
200,000-image validation split would need about 640 GB. Here only ``chunk x G`` distances
(and a boolean mask and a count of the same shape) exist at once, and no row is fully
sorted: the ``k`` nearest are found by partition, then only those ``k`` are sorted.

The order is exactly that of a stable sort of each row of the dense matrix: nearest first,
ties in gallery order (a tie straddling the ``k``-th place keeps the lowest gallery
positions). A query that is itself a gallery item (``self_index[q] >= 0``) never ranks
itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

IntArray = NDArray[np.int64]
FloatArray = NDArray[np.float64]

DEFAULT_CHUNK_BYTES = 64 * 1024 * 1024
"""Working memory per chunk of queries when no chunk size is given."""
BYTES_PER_CELL = 8 + 8 + 1 + 1
"""Per (query, gallery item) of a chunk: the float64 distance, the int64 tie count, two
boolean masks."""


def chunk_for(n_gallery: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Queries per chunk so that a chunk's working arrays stay within ``budget_bytes``."""
    return max(1, budget_bytes // (BYTES_PER_CELL * max(1, n_gallery)))


def self_positions(
    self_index: Sequence[int] | np.ndarray | None, n_queries: int, n_gallery: int
) -> IntArray:
    """``self_index`` checked: ``(Q,)`` gallery positions, -1 for a query not in it."""
    own = (
        np.full(n_queries, -1, dtype=np.int64)
        if self_index is None
        else np.asarray(self_index, dtype=np.int64)
    )
    if own.shape != (n_queries,) or own.max(initial=-1) >= n_gallery or own.min(initial=0) < -1:
        raise ValueError(f"self_index must be ({n_queries},) gallery positions or -1")
    return own


def top_k_width(k: int, n_gallery: int, any_self: bool) -> int:
    """How many neighbours each query gets: ``k``, or fewer in a small gallery."""
    width = min(k, n_gallery - (1 if any_self else 0))
    if width < 1:
        raise ValueError(f"the gallery has {n_gallery} items: nothing to rank")
    return width


def _rows_top_k(distances: FloatArray, width: int) -> tuple[IntArray, FloatArray]:
    """Exact stable top ``width`` of each row of ``distances`` (a chunk, modified: no)."""
    n_rows, n_cols = distances.shape
    if width >= n_cols:
        order = np.argsort(distances, axis=1, kind="stable").astype(np.int64)
        return order, np.take_along_axis(distances, order, axis=1)
    part = np.argpartition(distances, width - 1, axis=1)[:, :width]
    # The k-th smallest value of each row: everything below it is in; of the values equal
    # to it, the lowest gallery positions fill the remaining places (a stable sort's pick).
    kth = np.take_along_axis(distances, part, axis=1).max(axis=1)[:, None]
    below = distances < kth
    room = width - below.sum(axis=1, keepdims=True)
    tied = distances == kth
    chosen = below | (tied & (np.cumsum(tied, axis=1) <= room))
    # np.nonzero walks row by row, columns ascending: each row's picks in gallery order.
    cols = np.nonzero(chosen)[1].reshape(n_rows, width).astype(np.int64)
    picked = np.take_along_axis(distances, cols, axis=1)
    order = np.argsort(picked, axis=1, kind="stable")
    return np.take_along_axis(cols, order, axis=1), np.take_along_axis(picked, order, axis=1)


def top_k_neighbours(
    query_vectors: np.ndarray,
    gallery_vectors: np.ndarray,
    k: int,
    *,
    self_index: Sequence[int] | np.ndarray | None = None,
    chunk: int | None = None,
) -> tuple[IntArray, FloatArray]:
    """Top ``k`` gallery items per query by cosine distance (``1 - q.g`` of unit vectors,
    as the query path reports it), nearest first, ties in gallery order; ``chunk`` queries
    at a time (default: :func:`chunk_for` the gallery). Returns ``(Q, K)`` indices and
    distances, ``K`` as :func:`top_k_width` says."""
    q = np.asarray(query_vectors, dtype=np.float64)
    g = np.asarray(gallery_vectors, dtype=np.float64)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"expected (Q, D) and (G, D) vectors, got {q.shape} and {g.shape}")
    own = self_positions(self_index, len(q), len(g))
    width = top_k_width(k, len(g), bool((own >= 0).any()))
    step = chunk if chunk is not None else chunk_for(len(g))
    if step < 1:
        raise ValueError(f"chunk must be at least 1, got {step}")
    indices = np.empty((len(q), width), dtype=np.int64)
    distances = np.empty((len(q), width), dtype=np.float64)
    for start in range(0, len(q), step):
        end = min(start + step, len(q))
        block = 1.0 - q[start:end] @ g.T
        mine = own[start:end]
        rows = np.flatnonzero(mine >= 0)
        block[rows, mine[rows]] = np.inf
        indices[start:end], distances[start:end] = _rows_top_k(block, width)
    return indices, distances
