"""Losses of the two models."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainer.miners import all_triplets, hardest_triplets, pairwise_distances


@dataclass(frozen=True)
class TripletStats:
    loss: torch.Tensor
    active: float
    """Fraction of the mined triplets that still violate the margin."""
    triplets: int


def triplet_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, *, margin: float, mining: str
) -> TripletStats:
    """``relu(d(a, p) - d(a, n) + margin)`` on L2-normalised embeddings (Euclidean).

    ``hardest``: mean over anchors of their hardest triplet. ``all``: mean over the
    triplets that are still active (the batch-all loss of Hermans et al.; averaging over
    every triplet would let the easy majority drown the signal).
    """
    distances = pairwise_distances(F.normalize(embeddings.float(), dim=-1))
    if mining == "hardest":
        d_ap, d_an = hardest_triplets(distances, labels)
    elif mining == "all":
        d_ap, d_an = all_triplets(distances, labels)
    else:
        raise ValueError(f"mining must be 'all' or 'hardest', got {mining!r}")
    losses = F.relu(d_ap - d_an + margin)
    if len(losses) == 0:
        return TripletStats(embeddings.sum() * 0.0, 0.0, 0)
    active = losses > 0
    if mining == "all":
        loss = losses[active].mean() if active.any() else losses.sum() * 0.0
    else:
        loss = losses.mean()
    return TripletStats(loss, float(active.float().mean()), len(losses))


def stir_loss(logits: torch.Tensor, is_negative: torch.Tensor) -> torch.Tensor:
    """BCE with logits; the target is "the pair is NEGATIVE" (STIR's logit)."""
    return F.binary_cross_entropy_with_logits(logits.float(), is_negative.float())


def group_listwise_loss(
    logits: torch.Tensor, is_negative: torch.Tensor, prior: torch.Tensor | None = None
) -> torch.Tensor:
    """Per group (a query and its first-stage candidates, ``(G, k)``), the softmax
    cross-entropy of ``-logit`` with every match as a target: it trains the ORDER within a
    query, which is all a reranker is judged on. Groups without a match or without a
    non-match carry no order and are skipped.

    ``prior``: ``(G, k)`` logits added before the softmax (the first stage's rescaled
    distances times a weight): STIR then learns what to change in the first stage's order,
    not the order itself (residual training).
    """
    scores = logits.float() if prior is None else logits.float() + prior.float()
    negative = is_negative.bool()
    usable = (~negative).any(dim=1) & negative.any(dim=1)
    if not usable.any():
        return logits.sum() * 0.0
    scores, negative = -scores[usable], negative[usable]
    everything = torch.logsumexp(scores, dim=1)
    matches = torch.logsumexp(scores.masked_fill(negative, -torch.inf), dim=1)
    return (everything - matches).mean()
