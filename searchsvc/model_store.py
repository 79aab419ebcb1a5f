"""Model versions: which embedder and reranker are active, and a per-process cache of them.

The DB's ``model_versions`` table is the source of truth; every process (CLI, worker) loads
the active files once and reloads when the active version changes, so a promotion needs no
restart.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from searchsvc.config import Settings
from searchsvc.db import Database, ModelKind, ModelVersion
from searchsvc.db.models import utcnow
from searchsvc.errors import ModelError
from searchsvc.models.embedder import (
    Embedder,
    load_embedding_net,
    new_embedding_net,
    profile_spec,
    save_embedder,
)


@dataclass(frozen=True)
class ActiveVersion:
    id: int
    file: Path
    collection: str | None


def collection_name(alias: str, version_id: int) -> str:
    return f"{alias}_v{version_id}"


def active_version(db: Database, kind: ModelKind) -> ActiveVersion | None:
    with db.session() as session:
        row = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.kind == kind, ModelVersion.active.is_(True))
            .order_by(ModelVersion.id.desc())
        ).first()
        if row is None:
            return None
        return ActiveVersion(id=row.id, file=Path(row.file), collection=row.collection)


def ensure_active_embedder(db: Database, settings: Settings) -> ActiveVersion:
    """The active embedder; on first use, create version 1 from the configured profile.

    Version 1's weights are written to a file even when they are a seeded random init, so
    that ingest and every later query embed with exactly the same network.
    """
    current = active_version(db, ModelKind.EMBEDDER)
    if current is not None:
        return current
    spec = profile_spec(settings.embedder_profile)
    net = new_embedding_net(spec, seed=settings.seed, weights=settings.embedder_weights)
    with db.session() as session:
        # Another process may have raced us here: re-check inside the transaction.
        existing = session.scalars(
            select(ModelVersion).where(
                ModelVersion.kind == ModelKind.EMBEDDER, ModelVersion.active.is_(True)
            )
        ).first()
        if existing is not None:
            return ActiveVersion(existing.id, Path(existing.file), existing.collection)
        row = ModelVersion(
            kind=ModelKind.EMBEDDER,
            arch=spec.timm_name,
            file="",
            config={"profile": settings.embedder_profile, "spec": spec.to_json()},
            metrics={},
            active=True,
            notes=(
                f"initial: weights from {settings.embedder_weights}"
                if settings.embedder_weights
                else "initial: profile start weights"
                + (
                    " (hub pretrained)"
                    if spec.hub_pretrained
                    else f" (seeded init, seed {settings.seed})"
                )
            ),
            promoted_at=utcnow(),
        )
        session.add(row)
        session.flush()
        path = (settings.models_dir / f"embedder-v{row.id}.safetensors").resolve()
        save_embedder(net, path, {"version": row.id})
        row.file = str(path)
        row.collection = collection_name(settings.collection_alias, row.id)
        return ActiveVersion(row.id, path, row.collection)


class ModelCache:
    """Loads the active models once per process; reloads when the DB's active version moves."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self._settings = settings
        self._db = db
        self._lock = threading.Lock()
        self._embedder: tuple[int, Embedder] | None = None

    def embedder(self, version: ActiveVersion | None = None) -> tuple[ActiveVersion, Embedder]:
        """The active embedder (or the given version), loading it if it changed."""
        version = version or ensure_active_embedder(self._db, self._settings)
        with self._lock:
            if self._embedder is None or self._embedder[0] != version.id:
                try:
                    net = load_embedding_net(version.file)
                except ModelError as exc:
                    raise ModelError(f"embedder version {version.id}: {exc}") from None
                embedder = Embedder(
                    net, device=self._settings.device, precision=self._settings.precision
                )
                embedder.warm_up()
                self._embedder = (version.id, embedder)
            return version, self._embedder[1]
