"""The `celery worker` command line of one pool process, for the scripts and tests that
start workers themselves (importing it needs no broker, unlike ``workers.app``)."""

from __future__ import annotations

import sys


def worker_command(
    queue: str, name: str, *extra: str, log_level: str = "warning", app: str = "workers"
) -> list[str]:
    """``python -m celery -A workers worker`` on ``queue`` as ``name@host``, without
    gossip, mingle or heartbeats (single-host pools need none); ``extra`` are further
    worker options (``--pool solo`` ...); ``app`` another Celery app module (tests)."""
    return [
        sys.executable,
        "-m",
        "celery",
        "-A",
        app,
        "worker",
        "-Q",
        queue,
        "-n",
        f"{name}@%h",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
        "-l",
        log_level,
        *extra,
    ]
