"""How work reaches the task functions: in this process, or through Celery by task name.

``searchsvc`` never imports ``workers``: the Celery dispatcher sends tasks by their names
(``searchsvc.jobs.wire.EMBED_TASK`` ...), which the worker package registers.
"""

from __future__ import annotations

import concurrent.futures
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

from searchsvc.core.config import redact_secrets, redact_url, url_password
from searchsvc.core.errors import BrokerError, SearchsvcError

Payload = dict[str, Any]
TaskFunction = Callable[[Payload], Payload]


class TaskFailed(SearchsvcError):
    """The task ran and raised; the message is the task's own error."""


class TaskHandle(Protocol):
    def result(self, timeout: float | None = None) -> Payload:
        """The task's result; raises TimeoutError after ``timeout`` s, TaskFailed on failure."""

    def ready(self) -> bool:
        """True once the task has finished (its result or its failure is waiting)."""

    def started(self) -> bool:
        """True once a worker has begun the task (or it has finished): it is not lost."""


class Dispatcher(Protocol):
    def submit(
        self, task_name: str, payload: Payload, *, queue: str, expires_s: float | None = None
    ) -> TaskHandle:
        """Queue a task; ``expires_s``: a task not started by then is dropped, not run late."""

    def close(self) -> None: ...


MAX_RESENDS = 3
CONSUMER_GRACE_S = 5.0
RESEND_POLL_S = 0.1


