"""The served STIR in fp32 and in bf16 autocast, side by side: speed and CMC@1.

Loads a trained embedder and STIR (``--save-models`` of ``bench_quality_instance.py``, or
of ``bench_quality_real.py`` with ``--benchmark real``), builds that benchmark's test
photos (same seed, same products: its ``photos_of`` and its draw of products), ranks
them with the embedder in fp32 (the index's precision), and
reranks every query's first ``--top-n`` with the STIR at its own fusion weight and pair
order, once per precision, through :class:`searchsvc.models.stir.StirScorer` (the query
path's scorer; pairs in batches of ``--batch``, as ``SEARCHSVC_RERANK_MAX_BATCH_PAIRS``).
The queries are scored in blocks, each block in both precisions one after the other (the
order alternating), so that both see the same load on a shared machine. Reports pairs/s
per precision, their ratio, CMC@1 (and the other metrics) per precision, and how many
queries' top 5 came out in a different order.

Usage::

    python benchmarks/bench_stir_precision.py --models DIR [--test-products 2000]
        [--photos 5] [--top-n 5] [--threads 2] [--out benchmarks/results/stir_precision/NAME]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_quality_instance import photos_of
from quality_common import ArrayEvalSet, log, machine_info, rank_chunked

from searchsvc.learning.datasets import ViewParams, load_fashion_mnist
from searchsvc.learning.evaluation import REPORTED, stir_distances
from searchsvc.learning.training_data import load_size_for
from searchsvc.models.embedder import Embedder
from searchsvc.models.fusion import rerank_order
from searchsvc.models.runtime import cpu_has_native_bf16
from searchsvc.models.stir import StirScorer, load_stir
from trainer.augment import resize_pixels

PRECISIONS = ("fp32", "bf16")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", type=Path, required=True)
    parser.add_argument(
        "--benchmark",
        choices=["instance", "real"],
        default="instance",
        help="whose test photos: bench_quality_instance.py's or bench_quality_real.py's "
        "(the models should come from the same benchmark's --save-models)",
    )
    parser.add_argument("--train-products", type=int, default=20_000)
    parser.add_argument("--test-products", type=int, default=2_000)
    parser.add_argument("--photos", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--top-n", type=int, default=5)
    parser.add_argument("--batch", type=int, default=256, help="pairs per forward")
    parser.add_argument("--block", type=int, default=500, help="queries per timed block")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".searchsvc/datasets")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info()
    machine["native_bf16"] = cpu_has_native_bf16()
    embedder = Embedder.from_file(args.models / "embedder.safetensors", precision="fp32")
    stir_net = load_stir(args.models / "stir.safetensors")
    size = embedder.info.input_size

    if args.benchmark == "real":
        import bench_quality_real as real

        images, products = real.products_of(
            real.source_files(real.SOURCE), args.seed, real.DEFAULT_MIN_STD
        )
        test = [p for p in products if p["role"] == "test"]
        px, labels = real.photos_of(images, test, args.photos, args.seed, load_size_for(size))
    else:
        # The instance benchmark's draw: training articles first, then the test articles.
        train_images, _ = load_fashion_mnist("train", args.cache_dir)
        test_images, _ = load_fashion_mnist("test", args.cache_dir)
        rng = np.random.default_rng(args.seed)
        rng.choice(len(train_images), min(args.train_products, len(train_images)), replace=False)
        test_articles = rng.choice(
            len(test_images), min(args.test_products, len(test_images)), replace=False
        )
        px, labels = photos_of(
            test_images,
            test_articles,
            "test",
            args.photos,
            args.seed,
            ViewParams(),
            load_size_for(size),
        )
    eval_px = resize_pixels(px, size)
    eval_set = ArrayEvalSet(labels, labels, np.arange(len(labels)), {size: (eval_px, eval_px)})
    first = rank_chunked(eval_set, embedder, depth=10)
    log(f"embedder CMC@1 {100 * first.base.metrics['cmc@1']:.2f} on {len(labels)} photos")

    scorers = {p: StirScorer(stir_net, precision=p) for p in PRECISIONS}  # type: ignore[arg-type]
    gallery_px, query_px = eval_set.pixels(size)
    n = min(args.top_n, first.ranked.shape[1])
    distances = {p: np.empty((len(labels), n)) for p in PRECISIONS}
    seconds = dict.fromkeys(PRECISIONS, 0.0)
    for number, start in enumerate(range(0, len(labels), args.block)):
        block = slice(start, start + args.block)
        order = PRECISIONS if number % 2 == 0 else PRECISIONS[::-1]
        for precision in order:
            tick = time.perf_counter()
            distances[precision][block] = stir_distances(
                scorers[precision].score_pairs,
                query_px[block],
                lambda keys: gallery_px[keys],
                first.ranked[block],
                n,
                batch=args.batch,
            )
            seconds[precision] += time.perf_counter() - tick
    pairs = len(labels) * n * (2 if stir_net.config.symmetric else 1)
    weight = stir_net.config.fusion_weight
    rows: dict[str, Any] = {"embedder": first.base.metrics}
    orders = {}
    for precision in PRECISIONS:
        rows[f"embedder + STIR@{n}, {precision}"] = first.rerank_metrics(
            distances[precision], n, weight
        )
        orders[precision] = rerank_order(first.distances, distances[precision], n, weight)
    changed = int((orders["fp32"][:, :n] != orders["bf16"][:, :n]).any(axis=1).sum())
    speed = {p: pairs / seconds[p] for p in PRECISIONS}
    report = {
        "title": "STIR inference precision: fp32 against bf16 autocast, side by side",
        "machine": machine,
        "settings": {k: str(v) for k, v in vars(args).items()},
        "stir": {"fusion_weight": weight, "symmetric": stir_net.config.symmetric},
        "pairs_scored_per_precision": pairs,
        "seconds": seconds,
        "pairs_per_s": speed,
        "bf16_speedup": speed["bf16"] / speed["fp32"],
        "queries_reordered_differently": changed,
        "max_abs_distance_difference": float(np.abs(distances["fp32"] - distances["bf16"]).max()),
        "rows": rows,
    }
    lines = [
        f"{report['title']}",
        f"machine: {machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} "
        f"torch threads, native bf16: {machine['native_bf16']}; {machine['date']}; commit "
        f"{machine['git_commit']}",
        f"command: `{machine['command']}`",
        "",
        f"{pairs} pairs per precision ({len(labels)} queries x top {n}"
        + (", both orders" if stir_net.config.symmetric else "")
        + f"), fusion weight {weight:g}",
        "",
        "| precision | pairs/s | seconds |",
        "|---|---|---|",
        *(f"| {p} | {speed[p]:.0f} | {seconds[p]:.1f} |" for p in PRECISIONS),
        "",
        f"bf16 / fp32 speed: {report['bf16_speedup']:.3f}x; queries whose top {n} order "
        f"differs: {changed} of {len(labels)}; largest distance difference "
        f"{report['max_abs_distance_difference']:.4f}",
        "",
        "| row | " + " | ".join(REPORTED) + " |",
        "|---" * (len(REPORTED) + 1) + "|",
        *(
            f"| {row} | " + " | ".join(f"{100 * values[m]:.2f}" for m in REPORTED) + " |"
            for row, values in rows.items()
        ),
        "",
    ]
    print("\n".join(lines))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        args.out.with_suffix(".md").write_text("# " + "\n".join(lines))


if __name__ == "__main__":
    main()
