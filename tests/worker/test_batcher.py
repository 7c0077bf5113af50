from __future__ import annotations

import threading
from collections.abc import Sequence

import pytest

from cxr_triage.worker.batcher import MicroBatcher


def test_groups_concurrent_submissions_into_batches() -> None:
    seen: list[int] = []
    gate = threading.Event()

    def infer(items: Sequence[int]) -> list[int]:
        gate.wait(5)
        seen.append(len(items))
        return [i * 10 for i in items]

    batcher: MicroBatcher[int, int] = MicroBatcher(infer, max_batch=4, max_wait_ms=200)
    futures = [batcher.submit(i) for i in range(10)]
    gate.set()
    assert [f.result(timeout=10) for f in futures] == [i * 10 for i in range(10)]
    assert max(seen) == 4 and sum(seen) == 10
    assert batcher.largest_batch == 4
    batcher.close()


def test_lone_item_is_not_held_past_the_wait() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda xs: list(xs), max_batch=8, max_wait_ms=20)
    assert batcher.submit(7).result(timeout=2) == 7
    batcher.close()


def test_engine_failure_reaches_every_waiter_and_batcher_survives() -> None:
    calls = {"n": 0}

    def infer(items: Sequence[int]) -> list[int]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise MemoryError("engine out of memory")
        return list(items)

    batcher: MicroBatcher[int, int] = MicroBatcher(infer, max_batch=2, max_wait_ms=100)
    f1, f2 = batcher.submit(1), batcher.submit(2)
    with pytest.raises(MemoryError):
        f1.result(timeout=5)
    with pytest.raises(MemoryError):
        f2.result(timeout=5)
    assert batcher.submit(3).result(timeout=5) == 3
    batcher.close()


def test_wrong_result_count_is_an_error() -> None:
    batcher: MicroBatcher[int, int] = MicroBatcher(lambda xs: [], max_batch=2, max_wait_ms=10)
    with pytest.raises(RuntimeError, match="0 results for 1"):
        batcher.submit(1).result(timeout=5)
    batcher.close()
