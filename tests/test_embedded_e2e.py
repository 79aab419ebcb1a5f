"""The embedded path end to end, through the CLI a user runs: ingest, query, feedback,
status, re-ingest, edits and removals, broken files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from catalog_factory import GeneratedCatalog, product_pattern, render_view
from click.testing import CliRunner, Result
from PIL import Image
from sqlalchemy import func, select

from searchsvc.cli import main
from searchsvc.core.config import load_settings
from searchsvc.index import EdgeIndex
from searchsvc.storage.db import Database, Feedback, ImageStatus, QueryLog
from searchsvc.storage.db import Image as ImageRow


def run(*args: str, ok: bool = True) -> Result:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    if ok:
        assert result.exit_code == 0, result.output
    return result


def ingest_json(catalog: Path, *extra: str) -> dict[str, Any]:
    return json.loads(run("ingest", str(catalog), "--json", *extra).output)


def status_json() -> dict[str, Any]:
    return json.loads(run("status", "--json").output)


def query_json(image: Path, *extra: str) -> dict[str, Any]:
    return json.loads(run("query", str(image), "--json", *extra).output)


def db_rows(home: Path) -> list[tuple[str, str, str, str | None]]:
    db = Database(load_settings(env={"SEARCHSVC_HOME": str(home)}).sqlalchemy_url)
    try:
        with db.session() as session:
            rows = session.execute(
                select(
                    ImageRow.product_id, ImageRow.filename, ImageRow.status, ImageRow.point_id
                ).order_by(ImageRow.product_id, ImageRow.filename)
            ).all()
            return [(p, f, str(s.value), pt) for p, f, s, pt in rows]
    finally:
        db.dispose()


def index_point_ids(home: Path) -> set[str]:
    with EdgeIndex(home / "qdrant") as index:
        collection = index.resolve_alias("images")
        assert collection is not None
        return set(index.iter_point_ids(collection))


def test_ingest_then_query_returns_the_product_of_a_held_out_view(
    env_home: Path, catalog: GeneratedCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The first embedder is a seeded random init: at 32 px its random features tell these
    # synthetic products' held-out views apart, at 64 px they do not (p001 for p005). The
    # test is about the path, so it runs where an untrained net is known to be enough.
    monkeypatch.setenv("SEARCHSVC_EMBEDDER_PROFILE", "small")
    summary = ingest_json(catalog.root)
    total = len(catalog.product_ids) * 3
    assert summary["images_new"] == total
    assert summary["images_embedded"] == total
    assert summary["images_failed"] == 0
    assert summary["products_seen"] == len(catalog.product_ids)

    status = status_json()
    assert status["products"] == len(catalog.product_ids)
    assert status["images"] == {"indexed": total}
    assert status["indexed_points"] == total
    assert [m["kind"] for m in status["active_models"]] == ["embedder"]

    for product_id in catalog.product_ids[:6]:
        response = query_json(catalog.held_out[product_id], "--top-k", "5")
        results = response["results"]
        assert results[0]["product_id"] == product_id
        assert results[0]["title"] == f"Product {int(product_id[1:])}"
        assert results[0]["category"] == catalog.categories[product_id]
        # Products, not images: each product once, scores descending, ranks 1..k.
        ids = [r["product_id"] for r in results]
        assert len(ids) == len(set(ids)) == 5
        scores = [r["score"] for r in results]
        assert scores == sorted(scores, reverse=True)
        assert [r["first_stage_rank"] for r in results] == [1, 2, 3, 4, 5]
        assert response["reranked"] is False and response["rerank_reason"]
        assert set(response["timings_ms"]) >= {"decode_embed", "vector_search", "rerank", "total"}


def test_query_is_logged_and_feedback_lands_in_the_db(
    env_home: Path, catalog: GeneratedCatalog
) -> None:
    ingest_json(catalog.root)
    response = query_json(catalog.held_out["p001"])
    run("feedback", response["query_id"], "p001")
    run("feedback", response["query_id"], response["results"][1]["product_id"], "--negative")

    db = Database(load_settings(env={"SEARCHSVC_HOME": str(env_home)}).sqlalchemy_url)
    try:
        with db.session() as session:
            logged = session.get(QueryLog, response["query_id"])
            assert logged is not None
            assert [r["product_id"] for r in logged.results] == [
                r["product_id"] for r in response["results"]
            ]
            assert logged.image_path and Path(logged.image_path).read_bytes() == (
                catalog.held_out["p001"].read_bytes()
            )
            feedback = session.execute(
                select(Feedback.product_id, Feedback.positive).order_by(Feedback.id)
            ).all()
            assert feedback == [("p001", True), (response["results"][1]["product_id"], False)]
    finally:
        db.dispose()

    missing = run("feedback", "no-such-query", "p001", ok=False)
    assert missing.exit_code != 0
    assert "no-such-query" in missing.output and "Traceback" not in missing.output


def test_reingest_changes_nothing(env_home: Path, catalog: GeneratedCatalog) -> None:
    ingest_json(catalog.root)
    rows_before = db_rows(env_home)
    points_before = index_point_ids(env_home)

    again = ingest_json(catalog.root)
    assert again["images_unchanged"] == len(rows_before)
    assert again["images_new"] == again["images_changed"] == again["images_embedded"] == 0
    assert db_rows(env_home) == rows_before
    assert index_point_ids(env_home) == points_before
    assert status_json()["indexed_points"] == len(rows_before)


def test_edited_image_is_reembedded_and_removed_images_leave_only_with_sync(
    env_home: Path, catalog: GeneratedCatalog
) -> None:
    ingest_json(catalog.root)
    points_before = index_point_ids(env_home)
    total = len(points_before)

    # Edit one image: new bytes under the same name.
    edited = catalog.root / "p002" / "view0.jpg"
    render_view(product_pattern(np.random.default_rng(99)), np.random.default_rng(1)).save(edited)
    summary = ingest_json(catalog.root)
    assert summary["images_changed"] == 1 and summary["images_embedded"] == 1
    points_after = index_point_ids(env_home)
    assert len(points_after) == total  # the old point was replaced, not kept beside the new
    assert len(points_after - points_before) == 1

    # Remove a product folder and one more image.
    shutil.rmtree(catalog.root / "p003")
    (catalog.root / "p004" / "view1.png").unlink()
    kept = ingest_json(catalog.root)
    assert kept["images_removed"] == 0
    assert status_json()["indexed_points"] == total

    synced = ingest_json(catalog.root, "--sync")
    assert synced["images_removed"] == 4
    assert synced["products_removed"] == 1
    status = status_json()
    assert status["indexed_points"] == total - 4
    assert status["images"] == {"indexed": total - 4, "removed": 4}
    assert status["products"] == len(catalog.product_ids) - 1
    results = query_json(catalog.held_out["p003"], "--top-k", "20")["results"]
    assert "p003" not in {r["product_id"] for r in results}


def _salt_with_broken_files(root: Path) -> dict[str, str]:
    """Broken files of every kind; returns item -> a word its reason must contain."""
    good = (root / "p000" / "view1.png").read_bytes()
    jpeg = (root / "p000" / "view0.jpg").read_bytes()
    (root / "p005" / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 3])
    (root / "p005" / "notes.jpg").write_text("this is not an image")
    (root / "p006" / "empty.png").write_bytes(b"")
    (root / "p006" / "readme.txt").write_text("hello")
    (root / "p007" / "mislabelled.jpg").write_bytes(good)  # a PNG named .jpg: fine
    Image.new("RGB", (3000, 3000), "white").save(root / "p007" / "huge.png")
    (root / "stray.jpg").write_bytes(jpeg)
    with (root / "products.csv").open("a", encoding="utf-8") as handle:
        handle.write('p001,"Bad price",shoes,not-a-number,red\n')
        handle.write("p002,too,many,fields,here,extra\n")
    return {
        "p005/truncated.jpg": "truncated",
        "p005/notes.jpg": "not a recognised image",
        "p006/empty.png": "empty",
        "p006/readme.txt": "not an image file",
        "p007/huge.png": "pixels",
        "stray.jpg": "not a product",
        "products.csv line 14": "price",
        "products.csv line 15": "fields",
    }


def test_broken_files_are_named_and_everything_else_is_ingested(
    env_home: Path, catalog: GeneratedCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEARCHSVC_MAX_IMAGE_PIXELS", str(2000 * 2000))
    expected = _salt_with_broken_files(catalog.root)
    summary = ingest_json(catalog.root)
    problems = {p["item"].split("catalog/")[-1]: p["reason"] for p in summary["problems"]}
    for item, word in expected.items():
        assert item in problems, f"{item} not reported; got {sorted(problems)}"
        assert word in problems[item], f"{item}: {problems[item]!r} lacks {word!r}"
    assert summary["problem_count"] == len(expected)

    good_images = len(catalog.product_ids) * 3 + 1  # + the mislabelled but valid PNG
    status = status_json()
    assert status["images"]["indexed"] == good_images
    assert status["indexed_points"] == good_images
    # Decodable-by-name failures are recorded against their image; a re-run neither
    # retries them nor loses anything.
    again = ingest_json(catalog.root)
    assert again["images_embedded"] == 0
    assert status_json()["indexed_points"] == good_images
    failed = {(p, f) for p, f, s, _ in db_rows(env_home) if s == ImageStatus.FAILED.value}
    assert failed == {
        ("p005", "truncated.jpg"),
        ("p005", "notes.jpg"),
        ("p007", "huge.png"),
    }


def test_filter_narrows_results_inside_the_index(env_home: Path, catalog: GeneratedCatalog) -> None:
    ingest_json(catalog.root)
    query = catalog.held_out["p000"]  # p000 is a shoe; ask for bags only
    unfiltered = query_json(query, "--top-k", "4")["results"]
    assert unfiltered[0]["category"] == "shoes"
    bags = query_json(query, "--top-k", "4", "--filter", "category=bags")["results"]
    assert len(bags) == 4
    assert {r["category"] for r in bags} == {"bags"}
    bad = run("query", str(query), "--filter", "colour", ok=False)
    assert bad.exit_code != 0 and "FIELD=VALUE" in bad.output


def test_fatal_errors_are_one_line_without_traceback(env_home: Path, tmp_path: Path) -> None:
    missing = run("ingest", str(tmp_path / "nope"), ok=False)
    assert missing.exit_code == 1
    assert missing.output.strip().count("\n") == 0
    assert "catalog directory not found" in missing.output

    run_query = run("query", str(tmp_path / "nope.jpg"), ok=False)
    assert run_query.exit_code == 1 and "file not found" in run_query.output

    empty_index = tmp_path / "q.png"
    Image.new("RGB", (40, 40), "red").save(empty_index)
    no_index = run("query", str(empty_index), ok=False)
    assert no_index.exit_code == 1 and "ingest" in no_index.output


def test_bad_setting_is_named(env_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEARCHSVC_TOP_K", "many")
    result = run("status", ok=False)
    assert result.exit_code == 1
    assert "SEARCHSVC_TOP_K" in result.output and "many" in result.output


def test_db_upgrade_command(env_home: Path) -> None:
    result = run("db", "upgrade")
    assert "revision" in result.output
    current = run("db", "current").output.strip()
    assert current and current != "none (empty database)"


def test_demo_catalog_and_counts(env_home: Path, tmp_path: Path) -> None:
    pytest.importorskip("searchsvc.learning.datasets")
    from searchsvc.learning.datasets import DEBIAN_DIR

    if not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist not installed")
    run("demo-catalog", str(tmp_path / "demo"), "--products", "5", "--views", "2")
    root = tmp_path / "demo" / "catalog"
    assert len([p for p in root.iterdir() if p.is_dir()]) == 5
    summary = ingest_json(root)
    assert summary["images_embedded"] == 10 and summary["products_seen"] == 5


def test_query_log_counts(env_home: Path, catalog: GeneratedCatalog) -> None:
    ingest_json(catalog.root)
    for product_id in catalog.product_ids[:3]:
        query_json(catalog.held_out[product_id], "--no-rerank")
    db = Database(load_settings(env={"SEARCHSVC_HOME": str(env_home)}).sqlalchemy_url)
    try:
        with db.session() as session:
            assert session.scalar(select(func.count()).select_from(QueryLog)) == 3
            reasons = set(session.scalars(select(QueryLog.rerank_reason)))
            assert reasons == {"reranking turned off"}
    finally:
        db.dispose()


def test_worker_written_index_equals_coordinator_written(
    env_home: Path, catalog: GeneratedCatalog, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The switch SEARCHSVC_INDEX_WRITER=worker (for a Qdrant server) writes the same points
    from the task itself; here the in-process task shares this process's index."""
    ingest_json(catalog.root)
    by_coordinator = index_point_ids(env_home)
    answer = query_json(catalog.held_out["p007"])["results"]

    other = tmp_path / "worker-writes"
    monkeypatch.setenv("SEARCHSVC_HOME", str(other))
    monkeypatch.setenv("SEARCHSVC_INDEX_WRITER", "worker")
    summary = ingest_json(catalog.root)
    assert summary["images_embedded"] == len(by_coordinator)
    assert index_point_ids(other) == by_coordinator
    assert query_json(catalog.held_out["p007"])["results"] == answer
