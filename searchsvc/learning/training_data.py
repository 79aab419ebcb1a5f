"""Labelled data for the learning loop, read from the metadata DB; the split by product.

Labels are product ids: images of the same product are positives. Three sources:

- catalog images (``images`` rows that are ``indexed``, of products not removed);
- logged query photos (``query_log.image_path``) with POSITIVE feedback: the shopper's photo
  becomes one more labelled image of that product. It is the most valuable training data,
  because it is what queries really look like; it is never part of an evaluation gallery;
- results shown and marked NEGATIVE: a (query photo, product image) pair that a shopper
  says is not a match, a hard negative for STIR.

Per (query, product) the latest feedback wins. A query photo with positive feedback for two
different products is ambiguous and is left out (counted).

The split is by product and fixed by a seed: a product's side is a hash of (seed, product
id), so it does not move when the catalog grows or changes and a later retrain is compared
on the same validation products. Products with a single image stay in their split: they
are gallery items and negatives, never queries with a ground truth.
"""

from __future__ import annotations

import hashlib
import math
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from sqlalchemy import select

from searchsvc.core.errors import ImageError, SearchsvcError
from searchsvc.core.images import decode_image, read_image_bytes, resize_center_crop
from searchsvc.storage.db import Database, Feedback, Image, ImageStatus, Product, QueryLog
from searchsvc.storage.pixels import PixelStore

Source = Literal["catalog", "query"]
SplitName = Literal["train", "val"]
PAGE = 1024


@dataclass(frozen=True)
class LabelledImage:
    """One image with its product. ``image_id`` is set for catalog images, ``query_id``
    for logged query photos."""

    label: str
    path: Path
    content_hash: str
    source: Source
    image_id: int | None = None
    query_id: str | None = None


@dataclass(frozen=True)
class HardNegative:
    """A result a shopper marked wrong: (query photo, an image of the wrong product)."""

    query_id: str
    query_path: Path
    query_hash: str
    query_label: str | None
    """The product the same query was marked right for, when there is one."""
    negative_label: str
    negative_image_id: int | None
    """The image that was shown (from the logged results), when still indexed."""


@dataclass
class TrainingData:
    images: list[LabelledImage]
    hard_negatives: list[HardNegative]
    counts: dict[str, int] = field(default_factory=dict)

    def fingerprint(self) -> str:
        """A digest of exactly what would be trained on (order-independent): a retrain
        resumes only when its data is the same."""
        digest = hashlib.sha256()
        for item in sorted(f"{i.label}\x00{i.content_hash}\x00{i.source}" for i in self.images):
            digest.update(item.encode() + b"\n")
        for neg in sorted(f"{n.query_hash}\x00{n.negative_label}" for n in self.hard_negatives):
            digest.update(b"neg:" + neg.encode() + b"\n")
        return digest.hexdigest()


