"""Training data as the loops take it: pixels and integer labels, no DB."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from trainer.augment import resize_pixels
from trainer.pixel_rows import PixelRows


@dataclass(frozen=True)
class TrainSet:
    """Training pixels and integer labels (``-1``: an unlabelled image, never sampled as
    an anchor: a query photo that only serves a logged hard negative)."""

    pixels: np.ndarray | PixelRows
    """``(N, L, L, 3)`` uint8, decoded at the load size (a little over the input size): in
    memory, or rows on disk read a batch at a time (:class:`PixelRows`, the retrain's)."""
    labels: np.ndarray
    """``(N,)`` int64."""

    @classmethod
    def from_names(cls, pixels: np.ndarray | PixelRows, names: Sequence[str | None]) -> TrainSet:
        ids: dict[str, int] = {}
        labels = np.array(
            [-1 if n is None else ids.setdefault(n, len(ids)) for n in names], dtype=np.int64
        )
        return cls(pixels, labels)

    def __post_init__(self) -> None:
        if self.pixels.ndim != 4 or self.pixels.shape[-1] != 3 or self.pixels.dtype != np.uint8:
            raise ValueError(f"expected (N, L, L, 3) uint8 pixels, got {self.pixels.shape}")
        if self.labels.shape != (len(self.pixels),):
            raise ValueError(f"{len(self.labels)} labels for {len(self.pixels)} images")

    def eval_pixels(self, size: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Images ``start:stop`` as the query path sees them: whole, resized to ``size``
        (uint8)."""
        return resize_pixels(self.pixels[start:stop], size)
