"""The cross-request micro-batcher: one forward for requests that wait together."""

from __future__ import annotations

import threading
import time

import pytest

from searchsvc.models.batcher import MicroBatcher


def test_each_caller_gets_its_own_slice_in_order() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: [i * 10 for i in items])
    try:
        assert batcher.run([1, 2, 3]) == [10, 20, 30]
        assert batcher.run([]) == []
    finally:
        batcher.close()


def test_requests_waiting_during_a_forward_share_the_next_one() -> None:
    calls: list[list[int]] = []
    gate = threading.Event()

    def slow(items: list[int]) -> list[int]:
        calls.append(list(items))
        gate.wait(5)
        return [-i for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(slow, max_items=100, max_wait_s=0)
    try:
        first = batcher.submit([0])
        time.sleep(0.1)  # the first forward is running; the next requests queue up
        later = [batcher.submit([n, n + 100]) for n in range(1, 6)]
        gate.set()
        assert first.result(5) == [0]
        assert [f.result(5) for f in later] == [[-n, -(n + 100)] for n in range(1, 6)]
        assert len(calls) == 2 and sorted(calls[1]) == sorted(
            [v for n in range(1, 6) for v in (n, n + 100)]
        )
        assert batcher.batches_run == 2
    finally:
        batcher.close()


def test_batches_never_exceed_max_items_nor_split_a_request() -> None:
    sizes: list[int] = []
    gate = threading.Event()

    def record(items: list[int]) -> list[int]:
        gate.wait(5)
        sizes.append(len(items))
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(record, max_items=6, max_wait_s=0)
    try:
        futures = [batcher.submit(list(range(4))) for _ in range(5)]
        gate.set()
        assert all(f.result(5) == [0, 1, 2, 3] for f in futures)
        assert max(sizes) <= 6 and sum(sizes) == 20
    finally:
        batcher.close()


def test_a_failing_forward_fails_every_request_in_it_and_the_next_works() -> None:
    def flaky(items: list[int]) -> list[int]:
        if 13 in items:
            raise RuntimeError("bad pair")
        return items

    batcher: MicroBatcher[int, int] = MicroBatcher(flaky)
    try:
        with pytest.raises(RuntimeError, match="bad pair"):
            batcher.run([13])
        assert batcher.run([1]) == [1]
    finally:
        batcher.close()


def test_wrong_output_length_is_an_error_not_a_misaligned_result() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda items: items[:-1])
    try:
        with pytest.raises(RuntimeError, match="gave 1 for 2"):
            batcher.run([1, 2])
    finally:
        batcher.close()
