"""Model files entering the registry: the first embedder, created on first use, and any file
added later, checked by loading it before it becomes a version."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from searchsvc.core.config import Settings
from searchsvc.core.errors import ModelError
from searchsvc.models.embedder import (
    EmbedderSpec,
    EmbeddingNet,
    load_embedding_net,
    new_embedding_net,
    profile_spec,
    save_embedder,
)
from searchsvc.models.stir import load_stir
from searchsvc.storage.db import Database, ModelKind, ModelVersion
from searchsvc.storage.db.schema import utcnow
from searchsvc.storage.versions import (
    VersionRef,
    activate_version,
    active_version,
    add_version,
    collection_name,
)


def ensure_active_embedder(db: Database, settings: Settings) -> VersionRef:
    """The active embedder; on first use, create version 1 from the configured profile.

    Version 1's weights are written to a file even when they are a seeded random init, so
    that ingest and every later query embed with exactly the same network.
    """
    current = active_version(db, ModelKind.EMBEDDER)
    if current is not None:
        return current
    spec = profile_spec(settings.embedder_profile)
    net = new_embedding_net(spec, seed=settings.seed, weights=settings.embedder_weights)
    try:
        return _create_first_embedder(db, settings, spec, net)
    except IntegrityError:
        # Another process created it between our check and our insert: the database's one
        # active version per kind (migration 0002) refused ours; serve theirs.
        winner = active_version(db, ModelKind.EMBEDDER)
        if winner is None:
            raise
        return winner


def _create_first_embedder(
    db: Database, settings: Settings, spec: EmbedderSpec, net: EmbeddingNet
) -> VersionRef:
    with db.session() as session:
        # Another process may have raced us here: re-check inside the transaction.
        existing = session.scalars(
            select(ModelVersion).where(
                ModelVersion.kind == ModelKind.EMBEDDER, ModelVersion.active.is_(True)
            )
        ).first()
        if existing is not None:
            return VersionRef.of(existing)
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
        return VersionRef.of(row)


def register_version(
    db: Database,
    settings: Settings,
    kind: ModelKind,
    source: Path,
    *,
    activate: bool = False,
    metrics: dict[str, Any] | None = None,
    notes: str | None = None,
) -> int:
    """Copy a model file (and its JSON) into the models folder and record it as a version.

    The file is checked by loading it first: a version that cannot be served is refused.
    """
    config: dict[str, Any]
    if kind == ModelKind.STIR:
        stir_config = load_stir(source).config
        _check_stir_reads_the_stored_pixels(db, settings, stir_config.spec.input_size, source)
        arch, config = f"stir:{stir_config.spec.timm_name}", {"stir": stir_config.to_json()}
    else:
        embedder_net = load_embedding_net(source)
        arch = embedder_net.spec.timm_name
        config = {"spec": embedder_net.spec.to_json(), "dim": embedder_net.dim}
    version_id = add_version(
        db,
        kind=kind,
        arch=arch,
        config=config,
        source=source,
        models_dir=settings.models_dir,
        alias=settings.collection_alias,
        metrics=metrics,
        notes=notes,
    )
    if activate:
        activate_version(db, version_id)
    return version_id


def _check_stir_reads_the_stored_pixels(
    db: Database, settings: Settings, stir_size: int, source: Path
) -> None:
    """STIR reads the pixels the ingest stored at the embedder's input size: one of another
    size would fail every rerank with "pixels not found", so it is refused here."""
    embedder = active_version(db, ModelKind.EMBEDDER)
    if embedder is not None:
        try:
            stored, owner = int(embedder.config["spec"]["input_size"]), f"embedder v{embedder.id}"
        except (KeyError, TypeError, ValueError):
            return  # an unreadable config fails where it is read, with its own message
    else:
        stored = profile_spec(settings.embedder_profile).input_size
        owner = f"the {settings.embedder_profile} profile's first embedder"
    if stir_size != stored:
        raise ModelError(
            f"{source}: this STIR reads {stir_size} px images, but {owner} stores {stored} px "
            "pixels for the reranker (train STIR from the serving embedder: python -m "
            "trainer.retrain --only stir)"
        )
