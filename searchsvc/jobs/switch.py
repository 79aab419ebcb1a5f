"""Putting a model version in service.

Switching embedders (:func:`switch_embedder`):

1. the version's collection (``images_v<id>``) is created next to the serving one and
   every indexed catalog image is embedded into it, in batches through the embed pipeline
   an ingest uses (in-process, or Celery workers in a cluster); memory is bounded by the
   batches in flight;
2. the alias is moved to the new collection in ONE step. The query path finds its embedder
   by the collection the alias names, so this is the switch: a query that resolved the
   alias before it embeds with the old model and searches the old collection, one after it
   uses the new pair; no query sees a half-filled collection;
3. the version becomes the active one in the DB (ingest then writes to the new collection),
   and the re-embedded image rows are marked as embedded by it.

The old collection is left as it was, so a switch back is one alias move; removing old
collections is a later cleanup. An image ingested while the re-embedding ran keeps the old
embedder's version on its row, and the next ingest embeds it into the new collection.
Workers load the newly active versions on their next task, without a restart. A STIR
needs no re-embedding: activating it is the switch (:func:`switch_stir`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from sqlalchemy import func, select, update

from searchsvc.core.config import Settings
from searchsvc.core.errors import SearchsvcError
from searchsvc.index import VectorIndex
from searchsvc.jobs.dispatch import Dispatcher
from searchsvc.jobs.embed_pipeline import EmbedPipeline, write_points
from searchsvc.jobs.wire import EmbedItem, EmbedRequest, EmbedResponse
from searchsvc.models.embedder import embedder_dim
from searchsvc.storage.db import Database, Image, ImageStatus, ModelKind, Product
from searchsvc.storage.versions import activate_version, version

PAGE = 512


@dataclass(frozen=True)
class SwapReport:
    version_id: int
    previous_collection: str | None
    collection: str
    images_embedded: int
    images_failed: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


ProgressCallback = Callable[[int, int], None]
"""Called with (images embedded so far, images to embed)."""


def switch_stir(db: Database, version_id: int) -> None:
    """Serve this reranker from the next query on (workers reload it; nothing to re-embed)."""
    version(db, version_id, ModelKind.STIR)
    activate_version(db, version_id)


def switch_embedder(
    settings: Settings,
    db: Database,
    index: VectorIndex,
    dispatcher: Dispatcher,
    version_id: int,
    *,
    progress: ProgressCallback | None = None,
) -> SwapReport:
    """Re-embed the catalog into the version's collection, then switch to it (see the
    module docstring). Idempotent: after a crash, calling it again finishes the job.
    ``index`` must be open for writing."""
    started = time.perf_counter()
    target = version(db, version_id, ModelKind.EMBEDDER)
    collection = target.collection or ""
    index.ensure_collection(collection, embedder_dim(target.file))
    total = _count_indexed(db)
    embedded: list[tuple[int, str]] = []  # (image id, content hash) now in the new collection
    failed = 0

    def collected(request: EmbedRequest, _: None, response: EmbedResponse) -> None:
        nonlocal failed
        by_id = {item.image_id: item for item in request.items}
        for result in response.results:
            if result.error is not None:
                failed += 1
            else:
                item = by_id[result.image_id]
                embedded.append((item.image_id, item.content_hash))
        write_points(index, collection, request.items, response)
        if progress is not None:
            progress(len(embedded) + failed, total)

    def task_failed(request: EmbedRequest, _: None, exc: SearchsvcError) -> None:
        raise SearchsvcError(
            f"re-embedding with version {version_id} failed ({exc}); the alias was not "
            "moved: run the retrain again to finish the re-embedding"
        )

    pipeline: EmbedPipeline[None] = EmbedPipeline(
        dispatcher,
        in_flight=settings.ingest_tasks_in_flight,
        timeout_s=settings.embed_task_timeout_s,
        resend_after_s=settings.embed_task_resend_s,
        task_time_limit_s=settings.task_time_limit_s,
        on_result=collected,
        on_failure=task_failed,
        unfinished="the alias was not moved: run the retrain again to finish the re-embedding",
    )
    for page in _indexed_pages(db):
        for start in range(0, len(page), settings.batch_size):
            request = EmbedRequest(
                items=page[start : start + settings.batch_size],
                embedder_version=version_id,
                collection=collection,
                write_index=settings.workers_write_index,
            )
            pipeline.submit(request, None)
    pipeline.drain()
    index.optimize(collection)

    previous = index.resolve_alias(settings.collection_alias)
    index.set_alias(settings.collection_alias, collection)  # the switch, in one step
    activate_version(db, version_id)
    _mark_embedded(db, version_id, embedded)
    return SwapReport(
        version_id=version_id,
        previous_collection=previous,
        collection=collection,
        images_embedded=len(embedded),
        images_failed=failed,
        seconds=time.perf_counter() - started,
    )


def _count_indexed(db: Database) -> int:
    with db.session() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Image).where(Image.status == ImageStatus.INDEXED)
            )
            or 0
        )


def _indexed_pages(db: Database) -> Iterator[list[EmbedItem]]:
    """Every indexed catalog image as embed items, a page at a time (keyset pagination)."""
    last_id = 0
    while True:
        with db.session() as session:
            rows = session.execute(
                select(
                    Image.id,
                    Image.product_id,
                    Image.source_path,
                    Image.content_hash,
                    Product.category,
                )
                .join(Product, Product.id == Image.product_id)
                .where(Image.id > last_id, Image.status == ImageStatus.INDEXED)
                .order_by(Image.id)
                .limit(PAGE)
            ).all()
        if not rows:
            return
        last_id = rows[-1][0]
        yield [
            EmbedItem(
                image_id=image_id,
                product_id=product_id,
                path=path,
                content_hash=digest,
                category=category,
            )
            for image_id, product_id, path, digest, category in rows
        ]


def _mark_embedded(db: Database, version_id: int, embedded: list[tuple[int, str]]) -> None:
    """Rows whose image was re-embedded (same bytes as now) belong to the new version."""
    for start in range(0, len(embedded), PAGE):
        chunk = dict(embedded[start : start + PAGE])
        with db.session() as session:
            current = session.execute(
                select(Image.id, Image.content_hash).where(
                    Image.id.in_(chunk), Image.status == ImageStatus.INDEXED
                )
            ).all()
            same = [image_id for image_id, digest in current if chunk[image_id] == digest]
            if same:
                session.execute(
                    update(Image).where(Image.id.in_(same)).values(embedder_version_id=version_id)
                )
