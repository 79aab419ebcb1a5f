"""Time limits that hold in every pool: the task functions bound their own work (solo and
threads pools, like the in-process dispatcher's threads, ignore Celery's time limits)."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from catalog_factory import GeneratedCatalog, make_catalog
from sqlalchemy import select

from searchsvc.app import App
from searchsvc.core.config import load_settings
from searchsvc.jobs.tasks import TaskContext, TaskTimeLimitExceeded, rerank
from searchsvc.jobs.wire import RerankRequest, encode_pixels
from searchsvc.models.batcher import MicroBatcher
from searchsvc.storage.db import Database, Image, ImageStatus, ModelKind, ModelVersion
from searchsvc.storage.pixels import SqlitePixelStore


def test_an_embed_task_past_its_time_limit_stops_and_leaves_its_images_pending(
    home: Path, catalog: GeneratedCatalog
) -> None:
    settings = load_settings(
        env={"SEARCHSVC_HOME": str(home), "SEARCHSVC_TASK_TIME_LIMIT_S": "0.000001"}
    )
    app = App(settings)
    try:
        summary = app.ingest(catalog.root)
        with app.db.session() as session:
            statuses = set(session.scalars(select(Image.status)))
    finally:
        app.close()
    assert summary.images_embedded == 0
    assert statuses == {ImageStatus.PENDING}  # nothing lost: the next run embeds them
    reasons = {problem.reason for problem in summary.problems}
    assert reasons and all("SEARCHSVC_TASK_TIME_LIMIT_S" in reason for reason in reasons)


SIZE = 8


def test_a_rerank_task_stops_at_its_deadline_and_its_pairs_are_never_scored(
    tmp_path: Path,
) -> None:
    settings = load_settings(
        env={"SEARCHSVC_HOME": str(tmp_path / "home"), "SEARCHSVC_RERANK_TIMEOUT_S": "0.3"}
    )
    db = Database(settings.sqlalchemy_url)
    with db.session() as session:
        session.add(
            ModelVersion(
                kind=ModelKind.STIR, arch="stir:slow", file="s.safetensors", active=True, config={}
            )
        )
    pixels = SqlitePixelStore(tmp_path / "media")
    digest = "ab" * 32
    pixels.put_many([(digest, np.zeros((SIZE, SIZE, 3), np.uint8))])
    release, entered = threading.Event(), threading.Event()
    scored: list[int] = []

    def slow_forward(pairs: list[object]) -> list[float]:
        entered.set()
        release.wait(30)  # a forward that hangs (a stuck GPU, a huge batch)
        scored.append(len(pairs))
        return [0.5] * len(pairs)

    batcher: MicroBatcher[object, float] = MicroBatcher(slow_forward, max_wait_s=0.0)
    scorer = SimpleNamespace(info=SimpleNamespace(input_size=SIZE))
    models = SimpleNamespace(stir=lambda version: (scorer, batcher))
    ctx = TaskContext(settings=settings, db=db, models=models, pixels=pixels)  # type: ignore[arg-type]
    request = RerankRequest(
        stir_version=1,
        size=SIZE,
        query_pixels_b64=encode_pixels(np.zeros((SIZE, SIZE, 3), np.uint8)),
        candidate_hashes=[digest, digest],
    )
    try:
        outcomes: list[BaseException] = []
        threads = [
            threading.Thread(target=lambda: outcomes.append(_raises(request, ctx)))
            for _ in range(2)
        ]
        started = time.monotonic()
        threads[0].start()
        assert entered.wait(10)  # the first holds the forward...
        threads[1].start()  # ... the second waits behind it
        for thread in threads:
            thread.join(10)
        elapsed = time.monotonic() - started
        release.set()
        time.sleep(0.2)
    finally:
        release.set()
        batcher.close()
        db.dispose()
    assert len(outcomes) == 2 and all(isinstance(e, TaskTimeLimitExceeded) for e in outcomes)
    assert "SEARCHSVC_RERANK_TIMEOUT_S" in str(outcomes[0])
    assert elapsed < 3.0  # bounded by the deadline, not by the forward
    assert scored == [2]  # the waiting request was cancelled, not scored for nobody


def _raises(request: RerankRequest, ctx: TaskContext) -> BaseException:
    with pytest.raises(TaskTimeLimitExceeded) as caught:
        rerank(request, ctx)
    return caught.value


@pytest.mark.slow
def test_the_embed_time_limit_holds_in_a_solo_pool_worker(tmp_path: Path) -> None:
    """A real `celery worker --pool solo`, which ignores Celery's own time limits."""
    from test_workers_faults import finish, parse_json
    from workers_harness import RedisServer, cli_env, searchsvc, start_worker, stop

    catalog = make_catalog(tmp_path / "catalog", products=3, views=2)
    server = RedisServer(tmp_path / "redis")
    server.start()
    env = cli_env(
        tmp_path / "home",
        {"SEARCHSVC_BROKER_URL": server.url, "SEARCHSVC_TASK_TIME_LIMIT_S": "0.000001"},
    )
    worker = start_worker(env, "embed", "embed-solo", pool="solo")
    try:
        code, output = finish(searchsvc(env, "ingest", str(catalog.root), "--json"))
    finally:
        stop(worker)
        server.stop()
    assert code == 0, output
    summary = parse_json(output)
    assert summary["images_embedded"] == 0
    reasons = {p["reason"] for p in summary["problems"]}
    assert len(summary["problems"]) == 6
    assert all("left pending" in r and "SEARCHSVC_TASK_TIME_LIMIT_S" in r for r in reasons)
