"""How STIR's scores combine with the first-stage ranking: pure functions, no torch.

The first stage returns the top ``k`` by embedding distance, best first. STIR scores the
first ``top_n`` of them; those are re-sorted by STIR distance, and the rest keep their
first-stage order after them. The first-stage distance is NOT mixed into the STIR score.

Reported distances stay non-decreasing down the merged list: the reranked block's STIR
distances are mapped into an interval that ends below the first item that was not
reranked (see :func:`merge_reranked`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

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
