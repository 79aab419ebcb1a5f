"""Where and in what precision models run: shared by the embedder and STIR."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import numpy as np
import torch

from searchsvc.errors import ConfigError

Precision = Literal["auto", "fp32", "bf16", "fp16"]


def select_device(name: str) -> torch.device:
    """``auto`` -> the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("SEARCHSVC_DEVICE: 'cuda' was asked for but no CUDA device is visible")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32.

    ``auto``: bf16 on a CUDA card that has it, else fp16; fp32 on the CPU, where results must
    be exact and reproducible (set ``bf16`` explicitly on CPUs with AVX512-BF16 or AMX).
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return None


@contextlib.contextmanager
def inference_context(device: torch.device, dtype: torch.dtype | None) -> Iterator[None]:
    with torch.inference_mode():
        if dtype is None:
            yield
        else:
            with torch.autocast(device_type=device.type, dtype=dtype):
                yield


def pixels_to_tensor(
    pixels: np.ndarray,
    mean: tuple[float, float, float],
    std: tuple[float, float, float],
    device: torch.device,
) -> torch.Tensor:
    """uint8 (N, H, W, 3) -> normalised float (N, 3, H, W) on ``device``.

    The uint8 batch crosses to the device first (4x fewer bytes than float), then is
    normalised there.
    """
    if not pixels.flags.writeable or not pixels.flags.c_contiguous:
        pixels = np.array(pixels, copy=True, order="C")  # torch wants writable memory
    batch = torch.from_numpy(pixels).to(device, non_blocking=True)
    batch = batch.permute(0, 3, 1, 2).float().div_(255.0)
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    return batch.sub_(mean_t).div_(std_t)
