"""Retrieval metrics, exactly as STIR.md defines them (numpy only).

Inputs, per query: the ranked results as a boolean relevance row (``relevance[q, i]`` is
True when the result at rank ``i + 1`` is relevant to query ``q``) and ``n_relevant[q]``,
the number of relevant items in the whole gallery (not only in the ranked rows).

- CMC@k: 1 if any relevant item is in the top k (= Recall@k as used in metric learning).
- precision@k: relevant items in the top k / min(k, n_relevant).
- mAP@k: (1/n_k) * sum_{i<=k} (n_i / i) * rel_i, where n_i = hits within the top i and
  n_k = hits in the top k; 0 when n_k = 0. (Normalised by the hits found, not by
  min(k, n_relevant): this is the definition of STIR.md and the OML reference.)

Per-query functions return ``(Q,)`` float64 arrays; :func:`retrieval_metrics` averages them.
Queries with no relevant item in the gallery have no defined precision; the per-query
functions reject them, and :func:`retrieval_metrics` leaves them out and counts them.

The SOP protocol (queries are the gallery, each excluded from its own results and ground
truth) is applied where rankings are made: :func:`searchsvc.learning.evaluation.first_stage`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

BoolArray = NDArray[np.bool_]
FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]


def relevance_from_labels(query_labels: ArrayLike, ranked_gallery_labels: ArrayLike) -> BoolArray:
    """``(Q,)`` query labels and ``(Q, K)`` labels of each query's ranked results ->
    ``(Q, K)`` boolean relevance (same label = relevant)."""
    queries = np.asarray(query_labels)
    ranked = np.asarray(ranked_gallery_labels)
    if queries.ndim != 1 or ranked.ndim != 2 or len(queries) != len(ranked):
        raise ValueError(
            f"expected (Q,) query labels and (Q, K) ranked labels, got {queries.shape} and "
            f"{ranked.shape}"
        )
    return np.asarray(ranked == queries[:, None], dtype=bool)


def _prepare(relevance: ArrayLike, n_relevant: ArrayLike, k: int) -> tuple[BoolArray, IntArray]:
    rel = np.asarray(relevance, dtype=bool)
    n_rel = np.asarray(n_relevant, dtype=np.int64)
    if rel.ndim != 2:
        raise ValueError(f"relevance must be a (Q, K) matrix, got shape {rel.shape}")
    if n_rel.shape != (rel.shape[0],):
        raise ValueError(f"n_relevant must have shape ({rel.shape[0]},), got {n_rel.shape}")
    if k < 1:
        raise ValueError(f"k must be at least 1, got k={k}")
    if k > rel.shape[1]:
        raise ValueError(f"k={k} exceeds the {rel.shape[1]} ranked positions given")
    if np.any(n_rel < 1):
        raise ValueError(
            f"{int(np.sum(n_rel < 1))} queries have no relevant item in the gallery "
            "(leave them out, or use retrieval_metrics, which counts them)"
        )
    hits = rel.sum(axis=1)
    if np.any(hits > n_rel):
        q = int(np.argmax(hits > n_rel))
        raise ValueError(
            f"query {q} has {int(hits[q])} relevant results but n_relevant={int(n_rel[q])}"
        )
    return rel[:, :k], n_rel


def cmc_at_k(relevance: ArrayLike, n_relevant: ArrayLike, k: int) -> FloatArray:
    """Per query: 1.0 if any of the top ``k`` is relevant, else 0.0."""
    rel, _ = _prepare(relevance, n_relevant, k)
    return np.asarray(rel.any(axis=1), dtype=np.float64)


def precision_at_k(relevance: ArrayLike, n_relevant: ArrayLike, k: int) -> FloatArray:
    """Per query: relevant items in the top ``k`` / min(k, n_relevant)."""
    rel, n_rel = _prepare(relevance, n_relevant, k)
    return np.asarray(rel.sum(axis=1) / np.minimum(k, n_rel), dtype=np.float64)


def map_at_k(relevance: ArrayLike, n_relevant: ArrayLike, k: int) -> FloatArray:
    """Per query: (1/n_k) * sum_{i<=k} (n_i / i) * rel_i; 0 when no hit in the top ``k``."""
    rel, _ = _prepare(relevance, n_relevant, k)
    relf = rel.astype(np.float64)
    hits_at = np.cumsum(relf, axis=1)  # n_i
    ranks = np.arange(1, k + 1, dtype=np.float64)
    summed = (hits_at / ranks * relf).sum(axis=1)
    n_k = hits_at[:, -1]
    out = np.zeros(len(rel), dtype=np.float64)
    np.divide(summed, n_k, out=out, where=n_k > 0)
    return out


@dataclass(frozen=True)
class RetrievalReport:
    metrics: dict[str, float]
    """``"cmc@k"``, ``"precision@k"``, ``"map@k"`` for each k, in [0, 1]."""
    n_queries: int
    """Queries averaged over (those with at least one relevant item)."""
    n_skipped: int
    """Queries left out because the gallery holds nothing relevant to them."""


def retrieval_metrics(
    relevance: ArrayLike, n_relevant: ArrayLike, ks: Iterable[int] = (1, 5)
) -> RetrievalReport:
    """Mean CMC@k, precision@k and mAP@k over the queries that have a relevant item."""
    rel = np.asarray(relevance, dtype=bool)
    n_rel = np.asarray(n_relevant, dtype=np.int64)
    if rel.ndim != 2 or n_rel.shape != (rel.shape[0],):
        raise ValueError(
            f"expected (Q, K) relevance and (Q,) n_relevant, got {rel.shape} and {n_rel.shape}"
        )
    keep = n_rel > 0
    rel, n_rel = rel[keep], n_rel[keep]
    metrics: dict[str, float] = {}
    for k in sorted(set(ks)):
        for name, fn in (("cmc", cmc_at_k), ("precision", precision_at_k), ("map", map_at_k)):
            values = fn(rel, n_rel, k)
            metrics[f"{name}@{k}"] = float(values.mean()) if len(values) else float("nan")
    return RetrievalReport(metrics, n_queries=int(keep.sum()), n_skipped=int((~keep).sum()))
