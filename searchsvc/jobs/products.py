"""Catalog updates one product at a time (the HTTP API's ``PUT``/``DELETE /v1/products``).

An update is staged as a one-product catalog folder and handed to the same ingest
coordinator a folder scan uses (``ingest --sync`` on that folder): images are named by
their content hash, so sending the same photos again embeds nothing, and a photo left out
of the new set is removed. There is no second embedding or indexing path here.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image as PILImage
from sqlalchemy import select

from searchsvc.core.errors import ImageError
from searchsvc.core.images import content_hash, decode_image
from searchsvc.index import VectorIndex
from searchsvc.storage.catalog import CatalogProblem, ProductRecord
from searchsvc.storage.db import Database, Image, ImageStatus, Product

API_CATALOG_DIR = "api-catalog"
"""Under the home: one staged catalog folder per product updated through the API."""

_SUFFIX_OF_FORMAT = {
    "JPEG": ".jpg",
    "MPO": ".jpg",
    "PNG": ".png",
    "WEBP": ".webp",
    "BMP": ".bmp",
    "GIF": ".gif",
}


@dataclass(frozen=True)
class StagedProduct:
    root: Path
    """The one-product catalog to ingest with ``sync=True``."""
    filenames: list[str]
    problems: list[CatalogProblem]


def product_catalog_root(home: Path, product_id: str) -> Path:
    # Hashed: a product id may hold characters a folder name should not (it never holds '/').
    digest = hashlib.sha256(product_id.encode("utf-8")).hexdigest()[:32]
    return home / API_CATALOG_DIR / digest


def stage_product(
    home: Path,
    record: ProductRecord,
    images: Sequence[tuple[str, bytes]],
    *,
    max_pixels: int,
) -> StagedProduct:
    """Write ``record`` and the decodable ``images`` ((name for messages, bytes)) as a
    one-product catalog; each image that does not decode is named in ``problems``."""
    root = product_catalog_root(home, record.product_id)
    folder = root / record.product_id
    wanted: dict[str, bytes] = {}
    problems: list[CatalogProblem] = []
    for name, data in images:
        try:
            decode_image(data, name, max_pixels=max_pixels)  # the ingest's own checks
            image_format = _stored_format(data)
        except ImageError as exc:
            problems.append(CatalogProblem(name, exc.reason))
            continue
        suffix = _SUFFIX_OF_FORMAT.get(image_format, ".img")
        wanted[f"{content_hash(data)[:24]}{suffix}"] = data
    folder.mkdir(parents=True, exist_ok=True)
    for existing in folder.iterdir():
        if existing.name not in wanted:
            existing.unlink()
    for filename, data in wanted.items():
        path = folder / filename
        if not path.exists():  # same name, same bytes: the name is the content's hash
            tmp = path.with_name(f".{filename}.tmp")
            tmp.write_bytes(data)
            tmp.replace(path)
    line = {
        **record.attributes,
        "product_id": record.product_id,
        "title": record.title,
        "category": record.category,
        "price": record.price,
        "url": record.url,
    }
    metadata = root / "products.jsonl"
    tmp = root / ".products.jsonl.tmp"
    tmp.write_text(json.dumps(line, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(metadata)
    return StagedProduct(root=root, filenames=sorted(wanted), problems=problems)


def _stored_format(data: bytes) -> str:
    """The file format from the header (decoding converts to RGB and drops it)."""
    with PILImage.open(io.BytesIO(data)) as image:
        return str(image.format or "")


def remove_product(
    home: Path, db: Database, index: VectorIndex, collection: str | None, product_id: str
) -> int:
    """Take a product out of search: its points deleted from ``collection`` (the served
    one), its image rows marked removed, the product flagged removed. Returns how many
    images were removed; 0 for an unknown or already removed product."""
    with db.session() as session:
        product = session.get(Product, product_id)
        if product is None:
            return 0
        rows = list(
            session.scalars(
                select(Image).where(
                    Image.product_id == product_id, Image.status != ImageStatus.REMOVED
                )
            )
        )
        point_ids = [row.point_id for row in rows if row.point_id]
        if point_ids and collection is not None:
            index.delete(collection, point_ids)
        for row in rows:
            row.status = ImageStatus.REMOVED
            row.point_id = None
        product.removed = True
    shutil.rmtree(product_catalog_root(home, product_id), ignore_errors=True)
    return len(rows)


def product_view(db: Database, product_id: str) -> dict[str, Any] | None:
    """A product and its images as the API shows them; None when unknown or removed."""
    with db.session() as session:
        product = session.get(Product, product_id)
        if product is None or product.removed:
            return None
        images = [
            {
                "image_id": row.id,
                "filename": row.filename,
                "content_hash": row.content_hash,
                "status": row.status.value,
                "error": row.error,
            }
            for row in session.scalars(
                select(Image)
                .where(Image.product_id == product_id, Image.status != ImageStatus.REMOVED)
                .order_by(Image.id)
            )
        ]
        return {
            "product_id": product.id,
            "title": product.title,
            "category": product.category,
            "price": product.price,
            "url": product.url,
            "attributes": dict(product.attributes or {}),
            "images": images,
        }
