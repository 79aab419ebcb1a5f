"""Real product photos for demos and benchmarks: Fashion-MNIST (70,000 Zalando articles).

Read from Debian's ``dataset-fashion-mnist`` package when installed, else downloaded once from
the dataset's official mirror into ``cache_dir``. "Photos" of one article are made by seeded,
realistic camera changes (crop, rotation, shift, lighting, blur, noise), so the same seed
always gives the same catalog.
"""

from __future__ import annotations

import csv
import gzip
import struct
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from searchsvc.core.errors import SearchsvcError

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
OFFICIAL_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CATEGORY_SLUGS = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle-boot",
)


def _locate(name: str, cache_dir: Path) -> Path:
    for folder in (DEBIAN_DIR, cache_dir):
        if (folder / name).is_file():
            return folder / name
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / name
    try:
        urllib.request.urlretrieve(OFFICIAL_URL + name, target)  # noqa: S310 - fixed https/http URL
    except OSError as exc:
        raise SearchsvcError(
            f"Fashion-MNIST file {name} is neither in {DEBIAN_DIR} (apt-get install "
            f"dataset-fashion-mnist) nor downloadable from {OFFICIAL_URL} ({exc})"
        ) from None
    return target


def load_fashion_mnist(split: str, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels uint8 [N]) of the 'train' or 'test' split."""
    images_name, labels_name = FILES[split]
    with gzip.open(_locate(images_name, cache_dir), "rb") as handle:
        magic, count, rows, cols = struct.unpack(">IIII", handle.read(16))
        if magic != 2051:
            raise SearchsvcError(f"{images_name}: not an IDX image file")
        images = np.frombuffer(handle.read(count * rows * cols), dtype=np.uint8)
    with gzip.open(_locate(labels_name, cache_dir), "rb") as handle:
        magic, count_labels = struct.unpack(">II", handle.read(8))
        if magic != 2049 or count_labels != count:
            raise SearchsvcError(f"{labels_name}: not the label file of {images_name}")
        labels = np.frombuffer(handle.read(count), dtype=np.uint8)
    return images.reshape(count, rows, cols), labels


@dataclass(frozen=True)
class ViewParams:
    """How far a "new photo" of an article may differ from the catalog shot."""

    crop: tuple[float, float] = (0.75, 1.0)
    rotation_deg: float = 12.0
    shift: float = 0.08
    brightness: tuple[float, float] = (0.75, 1.25)
    contrast: tuple[float, float] = (0.75, 1.25)
    blur_max: float = 0.8
    noise_std: float = 6.0
    size: int = 56


def make_view(article: np.ndarray, rng: np.random.Generator, params: ViewParams) -> Image.Image:
    """One photo of ``article`` (a 28x28 grey image) under a random camera change."""
    size = params.size
    image = Image.fromarray(255 - article, "L").resize((size, size), Image.Resampling.BICUBIC)
    # Fashion-MNIST is light-on-black; shops show dark-on-white, hence the inversion.
    angle = float(rng.uniform(-params.rotation_deg, params.rotation_deg))
    image = image.rotate(angle, resample=Image.Resampling.BICUBIC, fillcolor=255)
    scale = float(rng.uniform(*params.crop))
    crop = max(8, round(size * scale))
    max_offset = size - crop
    dx = int(np.clip(rng.normal(max_offset / 2, params.shift * size), 0, max_offset))
    dy = int(np.clip(rng.normal(max_offset / 2, params.shift * size), 0, max_offset))
    image = image.crop((dx, dy, dx + crop, dy + crop)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    image = ImageEnhance.Brightness(image).enhance(float(rng.uniform(*params.brightness)))
    image = ImageEnhance.Contrast(image).enhance(float(rng.uniform(*params.contrast)))
    blur = float(rng.uniform(0, params.blur_max))
    if blur > 0.05:
        image = image.filter(ImageFilter.GaussianBlur(blur))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0, params.noise_std, pixels.shape).astype(np.float32)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L").convert("RGB")


def write_demo_catalog(
    out: Path,
    *,
    products: int,
    views: int,
    queries_per_product: int = 1,
    seed: int = 0,
    cache_dir: Path,
    params: ViewParams | None = None,
) -> tuple[Path, Path]:
    """Write a catalog of ``products`` real articles (test split), ``views`` photos each,
    plus held-out query photos (``queries/<product_id>__<n>.jpg``). Returns (catalog, queries).
    """
    params = params or ViewParams()
    images, labels = load_fashion_mnist("test", cache_dir)
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(images), size=min(products, len(images)), replace=False)
    catalog = out / "catalog"
    queries = out / "queries"
    catalog.mkdir(parents=True, exist_ok=True)
    queries.mkdir(parents=True, exist_ok=True)
    with (catalog / "products.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["product_id", "title", "category", "price", "fmnist_index"])
        for number, index in enumerate(chosen):
            product_id = f"fm{index:05d}"
            label = int(labels[index])
            writer.writerow(
                [
                    product_id,
                    f"{CLASSES[label]} no. {number + 1}",
                    CATEGORY_SLUGS[label],
                    f"{rng.uniform(9, 120):.2f}",
                    int(index),
                ]
            )
            folder = catalog / product_id
            folder.mkdir(exist_ok=True)
            for view in range(views):
                make_view(images[index], rng, params).save(folder / f"view{view}.jpg", quality=92)
            for q in range(queries_per_product):
                make_view(images[index], rng, params).save(
                    queries / f"{product_id}__{q}.jpg", quality=92
                )
    return catalog, queries
