"""Load with real worker processes: ingest throughput and concurrent query latency.

    python benchmarks/bench_load.py [--products 500] [--views 4] [--queries 160]

Needs Redis (default redis://127.0.0.1:6379/14, flushed first; SEARCHSVC_BENCH_REDIS_URL).

1. Ingest of one demo catalog (small profile), each mode in a fresh home: embedded
   (tasks in-process), 1 embed worker, 2 embed workers (celery, solo pool each). Torch
   threads are split so that the workers together use the machine's cores.
2. Queries: 8 concurrent clients (threads of one process: the embedded index opens in one
   process) against the ingested catalog, each query reranked by an (untrained) small STIR
   on a real rerank worker (threads pool, one process); latency p50/p95 of each stage.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime as dt
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import redis
import torch
from machine import SPEED_PROFILE, peak_rss_mib

from searchsvc.app import App
from searchsvc.core.config import Settings, load_settings
from searchsvc.jobs.dispatch import CeleryDispatcher
from searchsvc.jobs.model_files import ensure_active_embedder, register_version
from searchsvc.jobs.wire import EMBED_QUEUE, EMBED_TASK, EmbedRequest
from searchsvc.learning.datasets import write_demo_catalog
from searchsvc.models.embedder import load_embedding_net
from searchsvc.models.stir import StirConfig, StirNet, save_stir
from searchsvc.serving.rerank_stage import StirRerankStage
from searchsvc.serving.search import SearchService
from searchsvc.storage.db import ModelKind
from searchsvc.storage.versions import active_version
from workers.command import worker_command

REPO = Path(__file__).resolve().parent.parent


def start_worker(
    env: dict[str, str], queue: str, name: str, *extra: str
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        worker_command(queue, name, *extra),
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def worker_env(settings: Settings, threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEARCHSVC_")}
    env.update(
        SEARCHSVC_HOME=str(settings.home),
        SEARCHSVC_BROKER_URL=settings.broker_url,
        OMP_NUM_THREADS=str(threads),
    )
    return env


def ingest_mode(catalog: Path, home: Path, broker: str, workers: int) -> dict[str, float]:
    cores = os.cpu_count() or 1
    env = {"SEARCHSVC_HOME": str(home), **SPEED_PROFILE}
    if workers:
        env["SEARCHSVC_BROKER_URL"] = broker
    settings = load_settings(env=env)
    processes = [
        start_worker(
            worker_env(settings, max(1, cores // workers)), "embed", f"embed{n}", "--pool", "solo"
        )
        for n in range(workers)
    ]
    try:
        app = App(settings)
        if workers:
            warm_up(app, settings, workers)
        started = time.perf_counter()
        summary = app.ingest(catalog)
        seconds = time.perf_counter() - started
        app.close()
    finally:
        for process in processes:
            process.terminate()
            process.wait(timeout=30)
    assert summary.images_embedded == summary.images_seen, summary
    return {"images": summary.images_embedded, "seconds": seconds}


def warm_up(app: App, settings: Settings, workers: int) -> None:
    """Wait until every worker has booted and loaded the embedder (not part of ingest)."""
    version = ensure_active_embedder(app.db, settings)
    request = EmbedRequest([], version.id, version.collection or "")
    handles = [
        app.dispatcher.submit(EMBED_TASK, request.to_json(), queue=EMBED_QUEUE)
        for _ in range(4 * workers)
    ]
    for handle in handles:
        handle.result(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=500)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--queries", type=int, default=160)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()
    broker = os.environ.get("SEARCHSVC_BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")
    redis.Redis.from_url(broker).flushdb()

    with tempfile.TemporaryDirectory(prefix="bench-load-") as tmp:
        work = Path(tmp)
        catalog, queries_dir = write_demo_catalog(
            work / "demo", products=args.products, views=args.views, cache_dir=work / "cache"
        )
        ingest = {
            label: ingest_mode(catalog, work / f"home-{workers}", broker, workers)
            for label, workers in (("embedded", 0), ("1 worker", 1), ("2 workers", 2))
        }

        # Queries against the embedded-mode home, reranked on a real rerank worker.
        settings = load_settings(
            env={
                "SEARCHSVC_HOME": str(work / "home-0"),
                "SEARCHSVC_BROKER_URL": broker,
                **SPEED_PROFILE,
            }
        )
        settings = dataclasses.replace(settings, rerank_timeout_s=30.0)
        app = App(settings)
        embedder = active_version(app.db, ModelKind.EMBEDDER)
        assert embedder is not None
        net = load_embedding_net(embedder.file)
        torch.manual_seed(0)
        save_stir(StirNet.from_embedder(net, StirConfig(spec=net.spec)), work / "stir.safetensors")
        register_version(app.db, settings, ModelKind.STIR, work / "stir.safetensors", activate=True)
        reranker = start_worker(
            worker_env(settings, os.cpu_count() or 1),
            "rerank",
            "rerank0",
            "--pool",
            "threads",
            "--concurrency",
            str(args.clients),
        )
        photos = sorted(queries_dir.iterdir())[: args.queries]
        try:

            def service() -> SearchService:
                dispatcher = CeleryDispatcher(settings.broker_url)  # one connection per client
                return app.search_service(
                    StirRerankStage(app.db, lambda: dispatcher, timeout_s=settings.rerank_timeout_s)
                )

            warm = service()
            for photo in photos[:3]:  # the worker loads its model on the first task
                warm.query(photo.read_bytes(), str(photo))
            timings: list[dict[str, float]] = []
            flagged: list[str] = []

            def client(number: int) -> None:
                search = service()
                for photo in photos[number :: args.clients]:
                    response = search.query(photo.read_bytes(), str(photo))
                    if not response.reranked:
                        flagged.append(str(response.rerank_reason))
                    timings.append(response.timings_ms)

            started = time.perf_counter()
            with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
                list(pool.map(client, range(args.clients)))
            query_seconds = time.perf_counter() - started
        finally:
            reranker.terminate()
            reranker.wait(timeout=30)
            app.close()

    print(f"# load benchmark, {dt.date.today()}")
    print(
        f"# machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}; "
        f"demo catalog {args.products} x {args.views} photos, small profile, fp32; "
        f"coordinator peak RSS {peak_rss_mib():.0f} MiB"
    )
    print(f"{'ingest mode':<12} {'images':>7} {'seconds':>8} {'images/s':>9}")
    for label, result in ingest.items():
        rate = result["images"] / result["seconds"]
        print(f"{label:<12} {result['images']:>7.0f} {result['seconds']:>8.2f} {rate:>9.1f}")
    print(
        f"# {len(timings)} queries from {args.clients} concurrent clients in {query_seconds:.1f} s "
        f"({len(timings) / query_seconds:.1f} queries/s), rerank top 5 on 1 rerank worker; "
        f"{len(flagged)} answered without rerank {sorted(set(flagged))[:2]}"
    )
    print(f"{'stage':<18} {'p50 ms':>8} {'p95 ms':>8}")
    for stage in (
        "decode_embed",
        "vector_search",
        "rerank",
        "rerank_worker_load_pixels",
        "rerank_worker_forward",
        "total",
    ):
        values = [t[stage] for t in timings if stage in t]
        if values:
            print(
                f"{stage:<18} {np.percentile(values, 50):>8.1f} {np.percentile(values, 95):>8.1f}"
            )


if __name__ == "__main__":
    main()
