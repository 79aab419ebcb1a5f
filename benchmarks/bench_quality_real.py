"""Retrieval quality on REAL colour images: regions of Debian's GNOME wallpapers as products.

The two Fashion-MNIST benchmarks see 28 px grey articles; this one sees colour, texture
and detail. Source (documented, reproducible): every raster file of Debian's
``gnome-backgrounds`` package in ``/usr/share/backgrounds/gnome/`` (``--source``), listed
by sorted file name, that PIL reads (the ``*.webp`` files; the SVGs are left out), cells
too flat to recognise dropped (below: all of ``symbolic-*`` and ``vnc-*``, some of
``adwaita-*``). They are rendered and photographed
artwork (glass, tiles, wood, beads, icons), not catalogue shots: colour and texture at many
scales, and several nearly flat.

Products: each image is read once at 1024 px and cut into an 8 x 8 grid of cells (inset
from the border so that no photo runs off the image); a cell is a product (its centre
jittered by a seeded draw). A cell whose grey standard deviation is
below ``--min-std`` (flat: nothing to recognise) is dropped, by a rule fixed before any
result is seen. Rows of the grid decide the role, so products never share pixels across
roles: rows 0-4 train, row 5 validation (held out of training, model selection and the
gate), rows 6-7 test.

Photos: each product is photographed ``--photos`` times by a seeded camera
(:func:`camera_photo`): framing (centre shift up to 12% of the cell, scale 0.8-1.25, so a
photo also shows some of the surroundings), rotation up to 10 degrees, a perspective tilt
(corners moved up to 8%), a colour cast (per-channel gain 0.85-1.15, brightness 0.8-1.2),
Gaussian blur (radius 0-1.2 px at 80 px) and JPEG at quality 50-90.

Protocol and rows as the instance benchmark (``quality_common.py``): SOP on the test
products' photos (every photo queries the others, itself excluded); raw pixels (colour),
the embedder, embedder + STIR at top 5 and 10, the perfect reranker.

Usage::

    python benchmarks/bench_quality_real.py [--embedder-steps N --stir-steps N]
        [--profile small|small64] [--photos 5] [--out benchmarks/results/quality_real/NAME]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFilter
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

from searchsvc.learning.training_data import load_size_for
from searchsvc.models.embedder import profile_spec
from trainer.augment import resize_pixels
from trainer.data import TrainSet

SOURCE = Path("/usr/share/backgrounds/gnome")
WORK_SIDE = 1024
"""Each source image is read at this side once; cells are cut from it."""
GRID = 8
MARGIN_CELLS = 0.6
"""The grid is inset by this many cells on every side: a photo's framing, rotation and tilt
reach up to about 1.06 cells from a product's centre, so no photo runs off the image."""
CELL = int(WORK_SIDE / (GRID + 2 * MARGIN_CELLS))
ORIGIN = (WORK_SIDE - GRID * CELL) / 2
PHOTO_SIDE = 80
"""Photos are rendered at this side, then resized to the profile's load size."""
DEFAULT_MIN_STD = 6.0
ROLE_OF_ROW = {0: "train", 1: "train", 2: "train", 3: "train", 4: "train", 5: "val"}
"""Rows of the grid not listed (6, 7) are test products."""


def source_files(root: Path) -> list[Path]:
    """The raster files of ``root`` by sorted name that PIL reads, at least ``2 * CELL`` on
    a side."""
    files = []
    for path in sorted(root.iterdir()):
        try:
            with Image.open(path) as image:
                if min(image.size) >= 2 * CELL:
                    files.append(path)
        except (OSError, ValueError):
            continue  # an SVG or anything PIL cannot read
    return files


def camera_photo(
    source: Image.Image, centre: tuple[float, float], rng: np.random.Generator
) -> np.ndarray:
    """One photo of the cell at ``centre`` of ``source`` (``(PHOTO_SIDE, PHOTO_SIDE, 3)``
    uint8): framing, rotation, perspective, colour cast, blur, JPEG."""
    half = CELL / 2 * rng.uniform(0.8, 1.25)
    cx = centre[0] + rng.uniform(-0.12, 0.12) * CELL
    cy = centre[1] + rng.uniform(-0.12, 0.12) * CELL
    angle = np.deg2rad(rng.uniform(-10, 10))
    cos, sin = np.cos(angle), np.sin(angle)
    corners = []
    # PIL's QUAD: upper-left, lower-left, lower-right, upper-right of the source quad.
    for ux, uy in ((-1, -1), (-1, 1), (1, 1), (1, -1)):
        dx, dy = ux * half, uy * half
        dx += rng.uniform(-0.08, 0.08) * 2 * half
        dy += rng.uniform(-0.08, 0.08) * 2 * half
        corners += [cx + cos * dx - sin * dy, cy + sin * dx + cos * dy]
    photo = source.transform(
        (PHOTO_SIDE, PHOTO_SIDE), Image.Transform.QUAD, corners, Image.Resampling.BILINEAR
    )
    pixels = np.asarray(photo, dtype=np.float32)
    gain = rng.uniform(0.85, 1.15, size=3) * rng.uniform(0.8, 1.2)
    photo = Image.fromarray(np.clip(pixels * gain, 0, 255).astype(np.uint8), "RGB")
    radius = rng.uniform(0.0, 1.2)
    if radius > 0.2:
        photo = photo.filter(ImageFilter.GaussianBlur(radius))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=int(rng.integers(50, 91)))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