def load_training_data(db: Database) -> TrainingData:
    """Every labelled image and hard negative in the DB (streamed by pages, then held:
    these are references, not pixels)."""
    images: list[LabelledImage] = []
    first_image: dict[str, int] = {}
    indexed_ids: set[int] = set()
    last_id = 0
    while True:
        with db.session() as session:
            rows = session.execute(
                select(Image.id, Image.product_id, Image.source_path, Image.content_hash)
                .join(Product, Product.id == Image.product_id)
                .where(
                    Image.id > last_id,
                    Image.status == ImageStatus.INDEXED,
                    Product.removed.is_(False),
                )
                .order_by(Image.id)
                .limit(PAGE)
            ).all()
        if not rows:
            break
        last_id = rows[-1][0]
        for image_id, product_id, source_path, digest in rows:
            images.append(
                LabelledImage(product_id, Path(source_path), digest, "catalog", image_id=image_id)
            )
            first_image.setdefault(product_id, image_id)
            indexed_ids.add(image_id)

    with db.session() as session:
        live_products = set(
            session.scalars(select(Product.id).where(Product.removed.is_(False))).all()
        )
        feedback_rows = session.execute(
            select(
                Feedback.query_id,
                Feedback.product_id,
                Feedback.positive,
                QueryLog.image_path,
                QueryLog.image_hash,
                QueryLog.results,
            )
            .join(QueryLog, QueryLog.id == Feedback.query_id)
            .order_by(Feedback.id)
        ).all()

    latest: dict[tuple[str, str], bool] = {}
    queries: dict[str, tuple[str | None, str, list[Any]]] = {}
    for query_id, product_id, positive, image_path, image_hash, results in feedback_rows:
        latest[(query_id, product_id)] = bool(positive)  # ordered by id: the latest wins
        queries[query_id] = (image_path, image_hash, list(results or []))

    counts: Counter[str] = Counter()
    positives: dict[str, set[str]] = {}
    negatives: dict[str, set[str]] = {}
    for (query_id, product_id), positive in latest.items():
        if product_id not in live_products:
            counts["feedback_for_removed_products"] += 1
            continue
        (positives if positive else negatives).setdefault(query_id, set()).add(product_id)

    seen_query_images: set[tuple[str, str]] = set()
    query_label: dict[str, str] = {}
    for query_id in sorted(positives):
        image_path, image_hash, _ = queries[query_id]
        labels = positives[query_id]
        if len(labels) > 1:
            counts["ambiguous_query_photos"] += 1
            continue
        if not image_path or not Path(image_path).is_file():
            counts["query_photos_missing"] += 1
            continue
        label = next(iter(labels))
        query_label[query_id] = label
        if (label, image_hash) in seen_query_images:
            continue  # the same photo sent twice is one training image
        seen_query_images.add((label, image_hash))
        images.append(
            LabelledImage(label, Path(image_path), image_hash, "query", query_id=query_id)
        )

    hard_negatives: list[HardNegative] = []
    for query_id in sorted(negatives):
        image_path, image_hash, results = queries[query_id]
        if not image_path or not Path(image_path).is_file():
            counts["query_photos_missing"] += 1
            continue
        shown = {
            str(r.get("product_id")): int(r["image_id"])
            for r in results
            if isinstance(r, dict) and r.get("image_id") is not None
        }
        for product_id in sorted(negatives[query_id] - {query_label.get(query_id, "")}):
            shown_id = shown.get(product_id)
            negative_id = shown_id if shown_id in indexed_ids else first_image.get(product_id)
            if negative_id is None:
                counts["negatives_without_images"] += 1
                continue
            hard_negatives.append(
                HardNegative(
                    query_id=query_id,
                    query_path=Path(image_path),
                    query_hash=image_hash,
                    query_label=query_label.get(query_id),
                    negative_label=product_id,
                    negative_image_id=negative_id,
                )
            )

    counts["catalog_images"] = sum(1 for i in images if i.source == "catalog")
    counts["query_images"] = sum(1 for i in images if i.source == "query")
    counts["products"] = len({i.label for i in images})
    counts["hard_negatives"] = len(hard_negatives)
    return TrainingData(images, hard_negatives, dict(counts))


# --------------------------------------------------------------------------------- the split


