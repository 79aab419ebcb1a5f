"""Celery tasks: each wraps the searchsvc.jobs.tasks function of the same name, nothing more."""

from __future__ import annotations

from typing import Any

from celery.signals import worker_process_init

from searchsvc.app import build_task_context
from searchsvc.core.errors import BrokerError, DatabaseError, IndexBackendError
from searchsvc.jobs.dispatch import Payload
from searchsvc.jobs.tasks import TaskContext, task_functions
from searchsvc.jobs.wire import EMBED_TASK, RERANK_TASK
from workers.celery_app import app, settings

# Errors worth a retry (a database or index briefly away); bad input is not retried: the
# task functions report it per item in their result instead of raising.
TRANSIENT = (DatabaseError, IndexBackendError, BrokerError, ConnectionError, TimeoutError)

_context: TaskContext | None = None


def context() -> TaskContext:
    """Built once per worker process (after the fork), models loaded on first use."""
    global _context
    if _context is None:
        _context = build_task_context(settings)
    return _context


@worker_process_init.connect
def _reset_after_fork(**_: Any) -> None:
    global _context
    _context = None


def _run(task_name: str, payload: Payload) -> Payload:
    return task_functions(context())[task_name](payload)


@app.task(
    name=EMBED_TASK,
    autoretry_for=TRANSIENT,
    retry_backoff=True,
    retry_backoff_max=60,
    max_retries=5,
)
def embed_images(payload: Payload) -> Payload:
    return _run(EMBED_TASK, payload)


@app.task(name=RERANK_TASK, autoretry_for=TRANSIENT, max_retries=0)
def rerank(payload: Payload) -> Payload:
    return _run(RERANK_TASK, payload)
