"""Generated catalogs for tests: distinct products, several views each, held-out views."""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

CATEGORIES = ("shoes", "bags", "shirts")


@dataclass
class GeneratedCatalog:
    root: Path
    product_ids: list[str]
    categories: dict[str, str]
    held_out: dict[str, Path] = field(default_factory=dict)

    @property
    def image_count(self) -> int:
        return sum(1 for folder in self.root.iterdir() if folder.is_dir() for _ in folder.iterdir())


def product_pattern(rng: np.random.Generator) -> np.ndarray:
    """A product's 'look': a coarse 2x2 grid of random colours, as float RGB.

    Coarse on purpose: the tests' embedder is an untrained network, and the tests check the
    pipeline (ids, ranks, bookkeeping), not what training adds."""
    return rng.uniform(0, 255, size=(2, 2, 3))


def render_view(pattern: np.ndarray, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """A photo of the product: upscaled pattern, slightly shifted, relit and noisy."""
    image = Image.fromarray(pattern.astype(np.uint8), "RGB").resize(
        (size + 8, size + 8), Image.Resampling.BILINEAR
    )
    dx, dy = (int(v) for v in rng.integers(0, 9, size=2))
    pixels = np.asarray(image.crop((dx, dy, dx + size, dy + size)), dtype=np.float32)
    pixels = pixels * rng.uniform(0.9, 1.1) + rng.normal(0, 4, pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")


def make_catalog(
    root: Path,
    *,
    products: int = 12,
    views: int = 3,
    seed: int = 0,
    metadata: bool = True,
    held_out_dir: Path | None = None,
) -> GeneratedCatalog:
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    ids = [f"p{number:03d}" for number in range(products)]
    categories = {pid: CATEGORIES[number % len(CATEGORIES)] for number, pid in enumerate(ids)}
    generated = GeneratedCatalog(root, ids, categories)
    held_out_dir = held_out_dir or root.parent / f"{root.name}-queries"
    held_out_dir.mkdir(parents=True, exist_ok=True)
    for pid in ids:
        pattern = product_pattern(rng)
        folder = root / pid
        folder.mkdir(exist_ok=True)
        for view in range(views):
            fmt = ("jpg", "png", "webp")[view % 3]
            render_view(pattern, rng).save(folder / f"view{view}.{fmt}")
        query = held_out_dir / f"{pid}.jpg"
        render_view(pattern, rng).save(query, quality=95)
        generated.held_out[pid] = query
    if metadata:
        with (root / "products.csv").open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["product_id", "title", "category", "price", "color"])
            for number, pid in enumerate(ids):
                writer.writerow(
                    [pid, f"Product {number}", categories[pid], f"{10 + number}.5", "mixed"]
                )
    return generated
