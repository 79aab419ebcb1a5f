"""Throughput of the bare STIR network: (query, candidate) pairs per second.

Times ``StirNet.forward`` under ``torch.inference_mode`` in fp32 and in bf16 autocast, at
a few batch sizes, for the "small" profile and ViT-S/16 at 224 (random weights: the
architecture decides the speed; nothing is downloaded). Usage::

    python benchmarks/bench_stir.py [--profiles small vit_s16] [--batches 5 64]
                                    [--iters-small 20] [--iters-vit 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import os
import platform
import time

import torch
from machine import cpu_name

from searchsvc.core.profiles import PROFILES
from searchsvc.models.stir import StirConfig, StirNet


def pairs_per_second(
    net: StirNet,
    batch: int,
    iters: int,
    dtype: torch.dtype | None,
    device: torch.device,
) -> float:
    size = net.spec.input_size
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(batch, 3, size, size, generator=gen).to(device)
    candidates = torch.randn(batch, 3, size, size, generator=gen).to(device)

    def run() -> None:
        with torch.inference_mode():
            if dtype is None:
                net(query, candidates)
            else:
                with torch.autocast(device_type=device.type, dtype=dtype):
                    net(query, candidates)
        if device.type == "cuda":
            torch.cuda.synchronize()

    run()  # warm-up (allocations, kernel selection)
    start = time.perf_counter()
    for _ in range(iters):
        run()
    return batch * iters / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profiles", nargs="+", default=["small", "vit_s16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[5, 64])
    parser.add_argument("--iters-small", type=int, default=20)
    parser.add_argument("--iters-vit", type=int, default=2, help="for profiles other than small")
    parser.add_argument("--positional", choices=["interpolate", "split"], default="interpolate")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"date     {dt.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"machine  {platform.platform()} | {cpu_name()} | {os.cpu_count()} logical CPUs")
    print(
        f"torch    {torch.__version__} | threads {torch.get_num_threads()} | device {device} | "
        f"load average at start {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    print(f"mode     StirNet.forward, positional={args.positional}, inference_mode, random weights")
    print()
    header = f"{'profile':<9} {'pair input':>11} {'tokens':>6} {'batch':>5} {'iters':>5}"
    print(f"{header} {'fp32 pairs/s':>13} {'bf16 pairs/s':>13}")
    for profile in args.profiles:
        spec = dataclasses.replace(PROFILES[profile], hub_pretrained=False)
        torch.manual_seed(0)
        net = StirNet(StirConfig(spec=spec, positional=args.positional)).eval().to(device)
        size = spec.input_size
        grid = net.half_grid
        tokens = 2 * grid[0] * grid[1] + net.backbone.num_prefix_tokens
        iters = args.iters_small if profile == "small" else args.iters_vit
        for batch in args.batches:
            fp32 = pairs_per_second(net, batch, iters, None, device)
            bf16 = pairs_per_second(net, batch, iters, torch.bfloat16, device)
            print(
                f"{profile:<9} {f'3x{2 * size}x{size}':>11} {tokens:>6} {batch:>5} {iters:>5} "
                f"{fp32:>13.1f} {bf16:>13.1f}",
                flush=True,
            )
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"\nload average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
