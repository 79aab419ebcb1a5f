"""Putting a model version in service.

Switching embedders (:func:`switch_embedder`):

1. the version's collection (``images_v<id>``) is created next to the serving one and
   every indexed catalog image is embedded into it, in batches through the embed pipeline
   an ingest uses (in-process, or Celery workers in a cluster); memory is bounded by the
   batches in flight;
2. the switch is refused (nothing changes) when the new collection misses any point the
   served one holds: images that could not be read or embedded (a catalog moved or
   unmounted since ingest) must never put a partial collection in service; points only
   the new collection holds (images removed since an earlier, unswitched re-embedding)
   are deleted from it;
3. the version becomes the active one in the DB, in ONE transaction: this is the switch.
   The DB's active embedder is the one source of truth that queries
   (:func:`searchsvc.serving.search.served_embedder`), ingest and removals follow, so a
   crash at any step leaves them all on one collection, the old or the new;
   The same transaction marks the re-embedded rows as embedded by the version;
4. the alias, a view of that truth for other readers of the index, is moved to the new
   collection. A crash before this is repaired by :func:`reconcile_alias` on the next
   ingest or switch.

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
from searchsvc.storage.db import Database, Image, ImageStatus, ModelKind, ModelVersion, Product
from searchsvc.storage.db.schema import utcnow
from searchsvc.storage.versions import activate_version, active_version, version

PAGE = 512
NAMED_FAILURES = 3
"""Images a refused switch names (with their reasons); the count says how many in all."""


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
    failures: list[str] = []  # the first few, "path: reason"

    def collected(request: EmbedRequest, _: None, response: EmbedResponse) -> None:
        nonlocal failed
        by_id = {item.image_id: item for item in request.items}
        for result in response.results:
            if result.error is not None:
                failed += 1
                if len(failures) < NAMED_FAILURES:
                    failures.append(f"{by_id[result.image_id].path}: {result.error}")
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

    serving = active_version(db, ModelKind.EMBEDDER)
    previous = serving.collection if serving is not None else None
    if previous is not None and previous != collection:
        _match_served(index, previous, collection, version_id, failed, failures)
    _activate_with_rows(db, version_id, embedded)  # the switch, in one transaction
    index.set_alias(settings.collection_alias, collection)  # its view, for other readers
    return SwapReport(
        version_id=version_id,
        previous_collection=previous,
        collection=collection,
        images_embedded=len(embedded),
        images_failed=failed,
        seconds=time.perf_counter() - started,
    )


def _match_served(
    index: VectorIndex,
    served: str,
    collection: str,
    version_id: int,
    failed: int,
    failures: list[str],
) -> None:
    """Make the new collection hold exactly the served one's points, or refuse.

    A point the served collection has and the new one lacks is an image that could not be
    re-embedded: SearchsvcError, nothing switched. A point only the new one has is an
    image removed (``--sync``) after a re-embedding that was not switched (a crash, a
    refusal): it is deleted here, or the switch would bring it back.
    """
    present = set(index.iter_point_ids(collection))
    served_points = set(index.iter_point_ids(served))
    missing = len(served_points - present)
    if missing:
        named = "; ".join(failures) if failures else "no re-embedding error reported"
        raise SearchsvcError(
            f"switch to embedder v{version_id} refused: {collection} misses {missing} of the "
            f"images {served} serves ({failed} could not be re-embedded: {named}); nothing "
            "was switched: restore the catalog where it was ingested (or ingest it from its "
            "new place), then run the retrain again"
        )
    stale = present - served_points
    if stale:
        index.delete(collection, sorted(stale))


def reconcile_alias(settings: Settings, db: Database, index: VectorIndex) -> None:
    """Point the alias at the DB's active embedder's collection, where a switch that
    stopped between its two steps left it on the old one (the DB is the truth)."""
    serving = active_version(db, ModelKind.EMBEDDER)
    if serving is None or not serving.collection:
        return
    alias = settings.collection_alias
    current = index.resolve_alias(alias)
    if current is not None and current != serving.collection:
        index.set_alias(alias, serving.collection)


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


def _activate_with_rows(db: Database, version_id: int, embedded: list[tuple[int, str]]) -> None:
    """The switch: ONE transaction makes ``version_id`` the active embedder and marks the
    rows it re-embedded (same bytes as now) as its own, so that after a crash on either
    side of it the DB is wholly the old state or wholly the new one."""
    with db.session() as session:
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.kind == ModelKind.EMBEDDER, ModelVersion.id != version_id)
            .values(active=False)
        )
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.id == version_id)
            .values(active=True, promoted_at=utcnow())
        )
        for start in range(0, len(embedded), PAGE):
            chunk = dict(embedded[start : start + PAGE])
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
