"""Batching across requests: several callers' work in one forward pass.

A rerank request scores top_n pairs (5 by default), too few to fill a GPU. When several
requests wait at once, a :class:`MicroBatcher` hands them to one call of the batch function
(bounded by ``max_items`` and ``max_wait_s``), then gives each caller its own slice.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

Item = TypeVar("Item")
Out = TypeVar("Out")


@dataclass
class _Request(Generic[Item, Out]):
    items: Sequence[Item]
    future: Future[list[Out]]


class MicroBatcher(Generic[Item, Out]):
    """Collects requests for at most ``max_wait_s`` or until ``max_items`` wait, then runs
    ``batch_fn`` once on all their items (one request is never split)."""

    def __init__(
        self,
        batch_fn: Callable[[list[Item]], Sequence[Out]],
        *,
        max_items: int = 256,
        max_wait_s: float = 0.005,
    ) -> None:
        if max_items < 1 or max_wait_s < 0:
            raise ValueError("max_items must be >= 1 and max_wait_s >= 0")
        self._batch_fn = batch_fn
        self._max_items = max_items
        self._max_wait_s = max_wait_s
        self._lock = threading.Condition()
        self._queue: list[_Request[Item, Out]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._thread.start()
        self.batches_run = 0  # for tests and metrics

    def submit(self, items: Sequence[Item]) -> Future[list[Out]]:
        future: Future[list[Out]] = Future()
        if not items:
            future.set_result([])
            return future
        with self._lock:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.append(_Request(items, future))
            self._lock.notify()
        return future

    def run(self, items: Sequence[Item], timeout: float | None = None) -> list[Out]:
        return self.submit(items).result(timeout=timeout)

    def _take_batch(self) -> list[_Request[Item, Out]] | None:
        with self._lock:
            while not self._queue and not self._closed:
                self._lock.wait()
            if self._closed and not self._queue:
                return None
            # The first request is here: wait a little for others to join it.
            deadline = time.monotonic() + self._max_wait_s
            while sum(len(r.items) for r in self._queue) < self._max_items:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed:
                    break
                self._lock.wait(remaining)
            batch: list[_Request[Item, Out]] = []
            size = 0
            while self._queue and (
                not batch or size + len(self._queue[0].items) <= self._max_items
            ):
                request = self._queue.pop(0)
                batch.append(request)
                size += len(request.items)
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            # A caller that stopped waiting (its deadline passed) cancelled its request.
            batch = [r for r in batch if r.future.set_running_or_notify_cancel()]
            if not batch:
                continue
            items = [item for request in batch for item in request.items]
            try:
                outputs = list(self._batch_fn(items))
                if len(outputs) != len(items):
                    raise RuntimeError(f"batch function gave {len(outputs)} for {len(items)}")
            except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the error
                for request in batch:
                    request.future.set_exception(exc)
                continue
            self.batches_run += 1
            start = 0
            for request in batch:
                end = start + len(request.items)
                request.future.set_result(outputs[start:end])
                start = end

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        self._thread.join(timeout=5)
