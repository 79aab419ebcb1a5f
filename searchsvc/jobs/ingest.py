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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, func, insert, select, tuple_, update
from sqlalchemy.exc import IntegrityError, InterfaceError, OperationalError, StatementError
from sqlalchemy.orm import Session

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
    UnlistedFolder,
    iter_images,
    iter_metadata,
    open_catalog,
)
from searchsvc.storage.db import Database, Image, ImageStatus, IngestRun, Product
from searchsvc.storage.db.schema import utcnow
from searchsvc.storage.versions import VersionRef

MAX_PROBLEMS_KEPT = 200
SCAN_BATCH = 512
SYNC_NAMES_SHOWN = 10


class SyncRefused(SearchsvcError):
    """``--sync`` would remove more than its limit allows; nothing was removed."""


@dataclass(frozen=True)
class DeleteLimit:
    """How much one ``--sync`` may remove: at most ``count`` images, or at most ``fraction``
    of the catalog's live images. Neither set: no limit (``--force``)."""

    count: int | None = None
    fraction: float | None = None

    def allows(self, removing: int, live: int) -> bool:
        if self.count is not None and removing > self.count:
            return False
        return self.fraction is None or removing <= self.fraction * live

    def describe(self) -> str:
        if self.count is not None:
            return f"{self.count} images"
        if self.fraction is not None:
            return f"{self.fraction:.0%} of the catalog"
        return "no limit"


