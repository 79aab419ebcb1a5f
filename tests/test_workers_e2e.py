"""Ingest through real Celery worker processes on the local Redis, embedded Qdrant store.

The embedded store opens in one process only, so workers return vectors and the ingest
coordinator writes them: the result must equal the in-process run, point for point.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from catalog_factory import GeneratedCatalog
from click.testing import CliRunner
from workers_harness import cli_env, start_worker, stop

from searchsvc.cli import main
from searchsvc.index import EdgeIndex

REDIS_URL = os.environ.get("SEARCHSVC_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> str:
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=3)
    try:
        client.flushdb()
    except redis.exceptions.ConnectionError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is not running (scripts/services.sh starts it): {exc}")
    return REDIS_URL


@pytest.fixture
def embed_worker(env_home: Path, broker: str) -> Iterator[subprocess.Popen[bytes]]:
    worker = start_worker(cli_env(env_home, {"SEARCHSVC_BROKER_URL": broker}), "embed", "embed1")
    yield worker
    stop(worker)


def points(home: Path) -> set[str]:
    with EdgeIndex(home / "qdrant") as index:
        collection = index.resolve_alias("images")
        assert collection is not None
        return set(index.iter_point_ids(collection))


def ingest(catalog: Path) -> dict[str, object]:
    result = CliRunner().invoke(main, ["ingest", str(catalog), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    # From its first brace: stderr is mixed in (a worker that is still starting is warned of).
    return json.loads(result.output[result.output.index("{") :])


def query_ids(image: Path) -> list[tuple[str, float]]:
    result = CliRunner().invoke(main, ["query", str(image), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return [(r["product_id"], r["score"]) for r in json.loads(result.output)["results"]]


@pytest.mark.slow
def test_ingest_through_real_workers_equals_in_process(
    env_home: Path,
    broker: str,
    catalog: GeneratedCatalog,
    embed_worker: subprocess.Popen[bytes],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.setenv("SEARCHSVC_BROKER_URL", broker)
    summary = ingest(catalog.root)
    assert summary["images_embedded"] == len(catalog.product_ids) * 3
    assert embed_worker.poll() is None, "worker died"
    through_workers = points(env_home)
    with_workers = query_ids(catalog.held_out["p004"])

    # The same catalog in-process, in another home: the same points and the same answers.
    monkeypatch.delenv("SEARCHSVC_BROKER_URL")
    other_home = tmp_path / "in-process-home"
    monkeypatch.setenv("SEARCHSVC_HOME", str(other_home))
    ingest(catalog.root)
    assert points(other_home) == through_workers
    assert query_ids(catalog.held_out["p004"]) == with_workers


def test_dead_broker_fails_fast_naming_the_url(
    env_home: Path, catalog: GeneratedCatalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEARCHSVC_BROKER_URL", "redis://127.0.0.1:1/0")
    started = time.monotonic()
    result = CliRunner().invoke(main, ["ingest", str(catalog.root)], catch_exceptions=False)
    assert result.exit_code == 1
    assert "redis://127.0.0.1:1/0" in result.output
    assert "Traceback" not in result.output
    assert time.monotonic() - started < 30
