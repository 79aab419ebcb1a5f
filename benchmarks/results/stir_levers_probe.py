"""STIR levers side by side on ONE embedder: the instance benchmark's data, splits and
budgets (10-minute embedder, saved; then a 10-minute STIR per variant on it), each STIR
scored on the 10,000 test photos' top 10. The script as it ran on 2026-11-30 (fifth
session; only formatted since), kept with its figures in stir_levers.json; see quality.md.

    OPENBLAS_NUM_THREADS=2 python benchmarks/results/stir_levers_probe.py OUT [VARIANT ...]

A second run with the same OUT reuses the saved embedder and training-set vectors. The
``frozen_image_blocks*`` variants need stir_levers_freeze_image_blocks.patch (the
``freeze_image_blocks`` option, not kept)."""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, "/work/main/benchmarks")
sys.path.insert(0, "/work/main")
from bench_quality_class import (  # noqa: E402
    DEFAULT_CACHE,
    PROFILE,
    TOP_NS,
    ArrayEvalSet,
    log,
    make_validate_embedder,
    make_validate_stir,
    rank_chunked,
)
from bench_quality_instance import photos_of  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402
from searchsvc.datasets import ViewParams, load_fashion_mnist  # noqa: E402
from searchsvc.training_data import load_size_for  # noqa: E402

from searchsvc.models.embedder import Embedder, new_embedding_net, profile_spec  # noqa: E402
from searchsvc.models.stir import StirScorer  # noqa: E402
from trainer.augment import resize_pixels  # noqa: E402
from trainer.data import TrainSet  # noqa: E402
from trainer.embedder import EmbedderTrainConfig, train_embedder  # noqa: E402
from trainer.loop import Budget  # noqa: E402
from trainer.stir import StirTrainConfig, choose_scoring, frozen_embeddings, train_stir  # noqa: E402

VARIANTS = {
    "frozen_image_blocks": dict(freeze_image_blocks=True),
    "default": dict(),
    "frozen_image_blocks_lr3e-4": dict(freeze_image_blocks=True, lr_full=3e-4),
    "lr3e-4": dict(lr_full=3e-4),
    "group10": dict(group_size=10),
}
torch.set_num_threads(2)
out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
seed, precision = 0, "auto"
spec = profile_spec(PROFILE)
size, load = spec.input_size, load_size_for(spec.input_size)
params = ViewParams()
train_images, _ = load_fashion_mnist("train", DEFAULT_CACHE)
test_images, _ = load_fashion_mnist("test", DEFAULT_CACHE)
rng = np.random.default_rng(seed)
train_articles = rng.choice(len(train_images), 20_000, replace=False)
test_articles = rng.choice(len(test_images), 2_000, replace=False)
val_articles, fit_articles = train_articles[:500], train_articles[500:]
fit_px, fit_labels = photos_of(train_images, fit_articles, "train", 5, seed, params, load)
train_set = TrainSet(fit_px, fit_labels)
val_px, val_labels = photos_of(train_images, val_articles, "train", 5, seed, params, load)
val_eval = resize_pixels(val_px, size)
val_set = ArrayEvalSet(
    val_labels, val_labels, np.arange(len(val_labels)), {size: (val_eval, val_eval)}
)
test_px, test_labels = photos_of(test_images, test_articles, "test", 5, seed, params, load)
test_eval = resize_pixels(test_px, size)
eval_set = ArrayEvalSet(
    test_labels, test_labels, np.arange(len(test_labels)), {size: (test_eval, test_eval)}
)
log("data ready")

net = new_embedding_net(spec, seed=seed)
saved = out / "embedder.safetensors"
if saved.is_file():
    net.load_state_dict(load_file(str(saved)))
    log("embedder loaded")
else:
    res = train_embedder(
        net,
        train_set,
        EmbedderTrainConfig(seed=seed, precision=precision),
        validate=make_validate_embedder(val_set, precision),
        budget=Budget.of_seconds(600),
        log=log,
        progress=False,
    )
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(saved))
    log(f"embedder {res.steps_done} steps")
net.eval()
vectors = frozen_embeddings(
    net, train_set, precision=precision, cache_path=out / "train_vectors.safetensors"
)
embedder = Embedder(net, device="auto", precision=precision)
first = rank_chunked(eval_set, embedder, depth=10, chunk=1000)
val_first = rank_chunked(val_set, embedder, depth=10, chunk=1000)
results: dict = {
    "embedder": first.base.metrics["cmc@1"],
    "embedder_val": val_first.base.metrics["cmc@1"],
}
log(f"embedder test CMC@1 {100 * results['embedder']:.2f} val {100 * results['embedder_val']:.2f}")
only = sys.argv[2:] or list(VARIANTS)
for name in only:
    cfg = StirTrainConfig(seed=seed, precision=precision, **VARIANTS[name])  # type: ignore[arg-type]
    tick = time.monotonic()
    stir_net, sres = train_stir(
        net,
        train_set,
        cfg,
        embeddings=vectors,
        validate=make_validate_stir(val_first, precision, TOP_NS[0]),
        budget=Budget.of_seconds(600),
        log=log,
        progress=False,
    )
    train_s = time.monotonic() - tick
    choice, options = choose_scoring(stir_net, val_first, TOP_NS[0], precision=precision)  # type: ignore[arg-type]
    weight, symmetric = stir_net.config.fusion_weight, stir_net.config.symmetric
    stir_net.config = replace(stir_net.config, symmetric=False)
    scorer = StirScorer(stir_net, device="auto", precision=precision)  # type: ignore[arg-type]
    one_way = first.pair_distances(scorer.score_pairs, size, 10)
    rows = {}
    opts = {
        ("symmetric" if o.symmetric else "one way"): (o.fusion_weight, o.rows["cmc@1"])
        for o in options
    }
    if symmetric:
        reverse = first.pair_distances(lambda q, c: scorer.score_pairs(c, q), size, 10)  # noqa: B023
        served = (one_way + reverse) / 2
    else:
        served = one_way
    for n in TOP_NS:
        rows[f"served@{n}"] = first.rerank_metrics(served, n, weight)["cmc@1"]
        rows[f"one way w{opts['one way'][0]:g}@{n}"] = first.rerank_metrics(
            one_way, n, opts["one way"][0]
        )["cmc@1"]
        rows[f"alone@{n}"] = first.rerank_metrics(served, n, 0.0)["cmc@1"]
    results[name] = dict(
        steps=sres.steps_done,
        planned=sres.planned_steps,
        train_s=train_s,
        weight=weight,
        symmetric=symmetric,
        val_choice=choice.rows["cmc@1"],
        options=opts,
        rows=rows,
        history=sres.history,
    )
    log(
        f"== {name}: steps {sres.steps_done}, weight {weight:g} "
        f"{'sym' if symmetric else 'one way'}, "
        f"val {100 * choice.rows['cmc@1']:.2f}, "
        + ", ".join(f"{k} {100 * v:.2f}" for k, v in rows.items())
    )
    (out / f"results_{name}.json").write_text(json.dumps(results, indent=1, default=str))
log("done")
