"""The Celery application: configuration and queues only (tasks are in workers.tasks).

Start the pools (README, "Worker pools"):

    celery -A workers worker -Q embed --concurrency 2 -n embed@%h
    # ONE rerank process per GPU: its threads share one model, so requests that arrive
    # together are scored in one batched forward pass.
    CUDA_VISIBLE_DEVICES=0 celery -A workers worker -Q rerank --pool threads \
        --concurrency 8 -n rerank0@%h
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from searchsvc.core.config import load_settings
from searchsvc.jobs.wire import EMBED_QUEUE, EMBED_TASK, RERANK_QUEUE, RERANK_TASK

settings = load_settings()
if not settings.broker_url:
    raise SystemExit("SEARCHSVC_BROKER_URL is not set: workers need a broker (redis://...)")

app = Celery(
    "searchsvc",
    broker=settings.broker_url,
    backend=settings.result_backend_url or settings.broker_url,
    include=["workers.tasks"],
)
app.conf.update(
    # JSON only: a pickle payload from the broker is refused, never executed.
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_accept_content=["json"],
    task_queues=(Queue(EMBED_QUEUE), Queue(RERANK_QUEUE)),
    task_default_queue=EMBED_QUEUE,
    task_routes={EMBED_TASK: {"queue": EMBED_QUEUE}, RERANK_TASK: {"queue": RERANK_QUEUE}},
    # A task is acknowledged after it ran; a worker killed mid-task leaves it to another.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # One task at a time per process: GPU pools must not hoard work they cannot start.
    worker_prefetch_multiplier=1,
    # Prefork pools only (solo and threads pools ignore these): the task functions keep
    # their own deadline, SEARCHSVC_TASK_TIME_LIMIT_S, which holds in every pool.
    task_soft_time_limit=settings.task_time_limit_s,
    task_time_limit=settings.task_time_limit_s + 60,
    # STARTED is recorded, so that the ingest resends a lost task but never a slow one.
    task_track_started=True,
    result_expires=3600,
    broker_connection_retry_on_startup=True,
    # A task whose worker died (kill -9, lost machine) goes back to the queue after this.
    broker_transport_options={"visibility_timeout": settings.task_visibility_timeout_s},
    result_backend_transport_options={"visibility_timeout": settings.task_visibility_timeout_s},
    worker_hijack_root_logger=False,
)
