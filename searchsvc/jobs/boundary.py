"""The worker boundary: what a task message may ask for is what the database knows.

A message arrives from the broker, which anyone who can reach it can write to. Every field
that could steer a worker to a file, a key or a collection is tied back to the metadata
database, so that a forged message can do no more than a valid one would:

* an embed item names a registered image by id, and its path, product and content hash
  must be the row's (the worker then reads the row's file, not the message's; the
  category, which metadata may change meanwhile, is the row's);
* that file must lie under a catalog root an ingest registered (``ingest_runs``);
* candidate hashes of a rerank request must be SHA-256 hex digests, at most
  ``rerank_max_batch_pairs`` of them (one forward's worth), before they reach the pixel
  store.

The model version -> file and version -> collection ties are ``storage.versions``' (a
message names a version by id only) and the model cache is keyed by id and file.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import select

from searchsvc.jobs.wire import EmbedItem
from searchsvc.storage.db import Database, Image, IngestRun, Product

_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


def is_content_hash(value: object) -> bool:
    """A content hash as ``core.images.content_hash`` writes it: 64 lowercase hex digits."""
    return isinstance(value, str) and _SHA256_HEX.fullmatch(value) is not None


def check_candidate_hashes(hashes: Sequence[str], most: int) -> None:
    """ValueError naming the first candidate that is not a content hash, or the count."""
    if len(hashes) > most:
        raise ValueError(
            f"{len(hashes)} rerank candidates, at most {most} (SEARCHSVC_RERANK_MAX_BATCH_PAIRS)"
        )
    for digest in hashes:
        if not is_content_hash(digest):
            raise ValueError(f"rerank candidate {digest[:80]!r} is not a SHA-256 content hash")


@dataclass(frozen=True)
class Checked:
    """The items of a request as the database knows them, and the refused ones' reasons."""

    items: dict[int, EmbedItem]
    refused: dict[int, str]


def _under(path: str, roots: Sequence[str]) -> bool:
    # Lexical, not resolved: whether a symbolic link may leave the catalog is the ingest's
    # decision when it registers the file; here a message must not name a path of its own.
    normal = os.path.normpath(path)
    return any(normal == root or normal.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


def registered_items(db: Database, items: Sequence[EmbedItem]) -> Checked:
    """Each requested image as registered, or why it is refused (no such image, a message
    that disagrees with its row, a file outside every registered catalog root)."""
    wanted = {item.image_id for item in items if isinstance(item.image_id, int)}
    with db.session() as session:
        rows = {
            row.id: row
            for row in session.execute(
                select(
                    Image.id,
                    Image.product_id,
                    Image.source_path,
                    Image.content_hash,
                    Product.category,
                )
                .join(Product, Product.id == Image.product_id)
                .where(Image.id.in_(wanted))
            )
        }
        roots = [
            os.path.normpath(path)
            for path in session.scalars(select(IngestRun.catalog_path).distinct())
        ]
    checked: dict[int, EmbedItem] = {}
    refused: dict[int, str] = {}
    for item in items:
        row = rows.get(item.image_id)
        if row is None:
            refused[item.image_id] = f"image {item.image_id!r} is not registered"
            continue
        known = EmbedItem(
            image_id=row.id,
            product_id=row.product_id,
            path=row.source_path,
            content_hash=row.content_hash,
            category=row.category,
        )
        claimed = (item.product_id, item.path, item.content_hash)
        if claimed != (known.product_id, known.path, known.content_hash):
            refused[item.image_id] = (
                "the task does not match the registered image (it changed since the task was "
                "sent, or the message is forged); re-run ingest"
            )
        elif not _under(known.path, roots):
            refused[item.image_id] = f"{known.path} is outside every registered catalog root"
        else:
            checked[item.image_id] = known
    return Checked(checked, refused)
