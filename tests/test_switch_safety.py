"""The model switch loses nothing and serves nothing wrong: a crash at every step of it
leaves queries, ingest and removals on one collection; a re-embedding that could not read
its images never reaches the switch; removed products are never answers; a retrain with
the catalog moved away says what is missing in one line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_factory import GeneratedCatalog, make_catalog
from click.testing import CliRunner
from PIL import Image as PILImage
from sqlalchemy import select, update

import searchsvc.jobs.switch as switch_module
from searchsvc.app import App
from searchsvc.cli import main as searchsvc_main
from searchsvc.core.config import Settings, load_settings
from searchsvc.core.errors import SearchsvcError
from searchsvc.core.profiles import PROFILES
from searchsvc.jobs.model_files import register_version
from searchsvc.models.embedder import new_embedding_net, save_embedder
from searchsvc.serving.search import served_embedder
from searchsvc.storage.db import Image, ImageStatus, ModelKind, Product
from searchsvc.storage.versions import active_version

SPEC = dataclasses.replace(
    PROFILES["small"], timm_kwargs={**PROFILES["small"].timm_kwargs, "depth": 2}
)
OLD, NEW = "images_v1", "images_v2"


class Crash(BaseException):
    """The process dies here (BaseException: no handler on the way may swallow it)."""


@pytest.fixture
def small_catalog(tmp_path: Path) -> GeneratedCatalog:
    return make_catalog(tmp_path / "catalog", products=6, views=2)


def settings_for(home: Path) -> Settings:
    return load_settings(env={"SEARCHSVC_HOME": str(home), "SEARCHSVC_BATCH_SIZE": "4"})


def ingested_with_a_candidate(home: Path, catalog: Path) -> int:
    """v1 serving the ingested catalog, v2 registered (inactive): the candidate."""
    app = App(settings_for(home))
    try:
        first = home.parent / "v1.safetensors"
        save_embedder(new_embedding_net(SPEC, seed=0), first)
        register_version(app.db, app.settings, ModelKind.EMBEDDER, first, activate=True)
        app.ingest(catalog)
        candidate = home.parent / "v2.safetensors"
        save_embedder(new_embedding_net(SPEC, seed=1), candidate)
        return register_version(app.db, app.settings, ModelKind.EMBEDDER, candidate)
    finally:
        app.close()


def crash_before(app: App, step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Arm the crash: the process dies right before ``step`` of the switch runs."""
    index = app.index("write")

    def dying(*_: Any, **__: Any) -> None:
        raise Crash(step)

    if step in ("ensure_collection", "optimize", "set_alias"):
        monkeypatch.setattr(index, step, dying)
    elif step == "write_points":  # mid re-embedding, after the first batch came back
        calls = {"n": 0}
        real = switch_module.write_points

        def second_dies(*args: Any, **kwargs: Any) -> None:
            calls["n"] += 1
            if calls["n"] == 2:
                dying()
            real(*args, **kwargs)

        monkeypatch.setattr(switch_module, "write_points", second_dies)
    else:  # _activate_with_rows: the switch's one transaction; utcnow: inside it, after
        # the other versions were deactivated (the transaction must roll back whole)
        monkeypatch.setattr(switch_module, step, dying)


# Before the DB transaction that is the switch, everything stays on v1; after it, on v2.
STEPS = [
    ("ensure_collection", OLD),
    ("write_points", OLD),
    ("optimize", OLD),
    ("_activate_with_rows", OLD),
    ("utcnow", OLD),
    ("set_alias", NEW),
]


def distinct_image(source: Path, target: Path) -> None:
    pixels = np.asarray(PILImage.open(source).convert("RGB"))[::-1].copy()
    PILImage.fromarray(pixels).save(target)


def point_ids(app: App, collection: str) -> set[str]:
    return set(app.index("read").iter_point_ids(collection))