def parse_delete_limit(text: str) -> DeleteLimit:
    """``--max-delete``'s value: ``N`` images, or a share of the catalog (``0.3``, ``30%``)."""
    raw = text.strip()
    try:
        if raw.isdigit():
            return DeleteLimit(count=int(raw))
        fraction = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        fraction = -1.0
    if not 0.0 <= fraction <= 1.0:  # also NaN
        raise ValueError(f"{text!r}: expected a number of images (25) or a share (0.3, 30%)")
    return DeleteLimit(fraction=fraction)


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
        self,
        root: Path,
        *,
        sync: bool = False,
        progress: ProgressCallback | None = None,
        max_delete: DeleteLimit | None = None,
    ) -> IngestSummary:
        """Ingest ``root``; with ``sync``, then remove what it no longer holds, within
        ``max_delete`` (default: ``sync_max_delete_fraction`` of its live images)."""
        started = time.perf_counter()
        root = open_catalog(root).resolve()
        summary = IngestSummary()
        # Product folders that failed to list this run: their images are unknown, not gone.
        self._unlisted: set[str] = set()
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
                limit = max_delete or DeleteLimit(fraction=self.settings.sync_max_delete_fraction)
                self._sync_removed(root, summary, limit)
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
        except SyncRefused:
            status = "sync refused"
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
        follow = self.settings.follow_symlinks_outside_catalog
        for record in iter_metadata(root, follow_outside=follow):
            if isinstance(record, CatalogProblem):
                summary.add_problem(record)
                continue
            batch.append(record)
            if len(batch) >= SCAN_BATCH:
                self._store_products(batch, summary)
                batch = []
        if batch:
            self._store_products(batch, summary)

    def _store_products(self, records: Sequence[ProductRecord], summary: IngestSummary) -> None:
        """Upsert a batch; should the database refuse it (a value the reader's checks let
        through), store its rows one by one, naming each it refuses, and go on."""
        delta = IngestSummary(run_id=summary.run_id)
        try:
            self._upsert_products(records, delta)
        except StatementError as exc:
            if isinstance(exc, OperationalError | InterfaceError):
                raise  # the database itself is unavailable: not one row's fault
            if len(records) > 1:
                for record in records:
                    self._store_products([record], summary)
                return
            record = records[0]
            reason = " ".join(str(exc.orig or exc).split())[:200]
            summary.add_problem(
                CatalogProblem(record.where or record.product_id, f"database refused it ({reason})")
            )
            return
        summary.merge(delta)

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
        follow = self.settings.follow_symlinks_outside_catalog
        for batch in _batched(iter_images(root, follow_outside=follow), SCAN_BATCH):
            images: list[CatalogImage] = []
            for entry in batch:
                if isinstance(entry, CatalogProblem):
                    if isinstance(entry, UnlistedFolder):
                        self._unlisted.add(entry.product_id)
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
        unreadable: list[tuple[str, str]] = []
        skipped = 0
        for image in images:
            try:
                data = read_image_bytes(image.path, self.settings.max_image_bytes)
            except ImageError as exc:
                unreadable.append((image.product_id, image.filename))
                summary.images_failed += 1
                summary.add_problem(
                    CatalogProblem(f"{image.product_id}/{image.filename}", exc.reason)
                )
                skipped += 1
                continue
            hashed.append((image, content_hash(data), len(data)))
        if unreadable:
            # Listed but not readable (permissions, an I/O error): still there, so ``--sync``
            # must not take it for gone. Its row, if any, keeps its last good state.
            with self.db.session() as session:
                session.execute(
                    update(Image)
                    .where(tuple_(Image.product_id, Image.filename).in_(unreadable))
                    .values(last_seen_run_id=summary.run_id)
                )

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
            changed: list[int] = []  # rows with new bytes: a fresh count of deliveries
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
                    changed.append(row.id)
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
            if changed:
                connection.execute(
                    update(Image).where(Image.id.in_(changed)).values(embed_deliveries=0)
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
        # A changed image's old point goes, whether or not its new content embedded, unless
        # another row still holds it (the same bytes under another name of the product).
        released = {
            old: by_id[image_id].product_id
            for image_id, old in old_points.items()
            if old and old != new_points[image_id]
        }
        with self.db.session() as session:
            held = _held_points(session, released)
        stale = [point for point in released if point not in held]
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
    def _sync_removed(self, root: Path, summary: IngestSummary, limit: DeleteLimit) -> None:
        """Remove from the index what this catalog no longer holds (``ingest --sync``).

        Only what is confirmed gone leaves: an image row under this root that this run did
        not see, in a product folder that listed fine. A first, read-only pass counts it;
        over ``limit`` nothing is removed and :class:`SyncRefused` says what would have been.
        """
        prefix = str(root).rstrip("/") + "/"
        live = removing = 0
        names: list[str] = []
        for _, rows, gone in self._sync_batches(prefix, summary.run_id, modify=False):
            live += sum(
                1
                for row in rows
                if row.source_path.startswith(prefix) and row.status != ImageStatus.REMOVED
            )
            removing += len(gone)
            if len(names) < SYNC_NAMES_SHOWN:
                names.extend(f"{r.product_id}/{r.filename}" for r in gone[:SYNC_NAMES_SHOWN])
        if removing == 0:
            return
        if not limit.allows(removing, live):
            shown = ", ".join(names[:SYNC_NAMES_SHOWN])
            more = f" and {removing - SYNC_NAMES_SHOWN} more" if removing > SYNC_NAMES_SHOWN else ""
            raise SyncRefused(
                f"--sync refused: it would remove {removing} of the {live} indexed images "
                f"under {root} ({removing / live:.0%}), over the limit of {limit.describe()} "
                f"(SEARCHSVC_SYNC_MAX_DELETE_FRACTION); nothing was removed (the ingest itself "
                f"finished, run {summary.run_id}). It would remove: {shown}{more}. If the "
                f"catalog is complete (mounted, readable), re-run with --max-delete {removing} "
                f"or --force"
            )
        for session, _, gone in self._sync_batches(prefix, summary.run_id, modify=True):
            released = {row.point_id: row.product_id for row in gone if row.point_id}
            for row in gone:
                row.status = ImageStatus.REMOVED
                row.point_id = None
            if gone:
                session.flush()
                held = _held_points(session, released)
                point_ids = [point for point in released if point not in held]
                if point_ids and self.index is not None:
                    self.index.delete(self._collection(), point_ids)
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

    def _sync_batches(
        self, prefix: str, run_id: int, *, modify: bool
    ) -> Iterator[tuple[Session, list[Image], list[Image]]]:
        """Every image row, a batch at a time (keyset pagination), with its session and the
        batch's rows that are gone; with ``modify`` the caller's changes are committed."""
        last_id = 0
        while True:
            with self.db.session() as session:
                rows = list(
                    session.scalars(
                        select(Image).where(Image.id > last_id).order_by(Image.id).limit(SCAN_BATCH)
                    )
                )
                if not rows:
                    return
                last_id = rows[-1].id
                gone = [
                    row
                    for row in rows
                    if row.source_path.startswith(prefix)
                    and row.status != ImageStatus.REMOVED
                    and row.last_seen_run_id != run_id
                    and row.product_id not in self._unlisted
                ]
                yield session, rows, gone
                if not modify:
                    session.rollback()


def _held_points(session: Session, released: Mapping[str, str]) -> set[str]:
    """Of the ``released`` points (point id -> its product), those a live row still holds.

    A point id comes from (product, content), so two file names of one product with the same
    bytes share one point: editing or removing one must leave the point to the other.
    Pending rows count (their point may be written already); failed ones hold none.
    """
    if not released:
        return set()
    held: set[str] = set()
    for product_id, digest in session.execute(
        select(Image.product_id, Image.content_hash).where(
            Image.product_id.in_(set(released.values())),
            Image.status.in_([ImageStatus.PENDING, ImageStatus.INDEXED]),
        )
    ):
        point = point_id_for(product_id, digest)
        if point in released:
            held.add(point)
    return held


def _batched(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
