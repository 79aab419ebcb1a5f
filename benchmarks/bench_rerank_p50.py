"""Latency of one top-N rerank: N candidates' pixels from the store + one STIR forward.

    python benchmarks/bench_rerank_p50.py --profile vit_s16 --device cuda --precision bf16

Random weights (speed depends on the architecture only; nothing is downloaded). Prints
p50/p95 over ``--iters`` reranks, after warm-up, and the bare pairs/s at batch 64.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from searchsvc.core.profiles import PROFILES
from searchsvc.models.embedder import EmbeddingNet
from searchsvc.models.stir import StirConfig, StirNet, StirScorer
from searchsvc.storage.pixels import SqlitePixelStore


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="vit_s16", choices=sorted(PROFILES))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    parser.add_argument("--top-n", type=int, default=5)
    parser.add_argument("--iters", type=int, default=100)
    args = parser.parse_args()

    spec = PROFILES[args.profile]
    spec = type(spec)(**{**spec.__dict__, "hub_pretrained": False})
    torch.manual_seed(0)
    net = StirNet.from_embedder(EmbeddingNet(spec), StirConfig(spec=spec))
    scorer = StirScorer(net, device=args.device, precision=args.precision)
    size = spec.input_size
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as tmp:
        store = SqlitePixelStore(Path(tmp), cache_bytes=0)  # every rerank reads its candidates
        hashes = [f"{n:064x}" for n in range(64)]
        store.put_many(
            (digest, rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for digest in hashes
        )
        query = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

        def one_rerank(picked: list[str]) -> float:
            started = time.perf_counter()
            candidates = np.stack([store.get(h, size) for h in picked])
            scorer.score(query, candidates)
            if scorer.device.type == "cuda":
                torch.cuda.synchronize()
            return (time.perf_counter() - started) * 1000

        for _ in range(5):
            one_rerank(hashes[: args.top_n])
        latencies = [
            one_rerank([hashes[i] for i in rng.choice(64, args.top_n, replace=False)])
            for _ in range(args.iters)
        ]
        batch = np.stack([store.get(h, size) for h in hashes])
        scorer.score_pairs(batch, batch)
        started = time.perf_counter()
        rounds = max(1, args.iters // 10)
        for _ in range(rounds):
            scorer.score_pairs(batch, batch)
        if scorer.device.type == "cuda":
            torch.cuda.synchronize()
        pairs_per_s = rounds * len(batch) / (time.perf_counter() - started)

    device = torch.cuda.get_device_name() if scorer.device.type == "cuda" else platform.processor()
    print(
        f"# {dt.date.today()} {device}; STIR {args.profile} ({2 * size}x{size} pairs), "
        f"autocast {scorer.dtype}, torch {torch.__version__}"
    )
    print(
        f"top-{args.top_n} rerank (pixels from store + forward): "
        f"p50 {np.percentile(latencies, 50):.2f} ms, p95 {np.percentile(latencies, 95):.2f} ms"
    )
    print(f"bare forward at batch 64: {pairs_per_s:.1f} pairs/s")


if __name__ == "__main__":
    main()
