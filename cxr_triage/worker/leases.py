"""Renewable analysis claims: a live worker keeps its in-flight instances' leases fresh.

``claim_for_analysis`` gives an instance a short lease (``CXR_ANALYSIS_LEASE_S``). One thread per worker process
renews the leases of every instance this process holds, every third of a lease, in one UPDATE. When the process
dies (kill -9, OOM killer, power), renewals stop and the reconciler re-queues its instances within a lease plus a
reconcile interval, instead of waiting for the task time limit or Redis' visibility timeout.

A hold is renewed for at most ``max_hold`` (the task time limit): an image stuck in a hung decoder or engine is
then given up to the reconciler like a dead worker's, and its attempt counter eventually quarantines it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.core.logging import get_logger
from cxr_triage.db import repo

__all__ = ["LeaseKeeper"]

log = get_logger(__name__)


class LeaseKeeper:
    def __init__(
        self,
        session_factory: sessionmaker[Session],
        *,
        lease: timedelta,
        max_hold: timedelta,
        clock: Callable[[], datetime],
        monotonic: Callable[[], float] = time.monotonic,
        background: bool = True,
    ) -> None:
        self._session_factory = session_factory
        self.lease = lease
        self._max_hold_s = max_hold.total_seconds()
        self._clock = clock
        self._monotonic = monotonic
        self._held: dict[int, float] = {}  # instance id -> monotonic time the hold began
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._background = background  # False: the caller drives renew_now() (tests with a fake clock)

    @contextmanager
    def hold(self, instance_id: int) -> Iterator[None]:
        """Keep ``instance_id``'s lease renewed while the block runs."""
        with self._lock:
            self._held[instance_id] = self._monotonic()
            if self._background and (self._thread is None or not self._thread.is_alive()):
                self._thread = threading.Thread(target=self._run, name="cxr-lease-keeper", daemon=True)
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._held.pop(instance_id, None)

    def held(self) -> list[int]:
        with self._lock:
            return sorted(self._held)

    def renew_now(self) -> int:
        """One renewal round (the thread calls this every lease/3). Returns how many rows were extended."""
        now_mono = self._monotonic()
        with self._lock:
            ids = [i for i, since in self._held.items() if now_mono - since < self._max_hold_s]
        if not ids:
            return 0
        with self._session_factory() as session:
            return repo.renew_leases(session, instance_ids=ids, until=self._clock() + self.lease)

    def _run(self) -> None:
        interval = max(self.lease.total_seconds() / 3.0, 0.5)
        while True:
            time.sleep(interval)
            with self._lock:
                if not self._held:
                    self._thread = None  # idle: the next hold() starts a new thread
                    return
            try:
                self.renew_now()
            except Exception as exc:  # database blip: the next round tries again before the lease ends
                log.warning("lease renewal failed", error=type(exc).__name__)