def result_with_resends(
    first: TaskHandle,
    send_again: Callable[[], TaskHandle],
    *,
    timeout_s: float,
    resend_after_s: float,
    on_resend: Callable[[int], None] | None = None,
    started_limit_s: float = math.inf,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Payload:
    """The first result of an idempotent task or of the copies sent after it.

    A Redis broker can lose a task for good: a worker killed between popping the message
    and recording it as unacknowledged takes it along (kombu pops, then writes its
    ``unacked`` entry: celery/kombu#305, celery/celery#7950), and one that was recorded
    returns only after the broker's visibility timeout, an hour by default. So a task
    without a result ``resend_after_s`` after the wait began is sent again (at most
    ``MAX_RESENDS`` times, each after another ``resend_after_s``), and whichever copy
    finishes first answers; ``on_resend`` is told each copy's number. ``timeout_s`` bounds
    the whole wait (TimeoutError). A copy that fails raises TaskFailed as the task would.

    Only a lost task is sent again, not a slow one: while a worker runs a copy
    (``started``), no copy is added, unless that copy has run longer than
    ``started_limit_s`` (the task's own time limit, which holds in every pool: a copy still
    running past it lost its worker).
    """
    handles = [first]
    resends_from = clock()  # moved on while a worker runs a copy
    deadline = resends_from + timeout_s
    started_at: dict[int, float] = {}  # copy -> when it was first seen started
    while True:
        now = clock()
        if now >= deadline:
            raise TimeoutError(f"task did not finish within {timeout_s:g} s")
        next_resend = (
            resends_from + resend_after_s * len(handles)
            if len(handles) <= MAX_RESENDS
            else math.inf
        )
        until = min(deadline, next_resend)
        if len(handles) == 1:  # the usual case: block on the one result
            try:
                return first.result(timeout=max(0.0, until - now))
            except TimeoutError:
                pass
        else:
            finished = next((handle for handle in handles if handle.ready()), None)
            if finished is not None:
                return finished.result(timeout=max(1.0, deadline - clock()))
            sleep(min(RESEND_POLL_S, max(0.0, until - now)))
        now = clock()
        for index, handle in enumerate(handles):
            if index not in started_at and handle.started():
                started_at[index] = now
        running = [since for since in started_at.values() if now - since <= started_limit_s]
        if now >= next_resend and not running:
            handles.append(send_again())
            if on_resend is not None:
                on_resend(len(handles) - 1)
        elif now >= next_resend:
            # A worker has it: look again one resend period later (slow is not lost).
            resends_from += resend_after_s


class NoWorkerError(SearchsvcError):
    """No worker is consuming a queue that work is about to be sent to."""


def check_consumers(
    dispatcher: CeleryDispatcher,
    queue: str,
    *,
    stop: bool,
    notice: Callable[[str], None],
    waits_s: float,
    grace_s: float = CONSUMER_GRACE_S,
) -> None:
    """Say within seconds when no worker consumes ``queue``: a task sent there would wait,
    with no word, until its timeout. Workers are asked again for ``grace_s`` (a pool
    started together with the command is still booting). ``stop``: raise
    :class:`NoWorkerError`; else tell ``notice`` and go on (tasks wait in the queue)."""
    deadline = time.monotonic() + grace_s
    while not dispatcher.queue_consumers(queue, timeout=1.0):
        if time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    else:
        return
    message = (
        f"no worker is consuming the '{queue}' queue (start one: celery -A workers.celery_app "
        f"worker -Q {queue})"
    )
    if stop:
        raise NoWorkerError(f"{message}; stopped (SEARCHSVC_INGEST_WITHOUT_WORKER=stop)")
    notice(
        f"{message}; waiting up to {waits_s:g} s per task for one to start "
        "(SEARCHSVC_INGEST_WITHOUT_WORKER=stop stops instead)"
    )


class _FutureHandle:
    def __init__(self, future: concurrent.futures.Future[Payload]) -> None:
        self._future = future

    def ready(self) -> bool:
        return self._future.done()

    def started(self) -> bool:
        return self._future.running() or self._future.done()

    def result(self, timeout: float | None = None) -> Payload:
        try:
            return self._future.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            raise TimeoutError(f"task did not finish within {timeout} s") from None
        except SearchsvcError:
            raise
        except Exception as exc:  # noqa: BLE001 - any task failure is reported the same way
            raise TaskFailed(f"{type(exc).__name__}: {exc}") from exc


class InProcessDispatcher:
    """Runs task functions on background threads of this process, ``threads`` per queue.

    Two threads per queue by default: while one task's forward pass runs (torch releases
    the GIL), the next task decodes its images, and the caller prepares the batch after.
    """

    def __init__(self, tasks: dict[str, TaskFunction], *, threads: int = 2) -> None:
        self._tasks = tasks
        self._threads = threads
        self._executors: dict[str, concurrent.futures.ThreadPoolExecutor] = {}

    def submit(
        self, task_name: str, payload: Payload, *, queue: str, expires_s: float | None = None
    ) -> TaskHandle:
        function = self._tasks[task_name]
        executor = self._executors.get(queue)
        if executor is None:
            executor = concurrent.futures.ThreadPoolExecutor(
                self._threads, thread_name_prefix=queue
            )
            self._executors[queue] = executor
        return _FutureHandle(executor.submit(function, payload))

    def close(self) -> None:
        for executor in self._executors.values():
            executor.shutdown(wait=True, cancel_futures=True)
        self._executors.clear()


class _CeleryHandle:
    def __init__(self, async_result: Any) -> None:
        self._async_result = async_result

    def ready(self) -> bool:
        return bool(self._async_result.ready())

    def started(self) -> bool:
        # STARTED is recorded by workers with ``task_track_started`` (workers.celery_app).
        return self.ready() or self._async_result.state in ("STARTED", "RETRY")

    def result(self, timeout: float | None = None) -> Payload:
        from celery.exceptions import TimeoutError as CeleryTimeout

        try:
            value = self._async_result.get(timeout=timeout, propagate=True)
        except CeleryTimeout:
            raise TimeoutError(f"task did not finish within {timeout} s") from None
        except SearchsvcError:
            raise
        except Exception as exc:  # noqa: BLE001 - the worker's exception, re-raised by Celery
            raise TaskFailed(f"{type(exc).__name__}: {exc}") from exc
        if not isinstance(value, dict):
            raise TaskFailed(f"task returned {type(value).__name__}, expected a JSON object")
        return value


class CeleryDispatcher:
    """Sends tasks by name to Celery worker pools on Redis (JSON only)."""

    def __init__(
        self, broker_url: str, backend_url: str = "", *, visibility_timeout_s: float = 3600.0
    ) -> None:
        from celery import Celery

        self.broker_url = broker_url
        self._where = redact_url(broker_url)  # what messages name: never the password
        self._secrets = [url_password(broker_url), url_password(backend_url)]
        self.app = Celery("searchsvc-client", broker=broker_url, backend=backend_url or broker_url)
        self.app.conf.update(
            task_serializer="json",
            result_serializer="json",
            accept_content=["json"],
            broker_connection_retry_on_startup=False,
            broker_connection_max_retries=1,
            broker_transport_options={
                "max_retries": 1,
                "socket_connect_timeout": 3,
                "visibility_timeout": visibility_timeout_s,
            },
            redis_socket_connect_timeout=3,
            result_extended=False,
        )

    def check_broker(self, timeout: float = 3.0) -> None:
        """Fail fast, with the URL, when the broker cannot be reached."""
        try:
            with self.app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=timeout)
        except Exception as exc:  # noqa: BLE001 - kombu raises many kinds here
            raise BrokerError(
                f"cannot reach the broker at {self._where} ({self._scrub(exc)})"
            ) from None

    def _scrub(self, exc: BaseException) -> str:
        """A library's error text, which may quote the URL it was given."""
        return redact_secrets(str(exc), self._secrets)

    def queue_consumers(self, queue: str, timeout: float = 2.0) -> list[str]:
        """The workers consuming ``queue`` now, by Celery's broadcast inspection (every
        worker answers it unless started ``--without-control``)."""
        try:
            replies = self.app.control.inspect(timeout=timeout).active_queues() or {}
        except Exception as exc:  # noqa: BLE001 - kombu raises many kinds here
            raise BrokerError(f"cannot ask the broker for its workers ({exc})") from None
        return sorted(
            worker
            for worker, queues in replies.items()
            if any(isinstance(q, dict) and q.get("name") == queue for q in queues or ())
        )

    def submit(
        self, task_name: str, payload: Payload, *, queue: str, expires_s: float | None = None
    ) -> TaskHandle:
        try:
            result = self.app.send_task(task_name, args=[payload], queue=queue, expires=expires_s)
        except Exception as exc:  # noqa: BLE001
            raise BrokerError(
                f"cannot send {task_name} to {self._where} ({self._scrub(exc)})"
            ) from None
        return _CeleryHandle(result)

    def close(self) -> None:
        self.app.close()
