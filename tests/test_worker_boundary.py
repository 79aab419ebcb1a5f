"""Forged task messages: a message can do no more than a valid one would. Each forged
field (an image path, an image id, a path outside the catalog, a candidate hash) is tied back
to what the database knows."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from catalog_factory import GeneratedCatalog
from click.testing import CliRunner
from sqlalchemy import select, update

from searchsvc.app import build_task_context
from searchsvc.cli import main
from searchsvc.core.config import load_settings
from searchsvc.core.images import content_hash
from searchsvc.core.profiles import PROFILES
from searchsvc.jobs.tasks import TaskContext, task_functions
from searchsvc.jobs.wire import EMBED_TASK, RERANK_TASK, encode_pixels
from searchsvc.models.embedder import EmbeddingNet
from searchsvc.models.stir import StirConfig, StirNet, save_stir
from searchsvc.storage.db import Image, ModelKind, ModelVersion
from searchsvc.storage.versions import active_version


def run(*args: str) -> None:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output


@pytest.fixture
def ingested(
    env_home: Path, catalog: GeneratedCatalog, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TaskContext]:
    monkeypatch.setenv("SEARCHSVC_EMBEDDER_PROFILE", "small")  # the hand-made STIRs' size
    run("ingest", str(catalog.root))
    ctx = build_task_context(load_settings())
    yield ctx
    ctx.models.close()
    ctx.db.dispose()


def a_row(ctx: TaskContext) -> Image:
    with ctx.db.session() as session:
        return session.scalars(select(Image).order_by(Image.id)).first()  # type: ignore[return-value]


def embed(ctx: TaskContext, **item: Any) -> dict[str, Any]:
    version = active_version(ctx.db, ModelKind.EMBEDDER)
    assert version is not None
    payload = {
        "items": [item],
        "embedder_version": version.id,
        "collection": version.collection,
        "write_index": False,
    }
    (result,) = task_functions(ctx)[EMBED_TASK](payload)["results"]
    return result  # type: ignore[no-any-return]


def outside_copy(row: Image, tmp_path: Path) -> Path:
    """The same bytes outside the catalog: a hash check alone would accept them."""
    target = tmp_path / "elsewhere" / "secret.jpg"
    target.parent.mkdir(exist_ok=True)
    shutil.copyfile(row.source_path, target)
    return target


def test_a_forged_path_is_not_read(ingested: TaskContext, tmp_path: Path) -> None:
    row = a_row(ingested)
    forged = outside_copy(row, tmp_path)
    result = embed(
        ingested,
        image_id=row.id,
        product_id=row.product_id,
        path=str(forged),
        content_hash=row.content_hash,
    )
    assert result["vector_b64"] is None
    assert "does not match the registered image" in result["error"]


def test_an_unregistered_image_is_refused(ingested: TaskContext, tmp_path: Path) -> None:
    row = a_row(ingested)
    forged = tmp_path / "new.png"
    forged.write_bytes(Path(row.source_path).read_bytes()[:-1] + b"\0")
    digest = content_hash(forged.read_bytes())
    result = embed(
        ingested, image_id=10_000, product_id=row.product_id, path=str(forged), content_hash=digest
    )
    assert result["error"] == "image 10000 is not registered"
    with pytest.raises(Exception, match="no pixels|not found|missing"):
        ingested.pixels.get(digest, PROFILES["small"].input_size)


def test_a_row_outside_every_registered_catalog_root_is_refused(
    ingested: TaskContext, tmp_path: Path
) -> None:
    row = a_row(ingested)
    forged = outside_copy(row, tmp_path)
    with ingested.db.session() as session:  # as if a row had been written by other means
        session.execute(update(Image).where(Image.id == row.id).values(source_path=str(forged)))
    result = embed(
        ingested,
        image_id=row.id,
        product_id=row.product_id,
        path=str(forged),
        content_hash=row.content_hash,
    )
    assert result["error"] == f"{forged} is outside every registered catalog root"


def test_a_valid_message_still_embeds(ingested: TaskContext) -> None:
    row = a_row(ingested)
    result = embed(
        ingested,
        image_id=row.id,
        product_id=row.product_id,
        path=row.source_path,
        content_hash=row.content_hash,
        category="anything: the row's category is used",
    )
    assert result["error"] is None and result["vector_b64"]


def test_rerank_candidate_hashes_are_validated(ingested: TaskContext, tmp_path: Path) -> None:
    spec = dataclasses.replace(
        PROFILES["small"], timm_kwargs={**PROFILES["small"].timm_kwargs, "depth": 2}
    )
    torch.manual_seed(0)
    path = tmp_path / "stir.safetensors"
    save_stir(StirNet.from_embedder(EmbeddingNet(spec), StirConfig(spec=spec)), path)
    run("model", "add", "stir", str(path), "--activate")
    with ingested.db.session() as session:
        stir_id = session.scalar(select(ModelVersion.id).where(ModelVersion.kind == ModelKind.STIR))
    size = spec.input_size
    good = a_row(ingested).content_hash

    def rerank(hashes: list[str]) -> dict[str, Any]:
        payload = {
            "stir_version": stir_id,
            "size": size,
            "query_pixels_b64": encode_pixels(np.zeros((size, size, 3), np.uint8)),
            "candidate_hashes": hashes,
        }
        return task_functions(ingested)[RERANK_TASK](payload)

    assert len(rerank([good, good])["distances"]) == 2
    for forged in ("../../etc/passwd", good.upper(), good[:-1], f"{good}' OR 1=1"):
        with pytest.raises(ValueError, match="is not a SHA-256 content hash"):
            rerank([good, forged])
    with pytest.raises(ValueError, match="at most 256"):
        rerank([good] * 257)
