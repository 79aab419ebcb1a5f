"""A Celery app for tests: the real workers' app and tasks, plus a pause point.

A worker started with ``-A gated_worker`` runs its first task as any worker would (the
result is stored before ``task_postrun`` fires), then takes no further task until the file
named by ``GATED_WORKER_RELEASE`` exists. A test therefore knows exactly how much work was
done when it acts (one task's images), however fast or slow the machine is.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from celery.signals import task_postrun

from workers.celery_app import app  # its ``include`` registers the tasks

__all__ = ["app"]

RELEASE_FILE = Path(os.environ["GATED_WORKER_RELEASE"])
_tasks_done = 0


@task_postrun.connect
def _hold_after_the_first_task(**_: Any) -> None:
    global _tasks_done
    _tasks_done += 1
    if _tasks_done == 1:
        while not RELEASE_FILE.exists():
            time.sleep(0.05)
