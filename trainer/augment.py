"""Training augmentation on whole batches: RandomResizedCrop + horizontal flip.

One affine grid per image, one ``grid_sample`` call per batch (bicubic): as fast on the CPU
as on a GPU, and seeded by a ``torch.Generator`` so a step's crops are reproducible.
The crop follows torchvision's RandomResizedCrop: an area fraction from ``scale`` and an
aspect ratio log-uniform in ``ratio``, placed uniformly inside the image.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def random_resized_crop(
    images: torch.Tensor,
    size: int,
    *,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``(N, C, H, W)`` float -> ``(N, C, size, size)``: one random crop (resized) per image,
    mirrored with probability ``flip_p``."""
    n = images.shape[0]
    if n == 0:
        return images.new_zeros((0, images.shape[1], size, size))
    device = images.device

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator)

    area = uniform(*scale)
    log_ratio = uniform(math.log(ratio[0]), math.log(ratio[1]))
    aspect = torch.exp(log_ratio)
    width = torch.sqrt(area * aspect).clamp(max=1.0)  # fractions of the image side
    height = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (1 - width) * torch.rand(n, generator=generator) + width / 2
    cy = (1 - height) * torch.rand(n, generator=generator) + height / 2
    flip = torch.where(torch.rand(n, generator=generator) < flip_p, -1.0, 1.0)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = width * flip
    theta[:, 0, 2] = 2 * cx - 1
    theta[:, 1, 1] = height
    theta[:, 1, 2] = 2 * cy - 1
    grid = F.affine_grid(theta.to(device), [n, images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)


def center_resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """The evaluation view of training pixels: the whole (square) image resized to
    ``size``, as the query path's centre crop sees it."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", antialias=True)


def resize_pixels(pixels: np.ndarray, size: int, batch: int = 512) -> np.ndarray:
    """``(N, L, L, 3)`` uint8 -> ``(N, size, size, 3)`` uint8, whole images resized
    (bicubic, antialiased), in batches."""
    if pixels.shape[1] == size and pixels.shape[2] == size:
        return pixels
    out = np.empty((len(pixels), size, size, 3), dtype=np.uint8)
    for start in range(0, len(pixels), batch):
        chunk = torch.from_numpy(np.ascontiguousarray(pixels[start : start + batch]))
        images = chunk.permute(0, 3, 1, 2).float()
        resized = center_resize(images, size).round().clamp(0, 255).to(torch.uint8)
        out[start : start + batch] = resized.permute(0, 2, 3, 1).numpy()
    return out