@pytest.mark.parametrize(("step", "expected"), STEPS, ids=[s for s, _ in STEPS])
def test_a_crash_at_every_step_of_the_switch_leaves_one_collection_in_service(
    tmp_path: Path,
    small_catalog: GeneratedCatalog,
    monkeypatch: pytest.MonkeyPatch,
    step: str,
    expected: str,
) -> None:
    home = tmp_path / "home"
    candidate = ingested_with_a_candidate(home, small_catalog.root)
    app = App(settings_for(home))
    crash_before(app, step, monkeypatch)
    with pytest.raises(Crash):
        app.switch_embedder(candidate)
    app.close()
    monkeypatch.undo()

    # The next start: a query, an ingest that adds one image, a sync that removes one.
    added = small_catalog.root / "p001" / "added.png"
    distinct_image(small_catalog.root / "p001" / "view0.jpg", added)
    removed = small_catalog.root / "p002" / "view0.jpg"
    removed.unlink()
    app = App(settings_for(home))
    try:
        index = app.index("write")
        assert served_embedder(app.db, index, "images").collection == expected  # queries
        summary = app.ingest(small_catalog.root, sync=True)  # ingest and removals
        assert summary.images_embedded == 1 and summary.images_removed == 1
        assert index.resolve_alias("images") == expected  # the alias agrees again
        active = active_version(app.db, ModelKind.EMBEDDER)
        assert active is not None and active.collection == expected
        with app.db.session() as session:
            rows = dict(
                session.execute(
                    select(Image.source_path, Image.point_id).where(
                        Image.source_path.in_([str(added), str(removed)])
                    )
                ).all()
            )
        served = point_ids(app, expected)
        assert rows[str(added)] in served  # the new image is where queries look
        assert rows[str(removed)] not in served  # the removed one is gone from there
        with app.db.session() as session:
            indexed = set(
                session.scalars(select(Image.point_id).where(Image.status == ImageStatus.INDEXED))
            )
        assert served == indexed  # queries, ingest and removals: the same collection

        # And the switch, run again, finishes the job.
        report = app.switch_embedder(candidate)
        assert report.collection == NEW and index.resolve_alias("images") == NEW
        assert served_embedder(app.db, index, "images").collection == NEW
        assert point_ids(app, NEW) == indexed
    finally:
        app.close()


def test_a_switch_with_the_catalog_moved_away_is_refused_and_says_why(
    tmp_path: Path, small_catalog: GeneratedCatalog
) -> None:
    home = tmp_path / "home"
    candidate = ingested_with_a_candidate(home, small_catalog.root)
    shutil.move(small_catalog.root, tmp_path / "moved")  # unmounted, or moved since ingest
    app = App(settings_for(home))
    try:
        with pytest.raises(SearchsvcError) as refused:
            app.switch_embedder(candidate)
        message = str(refused.value)
        assert "refused" in message and "misses 12 of the images images_v1 serves" in message
        assert f"{small_catalog.root}/p00" in message  # names the files it could not read
        index = app.index("read")
        assert index.resolve_alias("images") == OLD  # nothing was switched
        assert served_embedder(app.db, index, "images").collection == OLD
    finally:
        app.close()


def test_search_results_never_include_products_marked_removed(
    tmp_path: Path, small_catalog: GeneratedCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "home"
    ingested_with_a_candidate(home, small_catalog.root)
    monkeypatch.setenv("SEARCHSVC_HOME", str(home))
    query = small_catalog.held_out["p003"]

    def answered() -> list[str]:
        result = CliRunner().invoke(
            searchsvc_main, ["query", str(query), "--json", "--no-rerank"], catch_exceptions=False
        )
        assert result.exit_code == 0, result.output
        return [r["product_id"] for r in json.loads(result.output)["results"]]

    assert "p003" in answered()
    app = App(settings_for(home))
    try:  # marked removed, its points still in the index (a sync that stopped midway)
        with app.db.session() as session:
            session.execute(update(Product).where(Product.id == "p003").values(removed=True))
            session.execute(
                update(Image).where(Image.product_id == "p001").values(status=ImageStatus.REMOVED)
            )
    finally:
        app.close()
    products = answered()
    assert "p003" not in products and "p001" not in products
    assert len(products) == 4  # every other product still answers


def test_retrain_with_the_catalog_moved_away_names_what_is_missing_in_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainer.retrain import main as retrain_main

    catalog = make_catalog(tmp_path / "catalog", products=12, views=3)
    home = tmp_path / "home"
    ingested_with_a_candidate(home, catalog.root)
    shutil.move(catalog.root, tmp_path / "moved")
    monkeypatch.setenv("SEARCHSVC_HOME", str(home))
    result = CliRunner().invoke(retrain_main, ["--max-minutes", "1", "--no-progress"])
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "could not be read" in errors[0] and str(catalog.root) in errors[0]
    assert "was the catalog moved since the ingest?" in errors[0]
    app = App(settings_for(home))
    try:
        active = active_version(app.db, ModelKind.EMBEDDER)
    finally:
        app.close()
    assert active is not None and active.collection == OLD  # nothing reached the switch
