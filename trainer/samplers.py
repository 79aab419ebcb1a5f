"""Balanced batches: ``n_labels`` products x ``n_instances`` images each.

Triplet mining and STIR's pair mining need every batch to hold positives for every anchor
and many negatives; a uniform sampler gives mostly singletons. An epoch visits every label
once (in a seeded order); a label with fewer than ``n_instances`` images repeats some of them
(their augmentations differ), so a product with a single image still serves as a negative
for the others. Batches depend only on (seed, epoch): a resumed run gets the same ones.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np


class BalancedBatchSampler:
    """Batches of item indices; see the module docstring."""

    def __init__(
        self, labels: Sequence[int] | np.ndarray, n_labels: int, n_instances: int, seed: int = 0
    ) -> None:
        if n_labels < 2 or n_instances < 2:
            raise ValueError(
                f"a balanced batch needs n_labels >= 2 and n_instances >= 2, got "
                f"{n_labels} x {n_instances}"
            )
        array = np.asarray(labels, dtype=np.int64)
        order = np.argsort(array, kind="stable")
        order = order[array[order] >= 0]  # unlabelled items are never sampled
        values, starts = np.unique(array[order], return_index=True)
        self.groups: list[np.ndarray] = np.split(order, starts[1:]) if len(values) else []
        if len(self.groups) < 2:
            raise ValueError(f"need at least 2 distinct labels, got {len(self.groups)}")
        self.n_labels = min(n_labels, len(self.groups))
        self.n_instances = n_instances
        self.seed = seed

    @property
    def batch_size(self) -> int:
        return self.n_labels * self.n_instances

    def __len__(self) -> int:
        """Batches per epoch: every label once (the last, incomplete batch is dropped)."""
        return len(self.groups) // self.n_labels

    def epoch(self, epoch: int) -> Iterator[np.ndarray]:
        """The batches (arrays of item indices) of epoch ``epoch``."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.groups))
        for b in range(len(self)):
            batch = []
            for g in order[b * self.n_labels : (b + 1) * self.n_labels]:
                members = self.groups[g]
                replace = len(members) < self.n_instances
                batch.append(rng.choice(members, size=self.n_instances, replace=replace))
            yield np.concatenate(batch)
