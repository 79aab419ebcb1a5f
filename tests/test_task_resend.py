"""Lost embed tasks: a task without a result is sent again, and the ingest finishes with
every image indexed once (a Redis broker can drop the task of a worker killed between
popping it and recording it as unacknowledged)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from catalog_factory import GeneratedCatalog
from sqlalchemy import select

from searchsvc.app import App
from searchsvc.core.config import load_settings
from searchsvc.jobs.dispatch import (
    MAX_RESENDS,
    Dispatcher,
    Payload,
    TaskFailed,
    TaskHandle,
    result_with_resends,
)
from searchsvc.jobs.embed_pipeline import EmbedPipeline
from searchsvc.jobs.wire import EmbedRequest
from searchsvc.storage.db import Image, ImageStatus


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class FakeHandle:
    """Finishes at ``done_at`` on the fake clock (None: never, a lost task); a worker runs
    it from ``started_at`` (None: no worker took it)."""

    def __init__(
        self,
        clock: FakeClock,
        done_at: float | None,
        value: Payload,
        *,
        fails: bool = False,
        started_at: float | None = None,
    ) -> None:
        self.clock, self.done_at, self.value, self.fails = clock, done_at, value, fails
        self.started_at = started_at

    def ready(self) -> bool:
        return self.done_at is not None and self.clock.now >= self.done_at

    def started(self) -> bool:
        return self.ready() or (self.started_at is not None and self.clock.now >= self.started_at)

    def result(self, timeout: float | None = None) -> Payload:
        if not self.ready():
            waited = timeout or 0.0
            if self.done_at is not None and self.clock.now + waited >= self.done_at:
                self.clock.now = self.done_at
            else:
                self.clock.now += waited
                raise TimeoutError("not yet")
        if self.fails:
            raise TaskFailed("ValueError: broken")
        return self.value


def copies(clock: FakeClock, finish_times: list[float | None]) -> Callable[[], TaskHandle]:
    """``send_again``: copy ``i`` finishes at ``finish_times[i]`` (absolute)."""
    sent: list[int] = []

    def send_again() -> TaskHandle:
        sent.append(1)
        return FakeHandle(clock, finish_times[len(sent) - 1], {"copy": len(sent)})

    return send_again


def test_a_task_that_answers_in_time_is_not_sent_again() -> None:
    clock = FakeClock()
    resends: list[int] = []
    value = result_with_resends(
        FakeHandle(clock, 5.0, {"copy": 0}),
        copies(clock, []),
        timeout_s=100,
        resend_after_s=10,
        on_resend=resends.append,
        clock=clock,
        sleep=clock.sleep,
    )
    assert value == {"copy": 0} and resends == [] and clock.now == 5.0


def test_a_lost_task_is_sent_again_and_the_copy_answers() -> None:
    clock = FakeClock()
    resends: list[int] = []
    value = result_with_resends(
        FakeHandle(clock, None, {"copy": 0}),  # lost: never finishes
        copies(clock, [13.0]),
        timeout_s=100,
        resend_after_s=10,
        on_resend=resends.append,
        clock=clock,
        sleep=clock.sleep,
    )
    assert value == {"copy": 1} and resends == [1]
    assert 13.0 <= clock.now < 13.2  # polled, not waited out


def test_the_original_still_answers_when_it_finishes_first_after_a_resend() -> None:
    clock = FakeClock()
    value = result_with_resends(
        FakeHandle(clock, 12.0, {"copy": 0}),  # slow, not lost
        copies(clock, [50.0]),
        timeout_s=100,
        resend_after_s=10,
        clock=clock,
        sleep=clock.sleep,
    )
    assert value == {"copy": 0} and clock.now < 12.2


def test_resends_are_bounded_and_the_wait_times_out() -> None:
    clock = FakeClock()
    resends: list[int] = []
    with pytest.raises(TimeoutError, match="60"):
        result_with_resends(
            FakeHandle(clock, None, {}),
            copies(clock, [None] * 10),
            timeout_s=60,
            resend_after_s=5,
            on_resend=resends.append,
            clock=clock,
            sleep=clock.sleep,
        )
    assert resends == list(range(1, MAX_RESENDS + 1))
    assert 60.0 <= clock.now < 60.2


def test_a_slow_task_that_a_worker_runs_is_not_sent_again() -> None:
    clock = FakeClock()
    resends: list[int] = []
    value = result_with_resends(
        FakeHandle(clock, 35.0, {"copy": 0}, started_at=1.0),  # slow, running: not lost
        copies(clock, [36.0]),
        timeout_s=100,
        resend_after_s=10,
        on_resend=resends.append,
        started_limit_s=60,
        clock=clock,
        sleep=clock.sleep,
    )
    assert value == {"copy": 0} and resends == [] and clock.now == 35.0


def test_a_started_task_running_past_its_time_limit_is_sent_again() -> None:
    """Its worker died mid-task (the task stops itself at its limit in every pool)."""
    clock = FakeClock()
    resends: list[int] = []
    value = result_with_resends(
        FakeHandle(clock, None, {"copy": 0}, started_at=1.0),
        copies(clock, [45.0]),
        timeout_s=100,
        resend_after_s=10,
        on_resend=resends.append,
        started_limit_s=25,
        clock=clock,
        sleep=clock.sleep,
    )
    assert value == {"copy": 1} and resends == [1]
    # seen started at 10 (the first look), past its limit after 35: resent at the next look
    assert 40.0 <= clock.now < 45.2


def test_embed_tasks_expire_when_the_run_stops_waiting() -> None:
    clock = FakeClock()
    sent: list[float | None] = []

    class Recording:
        def submit(
            self, task_name: str, payload: Payload, *, queue: str, expires_s: float | None = None
        ) -> TaskHandle:
            sent.append(expires_s)
            return FakeHandle(clock, 0.0, {"embedder_version": 1, "results": []})

        def close(self) -> None:
            pass

    pipeline: EmbedPipeline[None] = EmbedPipeline(
        Recording(),
        in_flight=1,
        timeout_s=42.0,
        resend_after_s=10,
        on_result=lambda *_: None,
        on_failure=lambda *_: None,
    )
    pipeline.submit(EmbedRequest(items=[], embedder_version=1, collection="images_v1"), None)
    pipeline.drain()
    assert sent == [42.0]


def test_a_copy_that_fails_reports_the_tasks_error() -> None:
    clock = FakeClock()

    def failing_copy() -> TaskHandle:
        return FakeHandle(clock, 11.0, {}, fails=True)

    with pytest.raises(TaskFailed, match="broken"):
        result_with_resends(
            FakeHandle(clock, None, {}),
            failing_copy,
            timeout_s=100,
            resend_after_s=10,
            clock=clock,
            sleep=clock.sleep,
        )


class _LostHandle:
    def ready(self) -> bool:
        return False

    def started(self) -> bool:
        return False

    def result(self, timeout: float | None = None) -> Payload:
        import time

        time.sleep(min(timeout or 0.0, 0.05))
        raise TimeoutError("lost")


class LosingDispatcher:
    """Passes tasks to ``inner`` but drops the ``lose``-th submission (1-based) for good,
    as a broker that lost it would."""

    def __init__(self, inner: Dispatcher, lose: int) -> None:
        self.inner, self.lose, self.submitted = inner, lose, 0

    def submit(
        self, task_name: str, payload: Payload, *, queue: str, expires_s: float | None = None
    ) -> TaskHandle:
        self.submitted += 1
        if self.submitted == self.lose:
            return _LostHandle()
        return self.inner.submit(task_name, payload, queue=queue, expires_s=expires_s)

    def close(self) -> None:
        self.inner.close()


def test_an_ingest_finishes_when_the_broker_loses_one_of_its_tasks(
    home: Path, catalog: GeneratedCatalog
) -> None:
    settings = load_settings(
        env={
            "SEARCHSVC_HOME": str(home),
            "SEARCHSVC_BATCH_SIZE": "4",
            "SEARCHSVC_EMBED_TASK_RESEND_S": "1",
        }
    )
    app = App(settings)
    try:
        losing = LosingDispatcher(app.dispatcher, lose=2)
        app._dispatcher = losing
        summary = app.ingest(catalog.root)
        total = catalog.image_count
        assert summary.images_embedded == total and summary.images_failed == 0
        # the lost batch was sent again (a slow one may have been too: no harm, the first
        # answer counts)
        assert summary.tasks_resent >= 1
        assert losing.submitted == -(-total // 4) + summary.tasks_resent
        with app.db.session() as session:
            rows = session.execute(select(Image.status, Image.point_id)).all()
        assert len(rows) == total and {status for status, _ in rows} == {ImageStatus.INDEXED}
        collection = app.index("read").resolve_alias(settings.collection_alias)
        assert collection is not None
        points = list(app.index("read").iter_point_ids(collection))
        assert len(points) == len(set(points)) == total
        assert set(points) == {point for _, point in rows}
    finally:
        app.close()
