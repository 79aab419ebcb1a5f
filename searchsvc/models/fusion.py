"""How STIR's scores combine with the first-stage ranking: pure functions, no torch.

The first stage returns the top ``k`` by embedding distance, best first. STIR scores the
first ``top_n`` of them; those are re-sorted by STIR distance, and the rest keep their
first-stage order after them. In the paper the first-stage distance is NOT mixed into the
STIR score; a STIR file may carry a calibrated ``fusion_weight`` (fitted on validation by
the trainer, 0 = the paper's rule) with which :func:`fuse_distances` blends the two first.

Reported distances stay non-decreasing down the merged list: the reranked block's STIR
distances are mapped into an interval that ends below the first item that was not
reranked (see :func:`merge_reranked`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from numpy.typing import NDArray

T = TypeVar("T")


@dataclass(frozen=True)
class MergeResult:
    order: list[int]
    """Indices into the first-stage list, in the merged order."""
    distances: list[float]
    """The distance to report for each position of ``order`` (non-decreasing)."""

    def apply(self, items: Sequence[T]) -> list[T]:
        """The first-stage ``items`` in the merged order."""
        if len(items) != len(self.order):
            raise ValueError(f"{len(items)} items for a merged order of {len(self.order)}")
        return [items[i] for i in self.order]


def validate_top_n(top_n: int, k: int) -> None:
    """STIR reorders at least two candidates and at most all ``k`` first-stage results."""
    if top_n <= 1:
        raise ValueError(f"top_n must be greater than 1 (got top_n={top_n}, k={k})")
    if top_n > k:
        raise ValueError(f"top_n must be at most k (got top_n={top_n}, k={k})")


def merge_reranked(
    first_stage_distances: Sequence[float], stir_distances: Sequence[float], top_n: int
) -> MergeResult:
    """Re-sort the first ``top_n`` first-stage results by STIR distance.

    Order: the first ``top_n`` sorted by ascending STIR distance, stably (equal STIR
    distances keep their first-stage order); items ``top_n .. k-1`` follow unchanged.

    Reported distances. Let ``d_1 <= ... <= d_k`` be the first-stage distances and
    ``s`` a STIR distance in ``[0, 1]`` (a sigmoid). Each reranked item reports::

        lo + (hi - lo) * s,   lo = d_1,   hi = d_(top_n + 1)

    clamped to at most the largest float strictly below ``hi`` (``math.nextafter``). The
    map is increasing in ``s``, so the reported distances of the block follow the new
    order; every one of them is strictly below ``d_(top_n + 1)``, the first item that
    follows, so the whole list stays non-decreasing. STIR's absolute scale is kept: a sure
    match (``s = 0``) reports the best first-stage distance. When the first ``top_n + 1``
    first-stage distances are all equal (``lo == hi``) the block reports
    ``nextafter(hi, -inf)`` for every item.

    ``top_n == k`` (nothing follows): the block maps onto the closed range the first stage
    reported, ``hi = d_k``, without the clamp (``s = 1`` reports ``d_k``).

    Raises ValueError when ``top_n`` is not in ``2..k``, when ``stir_distances`` does not
    have ``top_n`` values, when a STIR distance is not in ``[0, 1]``, or when the
    first-stage distances are not finite and non-decreasing.
    """
    k = len(first_stage_distances)
    validate_top_n(top_n, k)
    if len(stir_distances) != top_n:
        raise ValueError(f"expected {top_n} STIR distances (top_n), got {len(stir_distances)}")
    first = [float(d) for d in first_stage_distances]
    stir = [float(s) for s in stir_distances]
    for i, d in enumerate(first):
        if not math.isfinite(d):
            raise ValueError(f"first-stage distance {i} is not finite ({d})")
        if i and d < first[i - 1]:
            raise ValueError(
                f"first-stage distances must be non-decreasing (best first): "
                f"position {i} has {d} after {first[i - 1]}"
            )
    for i, s in enumerate(stir):
        if not 0.0 <= s <= 1.0:  # also rejects NaN
            raise ValueError(f"STIR distance {i} is not in [0, 1] ({s})")

    block = sorted(range(top_n), key=lambda i: (stir[i], i))
    lo = first[0]
    if top_n < k:
        hi = first[top_n]
        ceiling = math.nextafter(hi, -math.inf)
        block_distances = [min(lo + (hi - lo) * stir[i], ceiling) for i in block]
    else:
        hi = first[-1]
        block_distances = [min(lo + (hi - lo) * stir[i], hi) for i in block]
    order = block + list(range(top_n, k))
    return MergeResult(order=order, distances=block_distances + first[top_n:])


def fuse_distances(
    first_stage_distances: np.ndarray | Sequence[float],
    stir_distances: np.ndarray | Sequence[float],
    weight: float,
) -> NDArray[np.float64]:
    """Blend STIR distances with the first stage's, per query: ``(s + w * r) / (1 + w)``.

    ``r`` is each candidate's first-stage distance rescaled within its own query's block,
    ``(d - d_1) / (d_n - d_1)`` (0 when the block's distances are all equal), so the blend
    does not depend on the embedder's distance scale. The result stays in ``[0, 1]`` and
    is what :func:`merge_reranked` sorts by. ``weight = 0`` returns the STIR distances
    unchanged (the paper's rule); a large weight keeps the first-stage order and lets STIR
    break near-ties only.

    Works on one query (``(n,)`` arrays) or many (``(Q, n)``); the first-stage block must be
    the first ``n`` first-stage distances, best first.
    """
    if weight < 0 or not math.isfinite(weight):
        raise ValueError(f"fusion weight must be finite and >= 0, got {weight}")
    first = np.asarray(first_stage_distances, dtype=np.float64)
    stir = np.asarray(stir_distances, dtype=np.float64)
    if first.shape != stir.shape or first.ndim not in (1, 2):
        raise ValueError(
            f"first-stage and STIR distances must have one shape (n,) or (Q, n), got "
            f"{first.shape} and {stir.shape}"
        )
    if weight == 0:
        return stir.copy()
    low, high = first[..., :1], first[..., -1:]
    span = high - low
    relative = np.divide(first - low, span, out=np.zeros_like(first), where=span > 0)
    return np.clip((stir + weight * relative) / (1 + weight), 0.0, 1.0)


def rerank_order(
    distances: np.ndarray, stir_distances: np.ndarray, top_n: int, fusion_weight: float = 0.0
) -> NDArray[np.int64]:
    """Many queries at once: ``(Q, K)`` first-stage distances (best first) and ``(Q, n)``
    STIR distances of each query's first ``n = min(top_n, K)`` -> ``(Q, K)`` positions of
    the first-stage ranking in the reranked order (fused by ``fusion_weight``, then merged
    as :func:`merge_reranked` does). With ``n < 2`` the first-stage order stands."""
    dist = np.asarray(distances, dtype=np.float64)
    stir = np.asarray(stir_distances, dtype=np.float64)
    n = min(top_n, dist.shape[1])
    if stir.shape != (dist.shape[0], n):
        raise ValueError(f"expected ({dist.shape[0]}, {n}) STIR distances, got {stir.shape}")
    if n < 2:
        return np.tile(np.arange(dist.shape[1], dtype=np.int64), (dist.shape[0], 1))
    fused = fuse_distances(dist[:, :n], stir, fusion_weight)
    return np.array(
        [merge_reranked(row, s, n).order for row, s in zip(dist, fused, strict=True)],
        dtype=np.int64,
    )


def resolve_top_n(requested: int | None, *, default: int, top_k: int) -> int:
    """How many first-stage results a query reranks: the one place that decides it.

    The configured default shrinks to a smaller ``top_k``; an explicit request must lie in
    ``2..top_k`` (STIR reorders at least two candidates)."""
    if requested is None:
        return min(default, max(top_k, 2))
    if requested < 2 or requested > max(top_k, 2):
        raise ValueError(f"rerank_top_n must be in 2..top_k ({top_k}), got {requested}")
    return requested


@dataclass(frozen=True)
class RerankPlan:
    """How one query's STIR distances reorder its first stage: rerank the first ``top_n``,
    blended with the first stage by ``fusion_weight`` (:func:`fuse_distances`).

    ``calibrated_top_n`` is the top_n at which the trainer fitted the weight (stored with
    the STIR file); a plan at another top_n still applies it, and says so in :attr:`note`.
    """

    top_n: int
    fusion_weight: float = 0.0
    calibrated_top_n: int | None = None

    def __post_init__(self) -> None:
        if self.top_n < 2:
            raise ValueError(f"top_n must be greater than 1, got {self.top_n}")
        if self.fusion_weight < 0 or not math.isfinite(self.fusion_weight):
            raise ValueError(f"fusion weight must be finite and >= 0, got {self.fusion_weight}")

    @property
    def note(self) -> str | None:
        """Why this plan may rank less well than validation measured, if it may."""
        if self.calibrated_top_n is None or self.calibrated_top_n == self.top_n:
            return None
        return (
            f"fusion weight {self.fusion_weight:g} was calibrated at top_n "
            f"{self.calibrated_top_n}, applied at top_n {self.top_n}"
        )

    def apply(
        self, first_stage_distances: Sequence[float], stir_distances: Sequence[float]
    ) -> tuple[MergeResult, list[float]]:
        """One query: the merged order of its first-stage list and the (fused) distance each
        reranked candidate was sorted by, in first-stage order."""
        n = min(self.top_n, len(first_stage_distances))
        fused = fuse_distances(first_stage_distances[:n], stir_distances, self.fusion_weight)
        keys = [float(d) for d in fused]
        return merge_reranked(first_stage_distances, keys, n), keys
