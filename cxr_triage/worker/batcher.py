"""Dynamic micro-batching inside one worker process.

Each Celery task runs in its own thread (threads pool): it decodes and preprocesses its image (GIL-free codecs),
then hands the prepared tensor to this batcher and waits. One inference thread collects up to `max_batch` items
or waits at most `max_wait_ms` after the first, runs the engine once for the whole batch, and resolves each
caller's future. Each task keeps its own message and late acknowledgement, so a crash loses nothing.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")


class MicroBatcher(Generic[In, Out]):
    def __init__(self, infer: Callable[[Sequence[In]], list[Out]], *, max_batch: int, max_wait_ms: float) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._infer = infer
        self._max_batch = max_batch
        self._max_wait = max_wait_ms / 1000.0
        self._queue: queue.Queue[tuple[In, Future[Out]] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
        self._stopped = False
        self.batches_run = 0
        self.largest_batch = 0
        self._thread.start()

    def submit(self, item: In) -> Future[Out]:
        if self._stopped:
            raise RuntimeError("batcher is stopped")
        future: Future[Out] = Future()
        self._queue.put((item, future))
        return future

    def close(self) -> None:
        self._stopped = True
        self._queue.put(None)
        self._thread.join(timeout=10)

    def _collect(self) -> list[tuple[In, Future[Out]]] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self._max_wait
        while len(batch) < self._max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)
                break
            batch.append(item)
        return batch

    def _loop(self) -> None:
        while True:
            batch = self._collect()
            if batch is None:
                return
            items = [item for item, _ in batch]
            try:
                results = self._infer(items)
                if len(results) != len(items):
                    raise RuntimeError(f"engine returned {len(results)} results for {len(items)} inputs")
            except BaseException as exc:  # every waiter must hear about the failure
                for _, future in batch:
                    future.set_exception(exc)
                continue
            self.batches_run += 1
            self.largest_batch = max(self.largest_batch, len(items))
            for (_, future), result in zip(batch, results, strict=True):
                future.set_result(result)