def products_of(
    files: list[Path], seed: int, min_std: float
) -> tuple[list[Image.Image], list[dict[str, Any]]]:
    """The work-size images and the products: one per kept grid cell, with its file,
    row, column, jittered centre and role."""
    images, products = [], []
    for file_number, path in enumerate(files):
        with Image.open(path) as image:
            work = image.convert("RGB").resize((WORK_SIDE, WORK_SIDE), Image.Resampling.LANCZOS)
        images.append(work)
        grey = np.asarray(work.convert("L"), dtype=np.float32)
        rng = np.random.default_rng([seed, file_number])
        for row in range(GRID):
            for col in range(GRID):
                jitter = rng.uniform(-0.1, 0.1, size=2) * CELL
                cx = ORIGIN + (col + 0.5) * CELL + jitter[0]
                cy = ORIGIN + (row + 0.5) * CELL + jitter[1]
                top, left = int(ORIGIN + row * CELL), int(ORIGIN + col * CELL)
                cell = grey[top : top + CELL, left : left + CELL]
                if float(cell.std()) < min_std:
                    continue
                products.append(
                    {
                        "file": file_number,
                        "name": f"{path.name}:r{row}c{col}",
                        "centre": (float(cx), float(cy)),
                        "role": ROLE_OF_ROW.get(row, "test"),
                    }
                )
    return images, products


def photos_of(
    images: list[Image.Image],
    products: list[dict[str, Any]],
    photos: int,
    seed: int,
    load: int,
) -> tuple[np.ndarray, np.ndarray]:
    out = np.empty((len(products) * photos, PHOTO_SIDE, PHOTO_SIDE, 3), dtype=np.uint8)
    for n, product in enumerate(products):
        # A product's photos depend only on (seed, its name): subsets see the same photos.
        rng = np.random.default_rng([seed, *product["name"].encode()])
        for k in range(photos):
            out[n * photos + k] = camera_photo(images[product["file"]], product["centre"], rng)
    labels = np.repeat(np.arange(len(products), dtype=np.int64), photos)
    return resize_pixels(out, load), labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common_arguments(parser, embedder_minutes=10.0, stir_minutes=10.0)
    parser.add_argument("--source", type=Path, default=SOURCE)
    parser.add_argument("--photos", type=int, default=5, help="photos per product")
    parser.add_argument(
        "--min-std",
        type=float,
        default=DEFAULT_MIN_STD,
        help="drop cells flatter than this (grey std)",
    )
    args = parser.parse_args()
    check_steps(parser, args)
    if args.photos < 2:
        parser.error("--photos must be at least 2 (a query needs another photo of its product)")
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    timings: dict[str, float] = {}
    machine = machine_info()
    log(f"{machine['cpu']}, {machine['cores']} cores, {machine['torch_threads']} torch threads")

    spec = profile_spec(args.profile)
    size, load = spec.input_size, load_size_for(spec.input_size)
    stop = timed(timings, "data_s")
    files = source_files(args.source)
    if not files:
        parser.error(
            f"{args.source}: no raster image of at least {2 * CELL} px (apt package "
            "gnome-backgrounds)"
        )
    images, products = products_of(files, args.seed, args.min_std)
    by_role = {
        role: [p for p in products if p["role"] == role] for role in ("train", "val", "test")
    }
    fit_px, fit_labels = photos_of(images, by_role["train"], args.photos, args.seed, load)
    train_set = TrainSet(fit_px, fit_labels)
    val_px, val_labels = photos_of(images, by_role["val"], args.photos, args.seed, load)
    val_set = sop_set(val_px, val_labels, size)
    test_px, test_labels = photos_of(images, by_role["test"], args.photos, args.seed, load)
    eval_set = sop_set(test_px, test_labels, size)
    stop()
    log(
        f"data ({timings['data_s']:.0f} s): {len(files)} images, "
        + ", ".join(f"{len(v)} {k} products" for k, v in by_role.items())
        + f", {args.photos} photos each"
    )

    rows, training, counts = compare(
        args,
        train_set=train_set,
        eval_set=eval_set,
        val_set=val_set,
        timings=timings,
        raw_colour=True,
    )
    timings["total_s"] = time.monotonic() - started
    counts.update(
        source_images=len(files),
        train_products=len(by_role["train"]),
        val_products=len(by_role["val"]),
        test_products=len(by_role["test"]),
        photos_per_product=args.photos,
        cells_dropped_flat=len(files) * GRID * GRID - len(products),
    )
    settings = {
        "level": "instance (same region of a real image, new photo)",
        "dataset": f"{GRID}x{GRID} grid cells of the raster files in {args.source} "
        "(sorted by name): " + ", ".join(f.name for f in files),
        "relevance": "same product",
        "protocol": "SOP: every test photo queries the others, itself excluded",
        "roles": "grid rows 0-4 train, row 5 validation, rows 6-7 test",
        **run_settings(args, size, load),
        "raw_pixels": "colour",
        "model_selection": "validation CMC@1 per epoch (STIR: with its fusion weight calibrated)",
    }
    report: dict[str, Any] = {
        "title": "Retrieval quality, real images (GNOME wallpaper regions, camera photos)",
        "machine": machine,
        "settings": settings,
        "counts": counts,
        "timings": timings,
        "training": training,
        "rows": rows,
    }
    write_outputs(args.out, report["title"], report)


if __name__ == "__main__":
    main()
