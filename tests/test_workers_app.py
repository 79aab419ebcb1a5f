"""`celery -A workers ...`: Celery's convention for a package finds the app, with its tasks,
and the package stays importable without a broker."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from workers_harness import REPO, RedisServer, cli_env, start_worker, stop

from searchsvc.jobs.wire import EMBED_TASK, RERANK_TASK

pytestmark = pytest.mark.slow


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def celery(
    env: dict[str, str], *args: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "workers", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_celery_dash_a_workers_starts_a_worker_with_the_tasks(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    env = cli_env(tmp_path / "home", {"SEARCHSVC_BROKER_URL": redis_server.url})
    worker = start_worker(env, "embed", "embed-a")  # python -m celery -A workers worker ...
    try:
        deadline = time.monotonic() + 90
        while True:
            answer = celery(env, "inspect", "registered", "--timeout", "5")
            if EMBED_TASK in answer.stdout or time.monotonic() > deadline:
                break
            assert worker.poll() is None, "the worker exited"
            time.sleep(1)
    finally:
        stop(worker)
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "embed-a@" in answer.stdout
    assert EMBED_TASK in answer.stdout and RERANK_TASK in answer.stdout


def test_workers_package_imports_without_a_broker(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "home")  # no SEARCHSVC_BROKER_URL
    imported = subprocess.run(
        [sys.executable, "-c", "import workers, workers.command"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert imported.returncode == 0, imported.stderr
    # The app itself needs the broker, and says so in one line (no traceback).
    started = celery(env, "worker", "-Q", "embed")
    assert started.returncode != 0
    output = started.stdout + started.stderr
    assert "SEARCHSVC_BROKER_URL is not set" in output and "Traceback" not in output
