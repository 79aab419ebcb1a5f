"""Retrieval quality at the INSTANCE level: "same product, new photo".

Products are real Fashion-MNIST articles; each gets ``--photos`` photos made by
:func:`searchsvc.learning.datasets.make_view` (crop, rotation, shift, lighting, blur, noise; the
default :class:`~searchsvc.learning.datasets.ViewParams`, seeded per article). Training products
come from the TRAIN split, test products from the TEST split (disjoint articles); a part of
the training products (``--val-products``) is held out of training for model selection
(validation CMC@1 after every epoch, SOP protocol among themselves).

Evaluation: the SOP protocol on the test products' photos: every photo queries all the
others, itself excluded from its results and its ground truth; relevance = same product.
The comparison (raw pixels, the embedder, embedder + STIR at top_n 5 and 10, the perfect
reranker of the top 5 / 10) and its machinery are ``quality_common.py``'s, shared with
``bench_quality_class.py``: training through :func:`trainer.embedder.train_embedder` and
:func:`trainer.stir.train_stir` (default configs, ``--embedder-minutes`` and
``--stir-minutes``, or exact step counts: ``--embedder-steps`` and ``--stir-steps``),
ranking, reranking and metrics through :mod:`searchsvc.learning.evaluation` and
:mod:`searchsvc.learning.metrics`; STIR's fusion weight is calibrated on the validation
products, and the report carries the gate's verdict there.

Usage::

    python benchmarks/bench_quality_instance.py [--embedder-minutes 10] [--stir-minutes 10]
        [--train-products 20000] [--test-products 2000] [--photos 5] [--val-products 500]
        [--seed 0] [--embedder-steps N] [--stir-steps N]
        [--out benchmarks/results/quality_instance]
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import numpy as np
import torch
from quality_common import (
    check_steps,
    common_arguments,
    compare,
    log,
    machine_info,
    run_settings,
    sop_set,
    timed,
    write_outputs,
)

from searchsvc.learning.datasets import ViewParams, load_fashion_mnist, make_view
from searchsvc.learning.training_data import load_size_for
from searchsvc.models.embedder import profile_spec
from trainer.augment import resize_pixels
from trainer.data import TrainSet

SPLIT_IDS = {"train": 0, "test": 1}


def photos_of(
    images: np.ndarray,
    articles: np.ndarray,
    split: str,
    photos: int,
    seed: int,
    params: ViewParams,
    load: int,
) -> tuple[np.ndarray, np.ndarray]:
    """``(len(articles) * photos, load, load, 3)`` uint8 photos and their product labels
    (the article's position in ``articles``). Each article's photos depend only on (seed,
    split, article index): a subset run sees the same photos of the same article."""
    out = np.empty((len(articles) * photos, load, load, 3), dtype=np.uint8)
    block = 512
    buffer: list[np.ndarray] = []
    row = 0
    for article in articles:
        rng = np.random.default_rng([seed, SPLIT_IDS[split], int(article)])
        for _ in range(photos):
            buffer.append(np.asarray(make_view(images[article], rng, params)))
        if len(buffer) >= block:
            out[row : row + len(buffer)] = resize_pixels(np.stack(buffer), load)
            row += len(buffer)
            buffer = []
    if buffer:
        out[row : row + len(buffer)] = resize_pixels(np.stack(buffer), load)
    labels = np.repeat(np.arange(len(articles), dtype=np.int64), photos)
    return out, labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, embedder_minutes=10.0, stir_minutes=10.0)
    parser.add_argument(
        "--train-products",
        type=int,
        default=20_000,
        help="articles of the train split (validation products included)",
    )
    parser.add_argument("--test-products", type=int, default=2_000, help="test-split articles")
    parser.add_argument("--photos", type=int, default=5, help="photos per product")
    parser.add_argument(
        "--val-products",
        type=int,
        default=500,
        help="training products held out of training for model selection (0: none)",
    )
    args = parser.parse_args()
    check_steps(parser, args)
    if args.photos < 2:
        parser.error("--photos must be at least 2 (a query needs another photo of its product)")
    if args.val_products and args.val_products < 2:
        parser.error("--val-products must be 0 or at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    timings: dict[str, float] = {}
    machine = machine_info()
    log(f"{machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads")

    spec = profile_spec(args.profile)
    size, load = spec.input_size, load_size_for(spec.input_size)
    params = ViewParams()
    stop = timed(timings, "data_s")
    train_images, _ = load_fashion_mnist("train", args.cache_dir)
    test_images, _ = load_fashion_mnist("test", args.cache_dir)
    rng = np.random.default_rng(args.seed)
    train_articles = rng.choice(
        len(train_images), min(args.train_products, len(train_images)), replace=False
    )
    test_articles = rng.choice(
        len(test_images), min(args.test_products, len(test_images)), replace=False
    )
    n_val = min(args.val_products, len(train_articles) - 2)
    val_articles, fit_articles = train_articles[:n_val], train_articles[n_val:]

    fit_px, fit_labels = photos_of(
        train_images, fit_articles, "train", args.photos, args.seed, params, load
    )
    train_set = TrainSet(fit_px, fit_labels)
    val_set = None
    if n_val:
        val_px, val_labels = photos_of(
            train_images, val_articles, "train", args.photos, args.seed, params, load
        )
        val_set = sop_set(val_px, val_labels, size)
    test_px, test_labels = photos_of(
        test_images, test_articles, "test", args.photos, args.seed, params, load
    )
    eval_set = sop_set(test_px, test_labels, size)
    stop()
    log(
        f"data ({timings['data_s']:.0f} s): {len(fit_articles)} training products, "
        f"{n_val} validation products, {len(test_articles)} test products, "
        f"{args.photos} photos each"
    )

    rows, training, counts = compare(
        args, train_set=train_set, eval_set=eval_set, val_set=val_set, timings=timings
    )
    timings["total_s"] = time.monotonic() - started
    counts.update(
        train_products=len(fit_articles),
        val_products=n_val,
        test_products=len(test_articles),
        photos_per_product=args.photos,
    )
    settings = {
        "level": "instance (same product, new photo)",
        "dataset": (
            "Fashion-MNIST articles as products; photos by searchsvc.learning.datasets.make_view"
        ),
        "relevance": "same product",
        "protocol": "SOP: every test photo queries the others, itself excluded",
        "train_products_from": "train split",
        "test_products_from": "test split",
        **run_settings(args, size, load),
        "model_selection": "validation CMC@1 per epoch (STIR: with its fusion weight calibrated)"
        if val_set
        else "none (last weights)",
    }
    report: dict[str, Any] = {
        "title": "Retrieval quality, instance level (Fashion-MNIST products, make_view photos)",
        "machine": machine,
        "settings": settings,
        "counts": counts,
        "timings": timings,
        "training": training,
        "rows": rows,
        "view_params": dataclasses.asdict(params),
    }
    write_outputs(args.out, report["title"], report)


if __name__ == "__main__":
    main()
