"""Start checkpoints of the CPU profiles: the recipe that makes ``models/start/*.safetensors``.

As timm publishes a pretrained tag with its recipe, this project publishes the weights the
demo starts from (``SEARCHSVC_EMBEDDER_WEIGHTS``) and the command that made them. The
data: Fashion-MNIST's TRAIN split (60,000 articles), each article a product photographed
``--photos`` times by :func:`searchsvc.learning.datasets.make_view` (the default
:class:`~searchsvc.learning.datasets.ViewParams`, seeded per article). The demo catalog
(``searchsvc demo-catalog``) draws its products from the TEST split, so no demo product is
ever seen here. Training: :func:`trainer.embedder.train_embedder` with its default config
for the chosen profile (``--profile``, ``small`` or ``small64``) and an exact step count
(no time budget: the same command gives the same weights on the same torch build and
thread count).

Usage::

    python -m trainer.start_checkpoint --profile small64 --steps 800 --products 20000 \\
        --photos 4 --out models/start/small64-fmnist.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from searchsvc.learning.datasets import ViewParams, load_fashion_mnist, make_view
from searchsvc.learning.training_data import load_size_for
from searchsvc.models.embedder import new_embedding_net, profile_spec, save_embedder
from trainer.augment import resize_pixels
from trainer.data import TrainSet
from trainer.embedder import EmbedderTrainConfig, train_embedder
from trainer.loop import Budget

# Profiles a CPU can train a start checkpoint for in about an hour; vit_s16 starts from
# its DINO weights on the hub instead.
CPU_PROFILES = ("small", "small64")
DEFAULT_CACHE = Path(os.environ.get("SEARCHSVC_HOME", Path.home() / ".searchsvc")) / "datasets"


def product_photos(
    images: np.ndarray, articles: np.ndarray, photos: int, seed: int, load: int
) -> tuple[np.ndarray, np.ndarray]:
    """``(len(articles) * photos, load, load, 3)`` uint8 photos and their labels (the
    article's position in ``articles``); an article's photos depend only on (seed, article)."""
    params = ViewParams()
    views = np.empty((len(articles) * photos, params.size, params.size, 3), dtype=np.uint8)
    row = 0
    for article in articles:
        rng = np.random.default_rng([seed, int(article)])
        for _ in range(photos):
            views[row] = np.asarray(make_view(images[article], rng, params))
            row += 1
    # One resize over all photos (in the function's own batches): a call per article
    # costs tens of milliseconds of overhead each.
    out = resize_pixels(views, load)
    return out, np.repeat(np.arange(len(articles), dtype=np.int64), photos)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=CPU_PROFILES, default="small")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--products", type=int, default=20_000, help="train-split articles")
    parser.add_argument("--photos", type=int, default=4, help="photos per product")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE)
    parser.add_argument("--out", type=Path, required=True, help="OUT.safetensors (+ OUT.json)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.products < 2 or args.photos < 2:
        parser.error("--steps must be positive, --products and --photos at least 2")
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = profile_spec(args.profile)
    load = load_size_for(spec.input_size)
    started = time.monotonic()
    images, _ = load_fashion_mnist("train", args.cache_dir)
    rng = np.random.default_rng(args.seed)
    articles = np.sort(rng.choice(len(images), min(args.products, len(images)), replace=False))
    pixels, labels = product_photos(images, articles, args.photos, args.seed, load)
    print(f"data: {len(pixels)} photos of {len(articles)} products", file=sys.stderr)
    net = new_embedding_net(spec, seed=args.seed)
    config = EmbedderTrainConfig(seed=args.seed, steps=args.steps)
    result = train_embedder(
        net,
        TrainSet(pixels, labels),
        config,
        budget=Budget.of_seconds(None),
        progress=not args.no_progress,
    )
    recipe = {
        "recipe": "python -m trainer.start_checkpoint "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "data": "Fashion-MNIST train split, make_view photos (default ViewParams)",
        "profile": args.profile,
        "products": len(articles),
        "photos_per_product": args.photos,
        "seed": args.seed,
        "steps_done": result.steps_done,
        "train_config": config.resolve(spec).to_json(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.monotonic() - started, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_embedder(net.eval(), args.out, extra={"start_checkpoint": recipe})
    print(json.dumps(recipe, indent=2))


if __name__ == "__main__":
    main()
