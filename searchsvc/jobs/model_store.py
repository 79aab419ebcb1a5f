"""Model versions: which embedder and reranker are active, and a per-process cache of them.

The DB's ``model_versions`` table is the source of truth; every process (CLI, worker) loads
the active files once and reloads when the active version changes, so a promotion needs no
restart.
"""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import select, update

from searchsvc.core.config import Settings
from searchsvc.core.errors import ModelError, NotFoundError, SearchsvcError
from searchsvc.index import VectorIndex
from searchsvc.models.batcher import MicroBatcher
from searchsvc.models.embedder import (
    Embedder,
    load_embedding_net,
    new_embedding_net,
    profile_spec,
    save_embedder,
)
from searchsvc.models.stir import StirScorer, load_stir
from searchsvc.storage.db import Database, ModelKind, ModelVersion
from searchsvc.storage.db.schema import utcnow

Pair = tuple[np.ndarray, np.ndarray]


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


def served_embedder(db: Database, index: VectorIndex, alias: str) -> ActiveVersion:
    """The embedder whose collection ``alias`` names: the alias, not the DB flag, is the one
    switch queries follow, so a swap takes effect for readers in one step."""
    collection = index.resolve_alias(alias)
    if collection is None:
        raise SearchsvcError(
            f"the index has no collection '{alias}' yet: run 'searchsvc ingest CATALOG' first"
        )
    with db.session() as session:
        row = session.scalars(
            select(ModelVersion).where(
                ModelVersion.kind == ModelKind.EMBEDDER, ModelVersion.collection == collection
            )
        ).first()
        if row is None:
            raise SearchsvcError(f"collection {collection} belongs to no embedder version")
        return ActiveVersion(row.id, Path(row.file), row.collection)


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
        self._stir: tuple[int, StirScorer, MicroBatcher[Pair, float]] | None = None

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

    def stir(self, version: ActiveVersion) -> tuple[StirScorer, MicroBatcher[Pair, float]]:
        """The STIR scorer of ``version`` and its cross-request batcher, loaded once."""
        with self._lock:
            if self._stir is None or self._stir[0] != version.id:
                try:
                    net = load_stir(version.file)
                except ModelError as exc:
                    raise ModelError(f"reranker version {version.id}: {exc}") from None
                scorer = StirScorer(
                    net, device=self._settings.device, precision=self._settings.precision
                )
                size = scorer.info.input_size
                scorer.score(
                    np.zeros((size, size, 3), np.uint8), np.zeros((2, size, size, 3), np.uint8)
                )

                def score_batch(pairs: list[Pair]) -> list[float]:
                    queries = np.stack([query for query, _ in pairs])
                    candidates = np.stack([candidate for _, candidate in pairs])
                    return [float(d) for d in scorer.score_pairs(queries, candidates)]

                if self._stir is not None:
                    self._stir[2].close()
                batcher: MicroBatcher[Pair, float] = MicroBatcher(
                    score_batch,
                    max_items=self._settings.rerank_max_batch_pairs,
                    max_wait_s=self._settings.rerank_batch_wait_ms / 1000,
                )
                self._stir = (version.id, scorer, batcher)
            return self._stir[1], self._stir[2]

    def close(self) -> None:
        with self._lock:
            if self._stir is not None:
                self._stir[2].close()
                self._stir = None


def register_version(
    db: Database,
    settings: Settings,
    kind: ModelKind,
    source: Path,
    *,
    activate: bool = False,
    metrics: dict[str, object] | None = None,
    notes: str | None = None,
) -> int:
    """Copy a model file (and its JSON) into the models folder and record it as a version.

    The file is checked by loading it first: a version that cannot be served is refused.
    """
    from searchsvc.models.checkpoint import config_path_for

    config: dict[str, Any]
    if kind == ModelKind.STIR:
        stir_config = load_stir(source).config
        arch, config = f"stir:{stir_config.spec.timm_name}", {"stir": stir_config.to_json()}
    else:
        embedder_net = load_embedding_net(source)
        arch, config = embedder_net.spec.timm_name, {"spec": embedder_net.spec.to_json()}
    with db.session() as session:
        row = ModelVersion(
            kind=kind, arch=arch, file="", config=config, metrics=metrics or {}, notes=notes
        )
        session.add(row)
        session.flush()
        target = (settings.models_dir / f"{kind.value}-v{row.id}.safetensors").resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(config_path_for(source), config_path_for(target))
        shutil.copyfile(source, target)
        row.file = str(target)
        if kind == ModelKind.EMBEDDER:
            row.collection = collection_name(settings.collection_alias, row.id)
        version_id = row.id
    if activate:
        activate_version(db, version_id)
    return version_id


def activate_version(db: Database, version_id: int) -> None:
    """Make ``version_id`` the one active version of its kind, in one transaction.

    Embedders are activated by the retrain swap (their collection must be filled first);
    this is for rerankers, which need no re-embedding.
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
