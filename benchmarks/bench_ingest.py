"""Ingest throughput against the bare model forward, on the same images, in one run.

    python benchmarks/bench_ingest.py [--products 1000] [--views 4] [--precision auto]

1. bare: the embedder's forward alone on pre-decoded pixels (the ceiling);
2. pipeline: ``App.ingest`` on the catalog folder, embedded defaults: read + hash + DB rows
   + decode + preprocess + reranker pixel copy + embed + Qdrant upsert + DB status.

Each runs in its own process so that its peak memory (max RSS) is its own. The pipeline
should reach at least 80% of the bare forward's images/s.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import peak_rss_mib


def run_bare(catalog: Path, home: Path, batch_size: int, profile: str) -> dict[str, float]:
    import numpy as np

    from searchsvc.core.config import load_settings
    from searchsvc.core.images import load_pixels
    from searchsvc.models.embedder import Embedder, new_embedding_net, profile_spec

    settings = load_settings(
        env={"SEARCHSVC_HOME": str(home)}, overrides={"embedder_profile": profile}
    )
    spec = profile_spec(settings.embedder_profile)
    embedder = Embedder(
        new_embedding_net(spec, seed=0), device=settings.device, precision=settings.precision
    )
    embedder.warm_up()
    files = sorted(p for folder in catalog.iterdir() if folder.is_dir() for p in folder.iterdir())
    pixels = np.stack(
        [
            load_pixels(p.read_bytes(), str(p), size=spec.input_size, max_pixels=10**8)[0]
            for p in files
        ]
    )
    started = time.perf_counter()
    embedder.embed(pixels, batch_size=batch_size)
    seconds = time.perf_counter() - started
    return {"images": len(files), "seconds": seconds, "images_per_s": len(files) / seconds}


def run_pipeline(catalog: Path, home: Path, batch_size: int, profile: str) -> dict[str, float]:
    from searchsvc.app import App
    from searchsvc.core.config import load_settings
    from searchsvc.jobs.model_files import ensure_active_embedder

    settings = load_settings(
        env={"SEARCHSVC_HOME": str(home)},
        overrides={"batch_size": batch_size, "embedder_profile": profile},
    )
    app = App(settings)
    app.models.embedder(ensure_active_embedder(app.db, settings))  # load + warm up, untimed
    started = time.perf_counter()
    summary = app.ingest(catalog)
    seconds = time.perf_counter() - started
    app.close()
    assert summary.images_embedded == summary.images_seen, summary
    return {
        "images": summary.images_embedded,
        "seconds": seconds,
        "images_per_s": summary.images_embedded / seconds,
    }


def child(mode: str, catalog: Path, home: Path, batch_size: int, profile: str) -> None:
    result = (run_bare if mode == "bare" else run_pipeline)(catalog, home, batch_size, profile)
    result["peak_rss_mib"] = peak_rss_mib()
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--products", type=int, default=1000)
    parser.add_argument("--views", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--profile", default="small", help="embedder profile (input size)")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(__file__).resolve().parent.parent / ".bench-tmp",
        help="where the catalog and the home go (small-file writes are several times slower "
        "under /tmp than under /work on the machine these figures come from)",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", choices=["bare", "pipeline"])
    parser.add_argument("--catalog", type=Path)
    parser.add_argument("--home", type=Path)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.catalog, args.home, args.batch_size, args.profile)
        return

    from searchsvc.learning.datasets import write_demo_catalog

    args.workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench-ingest-", dir=args.workdir) as tmp:
        work = Path(tmp)
        catalog, _ = write_demo_catalog(
            work / "demo",
            products=args.products,
            views=args.views,
            queries_per_product=0,
            cache_dir=work / "cache",
        )
        env = {**os.environ, "SEARCHSVC_PRECISION": args.precision}
        env = {k: v for k, v in env.items() if k != "SEARCHSVC_HOME"}
        runs: dict[str, list[dict[str, float]]] = {"bare": [], "pipeline": []}
        # Alternate the two for several rounds and keep the median of each: load from
        # elsewhere on the machine then hits both alike.
        for round_number in range(args.rounds):
            for mode in ("bare", "pipeline"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        mode,
                        "--catalog",
                        str(catalog),
                        "--home",
                        str(work / f"home-{mode}-{round_number}"),
                        "--batch-size",
                        str(args.batch_size),
                        "--profile",
                        args.profile,
                    ],
                    env=env,
                    check=True,
                    capture_output=True,
                    text=True,
                )
                runs[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
        results = {
            mode: sorted(values, key=lambda r: r["images_per_s"])[len(values) // 2]
            for mode, values in runs.items()
        }

    import torch

    print(f"# ingest benchmark, {dt.date.today()}")
    print(
        f"# machine: {platform.machine()} {platform.processor() or ''} "
        f"{os.cpu_count()} cores, torch {torch.__version__} threads {torch.get_num_threads()}"
    )
    print(
        f"# catalog: {args.products} Fashion-MNIST products x {args.views} photos (56x56 JPEG), "
        f"{args.profile} profile, batch {args.batch_size}, precision {args.precision}; "
        f"data under {args.workdir}"
    )
    print(
        f"# median of {args.rounds} alternating rounds; all rounds' images/s: "
        + "; ".join(
            f"{mode} " + ", ".join(f"{r['images_per_s']:.0f}" for r in values)
            for mode, values in runs.items()
        )
    )
    print(f"{'mode':<10} {'images':>7} {'seconds':>8} {'images/s':>9} {'peak RSS MiB':>13}")
    for mode, r in results.items():
        print(
            f"{mode:<10} {r['images']:>7} {r['seconds']:>8.2f} {r['images_per_s']:>9.1f} "
            f"{r['peak_rss_mib']:>13.0f}"
        )
    ratio = results["pipeline"]["images_per_s"] / results["bare"]["images_per_s"]
    print(f"pipeline / bare forward: {ratio:.1%} (target >= 80%)")


if __name__ == "__main__":
    main()
