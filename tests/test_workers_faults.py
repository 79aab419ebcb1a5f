"""Faults against real processes: a private redis-server, real `celery worker` processes,
the real CLI. Whatever happens, nothing is lost and nothing is doubled."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from catalog_factory import make_catalog
from celery import Celery
from sqlalchemy import create_engine, func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from workers_harness import (
    RedisServer,
    cli_env,
    ctrl_c_as_at_a_terminal,
    searchsvc,
    start_worker,
    stop,
)

from searchsvc.core.config import load_settings
from searchsvc.index import EdgeIndex
from searchsvc.storage.db import Database, Image, ImageStatus

pytestmark = pytest.mark.slow


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def image_counts(home: Path) -> dict[str, int]:
    """Image rows by status, read through a plain read-only SQLite connection (no schema
    check, no ``journal_mode`` pragma to retry while the ingest writes)."""
    engine = create_engine(f"sqlite:///file:{home / 'searchsvc.db'}?mode=ro&uri=true")
    try:
        with Session(engine) as session:
            rows = session.execute(select(Image.status, func.count()).group_by(Image.status))
            return {status.value: count for status, count in rows}
    except OperationalError:  # the file exists, the ingest has not created the schema yet
        return {}
    finally:
        engine.dispose()


def assert_indexed_exactly_once(home: Path, expected: int) -> None:
    """DB rows, Qdrant points and statuses agree, each image once."""
    db = Database(load_settings(env={"SEARCHSVC_HOME": str(home)}).sqlalchemy_url)
    try:
        with db.session() as session:
            rows = session.execute(
                select(Image.product_id, Image.filename, Image.point_id, Image.status)
            ).all()
    finally:
        db.dispose()
    assert len(rows) == expected
    assert len({(p, f) for p, f, _, _ in rows}) == expected
    assert {s for _, _, _, s in rows} == {ImageStatus.INDEXED}
    with EdgeIndex(home / "qdrant") as index:
        collection = index.resolve_alias("images")
        assert collection is not None
        points = list(index.iter_point_ids(collection))
    assert len(points) == len(set(points)) == expected
    assert set(points) == {point for _, _, point, _ in rows}


def finish(process, timeout: float = 240) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out + err


def parse_json(output: str) -> dict:  # type: ignore[type-arg]
    """The JSON document a command printed (its stderr may hold log lines around it)."""
    value, _ = json.JSONDecoder().raw_decode(output[output.index("{") :])
    return value  # type: ignore[no-any-return]


def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_kill_9_of_an_embed_worker_mid_ingest(tmp_path: Path, redis_server: RedisServer) -> None:
    # Large enough that the ingest is still running when the poller sees its first
    # results: a fast machine embedded 180 images in 1.1 s, before the test could act.
    catalog = make_catalog(tmp_path / "catalog", products=300, views=3)
    total = 900
    home = tmp_path / "home"
    env = cli_env(
        home,
        {
            "SEARCHSVC_BROKER_URL": redis_server.url,
            "SEARCHSVC_BATCH_SIZE": "4",
            "SEARCHSVC_TASK_VISIBILITY_TIMEOUT_S": "4",
            # The kill lands right after a task's result, where the worker may have popped
            # the next task but not yet recorded it: Redis then has lost it, and only the
            # ingest's resend brings it back (the likely cause of a CI run that waited out
            # the 240 s here).
            "SEARCHSVC_EMBED_TASK_RESEND_S": "20",
        },
    )
    first = start_worker(env, "embed", "embed-a")
    ingest = searchsvc(env, "ingest", str(catalog.root), "--json")
    try:
        wait_until(
            lambda: (
                8 <= image_counts(home).get("indexed", 0)
                if (home / "searchsvc.db").exists()
                else False
            ),
            120,
            "the first embedded images",
        )
        stop(first, signal.SIGKILL)  # mid-task, no goodbye
        indexed_at_kill = image_counts(home).get("indexed", 0)
        assert indexed_at_kill < total, "the ingest finished before the kill; grow the catalog"
        time.sleep(1)
        second = start_worker(env, "embed", "embed-b")
        try:
            code, output = finish(ingest)
        finally:
            stop(second)
    finally:
        stop(first, signal.SIGKILL)
        if ingest.poll() is None:
            stop(ingest)  # type: ignore[arg-type]
    assert code == 0, output
    summary = parse_json(output)
    assert summary["images_embedded"] == total
    assert_indexed_exactly_once(home, total)


def test_broker_down_fails_fast_then_ingest_resumes(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    catalog = make_catalog(tmp_path / "catalog", products=20, views=3)
    home = tmp_path / "home"
    env = cli_env(home, {"SEARCHSVC_BROKER_URL": redis_server.url, "SEARCHSVC_BATCH_SIZE": "4"})

    redis_server.stop()
    # Fails rather than waits: one connection attempt (3 s connect timeout), so the command
    # ends well inside finish()'s bound, which fails the test if it hangs retrying. The
    # bound is generous on purpose: process start-up alone takes seconds on a loaded machine.
    code, output = finish(searchsvc(env, "ingest", str(catalog.root)), timeout=90)
    assert code == 1
    assert redis_server.url in output and "broker" in output
    assert "Traceback" not in output

    redis_server.start()
    worker = start_worker(env, "embed", "embed-a")
    try:
        code, output = finish(searchsvc(env, "ingest", str(catalog.root), "--json"))
    finally:
        stop(worker)
    assert code == 0, output
    assert_indexed_exactly_once(home, 60)


def test_commands_hear_ctrl_c_even_when_the_runner_ignores_it() -> None:
    # The runner ignoring SIGINT (started in the background) must not decide whether the
    # interrupt test below can interrupt anything.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        probe = [
            sys.executable,
            "-c",
            "import signal; print(signal.getsignal(signal.SIGINT) is signal.default_int_handler)",
        ]
        ignoring = subprocess.run(probe, capture_output=True, text=True, check=True)
        restored = subprocess.run(
            probe, capture_output=True, text=True, check=True, preexec_fn=ctrl_c_as_at_a_terminal
        )
    finally:
        signal.signal(signal.SIGINT, previous)
    assert ignoring.stdout.strip() == "False"  # what the child would inherit: no Ctrl-C
    assert restored.stdout.strip() == "True"


def test_interrupted_ingest_finishes_the_rest_on_the_next_run(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    # A gated worker embeds one task (4 images) and then takes no other until released:
    # the Ctrl-C lands while the ingest still has work to wait for, on any machine.
    catalog = make_catalog(tmp_path / "catalog", products=20, views=3)
    total, batch = 60, 4
    home = tmp_path / "home"
    release = tmp_path / "release-the-worker"
    env = cli_env(
        home,
        {
            "SEARCHSVC_BROKER_URL": redis_server.url,
            "SEARCHSVC_BATCH_SIZE": str(batch),
            "GATED_WORKER_RELEASE": str(release),
        },
    )
    worker = start_worker(env, "embed", "embed-gated", app="gated_worker")
    try:
        ingest = searchsvc(env, "ingest", str(catalog.root))
        wait_until(
            lambda: (
                image_counts(home).get("indexed", 0) >= batch
                if (home / "searchsvc.db").exists()
                else False
            ),
            120,
            "the first task's images",
        )
        ingest.send_signal(signal.SIGINT)  # Ctrl-C
        code, output = finish(ingest, timeout=60)
        assert code == 130, output
        assert "run the same command again" in output and "Traceback" not in output
        assert image_counts(home).get("indexed", 0) == batch  # exactly the first task

        release.touch()
        code, output = finish(searchsvc(env, "ingest", str(catalog.root), "--json"))
    finally:
        release.touch()
        stop(worker)
    assert code == 0, output
    summary = parse_json(output)
    assert summary["images_unchanged"] == batch  # nothing indexed is redone
    assert summary["images_embedded"] == total - batch
    assert_indexed_exactly_once(home, total)


def test_poison_tasks_fail_once_and_do_not_block_the_queue(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    catalog = make_catalog(tmp_path / "catalog", products=10, views=3)
    (catalog.root / "p003" / "poison.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    home = tmp_path / "home"
    env = cli_env(home, {"SEARCHSVC_BROKER_URL": redis_server.url, "SEARCHSVC_BATCH_SIZE": "4"})
    worker = start_worker(env, "embed", "embed-a")
    client = Celery(broker=redis_server.url, backend=redis_server.url)
    client.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
    try:
        # A message no task can use: it fails once (no retry) and the queue moves on.
        poison = client.send_task("searchsvc.embed_images", args=[{"items": "junk"}], queue="embed")
        with pytest.raises(Exception) as failure:
            poison.get(timeout=60)
        assert "malformed EmbedRequest" in str(failure.value)
        assert poison.state == "FAILURE"

        code, output = finish(searchsvc(env, "ingest", str(catalog.root), "--json"))
    finally:
        client.close()
        stop(worker)
    assert code == 0, output
    summary = parse_json(output)
    assert summary["images_embedded"] == 30
    assert summary["images_failed"] == 1
    problems = {p["item"]: p["reason"] for p in summary["problems"]}
    assert (
        "not a recognised image" in problems["p003/poison.jpg"]
        or "truncated" in problems["p003/poison.jpg"]
    )
    assert image_counts(home) == {"indexed": 30, "failed": 1}


def test_two_overlapping_ingests_at_once(tmp_path: Path) -> None:
    """Embedded store: the second ingest queues behind the first; together they index the
    union of both catalogs, each image once."""
    full = make_catalog(tmp_path / "full", products=30, views=3)
    first, second = tmp_path / "first", tmp_path / "second"
    for index, product_id in enumerate(full.product_ids):
        if index < 20:
            shutil.copytree(full.root / product_id, first / product_id)
        if index >= 10:
            shutil.copytree(full.root / product_id, second / product_id)
    home = tmp_path / "home"
    env = cli_env(home)
    runs = [searchsvc(env, "ingest", str(root), "--json") for root in (first, second)]
    results = [finish(run) for run in runs]
    for code, output in results:
        assert code == 0, output
    assert_indexed_exactly_once(home, 90)
    embedded = sum(parse_json(out)["images_embedded"] for _, out in results)
    assert embedded == 90  # the shared products were embedded by one ingest only


def _register_untrained_stir(home: Path, env: dict[str, str]) -> None:
    import dataclasses

    import torch

    from searchsvc.core.profiles import PROFILES
    from searchsvc.models.embedder import EmbeddingNet
    from searchsvc.models.stir import StirConfig, StirNet, save_stir

    spec = dataclasses.replace(
        PROFILES["small"], timm_kwargs={**PROFILES["small"].timm_kwargs, "depth": 2}
    )
    torch.manual_seed(0)
    path = home.parent / "stir.safetensors"
    save_stir(StirNet.from_embedder(EmbeddingNet(spec), StirConfig(spec=spec)), path)
    code, output = finish(searchsvc(env, "model", "add", "stir", str(path), "--activate"))
    assert code == 0, output


def test_rerank_on_a_worker_pool_and_without_one(tmp_path: Path, redis_server: RedisServer) -> None:
    catalog = make_catalog(tmp_path / "catalog", products=10, views=2)
    home = tmp_path / "home"
    env = cli_env(home, {"SEARCHSVC_EMBEDDER_PROFILE": "small"})  # the untrained STIR's size
    code, output = finish(searchsvc(env, "ingest", str(catalog.root)))
    assert code == 0, output
    _register_untrained_stir(home, env)
    env = cli_env(
        home, {"SEARCHSVC_BROKER_URL": redis_server.url, "SEARCHSVC_RERANK_TIMEOUT_S": "3"}
    )
    query = catalog.held_out["p002"]

    # No rerank worker: the first stage answers within the deadline, flagged.
    code, output = finish(searchsvc(env, "query", str(query), "--json"), timeout=90)
    assert code == 0, output
    alone = parse_json(output)
    assert alone["reranked"] is False and "timed out after 3 s" in alone["rerank_reason"]
    assert alone["timings_ms"]["rerank"] < 4000  # the stage's own wait: its deadline

    # A rerank pool (threads, so that concurrent requests share a forward pass).
    worker = start_worker(env, "rerank", "rerank-a", pool="threads", concurrency=4)
    try:
        env_long = {**env, "SEARCHSVC_RERANK_TIMEOUT_S": "30"}  # the worker loads its model
        code, output = finish(searchsvc(env_long, "query", str(query), "--json"), timeout=90)
    finally:
        stop(worker)
    assert code == 0, output
    served = parse_json(output)
    assert served["reranked"] is True, served["rerank_reason"]
    assert served["reranker"] == "stir-v2"
    assert all(r["stir_score"] is not None for r in served["results"][:5])
    assert {r["product_id"] for r in served["results"]} == {
        r["product_id"] for r in alone["results"]
    }
