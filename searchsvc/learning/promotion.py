"""Putting candidate models in service: the gate, the record, the re-embedding, the switch.

The gate is a pure comparison on the same validation split: a candidate is promoted only
when the configured metric beats what serves now by the configured margin. Every candidate
is registered as a model version, promoted or not, with its metrics, the gate's decision,
its data counts, seeds and duration, so a refused model can be inspected later.

Promoting an embedder (:func:`promote_embedder`):

1. its collection (``images_v<id>``) is created next to the serving one and every indexed
   catalog image is embedded into it, in batches through the embed task (the same task an
   ingest uses: in-process, or Celery workers in a cluster); memory is bounded by the batch;
2. the alias is moved to the new collection in ONE step. The query path finds its embedder
   by the collection the alias names, so this is the switch: a query that resolved the
   alias before it embeds with the old model and searches the old collection, one after it
   uses the new pair; no query sees a half-filled collection;
3. the version becomes the active one in the DB (ingest then writes to the new collection),
   and the re-embedded image rows are marked as embedded by it.

The old collection is left as it was, so a switch back is one alias move; removing old
collections is a later cleanup. An image ingested while the re-embedding ran keeps the old
embedder's version on its row, and the next ingest embeds it into the new collection.
Workers load the newly active versions on their next task (:class:`ModelCache`), without a
restart. A STIR needs no re-embedding: activating it is the switch (:func:`promote_stir`).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import select, update

from searchsvc.core.errors import SearchsvcError
from searchsvc.index import IndexPoint, point_id_for
from searchsvc.jobs.dispatch import EMBED_QUEUE, Payload, TaskHandle, result_with_resends
from searchsvc.jobs.model_store import activate_version, active_version, register_version
from searchsvc.jobs.tasks import EMBED_TASK, EmbedItem, EmbedRequest, EmbedResponse, decode_vector
from searchsvc.learning.evaluation import REPORTED
from searchsvc.models.embedder import embedder_dim
from searchsvc.storage.db import Database, Image, ImageStatus, ModelKind, ModelVersion, Product

if TYPE_CHECKING:
    from searchsvc.app import App
    from searchsvc.core.config import Settings

PAGE = 512
IN_FLIGHT = 2


# --------------------------------------------------------------------------------- the gate


@dataclass(frozen=True)
class Gate:
    """Promote only when ``metric`` improves on what serves by at least ``margin``
    (absolute, metrics are in [0, 1]); a margin of 0 still needs a strict improvement."""

    metric: str = "cmc@1"
    margin: float = 0.01

    def __post_init__(self) -> None:
        if self.metric not in REPORTED:
            raise SearchsvcError(
                f"gate metric {self.metric!r}: expected one of {', '.join(REPORTED)}"
            )
        if not math.isfinite(self.margin) or not 0.0 <= self.margin < 1.0:
            raise SearchsvcError(f"gate margin must be in [0, 1), got {self.margin}")


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    metric: str
    candidate: float
    baseline: float
    margin: float
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def decide(gate: Gate, candidate: float, baseline: float, *, what: str) -> GateDecision:
    """Compare one number of the candidate with the same number of what serves now."""
    gain = candidate - baseline
    passed = bool(gain >= gate.margin and gain > 0)
    verdict = "promoted" if passed else "kept out of service"
    reason = (
        f"{what}: {gate.metric} {100 * candidate:.2f} vs {100 * baseline:.2f} serving "
        f"({100 * gain:+.2f} points, margin {100 * gate.margin:.2f}): {verdict}"
    )
    return GateDecision(passed, gate.metric, candidate, baseline, gate.margin, reason)


# --------------------------------------------------------------------------------- records


def record_candidate(
    db: Database,
    settings: Settings,
    kind: ModelKind,
    file: Path,
    *,
    metrics: dict[str, Any],
    training: dict[str, Any],
    notes: str,
) -> int:
    """Register ``file`` as an inactive version carrying its evaluation (``metrics``) and
    how it was made (``training``: data counts, split, seeds, settings, duration)."""
    version_id = register_version(db, settings, kind, file, metrics=metrics, notes=notes)
    with db.session() as session:
        row = session.get(ModelVersion, version_id)
        assert row is not None
        row.config = {**row.config, "training": training}
    return version_id


def update_metrics(db: Database, version_id: int, **fields: Any) -> None:
    """Merge ``fields`` into a version's recorded metrics (the gate's decision, the swap)."""
    with db.session() as session:
        row = session.get(ModelVersion, version_id)
        if row is None:
            raise SearchsvcError(f"model version {version_id}: no such version")
        row.metrics = {**row.metrics, **fields}


# --------------------------------------------------------------------------------- promotion


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


def promote_stir(db: Database, version_id: int) -> None:
    """Serve this reranker from the next query on (workers reload it; nothing to re-embed)."""
    _version_row(db, version_id, ModelKind.STIR)
    activate_version(db, version_id)


def promote_embedder(
    app: App, version_id: int, *, progress: ProgressCallback | None = None
) -> SwapReport:
    """Re-embed the catalog into the version's collection, then switch to it (see the
    module docstring). Idempotent: after a crash, calling it again finishes the job."""
    started = time.perf_counter()
    settings, db = app.settings, app.db
    file, collection = _version_row(db, version_id, ModelKind.EMBEDDER)
    index = app.index
    index.ensure_collection(collection, embedder_dim(file))
    total = _count_indexed(db)
    embedded: list[tuple[int, str]] = []  # (image id, content hash) now in the new collection
    failed = 0
    in_flight: collections.deque[tuple[TaskHandle, list[EmbedItem], Payload]] = collections.deque()

    def collect() -> None:
        nonlocal failed
        handle, items, payload = in_flight.popleft()
        try:
            response = EmbedResponse.from_json(
                result_with_resends(
                    handle,
                    lambda: app.dispatcher.submit(EMBED_TASK, payload, queue=EMBED_QUEUE),
                    timeout_s=settings.embed_task_timeout_s,
                    resend_after_s=settings.embed_task_resend_s,
                )
            )
        except TimeoutError:
            raise SearchsvcError(
                f"no embed worker finished a task within {settings.embed_task_timeout_s:g} s "
                "(are workers running on the 'embed' queue?); the alias was not moved: run "
                "the retrain again to finish the re-embedding"
            ) from None
        by_id = {item.image_id: item for item in items}
        points = []
        for result in response.results:
            item = by_id[result.image_id]
            if result.error is not None:
                failed += 1
                continue
            embedded.append((item.image_id, item.content_hash))
            if not response.indexed_by_worker:
                assert result.vector_b64 is not None
                points.append(
                    IndexPoint(
                        point_id=point_id_for(item.product_id, item.content_hash),
                        vector=decode_vector(result.vector_b64),
                        product_id=item.product_id,
                        image_id=item.image_id,
                        category=item.category,
                    )
                )
        if points:
            index.upsert(collection, points)
        if progress is not None:
            progress(len(embedded) + failed, total)

    for page in _indexed_pages(db):
        for start in range(0, len(page), settings.batch_size):
            items = page[start : start + settings.batch_size]
            request = EmbedRequest(
                items=items,
                embedder_version=version_id,
                embedder_file=str(file),
                collection=collection,
                write_index=settings.workers_write_index,
            )
            payload = request.to_json()
            handle = app.dispatcher.submit(EMBED_TASK, payload, queue=EMBED_QUEUE)
            in_flight.append((handle, items, payload))
            while len(in_flight) >= IN_FLIGHT:
                collect()
    while in_flight:
        collect()
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


def _version_row(db: Database, version_id: int, kind: ModelKind) -> tuple[Path, str]:
    with db.session() as session:
        row = session.get(ModelVersion, version_id)
        if row is None:
            raise SearchsvcError(f"model version {version_id}: no such version")
        if row.kind != kind:
            raise SearchsvcError(f"model version {version_id} is a {row.kind.value}, not a {kind}")
        return Path(row.file), row.collection or ""


def _count_indexed(db: Database) -> int:
    from sqlalchemy import func

    with db.session() as session:
        return int(
            session.scalar(
                select(func.count()).select_from(Image).where(Image.status == ImageStatus.INDEXED)
            )
            or 0
        )


def _indexed_pages(db: Database) -> Any:
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


def serving_embedder(db: Database) -> int | None:
    """The id of the active embedder version, if any."""
    current = active_version(db, ModelKind.EMBEDDER)
    return None if current is None else current.id
