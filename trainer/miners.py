"""Which comparisons a batch trains on.

Triplets (the embedder): ``all`` valid triplets of the batch, or the ``hardest`` per anchor
(farthest positive, closest negative). STIR.md: pure hardest-in-batch mining collapsed every
embedding to one point; all triplets for the first ~30% of the steps, then hardest, did not.

Pairs (STIR): per anchor its hardest positive and hardest negative by the FROZEN embedder's
distances (computed once, cached), or with probability ``1 - hard_fraction`` a random one
(STIR.md: a curriculum from random to mined pairs let it learn at all).
"""

from __future__ import annotations

import numpy as np
import torch


def pairwise_distances(embeddings: torch.Tensor) -> torch.Tensor:
    """Euclidean distances of (unit) vectors, with a gradient that stays finite at 0."""
    squared = (2 - 2 * embeddings @ embeddings.T).clamp(min=0)
    return torch.sqrt(squared + 1e-12)


def masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive mask without the diagonal, negative mask) of a batch's labels."""
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same


def hardest_triplets(
    distances: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per anchor that has both: (farthest positive distance, closest negative distance)."""
    positive, negative = masks(labels)
    usable = positive.any(1) & negative.any(1)
    d_ap = distances.masked_fill(~positive, -torch.inf).amax(1)
    d_an = distances.masked_fill(~negative, torch.inf).amin(1)
    return d_ap[usable], d_an[usable]


def all_triplets(
    distances: torch.Tensor, labels: torch.Tensor, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every valid (anchor, positive, negative): ``(T,)`` d_ap and d_an. Anchors are
    processed ``chunk`` at a time so the (A, B, B) comparison stays small."""
    positive, negative = masks(labels)
    aps, ans = [], []
    for start in range(0, len(labels), chunk):
        rows = slice(start, start + chunk)
        valid = positive[rows, :, None] & negative[rows, None, :]
        a, p, n = valid.nonzero(as_tuple=True)
        a = a + start
        aps.append(distances[a, p])
        ans.append(distances[a, n])
    return torch.cat(aps), torch.cat(ans)


def mine_pairs(
    embeddings: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    *,
    hard_fraction: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """STIR training pairs of one batch, as batch positions: ``(first, second,
    is_negative)``. Per anchor one positive and one negative, each the hardest by the
    frozen embeddings with probability ``hard_fraction``, else a random one. Duplicate
    pairs (in either order) are kept once."""
    emb = np.asarray(embeddings, dtype=np.float64)
    dist = np.sqrt(np.clip(2 - 2 * emb @ emb.T, 0, None))
    same = labels[:, None] == labels[None, :]
    np.fill_diagonal(same, False)
    other = labels[:, None] != labels[None, :]
    seen: set[tuple[int, int]] = set()
    first, second, target = [], [], []
    for anchor in range(len(labels)):
        for mask, negative in ((same[anchor], False), (other[anchor], True)):
            candidates = np.flatnonzero(mask)
            if len(candidates) == 0:
                continue
            if rng.random() < hard_fraction:
                row = dist[anchor, candidates]
                pick = candidates[np.argmin(row) if negative else np.argmax(row)]
            else:
                pick = rng.choice(candidates)
            key = (min(anchor, int(pick)), max(anchor, int(pick)))
            if key in seen:
                continue
            seen.add(key)
            first.append(anchor)
            second.append(int(pick))
            target.append(negative)
    return (
        np.asarray(first, dtype=np.int64),
        np.asarray(second, dtype=np.int64),
        np.asarray(target, dtype=bool),
    )


def neighbour_table(
    embeddings: np.ndarray, k: int, *, chunk: int = 2048
) -> tuple[np.ndarray, np.ndarray]:
    """Every item's ``k`` nearest items by cosine distance (itself excluded), nearest
    first, ties by index: ``(N, k)`` indices and distances. Exact, ``chunk`` rows at a
    time so that memory stays at ``chunk x N`` floats.

    torch's matmul and top-k, not numpy's argpartition: for 97,500 random unit vectors of
    128 dimensions (2-core EPYC, side by side) 56 s against 116 s. The table is built
    inside STIR's training budget."""
    vectors = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32))
    n = len(vectors)
    k = min(k, n - 1)
    if k < 1:
        raise ValueError(f"need at least 2 items for a neighbour table, got {n}")
    indices = np.empty((n, k), dtype=np.int64)
    distances = np.empty((n, k), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, n, chunk):
            similarity = vectors[start : start + chunk] @ vectors.T
            rows = torch.arange(len(similarity))
            similarity[rows, start + rows] = -torch.inf  # never its own neighbour
            top, where = torch.topk(similarity, k, dim=1, largest=True, sorted=True)
            part, part_d = where.numpy(), 1.0 - top.numpy()
            order = np.lexsort((part, part_d), axis=1)  # by distance, then index
            indices[start : start + chunk] = np.take_along_axis(part, order, axis=1)
            distances[start : start + chunk] = np.take_along_axis(part_d, order, axis=1)
    return indices, distances


def useful_anchors(neighbours: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Items whose neighbour group holds both a match and a non-match: the only groups in
    which a reranker has an order to fix (items labelled -1 never anchor)."""
    same = labels[neighbours] == labels[:, None]
    return np.flatnonzero((labels >= 0) & same.any(axis=1) & ~same.all(axis=1))


def relative_distances(distances: np.ndarray) -> np.ndarray:
    """Per row, ``(d - d_first) / (d_last - d_first)`` (0 where the row is flat): the
    first-stage signal that :func:`searchsvc.models.fusion.fuse_distances` blends in."""
    d = np.asarray(distances, dtype=np.float64)
    low, span = d[:, :1], d[:, -1:] - d[:, :1]
    return np.divide(d - low, span, out=np.zeros_like(d), where=span > 0)
