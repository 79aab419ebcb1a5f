"""``searchsvc cleanup`` on real stores (SQLite DB, the SQLite pixel file, the embedded
vector index, files): a dry run reports and removes nothing; ``--apply`` removes exactly
what was reported, and what any reader still needs stays."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import numpy as np
from catalog_factory import make_catalog
from click.testing import CliRunner
from sqlalchemy import select

from searchsvc.app import App
from searchsvc.cli import main as cli_main
from searchsvc.core.config import load_settings
from searchsvc.jobs.cleanup import cleanup
from searchsvc.storage.db import Image, ModelKind, ModelVersion, QueryLog, utcnow
from searchsvc.storage.versions import active_version


def test_dry_run_then_apply_removes_only_what_no_reader_needs(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    env = {"SEARCHSVC_HOME": str(home), "SEARCHSVC_QUERY_RETENTION_DAYS": "30"}
    settings = load_settings(env=env)
    catalog = make_catalog(tmp_path / "catalog", products=3, views=2)
    app = App(settings)
    try:
        app.ingest(catalog.root)
        v1 = active_version(app.db, ModelKind.EMBEDDER)
        assert v1 is not None and v1.collection
        index = app.index("write")
        # Two later embedders, promoted after v1: v1's collection is older than the
        # previous one (v2) and goes; v2 (a rollback target) and v3 (serving) stay.
        with app.db.session() as session:
            first = session.get(ModelVersion, v1.id)
            assert first is not None
            base_time = first.promoted_at or utcnow()
            for n in (2, 3):
                session.add(
                    ModelVersion(
                        kind=ModelKind.EMBEDDER,
                        arch=first.arch,
                        file=first.file,
                        config={},
                        metrics={},
                        collection=f"images_v{100 + n}",
                        active=n == 3,
                        promoted_at=base_time + dt.timedelta(minutes=n),
                    )
                )
            first.active = False
        for n in (2, 3):
            index.ensure_collection(f"images_v{100 + n}", 4)  # empty
        index.set_alias(settings.collection_alias, "images_v103")

        # Pixels: the indexed images' stay, two rows of hashes no image has go.
        with app.db.session() as session:
            hashes = set(session.scalars(select(Image.content_hash)).all())
        app.pixels.put_many([("orphan-a", np.zeros((8, 8, 3), np.uint8))])
        app.pixels.put_many([("orphan-b", np.zeros((4, 4, 3), np.uint8))])

        # Retrain runs: a finished one goes, an unfinished one (resumable) stays.
        for name, finished in (("run-done", True), ("run-open", False)):
            run = home / "retrain" / name
            run.mkdir(parents=True)
            (run / "run.json").write_text(json.dumps({"finished": finished}))
            (run / "train-pixels.u8").write_bytes(b"x" * 1000)

        # Query photos: an old one goes; one an old and a young row share stays.
        photos = settings.query_images_dir / "ab"
        photos.mkdir(parents=True)
        old_photo, shared_photo = photos / "old.png", photos / "shared.png"
        old_photo.write_bytes(b"o" * 300)
        shared_photo.write_bytes(b"s" * 200)
        now = utcnow()
        with app.db.session() as session:
            for qid, path, age in (
                ("q-old", old_photo, 40),
                ("q-shared-old", shared_photo, 40),
                ("q-shared-new", shared_photo, 1),
            ):
                session.add(
                    QueryLog(
                        id=qid,
                        created_at=now - dt.timedelta(days=age),
                        image_hash=qid,
                        image_path=str(path.resolve()),
                        filters={},
                        top_k=5,
                        results=[],
                        latency_ms=1.0,
                        timings_ms={},
                    )
                )
    finally:
        app.close()

    for key in [k for k in os.environ if k.startswith("SEARCHSVC_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    dry = CliRunner().invoke(cli_main, ["cleanup", "--json"])
    assert dry.exit_code == 0, dry.output
    report = json.loads(dry.output)
    assert report["applied"] is False
    assert report["collections"]["count"] == 1
    assert report["collections"]["examples"][0].startswith(f"{v1.collection} (6 points)")
    assert report["collections"]["bytes"] > 0
    assert sorted(report["pixels"]["examples"]) == ["orphan-a", "orphan-b"]
    assert report["pixels"]["bytes"] == 8 * 8 * 3 + 4 * 4 * 3
    assert report["retrain_runs"] == {
        "count": 1,
        "bytes": 1000 + len(json.dumps({"finished": True})),
        "examples": ["run-done"],
        "note": "",
    }
    assert report["query_photos"]["examples"] == ["old.png"]
    assert report["query_photos"]["bytes"] == 300
    # Nothing removed by the dry run.
    assert old_photo.is_file() and (home / "retrain" / "run-done").is_dir()

    applied = CliRunner().invoke(cli_main, ["cleanup", "--apply"])
    assert applied.exit_code == 0, applied.output
    assert "collections: removed 1" in applied.output

    app = App(settings)
    try:
        index = app.index("read")
        assert v1.collection not in index.collections()
        assert {"images_v102", "images_v103"} <= set(index.collections())
        kept = {k.content_hash for k in app.pixels.keys()}
        assert kept == hashes  # every image's pixels, no orphan
        assert not (home / "retrain" / "run-done").exists()
        assert (home / "retrain" / "run-open" / "train-pixels.u8").is_file()
        assert not old_photo.exists() and shared_photo.is_file()
        with app.db.session() as session:
            paths = dict(session.execute(select(QueryLog.id, QueryLog.image_path)).all())
        assert paths["q-old"] is None
        assert paths["q-shared-old"] and paths["q-shared-new"]
        again = cleanup(settings, app.db, app.pixels, lambda: index)
        assert all(found.count == 0 for found in again.kinds.values())
    finally:
        app.close()
