"""Where and in what precision models run: shared by the embedder and STIR."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from searchsvc.core.errors import ConfigError

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


def training_autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The autocast dtype of a training step: :func:`autocast_dtype`, except that ``auto``
    on a CPU with native bf16 instructions (AMX tiles or AVX512-BF16) trains in bf16.

    Small profile, batch 80, matmul attention (:func:`matmul_attention`), measured side by
    side: 211 ms per step in bf16 against 418 ms in fp32 on a 2-core Xeon with AMX (one
    thread); 214-232 ms against 397-437 ms on a 2-core AMD EPYC with AVX512-BF16 and no AMX
    (two threads). Without matmul attention bf16 saved only 0-16%. The embedder serves
    with :func:`autocast_dtype` (exact fp32 on every CPU), STIR with
    :func:`rerank_autocast_dtype`.
    """
    if precision == "auto" and device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return autocast_dtype(device, precision)


def rerank_autocast_dtype(device: torch.device, precision: Precision) -> torch.dtype | None:
    """The autocast dtype of STIR's inference: :func:`autocast_dtype`, except that ``auto``
    on a CPU with native bf16 instructions scores pairs in bf16.

    The embedder stays exact (its vectors are stored and compared with ones embedded long
    before); a STIR score lives for one request. Measured side by side on a 2-core Xeon with
    AMX (``benchmarks/bench_stir_precision.py``, the trained STIRs of the real-photo
    benchmark, 865 queries' top 5): bf16 2.0x the fp32 pairs/s, CMC@1 unchanged (61.97 and
    61.97 at 32 px), the order of 18 of 865 top-5 lists changed by distances within 0.04;
    the instance benchmark's STIR, 5,000 queries: 1.9x, CMC@1 90.88 fp32 against 90.84.
    The rule is the training step's, so that the gate validates STIR as it is served.
    """
    return training_autocast_dtype(device, precision)


BF16_CPU_FLAGS = frozenset({"amx_bf16", "avx512_bf16"})


@functools.cache
def cpu_has_native_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether the CPU advertises bf16 arithmetic (AMX tiles or AVX512-BF16; Linux; False
    where it cannot tell). Without them bf16 is emulated and slower than fp32."""
    try:
        with cpuinfo.open(encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return not BF16_CPU_FLAGS.isdisjoint(line.split())
    except OSError:
        pass
    return False


@contextlib.contextmanager
def matmul_attention(
    net: nn.Module, device: torch.device, dtype: torch.dtype | None
) -> Iterator[int]:
    """For bf16 training on a CPU: timm's attention layers use explicit matmuls instead of
    the fused kernel while the block runs (yields how many layers were switched; each gets
    its own setting back on exit).

    The CPU's fused (flash) attention backward in bf16 took 55% of a small-profile training
    step (40 ms per call, profiled); with matmuls the step ran in half the time. fp32, CUDA
    and inference keep the fused kernel (as fast or faster there).
    """
    layers = (
        [m for m in net.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
        if device.type == "cpu" and dtype == torch.bfloat16
        else []
    )
    before = [bool(module.fused_attn) for module in layers]
    for module in layers:
        setattr(module, "fused_attn", False)  # noqa: B010 - a timm attribute, not a Module
    try:
        yield len(layers)
    finally:
        for module, fused in zip(layers, before, strict=True):
            setattr(module, "fused_attn", fused)  # noqa: B010


@contextlib.contextmanager
def training_forward(
    net: nn.Module, device: torch.device, dtype: torch.dtype | None
) -> Iterator[None]:
    """The context of a training forward pass: autocast to ``dtype`` (none for fp32) and,
    for bf16 on a CPU, :func:`matmul_attention`."""
    with (
        torch.autocast(device.type, dtype=dtype, enabled=dtype is not None),
        matmul_attention(net, device, dtype),
    ):
        yield


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
