"""The learning loop end to end on a generated catalog (Fashion-MNIST articles, 3 photos
each): retraining beats the random-init embedder on validation CMC@1 and is promoted;
queries keep working while the catalog is re-embedded and the alias moves; the gate
refuses a worse model and keeps the serving one; logged feedback becomes training data;
``searchsvc eval`` and the retrain CLI."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import select

import trainer.retrain as retrain_module
from searchsvc.app import App
from searchsvc.cli import main as searchsvc_main
from searchsvc.core.config import Settings, load_settings
from searchsvc.core.profiles import PROFILES
from searchsvc.jobs.model_files import register_version
from searchsvc.learning.datasets import DEBIAN_DIR, write_demo_catalog
from searchsvc.learning.evaluation import evaluate_live, load_query_set
from searchsvc.models.embedder import new_embedding_net, save_embedder
from searchsvc.models.stir import load_stir
from searchsvc.serving.feedback import record_feedback
from searchsvc.storage.db import Image, ModelKind, ModelVersion
from searchsvc.storage.versions import active_version
from trainer.retrain import RetrainConfig, RetrainReport, RetrainServices, retrain
from trainer.retrain import main as retrain_main

pytestmark = pytest.mark.skipif(
    not (DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist not installed",
)

# A two-block version of the small profile keeps every step of the loop fast.
SPEC = dataclasses.replace(
    PROFILES["small"], timm_kwargs={**PROFILES["small"].timm_kwargs, "depth": 2}
)


@dataclass
class World:
    settings: Settings
    app: App
    queries: Path
    random_init: int
    trained: RetrainReport


def _config(settings: Settings, **changes: Any) -> RetrainConfig:
    config = RetrainConfig.for_settings(settings, progress=False, **changes)
    embedder = dataclasses.replace(config.embedder, steps=40, n_labels=16)
    return dataclasses.replace(config, embedder=embedder)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("retrain")
    settings = load_settings(
        env={"SEARCHSVC_HOME": str(root / "home"), "SEARCHSVC_VAL_FRACTION": "0.3"}
    )
    catalog, queries = write_demo_catalog(
        root / "demo", products=100, views=3, seed=0, cache_dir=root / "cache"
    )
    app = App(settings)
    first = root / "random-init.safetensors"
    save_embedder(new_embedding_net(SPEC, seed=0), first)
    random_init = register_version(
        app.db, settings, ModelKind.EMBEDDER, first, activate=True, notes="random init"
    )
    app.ingest(catalog)
    try:
        report = retrain(
            settings,
            _config(settings, only="embedder"),
            services=RetrainServices.of(app),
            log=print,
        )
        yield World(settings, app, queries, random_init, report)
    finally:
        app.close()


def _collection_of(app: App) -> str | None:
    return app.index("read").resolve_alias(app.settings.collection_alias)


def test_retraining_beats_the_random_init_and_is_promoted_with_its_record(world: World) -> None:
    stage = world.trained.stages["embedder"]
    assert stage.decision is not None and stage.candidate and stage.baseline
    assert stage.baseline.models == {"embedder": f"v{world.random_init}"}
    gain = stage.candidate.metric("cmc@1") - stage.baseline.metric("cmc@1")
    assert gain >= 0.05, (stage.candidate.rows, stage.baseline.rows)
    assert stage.decision.passed and stage.promoted and stage.swap is not None
    new = stage.candidate_version
    assert new is not None and new != world.random_init

    app = world.app
    active = active_version(app.db, ModelKind.EMBEDDER)
    assert active is not None and active.id == new
    assert _collection_of(app) == f"images_v{new}"
    old_collection = f"images_v{world.random_init}"
    assert old_collection in app.index("read").collections()  # kept until a cleanup
    assert (
        app.index("read").count(f"images_v{new}") == app.index("read").count(old_collection) == 300
    )
    with app.db.session() as session:
        row = session.get(ModelVersion, new)
        assert row is not None and row.active
        metrics, training = row.metrics, row.config["training"]
        versions = set(session.scalars(select(Image.embedder_version_id)).all())
    assert versions == {new}  # every re-embedded row now belongs to the new version
    assert metrics["promoted"] is True and metrics["gate"]["passed"] is True
    assert metrics["validation"]["rows"]["embedder"]["cmc@1"] == stage.candidate.metric("cmc@1")
    assert metrics["baseline"]["version"] == world.random_init
    assert metrics["swap"]["images_embedded"] == 300
    assert training["seeds"] == {"split": 0, "embedder": 0}
    assert training["data"]["catalog_images"] == 300 and training["data"]["products"] == 100
    assert training["split"]["val"]["products"] + training["split"]["train"]["products"] == 100
    assert training["result"]["steps_done"] == 40 and training["result"]["seconds"] > 0
    assert training["config"]["lr"] == 1e-3  # defaults are recorded as decided

    # The query path now embeds with the new version.
    photo = sorted(world.queries.iterdir())[0]
    response = app.search_service().query(photo.read_bytes(), str(photo), rerank=False)
    assert response.embedder_version == new


def test_queries_succeed_while_the_catalog_is_reembedded_and_the_alias_moves(
    world: World,
) -> None:
    app = world.app
    before = active_version(app.db, ModelKind.EMBEDDER)
    assert before is not None
    # A new version with the same weights: the swap is what is under test here.
    candidate = register_version(app.db, world.settings, ModelKind.EMBEDDER, before.file)
    photos = sorted(world.queries.iterdir())[:10]
    swapping, answered_mid_swap, stop = threading.Event(), threading.Event(), threading.Event()
    answers: list[tuple[bool, int]] = []
    errors: list[BaseException] = []

    def ask() -> None:
        service = app.search_service()
        n = 0
        while not stop.is_set():
            photo = photos[n % len(photos)]
            n += 1
            during = swapping.is_set()
            try:
                response = service.query(photo.read_bytes(), str(photo), rerank=False)
            except BaseException as exc:  # noqa: BLE001 - every failure is a test failure
                errors.append(exc)
                return
            assert response.results
            answers.append((during, response.embedder_version))
            if during and sum(1 for d, _ in answers if d) >= 3:
                answered_mid_swap.set()

    def progress(done: int, total: int) -> None:
        if not swapping.is_set():
            swapping.set()  # a batch is in the new collection; the alias has not moved
            assert answered_mid_swap.wait(60), "no query was answered during the swap"

    thread = threading.Thread(target=ask)
    thread.start()
    try:
        while not answers and not errors:
            time.sleep(0.01)
        swap = app.switch_embedder(candidate, progress=progress)
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join(60)
    assert not errors, errors
    mid = [version for during, version in answers if during]
    assert len(mid) >= 3 and set(mid) <= {before.id, candidate}
    assert mid[0] == before.id  # the first queries of the swap ran on the old pair
    assert answers[-1][1] == candidate  # and the last ones on the new
    assert swap.previous_collection == before.collection and swap.images_embedded == 300
    assert _collection_of(app) == f"images_v{candidate}"


def test_the_gate_refuses_a_worse_model_and_keeps_the_serving_one(world: World) -> None:
    app = world.app
    serving = active_version(app.db, ModelKind.EMBEDDER)
    assert serving is not None
    collections = set(app.index("read").collections())
    # From the profile's start weights, barely trained: worse than the serving model.
    config = _config(world.settings, only="embedder", init="profile")
    config = dataclasses.replace(
        config, embedder=dataclasses.replace(config.embedder, steps=1, lr=1e-6, seed=7)
    )
    report = retrain(world.settings, config, services=RetrainServices.of(app), log=print)
    stage = report.stages["embedder"]
    assert stage.decision is not None and not stage.decision.passed and not stage.promoted
    assert stage.candidate and stage.baseline
    assert stage.candidate.metric("cmc@1") < stage.baseline.metric("cmc@1")
    active = active_version(app.db, ModelKind.EMBEDDER)
    assert active is not None and active.id == serving.id
    assert _collection_of(app) == serving.collection
    assert set(app.index("read").collections()) == collections  # nothing re-embedded
    with app.db.session() as session:
        refused = session.get(ModelVersion, stage.candidate_version)
        assert refused is not None and not refused.active
        assert refused.metrics["gate"]["passed"] is False
        assert refused.metrics["promoted"] is False
        assert "kept out of service" in (refused.notes or "")


def _versions(app: App) -> list[int]:
    with app.db.session() as session:
        return list(session.scalars(select(ModelVersion.id).order_by(ModelVersion.id)).all())


def test_a_crashed_retrain_continues_where_it_stopped(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = world.app
    config = _config(world.settings, promote=False)
    config = dataclasses.replace(
        config, stir=dataclasses.replace(config.stir, steps=2, n_labels=8, n_instances=2)
    )

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("killed")

    before = _versions(app)
    monkeypatch.setattr(retrain_module, "train_stir", killed)
    with pytest.raises(RuntimeError, match="killed"):
        retrain(world.settings, config, services=RetrainServices.of(app), log=print)
    monkeypatch.undo()
    after_crash = _versions(app)
    assert len(after_crash) == len(before) + 1  # the embedder candidate, recorded
    lines: list[str] = []
    report = retrain(world.settings, config, services=RetrainServices.of(app), log=lines.append)
    assert any("embedder: candidate already trained" in line for line in lines)
    assert not any("embedder epoch" in line for line in lines)
    assert report.stages["embedder"].candidate_version == after_crash[-1]
    assert _versions(app) == [*after_crash, report.stages["stir"].candidate_version]
    assert not list(report.run_dir.glob("*.safetensors"))  # a finished run keeps its record
    assert (report.run_dir / "report.json").is_file()


def test_stir_from_logged_feedback_is_gated_and_eval_reports_it(world: World) -> None:
    """Feedback on logged queries becomes training data (a positive photo, a hard
    negative); a STIR is trained and promoted only if it beats serving without one."""
    app = world.app
    service = app.search_service()
    photo = sorted(world.queries.iterdir())[0]
    label = photo.name.split("__")[0]
    response = service.query(photo.read_bytes(), str(photo), rerank=False)
    wrong = next(r.product_id for r in response.results if r.product_id != label)
    record_feedback(app.db, response.query_id, label, positive=True)
    record_feedback(app.db, response.query_id, wrong, positive=False)

    config = _config(world.settings, only="stir")
    config = dataclasses.replace(
        config, stir=dataclasses.replace(config.stir, steps=6, n_labels=8, n_instances=2)
    )
    report = retrain(world.settings, config, services=RetrainServices.of(app), log=print)
    assert report.data["query_images"] == 1 and report.data["hard_negatives"] == 1
    stage = report.stages["stir"]
    assert stage.decision is not None and stage.candidate is not None
    assert {"embedder", "stir@5", "stir@10"} <= set(stage.candidate.rows)
    assert stage.baseline is not None and stage.baseline.models == {"stir": "none"}
    gain = stage.candidate.metric("cmc@1", "stir@5") - stage.baseline.metric("cmc@1")
    assert stage.decision.passed == (gain >= 0.01)
    # After training, validation chose the pair order and the fusion weight (the best of
    # one way and symmetric; a tie to one way), and the candidate file carries the choice.
    assert stage.train is not None
    scoring = stage.train["scoring"]
    one_way, both = scoring["options"]
    assert (one_way["symmetric"], both["symmetric"]) == (False, True)
    best = both if both["cmc@1"] > one_way["cmc@1"] else one_way
    assert (scoring["symmetric"], scoring["fusion_weight"]) == (
        best["symmetric"],
        best["fusion_weight"],
    )
    with app.db.session() as session:
        version = session.get(ModelVersion, stage.candidate_version)
        assert version is not None
        stored = load_stir(Path(version.file)).config
    assert (stored.symmetric, stored.fusion_weight) == (best["symmetric"], best["fusion_weight"])
    active = active_version(app.db, ModelKind.STIR)
    assert (active is not None and active.id == stage.candidate_version) == stage.promoted

    live = evaluate_live(
        app.search_service(app.in_process_rerank_stage(), record_queries=False),
        load_query_set(world.queries),
        max_bytes=app.settings.max_image_bytes,
    )
    assert live.n_queries == 100 and set(live.rows) == (
        {"embedder", "stir@5", "stir@10"} if stage.promoted else {"embedder"}
    )


def test_eval_and_retrain_commands(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEARCHSVC_HOME", str(world.settings.home))
    monkeypatch.setenv("SEARCHSVC_VAL_FRACTION", "0.3")
    runner = CliRunner()
    result = runner.invoke(searchsvc_main, ["eval", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["source"] == "catalog split (val)"
    assert set(report["rows"]["embedder"]) == {
        "cmc@1",
        "cmc@5",
        "cmc@10",
        "precision@5",
        "map@5",
        "map@10",
    }
    text = runner.invoke(searchsvc_main, ["eval"], catch_exceptions=False).output
    assert "serving embedder" in text and "cmc@1" in text

    result = runner.invoke(retrain_main, ["--dry-run", "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)  # the epoch and plan lines go to stderr
    assert plan["dry_run"] is True and plan["plan"]["embedder"]["steps_per_epoch"] >= 1
    bad = runner.invoke(retrain_main, ["--gate-metric", "recall@1", "--dry-run"])
    assert bad.exit_code == 1 and "gate metric" in bad.output
