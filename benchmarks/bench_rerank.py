"""The rerank task against the bare STIR forward, and batching across queries.

    python benchmarks/bench_rerank.py [--queries 200] [--top-n 5]

On one ingested demo catalog (small profile) with an untrained small STIR (speed does not
depend on the weights), in one run:

1. bare: ``StirScorer.score`` on pixels already in memory, one query's top_n per call;
2. task: ``searchsvc.jobs.tasks.rerank`` on the same pairs: base64 query pixels in, candidate
   pixels read from the pixel store, the micro-batcher hop; with the share spent loading;
3. 8 concurrent clients: each sends its queries' rerank tasks one after another, with the
   cross-query batcher on (requests that wait together share one forward) and off
   (max one request per forward), queries/s and latency p50/p95.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime as dt
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from machine import SPEED_PROFILE

from searchsvc.app import App
from searchsvc.core.config import load_settings
from searchsvc.jobs.model_files import register_version
from searchsvc.jobs.tasks import rerank
from searchsvc.jobs.wire import RerankRequest, encode_pixels
from searchsvc.learning.datasets import write_demo_catalog
from searchsvc.models.batcher import MicroBatcher
from searchsvc.models.embedder import load_embedding_net
from searchsvc.models.stir import StirConfig, StirNet, save_stir
from searchsvc.storage.db import Image, ModelKind
from searchsvc.storage.pixels import SqlitePixelStore
from searchsvc.storage.versions import active_version


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=400)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--top-n", type=int, default=5)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-rerank-") as tmp:
        work = Path(tmp)
        catalog, _ = write_demo_catalog(
            work / "demo",
            products=args.products,
            views=2,
            queries_per_product=0,
            cache_dir=work / "cache",
        )
        settings = load_settings(env={"SEARCHSVC_HOME": str(work / "home"), **SPEED_PROFILE})
        app = App(settings)
        app.ingest(catalog)
        embedder = active_version(app.db, ModelKind.EMBEDDER)
        assert embedder is not None
        torch.manual_seed(0)
        stir_path = work / "stir.safetensors"
        net = load_embedding_net(embedder.file)
        save_stir(StirNet.from_embedder(net, StirConfig(spec=net.spec)), stir_path)
        register_version(app.db, settings, ModelKind.STIR, stir_path, activate=True)
        stir = active_version(app.db, ModelKind.STIR)
        assert stir is not None
        ctx = app.task_context()
        scorer, _ = ctx.models.stir(stir)
        size = scorer.info.input_size

        with app.db.session() as session:
            hashes = [h for (h,) in session.query(Image.content_hash).order_by(Image.id)]
        rng = np.random.default_rng(0)
        jobs = []
        for _ in range(args.queries):
            picked = [hashes[i] for i in rng.choice(len(hashes), args.top_n, replace=False)]
            query = ctx.pixels.get(hashes[int(rng.integers(len(hashes)))], size)
            jobs.append((query, picked))
        requests = [RerankRequest(stir.id, size, encode_pixels(q), picked) for q, picked in jobs]
        in_memory = [(q, np.stack([ctx.pixels.get(h, size) for h in picked])) for q, picked in jobs]

        # Warm up both paths once.
        scorer.score(*in_memory[0])
        rerank(requests[0], ctx)
        pairs = args.queries * args.top_n

        def bare_run() -> float:
            started = time.perf_counter()
            for query, candidates in in_memory:
                scorer.score(query, candidates)
            return time.perf_counter() - started

        def task_run(cache: bool) -> tuple[float, list[float]]:
            # cold: every candidate's PNG is read and decoded; warm: the in-memory LRU.
            ctx.pixels = SqlitePixelStore(settings.media_dir, cache_bytes=256 << 20 if cache else 0)
            if cache:
                for request in requests:
                    for digest in request.candidate_hashes:
                        ctx.pixels.get(digest, size)
            load_ms: list[float] = []
            started = time.perf_counter()
            for request in requests:
                load_ms.append(rerank(request, ctx).timings_ms["load_pixels"])
            return time.perf_counter() - started, load_ms

        # Alternate the paths for several rounds and keep medians: other load on the
        # machine then hits all of them alike.
        rounds: dict[str, list[float]] = {"bare": [], "cold": [], "warm": []}
        loads: dict[str, list[float]] = {"cold": [], "warm": []}
        for _ in range(args.rounds):
            rounds["bare"].append(bare_run())
            for name, cache in (("cold", False), ("warm", True)):
                seconds, load_ms = task_run(cache)
                rounds[name].append(seconds)
                loads[name].append(sum(load_ms) / 1000 / seconds)
        bare_s = statistics.median(rounds["bare"])
        cold_s = statistics.median(rounds["cold"])
        warm_s = statistics.median(rounds["warm"])

        def concurrent_run(batched: bool) -> tuple[float, list[float], int]:
            def score(items: list[tuple[np.ndarray, np.ndarray]]) -> list[float]:
                queries = np.stack([q for q, _ in items])
                candidates = np.stack([c for _, c in items])
                return [float(d) for d in scorer.score_pairs(queries, candidates)]

            batcher: MicroBatcher[tuple[np.ndarray, np.ndarray], float] = MicroBatcher(
                score,
                max_items=settings.rerank_max_batch_pairs if batched else args.top_n,
                max_wait_s=settings.rerank_batch_wait_ms / 1000 if batched else 0.0,
            )
            latencies: list[float] = []

            def client(worker: int) -> None:
                for index in range(worker, len(requests), args.clients):
                    request = requests[index]
                    t0 = time.perf_counter()
                    query = jobs[index][0]
                    candidates = [ctx.pixels.get(h, size) for h in request.candidate_hashes]
                    batcher.run([(query, c) for c in candidates])
                    latencies.append((time.perf_counter() - t0) * 1000)

            t0 = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(client, range(args.clients)))
            seconds = time.perf_counter() - t0
            runs = batcher.batches_run
            batcher.close()
            return seconds, latencies, runs

        batched_s, batched_lat, batched_runs = concurrent_run(True)
        single_s, single_lat, single_runs = concurrent_run(False)
        app.close()

    print(f"# rerank benchmark, {dt.date.today()}")
    print(
        f"# machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__} "
        f"threads {torch.get_num_threads()}; small profile STIR ({size}x{size} per image, "
        f"{2 * (size // 4) ** 2 + 1} tokens), fp32, top_n {args.top_n}, {args.queries} queries"
    )
    title = f"path (median of {args.rounds} rounds)"
    print(f"{title:<34} {'pairs/s':>9} {'ms/query':>9} {'loading':>8}")
    for name, seconds, load in (
        ("bare StirScorer.score", bare_s, None),
        ("rerank task, pixel cache cold", cold_s, statistics.median(loads["cold"])),
        ("rerank task, pixel cache warm", warm_s, statistics.median(loads["warm"])),
    ):
        share = "" if load is None else f"{load:.1%}"
        print(
            f"{name:<34} {pairs / seconds:>9.1f} {seconds / args.queries * 1000:>9.2f} {share:>8}"
        )
    print(
        f"task overhead over bare: cold {cold_s / bare_s - 1:+.1%}, "
        f"warm {warm_s / bare_s - 1:+.1%} (target < 15%)"
    )
    print(f"# {args.clients} concurrent clients, each query's top_n scored through the batcher")
    print(f"{'mode':<28} {'queries/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'forwards':>9}")
    for name, seconds, lat, runs in (
        ("batched across queries", batched_s, batched_lat, batched_runs),
        ("one query per forward", single_s, single_lat, single_runs),
    ):
        print(
            f"{name:<28} {args.queries / seconds:>9.1f} {percentile(lat, 50):>8.2f} "
            f"{percentile(lat, 95):>8.2f} {runs:>9}"
        )
    print(f"batched / one-by-one throughput: {single_s / batched_s:.2f}x")


if __name__ == "__main__":
    main()
