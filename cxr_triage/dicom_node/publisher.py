"""Publishing analysis hints off the C-STORE path: commit the row, answer the peer, then publish.

The C-STORE handler hands the committed instance id to :class:`BackgroundPublisher` (a non-blocking put into a
bounded queue) and answers at once; one thread per listener process publishes in the background. A broker that is
slow or down therefore never delays the modality's answer. Nothing is lost when a hint is not published (queue
full, broker down, process killed with hints queued): the row stays RECEIVED in the database, which is the record
of work, and the reconciler re-queues it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from cxr_triage.core.logging import get_logger

__all__ = ["BackgroundPublisher"]

LOG = get_logger(__name__)
_STOP = -1


class BackgroundPublisher:
    def __init__(self, publish: Callable[[int], None], *, maxsize: int = 10_000, name: str = "cxr-publisher") -> None:
        if maxsize < 1:
            raise ValueError("maxsize must be >= 1")
        self._publish = publish
        self._queue: queue.Queue[int] = queue.Queue(maxsize=maxsize)
        self._closed = False
        self.published = 0
        self.failed = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, instance_id: int) -> bool:
        """Hand over one id without blocking. False: not queued (full or closed); the reconciler will queue it."""
        if self._closed:
            return False
        try:
            self._queue.put_nowait(instance_id)
        except queue.Full:
            self.dropped += 1
            LOG.warning("publish_queue_full", instance_id=instance_id)
            return False
        return True

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def flush(self, timeout: float) -> bool:
        """Wait until everything handed over so far was attempted; True if it was within ``timeout``."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Stop taking ids; attempt what is queued for up to ``timeout`` seconds (the rest stays RECEIVED)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._queue.put(_STOP, timeout=timeout)
        except queue.Full:
            pass  # the thread is a daemon; whatever it did not reach is re-queued by the reconciler
        self._thread.join(timeout=timeout)

    def _run(self) -> None:
        while True:
            instance_id = self._queue.get()
            try:
                if instance_id == _STOP:
                    return
                self._publish(instance_id)
                self.published += 1
            except Exception as exc:  # observed, not reported to a peer: the row is committed already
                self.failed += 1
                LOG.warning("publish_failed", instance_id=instance_id, error=type(exc).__name__)
            finally:
                self._queue.task_done()
