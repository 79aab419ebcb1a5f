"""The ingest coordinator: catalog -> DB rows -> embed tasks -> index points.

Streams the catalog in batches (memory is bounded by the batch, not the catalog), skips
images whose content hash is already indexed by the active embedder, and keeps a bounded
window of embed tasks in flight, so that reading and bookkeeping overlap with embedding.

Crash safety: rows are committed as ``pending`` before their task is sent, and become
``indexed`` only after their point is written. A re-run re-sends whatever is still pending;
point ids come from the content, so a repeated upsert overwrites instead of duplicating.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, func, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError

from searchsvc.core.config import Settings
from searchsvc.core.errors import ImageError, SearchsvcError
from searchsvc.core.images import content_hash, read_image_bytes
from searchsvc.index import VectorIndex, point_id_for
from searchsvc.jobs.dispatch import Dispatcher
from searchsvc.jobs.embed_pipeline import EmbedPipeline, write_points
from searchsvc.jobs.wire import EmbedItem, EmbedRequest, EmbedResponse
from searchsvc.storage.catalog import (
    CatalogImage,
    CatalogProblem,
    ProductRecord,
    iter_images,
    iter_metadata,
    open_catalog,
)
from searchsvc.storage.db import Database, Image, ImageStatus, IngestRun, Product
from searchsvc.storage.db.schema import utcnow
from searchsvc.storage.versions import VersionRef

MAX_PROBLEMS_KEPT = 200
SCAN_BATCH = 512


@dataclass
class IngestSummary:
    run_id: int = 0
    products_seen: int = 0
    products_new: int = 0
    products_removed: int = 0
    images_seen: int = 0
    images_new: int = 0
    images_changed: int = 0
    images_unchanged: int = 0
    images_embedded: int = 0
    images_failed: int = 0
    images_removed: int = 0
    tasks_resent: int = 0
    """Embed tasks sent again after no result came (``embed_task_resend_s``)."""
    problem_count: int = 0
    problems: list[CatalogProblem] = field(default_factory=list)
    seconds: float = 0.0

    def merge(self, other: IngestSummary) -> None:
        """Add the counts and problems of ``other`` (a batch's) to this summary."""
        for name, value in other.counts().items():
            if isinstance(value, int) and name != "problem_count":
                setattr(self, name, getattr(self, name) + value)
        for problem in other.problems:
            self.add_problem(problem)
        self.problem_count += other.problem_count - len(other.problems)  # those not kept

    def add_problem(self, problem: CatalogProblem) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS_KEPT:
            self.problems.append(problem)

    def counts(self) -> dict[str, Any]:
        return {
            name: value
            for name, value in self.__dict__.items()
            if isinstance(value, int | float) and name != "run_id"
        }


ProgressCallback = Callable[[int, int], None]
"""Called with (images finished so far, images failed so far)."""


OldPoints = dict[int, str | None]
"""Image id -> the point its new content replaces (deleted once the new one is written)."""


class IngestCoordinator:
    def __init__(
        self,
        settings: Settings,
        db: Database,
        index: VectorIndex | None,
        dispatcher: Dispatcher,
        embedder: VersionRef,
        embedder_dim: int,
        *,
        max_in_flight: int = 2,
    ) -> None:
        self.settings = settings
        self.db = db
        self.index = index
        self.dispatcher = dispatcher
        self.embedder = embedder
        self.dim = embedder_dim
        self.max_in_flight = max_in_flight
        self.workers_write = settings.workers_write_index
        if not self.workers_write and index is None:
            raise ValueError("the coordinator writes the index but was given none")

    # ------------------------------------------------------------------ entry point
    def run(
        self, root: Path, *, sync: bool = False, progress: ProgressCallback | None = None
    ) -> IngestSummary:
        started = time.perf_counter()
        root = open_catalog(root).resolve()
        summary = IngestSummary()
        collection = self._collection()
        if self.index is not None:
            self.index.ensure_collection(collection, self.dim)
            if self.index.resolve_alias(self.settings.collection_alias) is None:
                self.index.set_alias(self.settings.collection_alias, collection)

        with self.db.session() as session:
            run = IngestRun(catalog_path=str(root), status="running")
            session.add(run)
            session.flush()
            summary.run_id = run.id

        status = "failed"
        try:
            self._ingest_metadata(root, summary)
            self._ingest_images(root, summary, progress)
            if sync:
                self._sync_removed(root, summary)
            with self.db.session() as session:
                summary.products_seen = int(
                    session.scalar(
                        select(func.count())
                        .select_from(Product)
                        .where(Product.last_seen_run_id == summary.run_id)
                    )
                    or 0
                )
            if self.index is not None:
                self.index.optimize(collection)
            status = "done"
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            summary.seconds = time.perf_counter() - started
            with self.db.session() as session:
                session.execute(
                    update(IngestRun)
                    .where(IngestRun.id == summary.run_id)
                    .values(
                        status=status,
                        finished_at=utcnow(),
                        counts=summary.counts(),
                        problems=[{"item": p.item, "reason": p.reason} for p in summary.problems],
                    )
                )
        return summary

    def _collection(self) -> str:
        if not self.embedder.collection:
            raise SearchsvcError(f"embedder version {self.embedder.id} has no collection")
        return self.embedder.collection

    # ------------------------------------------------------------------ metadata
    def _ingest_metadata(self, root: Path, summary: IngestSummary) -> None:
        batch: list[ProductRecord] = []
        for record in iter_metadata(root):
            if isinstance(record, CatalogProblem):
                summary.add_problem(record)
                continue
            batch.append(record)
            if len(batch) >= SCAN_BATCH:
                self._upsert_products(batch, summary)
                batch = []
        if batch:
            self._upsert_products(batch, summary)

    def _upsert_products(self, records: Sequence[ProductRecord], summary: IngestSummary) -> None:
        latest = {record.product_id: record for record in records}  # a later row wins
        with self.db.session() as session:
            existing = {
                product.id: product
                for product in session.scalars(select(Product).where(Product.id.in_(latest)))
            }
            for product_id, record in latest.items():
                product = existing.get(product_id)
                if product is None:
                    product = Product(id=product_id)
                    session.add(product)
                    summary.products_new += 1
                values = {
                    "title": record.title,
                    "category": record.category,
                    "price": record.price,
                    "url": record.url,
                    "attributes": record.attributes,
                }
                for name, value in values.items():
                    if getattr(product, name) != value:
                        setattr(product, name, value)
                product.removed = False
                product.last_seen_run_id = summary.run_id

    # ------------------------------------------------------------------ images
    def _ingest_images(
        self, root: Path, summary: IngestSummary, progress: ProgressCallback | None
    ) -> None:
        done = 0

        def report() -> None:
            if progress is not None:
                progress(done, summary.images_failed)

        def collected(
            request: EmbedRequest, old_points: OldPoints, response: EmbedResponse
        ) -> None:
            nonlocal done
            done += self._record_results(request.items, old_points, response, summary)
            report()

        def failed(request: EmbedRequest, _: OldPoints, exc: SearchsvcError) -> None:
            # The whole task failed (not one image): leave its rows pending for a re-run.
            for item in request.items:
                summary.add_problem(
                    CatalogProblem(item.path, f"embed task failed, left pending ({exc})")
                )
            report()

        def resent() -> None:
            summary.tasks_resent += 1

        pipeline: EmbedPipeline[OldPoints] = EmbedPipeline(
            self.dispatcher,
            in_flight=self.max_in_flight,
            timeout_s=self.settings.embed_task_timeout_s,
            resend_after_s=self.settings.embed_task_resend_s,
            task_time_limit_s=self.settings.task_time_limit_s,
            on_result=collected,
            on_failure=failed,
            on_resend=resent,
            unfinished="unfinished images stay pending: run the ingest again to finish them",
        )
        for batch in _batched(iter_images(root), SCAN_BATCH):
            images: list[CatalogImage] = []
            for entry in batch:
                if isinstance(entry, CatalogProblem):
                    summary.add_problem(entry)
                else:
                    images.append(entry)
            if not images:
                continue
            summary.images_seen += len(images)
            to_embed, old_points, skipped = self._register(images, summary)
            done += skipped
            report()
            for start in range(0, len(to_embed), self.settings.batch_size):
                chunk = to_embed[start : start + self.settings.batch_size]
                request = EmbedRequest(
                    items=chunk,
                    embedder_version=self.embedder.id,
                    collection=self._collection(),
                    write_index=self.workers_write,
                )
                pipeline.submit(request, {i.image_id: old_points.get(i.image_id) for i in chunk})
        pipeline.drain()

    def _register(
        self, images: list[CatalogImage], summary: IngestSummary
    ) -> tuple[list[EmbedItem], dict[int, str | None], int]:
        """Hash the batch's files and bring their rows up to date.

        Returns the items to embed, the old point of each changed image, and how many
        images needed no work (unchanged, or failed to read).
        """
        hashed: list[tuple[CatalogImage, str, int]] = []
        skipped = 0
        for image in images:
            try:
                data = read_image_bytes(image.path, self.settings.max_image_bytes)
            except ImageError as exc:
                summary.images_failed += 1
                summary.add_problem(
                    CatalogProblem(f"{image.product_id}/{image.filename}", exc.reason)
                )
                skipped += 1
                continue
            hashed.append((image, content_hash(data), len(data)))

        # Two coordinators (a Qdrant server lets several run at once) may insert the same
        # new image row concurrently: the loser's transaction fails on the unique key, and a
        # second attempt finds the winner's row and treats it like any existing one.
        for attempt in range(3):
            delta = IngestSummary(run_id=summary.run_id)
            try:
                to_embed, old_points, unchanged = self._register_rows(hashed, delta)
                break
            except IntegrityError:
                if attempt == 2:
                    raise
        summary.merge(delta)
        return to_embed, old_points, skipped + unchanged

    def _register_rows(
        self, hashed: list[tuple[CatalogImage, str, int]], summary: IngestSummary
    ) -> tuple[list[EmbedItem], dict[int, str | None], int]:
        """One transaction: rows of the batch created or updated; counts go to ``summary``."""
        skipped = 0
        to_embed: list[EmbedItem] = []
        old_points: dict[int, str | None] = {}
        run_id = summary.run_id
        with self.db.session() as session:
            product_ids = {image.product_id for image, _, _ in hashed}
            products = {
                p.id: p for p in session.scalars(select(Product).where(Product.id.in_(product_ids)))
            }
            for product_id in product_ids - products.keys():
                products[product_id] = Product(id=product_id, attributes={})
                session.add(products[product_id])
                summary.products_new += 1
            for product in products.values():
                product.removed = False
                product.last_seen_run_id = run_id

            categories = {pid: product.category for pid, product in products.items()}
            # Core statements, not ORM objects: at ingest rates the ORM's per-object
            # bookkeeping cost more CPU than decoding the images.
            keys = [(image.product_id, image.filename) for image, _, _ in hashed]
            rows = {
                (row.product_id, row.filename): row
                for row in session.execute(
                    select(
                        Image.id,
                        Image.product_id,
                        Image.filename,
                        Image.content_hash,
                        Image.status,
                        Image.error,
                        Image.point_id,
                        Image.embedder_version_id,
                    ).where(tuple_(Image.product_id, Image.filename).in_(keys))
                )
            }
            new_rows: list[dict[str, Any]] = []
            updates: list[dict[str, Any]] = []
            fresh: list[tuple[int, str, CatalogImage]] = []  # (image id, hash, file)
            for image, digest, size in hashed:
                row = rows.get((image.product_id, image.filename))
                if row is None:
                    new_rows.append(
                        {
                            "product_id": image.product_id,
                            "filename": image.filename,
                            "source_path": str(image.path),
                            "content_hash": digest,
                            "size_bytes": size,
                            "status": ImageStatus.PENDING,
                            "last_seen_run_id": run_id,
                        }
                    )
                    summary.images_new += 1
                    continue
                status, error = row.status, row.error
                if row.content_hash != digest:
                    summary.images_changed += 1
                    old_points[row.id] = row.point_id
                    status, error = ImageStatus.PENDING, None
                    fresh.append((row.id, digest, image))
                elif row.status == ImageStatus.FAILED:
                    # Same bytes as the last failed attempt: it would fail the same way.
                    summary.images_failed += 1
                    summary.add_problem(
                        CatalogProblem(f"{image.product_id}/{image.filename}", error or "failed")
                    )
                    skipped += 1
                elif (
                    row.status == ImageStatus.INDEXED
                    and row.embedder_version_id == self.embedder.id
                ):
                    summary.images_unchanged += 1
                    skipped += 1
                else:  # pending from an interrupted run, removed earlier, or another embedder
                    if row.status == ImageStatus.REMOVED:
                        summary.images_new += 1
                    old_points[row.id] = None
                    status = ImageStatus.PENDING
                    fresh.append((row.id, digest, image))
                updates.append(
                    {
                        "b_id": row.id,
                        "source_path": str(image.path),
                        "content_hash": digest,
                        "size_bytes": size,
                        "status": status,
                        "error": error,
                        "last_seen_run_id": run_id,
                    }
                )
            session.flush()  # new product rows first: image rows refer to them
            connection = session.connection()
            if updates:
                connection.execute(
                    update(Image)
                    .where(Image.id == bindparam("b_id"))
                    .values(
                        {
                            name: bindparam(name)
                            for name in (
                                "source_path",
                                "content_hash",
                                "size_bytes",
                                "status",
                                "error",
                                "last_seen_run_id",
                            )
                        }
                    ),
                    updates,
                )
            if new_rows:
                inserted = connection.execute(
                    insert(Image).returning(Image.id, sort_by_parameter_order=True), new_rows
                )
                by_key = {(image.product_id, image.filename): image for image, _, _ in hashed}
                for (image_id,), values in zip(inserted, new_rows, strict=True):
                    image = by_key[(values["product_id"], values["filename"])]
                    fresh.append((image_id, values["content_hash"], image))
            for image_id, digest, image in fresh:
                to_embed.append(
                    EmbedItem(
                        image_id=image_id,
                        product_id=image.product_id,
                        path=str(image.path),
                        content_hash=digest,
                        category=categories[image.product_id],
                    )
                )
        return to_embed, old_points, skipped

    def _record_results(
        self,
        items: list[EmbedItem],
        old_points: OldPoints,
        response: EmbedResponse,
        summary: IngestSummary,
    ) -> int:
        """Write one task's points and record each image's outcome; returns how many images
        it finished."""
        by_id = {item.image_id: item for item in items}
        new_points = {
            item.image_id: point_id_for(item.product_id, item.content_hash) for item in items
        }
        # A changed image's old point goes, whether or not its new content embedded.
        stale = [old for image_id, old in old_points.items() if old and old != new_points[image_id]]
        write_points(self.index, self._collection(), items, response, stale=stale)

        # One executemany per outcome. The content-hash condition leaves a row alone when a
        # concurrent ingest registered newer bytes meanwhile: its own task finishes it.
        indexed = [
            {
                "b_id": r.image_id,
                "b_hash": by_id[r.image_id].content_hash,
                "point_id": new_points[r.image_id],
                "width": r.width,
                "height": r.height,
            }
            for r in response.results
            if r.error is None
        ]
        failed = [
            {"b_id": r.image_id, "b_hash": by_id[r.image_id].content_hash, "error": r.error}
            for r in response.results
            if r.error is not None
        ]
        same_row = (Image.id == bindparam("b_id")) & (Image.content_hash == bindparam("b_hash"))
        now = utcnow()
        with self.db.session() as session:
            connection = session.connection()
            if indexed:
                connection.execute(
                    update(Image)
                    .where(same_row)
                    .values(
                        status=ImageStatus.INDEXED,
                        error=None,
                        point_id=bindparam("point_id"),
                        embedder_version_id=response.embedder_version,
                        width=bindparam("width"),
                        height=bindparam("height"),
                        updated_at=now,
                    ),
                    indexed,
                )
            if failed:
                connection.execute(
                    update(Image)
                    .where(same_row)
                    .values(
                        status=ImageStatus.FAILED,
                        error=bindparam("error"),
                        point_id=None,
                        updated_at=now,
                    ),
                    failed,
                )
        summary.images_embedded += len(indexed)
        summary.images_failed += len(failed)
        for r in response.results:
            if r.error is not None:
                item = by_id[r.image_id]
                summary.add_problem(
                    CatalogProblem(f"{item.product_id}/{Path(item.path).name}", r.error)
                )
        return len(response.results)

    # ------------------------------------------------------------------ sync
    def _sync_removed(self, root: Path, summary: IngestSummary) -> None:
        """Remove from the index what this catalog no longer holds (``ingest --sync``)."""
        prefix = str(root).rstrip("/") + "/"
        last_id = 0
        while True:  # keyset pagination: one pass over the images, a batch at a time
            with self.db.session() as session:
                rows = list(
                    session.scalars(
                        select(Image).where(Image.id > last_id).order_by(Image.id).limit(SCAN_BATCH)
                    )
                )
                if not rows:
                    break
                last_id = rows[-1].id
                gone = [
                    row
                    for row in rows
                    if row.source_path.startswith(prefix)
                    and row.status != ImageStatus.REMOVED
                    and row.last_seen_run_id != summary.run_id
                ]
                point_ids = [row.point_id for row in gone if row.point_id]
                if point_ids and self.index is not None:
                    self.index.delete(self._collection(), point_ids)
                for row in gone:
                    row.status = ImageStatus.REMOVED
                    row.point_id = None
                summary.images_removed += len(gone)
        with self.db.session() as session:
            live_products = select(Image.product_id).where(Image.status != ImageStatus.REMOVED)
            # A product with no photo left cannot be found by image search: it leaves too,
            # even when the metadata file still lists it.
            result = session.execute(
                update(Product)
                .where(Product.removed.is_(False), Product.id.not_in(live_products))
                .values(removed=True)
            )
            summary.products_removed += int(result.rowcount or 0)  # type: ignore[attr-defined]


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
