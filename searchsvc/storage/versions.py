"""Model versions in the metadata DB: which embedder and reranker serve, and their files.

The ``model_versions`` table is the source of truth for every process (CLI, service,
worker): a version names its file, its collection (embedders) and its config, and at most
one version of each kind is active. Nothing here loads a model: checking a file before it
becomes a version is :mod:`searchsvc.jobs.model_files`' job.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update

from searchsvc.core.errors import NotFoundError, SearchsvcError
from searchsvc.core.files import config_path_for
from searchsvc.storage.db import Database, ModelKind, ModelVersion
from searchsvc.storage.db.schema import utcnow


@dataclass(frozen=True)
class VersionRef:
    """A model version as the code passes it around: its id, its file, its collection
    (embedders only) and its config as recorded at registration."""

    id: int
    file: Path
    collection: str | None
    config: dict[str, Any]

    @classmethod
    def of(cls, row: ModelVersion) -> VersionRef:
        return cls(row.id, Path(row.file), row.collection, dict(row.config or {}))


def collection_name(alias: str, version_id: int) -> str:
    return f"{alias}_v{version_id}"


def active_version(db: Database, kind: ModelKind) -> VersionRef | None:
    with db.session() as session:
        row = session.scalars(
            select(ModelVersion)
            .where(ModelVersion.kind == kind, ModelVersion.active.is_(True))
            .order_by(ModelVersion.id.desc())
        ).first()
        return None if row is None else VersionRef.of(row)


def version(db: Database, version_id: int, kind: ModelKind) -> VersionRef:
    """Version ``version_id``, which must be a ``kind``; NotFoundError otherwise."""
    with db.session() as session:
        row = session.get(ModelVersion, version_id)
        if row is None:
            raise NotFoundError(f"model version {version_id}: no such version")
        if row.kind != kind:
            raise SearchsvcError(
                f"model version {version_id} is a {row.kind.value}, not a {kind.value}"
            )
        return VersionRef.of(row)


def embedder_of_collection(db: Database, collection: str) -> VersionRef:
    """The embedder version whose vectors fill ``collection``."""
    with db.session() as session:
        row = session.scalars(
            select(ModelVersion).where(
                ModelVersion.kind == ModelKind.EMBEDDER, ModelVersion.collection == collection
            )
        ).first()
        if row is None:
            raise SearchsvcError(f"collection {collection} belongs to no embedder version")
        return VersionRef.of(row)


def add_version(
    db: Database,
    *,
    kind: ModelKind,
    arch: str,
    config: dict[str, Any],
    source: Path,
    models_dir: Path,
    alias: str,
    metrics: dict[str, Any] | None = None,
    notes: str | None = None,
) -> int:
    """Copy a model file (and its JSON) into ``models_dir`` and record it as an inactive
    version; embedders get their own collection name."""
    with db.session() as session:
        row = ModelVersion(
            kind=kind, arch=arch, file="", config=config, metrics=metrics or {}, notes=notes
        )
        session.add(row)
        session.flush()
        target = (models_dir / f"{kind.value}-v{row.id}.safetensors").resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config_path_for(source), config_path_for(target))
        shutil.copyfile(source, target)
        row.file = str(target)
        if kind == ModelKind.EMBEDDER:
            row.collection = collection_name(alias, row.id)
        return row.id


def activate_version(db: Database, version_id: int) -> None:
    """Make ``version_id`` the one active version of its kind, in one transaction.

    Embedders are activated by the switch (their collection must be filled first); this is
    for rerankers, which need no re-embedding.
    """
    with db.session() as session:
        row = session.get(ModelVersion, version_id)
        if row is None:
            raise NotFoundError(f"model version {version_id}: no such version")
        session.execute(
            update(ModelVersion)
            .where(ModelVersion.kind == row.kind, ModelVersion.id != row.id)
            .values(active=False)
        )
        row.active = True
        row.promoted_at = utcnow()


def deactivate_kind(db: Database, kind: ModelKind) -> None:
    """No active version of ``kind`` (for STIR: queries are answered by the first stage)."""
    with db.session() as session:
        session.execute(update(ModelVersion).where(ModelVersion.kind == kind).values(active=False))


def merge_metrics(db: Database, version_id: int, **fields: Any) -> None:
    """Merge ``fields`` into a version's recorded metrics (the gate's decision, the swap)."""
    _merge(db, version_id, "metrics", fields)


def merge_config(db: Database, version_id: int, **fields: Any) -> None:
    """Merge ``fields`` into a version's recorded config (how a candidate was trained)."""
    _merge(db, version_id, "config", fields)


def _merge(db: Database, version_id: int, column: str, fields: dict[str, Any]) -> None:
    with db.session() as session:
        row = session.get(ModelVersion, version_id)
        if row is None:
            raise NotFoundError(f"model version {version_id}: no such version")
        setattr(row, column, {**getattr(row, column), **fields})
