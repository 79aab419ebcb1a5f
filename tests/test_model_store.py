"""Model versions and the per-process cache: workers pick up a new version without restart."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from sqlalchemy import select

from searchsvc.app import model_cache
from searchsvc.core.config import Settings, load_settings
from searchsvc.core.errors import ModelError
from searchsvc.core.profiles import PROFILES
from searchsvc.jobs.model_files import ensure_active_embedder, register_version
from searchsvc.models.embedder import (
    load_embedding_net,
    new_embedding_net,
    profile_spec,
    save_embedder,
)
from searchsvc.models.stir import StirConfig, StirNet, save_stir
from searchsvc.storage.db import Database, ModelKind, ModelVersion
from searchsvc.storage.versions import activate_version, active_version


@pytest.fixture
def db(settings: Settings) -> Database:
    database = Database(settings.sqlalchemy_url)
    yield database  # type: ignore[misc]
    database.dispose()


def _stir_file(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    net = new_embedding_net(PROFILES["small"], seed=seed)
    save_stir(StirNet.from_embedder(net, StirConfig(spec=net.spec)), path)
    return path


def test_first_embedder_is_created_once_and_written_to_a_file(
    settings: Settings, db: Database
) -> None:
    first = ensure_active_embedder(db, settings)
    again = ensure_active_embedder(db, settings)
    assert first == again and first.file.is_file()
    assert first.collection == f"images_v{first.id}"
    # The stored weights are the seeded start: the same seed rebuilds them exactly.
    stored = load_embedding_net(first.file).state_dict()
    rebuilt = new_embedding_net(
        profile_spec(settings.embedder_profile), seed=settings.seed
    ).state_dict()
    assert all(torch.equal(stored[k], rebuilt[k]) for k in rebuilt)


def test_cache_reloads_when_the_active_version_moves(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    cache = model_cache(settings)

    def active_embedder():  # type: ignore[no-untyped-def]
        version = ensure_active_embedder(db, settings)
        return version, cache.embedder(version)

    v1, embedder1 = active_embedder()
    assert active_embedder()[1] is embedder1  # loaded once

    other = new_embedding_net(PROFILES["small"], seed=7)
    save_embedder(other, tmp_path / "e2.safetensors")
    v2 = register_version(db, settings, ModelKind.EMBEDDER, tmp_path / "e2.safetensors")
    activate_version(db, v2)
    version, embedder2 = active_embedder()
    assert version.id == v2 and embedder2 is not embedder1

    s1 = register_version(db, settings, ModelKind.STIR, _stir_file(tmp_path / "s1.safetensors", 1))
    s2 = register_version(db, settings, ModelKind.STIR, _stir_file(tmp_path / "s2.safetensors", 2))
    activate_version(db, s1)
    first = active_version(db, ModelKind.STIR)
    assert first is not None
    scorer1, batcher1 = cache.stir(first)
    assert cache.stir(first)[0] is scorer1
    activate_version(db, s2)
    second = active_version(db, ModelKind.STIR)
    assert second is not None and second.id == s2
    scorer2, _ = cache.stir(second)
    assert scorer2 is not scorer1
    with pytest.raises(RuntimeError, match="closed"):
        batcher1.submit([1])  # the old version's batcher was shut down
    cache.close()

    with db.session() as session:
        active = session.scalars(select(ModelVersion.id).where(ModelVersion.active.is_(True)))
        assert sorted(active) == sorted([v2, s2])  # one active per kind
    assert v1.id != v2


def test_a_stir_that_cannot_read_the_stored_pixels_is_refused(home: Path, tmp_path: Path) -> None:
    settings = load_settings(
        env={"SEARCHSVC_HOME": str(home), "SEARCHSVC_EMBEDDER_PROFILE": "small64"}
    )
    db = Database(settings.sqlalchemy_url)
    try:
        # No embedder yet: the profile's first embedder will store 64 px pixels.
        small_stir = _stir_file(tmp_path / "small.safetensors", 1)
        with pytest.raises(ModelError, match="reads 32 px images, but the small64 profile"):
            register_version(db, settings, ModelKind.STIR, small_stir)
        embedder = ensure_active_embedder(db, settings)
        with pytest.raises(ModelError) as refused:
            register_version(db, settings, ModelKind.STIR, small_stir)
        assert f"embedder v{embedder.id} stores 64 px" in str(refused.value)
        with db.session() as session:
            kinds = list(session.scalars(select(ModelVersion.kind)))
        assert kinds == [ModelKind.EMBEDDER]  # nothing half-registered
        # A STIR of the embedder's own size is a version like any other.
        torch.manual_seed(0)
        net = new_embedding_net(PROFILES["small64"], seed=0)
        fits = tmp_path / "fits.safetensors"
        save_stir(StirNet.from_embedder(net, StirConfig(spec=net.spec)), fits)
        assert register_version(db, settings, ModelKind.STIR, fits) > embedder.id
    finally:
        db.dispose()


def test_an_unloadable_file_is_refused_before_it_becomes_a_version(
    settings: Settings, db: Database, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"junk")
    bad.with_suffix(".json").write_text('{"kind": "stir"}')
    with pytest.raises(ModelError):
        register_version(db, settings, ModelKind.STIR, bad)
    with db.session() as session:
        assert session.scalars(select(ModelVersion)).first() is None