def split_of(product_id: str, *, seed: int, val_fraction: float) -> SplitName:
    """The product's side: a uniform number from a hash of (seed, product id), below
    ``val_fraction`` means validation. Independent of every other product."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    digest = hashlib.sha256(f"{seed}\x00{product_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2.0**64
    return "val" if u < val_fraction else "train"


@dataclass
class DataSplit:
    """The labelled data cut by product. ``record`` is what a model version stores."""

    train: list[LabelledImage]
    val: list[LabelledImage]
    train_hard_negatives: list[HardNegative]
    val_hard_negatives: list[HardNegative]
    seed: int
    val_fraction: float
    val_sample: dict[str, Any] | None = None
    """How :func:`sample_validation` cut the validation side (None: it is whole)."""

    @property
    def record(self) -> dict[str, Any]:
        def summary(items: Sequence[LabelledImage]) -> dict[str, int]:
            per_product = Counter(i.label for i in items)
            return {
                "products": len(per_product),
                "images": sum(1 for i in items if i.source == "catalog"),
                "query_photos": sum(1 for i in items if i.source == "query"),
                "products_with_one_image": sum(1 for n in per_product.values() if n == 1),
            }

        val_products = sorted({i.label for i in self.val})
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "train": {**summary(self.train), "hard_negatives": len(self.train_hard_negatives)},
            "val": {**summary(self.val), "hard_negatives": len(self.val_hard_negatives)},
            "val_products_sha256": hashlib.sha256("\n".join(val_products).encode()).hexdigest(),
            **({"val_sample": self.val_sample} if self.val_sample is not None else {}),
        }


def split_data(data: TrainingData, *, seed: int, val_fraction: float) -> DataSplit:
    """Train and validation sides of ``data``. A hard negative goes to validation when any
    product it names is a validation product (training never sees validation products)."""
    side: dict[str, SplitName] = {}

    def of(label: str) -> SplitName:
        if label not in side:
            side[label] = split_of(label, seed=seed, val_fraction=val_fraction)
        return side[label]

    train = [i for i in data.images if of(i.label) == "train"]
    val = [i for i in data.images if of(i.label) == "val"]
    train_neg: list[HardNegative] = []
    val_neg: list[HardNegative] = []
    for neg in data.hard_negatives:
        labels = [neg.negative_label] + ([neg.query_label] if neg.query_label else [])
        (val_neg if any(of(label) == "val" for label in labels) else train_neg).append(neg)
    return DataSplit(train, val, train_neg, val_neg, seed, val_fraction)


def sample_validation(split: DataSplit, max_images: int) -> DataSplit:
    """The split with its validation side cut to at most ``max_images`` images (catalog
    images and query photos), whole products at a time, so that evaluation memory and time
    stay bounded however large the catalog grows.

    Products are taken in the order of a hash of (split seed, product id), each when its
    images still fit: the same products for every model evaluated on this split (the old
    and the new model of a gate), and, like the split itself, a product's place does not
    move when others are added. Products left out are still never trained on. The cut is
    recorded (:attr:`DataSplit.val_sample`, in :attr:`DataSplit.record`)."""
    if max_images < 1:
        raise ValueError(f"max_images must be at least 1, got {max_images}")
    per_product = Counter(i.label for i in split.val)
    if sum(per_product.values()) <= max_images:
        return split

    def rank(label: str) -> bytes:
        return hashlib.sha256(f"val-sample\x00{split.seed}\x00{label}".encode()).digest()

    kept: set[str] = set()
    total = 0
    for label in sorted(per_product, key=rank):
        if total + per_product[label] <= max_images:
            kept.add(label)
            total += per_product[label]
    val = [i for i in split.val if i.label in kept]
    val_neg = [
        n
        for n in split.val_hard_negatives
        if n.negative_label in kept or (n.query_label is not None and n.query_label in kept)
    ]
    record = {
        "max_images": max_images,
        "seed": split.seed,
        "products": len(kept),
        "of_products": len(per_product),
        "images": total,
        "of_images": sum(per_product.values()),
    }
    return DataSplit(
        split.train,
        val,
        split.train_hard_negatives,
        val_neg,
        split.seed,
        split.val_fraction,
        record,
    )


# --------------------------------------------------------------------------------- pixels


def load_size_for(input_size: int) -> int:
    """The side training pixels are decoded at: a little larger than the model's input
    (the 224/256 ratio of ImageNet practice), so RandomResizedCrop has room to cut from."""
    return math.ceil(input_size * 8 / 7)


@dataclass
class PixelLoader:
    """Model-ready pixels of labelled images, decoded through the one safe path
    (:mod:`searchsvc.core.images`).

    At the model's input size a catalog image is read from the reranker's pixel store when
    it is there (ingest already decoded it); anything else (another size, a query photo)
    is decoded from the original file.
    """

    max_bytes: int
    max_pixels: int
    store: PixelStore | None = None

    def one(self, path: Path, content_hash: str, size: int) -> np.ndarray:
        if self.store is not None and self.store.has(content_hash, size):
            try:
                return self.store.get(content_hash, size)
            except ImageError:
                pass  # an unreadable cached copy: decode the original instead
        data = read_image_bytes(path, self.max_bytes)
        image, _ = decode_image(data, str(path), max_pixels=self.max_pixels, min_side=size)
        return resize_center_crop(image, size)

    def many(
        self,
        refs: Sequence[tuple[Path, str]],
        size: int,
        *,
        progress: Callable[[int], None] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """``(N, size, size, 3)`` uint8 and an ``(N,)`` bool mask of the images that could be
        read (failed rows are zeros). Memory: the returned array only."""
        out = np.zeros((len(refs), size, size, 3), dtype=np.uint8)
        ok = np.zeros(len(refs), dtype=bool)
        for n, (path, digest) in enumerate(refs):
            try:
                out[n] = self.one(path, digest, size)
                ok[n] = True
            except ImageError:
                pass
            if progress is not None:
                progress(n + 1)
        return out, ok


def refs_of(images: Iterable[LabelledImage]) -> list[tuple[Path, str]]:
    return [(i.path, i.content_hash) for i in images]


def require_val_queries(split: DataSplit, minimum: int = 2) -> None:
    """Refuse a validation side on which no metric means anything."""
    per_product = Counter(i.label for i in split.val if i.source == "catalog")
    usable = sum(1 for n in per_product.values() if n >= 2)
    if usable < minimum:
        raise SearchsvcError(
            f"the validation split has {usable} products with two or more catalog images "
            f"(need at least {minimum}): add products, or raise SEARCHSVC_VAL_FRACTION "
            f"(now {split.val_fraction:g})"
        )
