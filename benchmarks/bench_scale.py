"""Cost curves of a growing catalog: memory that should stay flat, per-image cost that
should stay near flat (issue 18).

    python benchmarks/bench_scale.py --images 10000 --root /tmp/scale-bench/10k \
        --phases generate,ingest,search,eval,retrain

A catalog of real Fashion-MNIST articles (train and test splits, 70,000 articles) with
camera-like variations (:func:`searchsvc.learning.datasets.make_view`: crop, rotation,
shift, light, blur, noise), 4 photos a product, written to ``--root`` one file at a time
(never held in memory; keep it out of the repo). Small profile, embedded defaults.

Phases, each in a process of its own so that its peak RSS (``ru_maxrss``) is its own:

- ``generate``: write the catalog (not a measurement);
- ``ingest``: ``App.ingest``: images/s and peak RSS;
- ``search``: the embedded index's search at top_k 20, with and without a category filter,
  for 300 held-out photos (their vectors embedded first, untimed): p50/p99 ms;
- ``eval``: ``searchsvc eval``'s path (the validation sample, chunked top-k): seconds and
  peak RSS;
- ``retrain``: the embedder retrain with a fixed small step count (``--retrain-steps``),
  not promoted: seconds and peak RSS (pixels on disk, the gate on the validation sample).

Each phase appends its figures to ``ROOT/results.json``; ``--write-results NAME`` gathers
the results of several roots into benchmarks/results/scale/NAME.json and .md.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from machine import REPO, SPEED_PROFILE, cpu_name, git_commit, peak_rss_mib

VIEWS = 4
QUERIES = 300


def generate(root: Path, images: int, seed: int = 0) -> dict[str, Any]:
    import numpy as np

    from searchsvc.learning.datasets import (
        CATEGORY_SLUGS,
        ViewParams,
        load_fashion_mnist,
        make_view,
    )

    cache = root / "cache"
    train, train_labels = load_fashion_mnist("train", cache)
    test, test_labels = load_fashion_mnist("test", cache)
    articles = np.concatenate([train, test])
    labels = np.concatenate([train_labels, test_labels])
    products = images // VIEWS
    rng = np.random.default_rng(seed)
    # Beyond 70,000 products an article comes back as another product (a look-alike).
    chosen = rng.permutation(len(articles))[: min(products, len(articles))]
    chosen = np.resize(chosen, products)
    params = ViewParams()
    catalog = root / "catalog"
    catalog.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with (catalog / "products.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "title", "category", "price"])
        for number, index in enumerate(chosen):
            product_id = f"p{number:07d}"
            label = int(labels[index])
            writer.writerow([product_id, f"article {index}", CATEGORY_SLUGS[label], "10.00"])
            folder = catalog / product_id
            folder.mkdir(exist_ok=True)
            for view in range(VIEWS):
                make_view(articles[index], rng, params).save(folder / f"v{view}.jpg", quality=92)
    queries = root / "queries"
    queries.mkdir(exist_ok=True)
    for q in range(QUERIES):
        number = int(rng.integers(products))
        index = chosen[number]
        make_view(articles[index], rng, params).save(
            queries / f"p{number:07d}__{CATEGORY_SLUGS[int(labels[index])]}__{q}.jpg", quality=92
        )
    seconds = time.perf_counter() - started
    size = sum(f.stat().st_size for f in catalog.rglob("*.jpg"))
    return {"images": products * VIEWS, "products": products, "seconds": seconds, "bytes": size}


def _settings(root: Path) -> Any:
    from searchsvc.core.config import load_settings

    env = {"SEARCHSVC_HOME": str(root / "home"), **SPEED_PROFILE}
    if "SEARCHSVC_VAL_SAMPLE_IMAGES" in os.environ:
        env["SEARCHSVC_VAL_SAMPLE_IMAGES"] = os.environ["SEARCHSVC_VAL_SAMPLE_IMAGES"]
    return load_settings(env=env)


def ingest(root: Path) -> dict[str, Any]:
    from searchsvc.app import App
    from searchsvc.jobs.model_files import ensure_active_embedder

    settings = _settings(root)
    app = App(settings)
    try:
        app.models.embedder(ensure_active_embedder(app.db, settings))  # load, untimed
        started = time.perf_counter()
        summary = app.ingest(root / "catalog")
        seconds = time.perf_counter() - started
    finally:
        app.close()
    return {
        "images": summary.images_embedded,
        "seconds": seconds,
        "images_per_s": summary.images_embedded / seconds,
    }


def search(root: Path) -> dict[str, Any]:
    import numpy as np

    from searchsvc.app import App
    from searchsvc.core.images import load_pixels
    from searchsvc.storage.db import ModelKind
    from searchsvc.storage.versions import active_version

    settings = _settings(root)
    app = App(settings)
    try:
        version = active_version(app.db, ModelKind.EMBEDDER)
        assert version is not None
        embedder = app.models.embedder(version)
        files = sorted((root / "queries").iterdir())
        size = embedder.info.input_size
        pixels = np.stack(
            [load_pixels(f.read_bytes(), str(f), size=size, max_pixels=10**7)[0] for f in files]
        )
        vectors = embedder.embed(pixels)
        index = app.index("read")
        collection = index.resolve_alias(settings.collection_alias)
        assert collection is not None
        points = index.count(collection)
        out: dict[str, Any] = {"points": points, "queries": len(files), "top_k": 20}
        for name, with_filter in (("no_filter", False), ("category_filter", True)):
            for vector in vectors[:20]:  # warm-up
                index.search(collection, vector, 20)
            times = []
            for vector, file in zip(vectors, files, strict=True):
                filters = {"category": file.stem.split("__")[1]} if with_filter else None
                started = time.perf_counter()
                hits = index.search(collection, vector, 20, filters)
                times.append((time.perf_counter() - started) * 1000)
                assert len(hits) == 20
            out[name] = {
                "p50_ms": float(np.percentile(times, 50)),
                "p99_ms": float(np.percentile(times, 99)),
            }
    finally:
        app.close()
    return out


def evaluate(root: Path) -> dict[str, Any]:
    from searchsvc.learning.evaluation import evaluate_served_on_split
    from searchsvc.storage.db import Database
    from searchsvc.storage.pixels import open_pixel_store

    settings = _settings(root)
    db = Database(settings.sqlalchemy_url)
    pixels = open_pixel_store(settings, db)
    try:
        started = time.perf_counter()
        report, split = evaluate_served_on_split(settings, db, pixels)
        seconds = time.perf_counter() - started
    finally:
        pixels.close()
        db.dispose()
    return {
        "seconds": seconds,
        "gallery": report.n_gallery,
        "queries": report.n_queries,
        "val_sample": split.get("val_sample"),
        "cmc@1": report.metric("cmc@1"),
    }


def retrain(root: Path, steps: int) -> dict[str, Any]:
    import dataclasses

    from trainer.retrain import RetrainConfig
    from trainer.retrain import retrain as run_retrain

    settings = _settings(root)
    config = RetrainConfig.for_settings(
        settings, only="embedder", promote=False, progress=False, resume=False
    )
    config = dataclasses.replace(config, embedder=dataclasses.replace(config.embedder, steps=steps))
    started = time.perf_counter()
    report = run_retrain(settings, config, log=lambda _: None)
    seconds = time.perf_counter() - started
    stage = report.stages["embedder"]
    return {
        "seconds": seconds,
        "steps": steps,
        "train_images": report.split["train"]["images"],
        "val_images_evaluated": report.split["val"]["images"],
        "candidate_cmc@1": stage.candidate.metric("cmc@1") if stage.candidate else None,
    }


PHASES = ("generate", "ingest", "search", "eval", "retrain")


def child(phase: str, root: Path, images: int, steps: int) -> None:
    if phase == "generate":
        result = generate(root, images)
    elif phase == "ingest":
        result = ingest(root)
    elif phase == "search":
        result = search(root)
    elif phase == "eval":
        result = evaluate(root)
    else:
        result = retrain(root, steps)
    result["peak_rss_mib"] = peak_rss_mib()
    print("RESULT " + json.dumps(result))


def write_results(name: str, roots: list[Path], exclusive: bool, machine: str) -> None:
    runs = {}
    for root in roots:
        data = json.loads((root / "results.json").read_text())
        runs[str(data["images"])] = data
    record = {
        "benchmark": "bench_scale",
        "machine": machine,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "commit": git_commit(),
        "exclusive": exclusive,
        "runs": runs,
    }
    out = REPO / "benchmarks" / "results" / "scale"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# bench_scale: {name}",
        "",
        f"Machine {machine} ({cpu_name()}, {os.cpu_count()} cores); commit {git_commit()}; "
        + ("timed phases ran exclusive." if exclusive else "the machine was SHARED."),
        "",
        "| images | ingest img/s | ingest peak RSS MiB | search p50/p99 ms | "
        "filtered p50/p99 ms | eval s | eval peak RSS MiB | retrain s | retrain peak RSS MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for images, data in sorted(runs.items(), key=lambda kv: int(kv[0])):

        def get(phase: str, *keys: str, phases: dict[str, Any] = data["phases"]) -> str:
            value: Any = phases.get(phase, {})
            for key in keys:
                value = value.get(key, {}) if isinstance(value, dict) else {}
            return f"{value:.1f}" if isinstance(value, float | int) else "-"

        lines.append(
            f"| {int(images):,} | {get('ingest', 'images_per_s')} | "
            f"{get('ingest', 'peak_rss_mib')} | {get('search', 'no_filter', 'p50_ms')} / "
            f"{get('search', 'no_filter', 'p99_ms')} | "
            f"{get('search', 'category_filter', 'p50_ms')} / "
            f"{get('search', 'category_filter', 'p99_ms')} | {get('eval', 'seconds')} | "
            f"{get('eval', 'peak_rss_mib')} | {get('retrain', 'seconds')} | "
            f"{get('retrain', 'peak_rss_mib')} |"
        )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--root", type=Path)
    parser.add_argument("--phases", default=",".join(PHASES))
    parser.add_argument("--retrain-steps", type=int, default=20)
    parser.add_argument(
        "--val-sample",
        type=int,
        help="SEARCHSVC_VAL_SAMPLE_IMAGES for the eval and retrain phases (default: the "
        "setting's default)",
    )
    parser.add_argument("--child")
    parser.add_argument("--write-results", metavar="NAME")
    parser.add_argument("--roots", type=Path, nargs="*", default=[])
    parser.add_argument("--machine", default="epyc-zen3", help="the machine's name in results")
    parser.add_argument(
        "--shared", action="store_true", help="the timed phases did not run exclusive"
    )
    args = parser.parse_args()
    if args.write_results:
        write_results(args.write_results, args.roots, not args.shared, args.machine)
        return
    if args.child:
        child(args.child, args.root, args.images, args.retrain_steps)
        return
    root: Path = args.root
    root.mkdir(parents=True, exist_ok=True)
    results_file = root / "results.json"
    results = (
        json.loads(results_file.read_text())
        if results_file.is_file()
        else {"images": args.images, "phases": {}}
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"),
    }
    if args.val_sample:
        env["SEARCHSVC_VAL_SAMPLE_IMAGES"] = str(args.val_sample)
    for phase in args.phases.split(","):
        command = [
            sys.executable,
            __file__,
            "--child",
            phase,
            "--root",
            str(root),
            "--images",
            str(args.images),
            "--retrain-steps",
            str(args.retrain_steps),
        ]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            sys.exit(f"{phase} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
        line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
        results["phases"][phase] = json.loads(line[len("RESULT ") :])
        if args.val_sample and phase in ("eval", "retrain"):
            results["phases"][phase]["val_sample_images_setting"] = args.val_sample
        print(phase, json.dumps(results["phases"][phase]), flush=True)
        results_file.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
