"""The one embed pipeline: embed requests kept in flight, sent again when lost, results
handed back as they come. Ingest and the re-embedding of a promotion both run on it and
keep only their own bookkeeping (the handlers they pass in).

Memory is bounded by ``in_flight`` requests of one batch each, never by the catalog.
"""

from __future__ import annotations

import collections
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from searchsvc.core.errors import BrokerError, SearchsvcError
from searchsvc.index import IndexPoint, VectorIndex, point_id_for
from searchsvc.jobs.dispatch import Dispatcher, Payload, TaskHandle, result_with_resends
from searchsvc.jobs.wire import (
    EMBED_QUEUE,
    EMBED_TASK,
    EmbedItem,
    EmbedRequest,
    EmbedResponse,
    decode_vector,
)

Tag = TypeVar("Tag")
"""What a caller keeps with each request (ingest: the points its images replace)."""


class EmbedTimeout(SearchsvcError):
    """No embed worker finished a task in time; what it names is left for a re-run."""


@dataclass
class _InFlight(Generic[Tag]):
    handle: TaskHandle
    request: EmbedRequest
    payload: Payload
    tag: Tag


ResultHandler = Callable[[EmbedRequest, Tag, EmbedResponse], None]
FailureHandler = Callable[[EmbedRequest, Tag, SearchsvcError], None]


class EmbedPipeline(Generic[Tag]):
    """Submit embed requests with :meth:`submit` (it waits while ``in_flight`` are out),
    then :meth:`drain`. Each finished request goes to ``on_result``; a task that ran and
    failed as a whole (not one image: those are per-item errors in its result) goes to
    ``on_failure``. A task without a result after ``resend_after_s`` that no worker has
    started (or that ran past ``task_time_limit_s``) is sent again
    (:func:`result_with_resends`), and expires after ``timeout_s``; past ``timeout_s`` an
    :class:`EmbedTimeout` ends the run, its message ending with ``unfinished`` (what
    happens to the work not done). A broker that fails is never a per-task failure:
    :class:`BrokerError` propagates."""

    def __init__(
        self,
        dispatcher: Dispatcher,
        *,
        in_flight: int,
        timeout_s: float,
        resend_after_s: float,
        on_result: ResultHandler[Tag],
        on_failure: FailureHandler[Tag],
        on_resend: Callable[[], None] | None = None,
        unfinished: str = "",
        task_time_limit_s: float = math.inf,
    ) -> None:
        if in_flight < 1:
            raise ValueError(f"in_flight must be at least 1, got {in_flight}")
        self._dispatcher = dispatcher
        self._in_flight = in_flight
        self._timeout_s = timeout_s
        self._resend_after_s = resend_after_s
        self._on_result = on_result
        self._on_failure = on_failure
        self._on_resend = on_resend
        self._unfinished = unfinished
        # A copy a worker still runs this long after it started lost its worker: the task
        # stops itself at its time limit (every pool), a prefork pool kills it 60 s later.
        self._started_limit_s = task_time_limit_s + 60.0
        self._pending: collections.deque[_InFlight[Tag]] = collections.deque()

    def submit(self, request: EmbedRequest, tag: Tag) -> None:
        payload = request.to_json()
        handle = self._send(payload)
        self._pending.append(_InFlight(handle, request, payload, tag))
        while len(self._pending) >= self._in_flight:
            self._collect_one()

    def drain(self) -> None:
        while self._pending:
            self._collect_one()

    def _send(self, payload: Payload) -> TaskHandle:
        # Not started by the time this run stops waiting: dropped, not run for nobody.
        return self._dispatcher.submit(
            EMBED_TASK, payload, queue=EMBED_QUEUE, expires_s=self._timeout_s
        )

    def _collect_one(self) -> None:
        """The first request that has finished, else the oldest (waiting, with resends)."""
        finished = next((p for p in self._pending if p.handle.ready()), None)
        entry = finished if finished is not None else self._pending[0]
        self._pending.remove(entry)

        def resent(_copy: int) -> None:
            if self._on_resend is not None:
                self._on_resend()

        try:
            response = EmbedResponse.from_json(
                result_with_resends(
                    entry.handle,
                    lambda: self._send(entry.payload),
                    timeout_s=self._timeout_s,
                    resend_after_s=self._resend_after_s,
                    on_resend=resent,
                    started_limit_s=self._started_limit_s,
                )
            )
        except TimeoutError:
            raise EmbedTimeout(
                f"no embed worker finished a task within {self._timeout_s:g} s (are workers "
                f"running on the '{EMBED_QUEUE}' queue?)"
                + (f"; {self._unfinished}" if self._unfinished else "")
            ) from None
        except BrokerError:
            raise
        except SearchsvcError as exc:
            self._on_failure(entry.request, entry.tag, exc)
            return
        self._on_result(entry.request, entry.tag, response)


def points_of(items: Sequence[EmbedItem], response: EmbedResponse) -> list[IndexPoint]:
    """The index points of a response's embedded images (none when the worker wrote them)."""
    if response.indexed_by_worker:
        return []
    by_id = {item.image_id: item for item in items}
    points = []
    for result in response.results:
        if result.error is not None or result.vector_b64 is None:
            continue
        item = by_id[result.image_id]
        points.append(
            IndexPoint(
                point_id=point_id_for(item.product_id, item.content_hash),
                vector=decode_vector(result.vector_b64),
                product_id=item.product_id,
                image_id=item.image_id,
                category=item.category,
            )
        )
    return points


def write_points(
    index: VectorIndex | None,
    collection: str,
    items: Sequence[EmbedItem],
    response: EmbedResponse,
    *,
    stale: Sequence[str] = (),
) -> None:
    """The one path by which a caller writes a response's points: upsert what the response
    embedded, then delete ``stale`` points (the ones the new content replaces)."""
    points = points_of(items, response)
    if index is None:
        if points:
            raise SearchsvcError("embed results came back with vectors and no index to write")
        return
    if points:
        index.upsert(collection, points)
    if stale:
        index.delete(collection, list(stale))
