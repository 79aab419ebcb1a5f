"""Throughput of the embedded vector index (EdgeIndex).

Loads N random unit vectors in batches, optimizes (builds HNSW), then times single-vector
searches (unfiltered and filtered on category). Usage::

    python benchmarks/bench_index.py [--points 100000] [--dim 384] [--batch 1000]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from searchsvc.index import EdgeIndex, IndexPoint, point_id_for


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--points", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    vectors = rng.standard_normal((args.points, args.dim), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    categories = [f"cat{i % 20}" for i in range(args.points)]
    points = [
        IndexPoint(point_id_for(f"p{i}", f"h{i}"), vectors[i], f"p{i}", i, categories[i])
        for i in range(args.points)
    ]
    queries = rng.standard_normal((args.queries, args.dim), dtype=np.float32)

    with tempfile.TemporaryDirectory() as tmp, EdgeIndex(Path(tmp)) as index:
        index.ensure_collection("bench", args.dim)
        start = time.perf_counter()
        for i in range(0, args.points, args.batch):
            index.upsert("bench", points[i : i + args.batch])
        load_s = time.perf_counter() - start
        start = time.perf_counter()
        index.optimize("bench")
        optimize_s = time.perf_counter() - start
        assert index.count("bench") == args.points

        def timed(filters: dict[str, str] | None) -> np.ndarray:
            for q in queries[:10]:  # warm-up
                index.search("bench", q, args.limit, filters)
            times = []
            for q in queries:
                t0 = time.perf_counter()
                index.search("bench", q, args.limit, filters)
                times.append(time.perf_counter() - t0)
            return np.array(times) * 1000

        plain = timed(None)
        filtered = timed({"category": "cat3"})

    print(f"points={args.points} dim={args.dim} batch={args.batch} limit={args.limit}")
    print(
        f"upsert: {args.points / load_s:,.0f} points/s "
        f"({load_s:.1f} s in upsert calls of {args.batch})"
    )
    print(f"optimize (HNSW build): {optimize_s:.1f} s")
    print(f"search: p50 {np.percentile(plain, 50):.2f} ms, p95 {np.percentile(plain, 95):.2f} ms")
    print(
        f"search filtered (1/20 of points): p50 {np.percentile(filtered, 50):.2f} ms, "
        f"p95 {np.percentile(filtered, 95):.2f} ms"
    )


if __name__ == "__main__":
    main()
