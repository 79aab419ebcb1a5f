"""What ``searchsvc status`` reports: products, images by status, points, serving models."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select

from searchsvc.core.config import Settings
from searchsvc.index import VectorIndex
from searchsvc.storage.db import Database, Image, IngestRun, ModelKind, ModelVersion, Product


def catalog_status(settings: Settings, db: Database, index: VectorIndex) -> dict[str, Any]:
    with db.session() as session:
        products = session.scalar(
            select(func.count()).select_from(Product).where(Product.removed.is_(False))
        )
        images = dict(
            session.execute(select(Image.status, func.count()).group_by(Image.status)).all()
        )
        models = [
            {
                "id": row.id,
                "kind": row.kind.value,
                "arch": row.arch,
                "file": row.file,
                "collection": row.collection,
                "metrics": row.metrics,
                "promoted_at": row.promoted_at.isoformat() if row.promoted_at else None,
            }
            for row in session.scalars(select(ModelVersion).where(ModelVersion.active.is_(True)))
        ]
        last_run = session.scalars(select(IngestRun).order_by(IngestRun.id.desc())).first()
        last = (
            {
                "id": last_run.id,
                "catalog": last_run.catalog_path,
                "status": last_run.status,
                "counts": last_run.counts,
            }
            if last_run
            else None
        )
    collection = index.resolve_alias(settings.collection_alias)
    return {
        "products": int(products or 0),
        "images": {str(getattr(k, "value", k)): int(v) for k, v in images.items()},
        "indexed_points": index.count(collection) if collection else 0,
        "collection": collection,
        "active_models": models,
        "active_embedder": next(
            (m["id"] for m in models if m["kind"] == ModelKind.EMBEDDER.value), None
        ),
        "last_ingest": last,
        "locations": settings.describe(),
    }
