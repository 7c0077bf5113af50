"""A hard task time limit for the threads pool: a task that overruns makes the worker process exit.

Celery enforces ``task_time_limit`` only in the prefork pool (the parent kills the child). The threads pool, which
the analyze queue needs so that concurrent tasks share micro-batches, ignores it: a hung decode or a stuck lock
would hold a slot forever, and late acknowledgement, the visibility timeout and the renewable leases would
protect nothing, because the process stays alive and keeps its messages.

So each worker process runs one watchdog thread. Celery's ``task_prerun``/``task_postrun`` signals (sent in the
thread that runs the task) register and unregister each task; when one has run longer than the limit, the
process exits hard with :data:`EXIT_TASK_TIME_LIMIT`, as prefork's hard limit kills its child. Its unacknowledged
messages are redelivered by Redis, its leases stop being renewed so the reconciler re-queues its images, the
attempt counter (committed before inference) quarantines an image that hangs every time, and the supervisor
(``cxr-triage up``) or systemd (``Restart=always``) starts a fresh worker.

A hard exit, not an exception: Python cannot interrupt a thread blocked in C code (a codec, a socket, a lock).
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cxr_triage.core.logging import get_logger

__all__ = ["EXIT_TASK_TIME_LIMIT", "Overrun", "TaskWatchdog", "install_watchdog", "uninstall_watchdog", "exit_process"]

log = get_logger(__name__)

# EX_TEMPFAIL (sysexits.h): "try again later", which is what a restart does. Distinct from Celery's own codes
# (0, 1) and from the CLI's configuration (2) and database (3) exits.
EXIT_TASK_TIME_LIMIT = 75


@dataclass(frozen=True)
class Overrun:
    """A task past its limit. Only the task's name and Celery id: never its arguments."""

    task_id: str
    task_name: str
    elapsed_s: float


class TaskWatchdog:
    """Tracks running tasks; calls ``on_expire`` (default: :func:`exit_process`) for the first one over the limit."""

    def __init__(
        self,
        limit_s: float,
        *,
        on_expire: Callable[[Overrun], None] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        interval_s: float | None = None,
    ) -> None:
        if limit_s <= 0:
            raise ValueError("limit_s must be positive")
        self.limit_s = float(limit_s)
        self._on_expire = on_expire or exit_process
        self._monotonic = monotonic
        # Checked often enough that an overrun is noticed within ~5 % of the limit (at most every second).
        self._interval = interval_s if interval_s is not None else min(max(self.limit_s / 20.0, 0.05), 1.0)
        self._running: dict[tuple[str, int], tuple[str, float]] = {}  # (task id, thread) -> (name, start)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired: Overrun | None = None

    # -- registration (called from the task's own thread) ------------------------------------------------
    def started(self, task_id: str, task_name: str) -> None:
        with self._lock:
            self._running[(task_id, threading.get_ident())] = (task_name, self._monotonic())

    def finished(self, task_id: str) -> None:
        with self._lock:
            self._running.pop((task_id, threading.get_ident()), None)

    def running(self) -> int:
        with self._lock:
            return len(self._running)

    # -- checking --------------------------------------------------------------------------------------
    def overdue(self) -> list[Overrun]:
        now = self._monotonic()
        with self._lock:
            items = list(self._running.items())
        return [
            Overrun(task_id=task_id, task_name=name, elapsed_s=now - since)
            for (task_id, _), (name, since) in items
            if now - since > self.limit_s
        ]

    def check_now(self) -> Overrun | None:
        """One check; fires at most once per watchdog (the default action does not return)."""
        if self.fired is not None:
            return None
        late = self.overdue()
        if not late:
            return None
        worst = max(late, key=lambda o: o.elapsed_s)
        self.fired = worst
        self._on_expire(worst)
        return worst

    def start(self) -> "TaskWatchdog":
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="cxr-task-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.check_now()
            except Exception as exc:  # a bug in on_expire must not silently end the watching
                log.error("watchdog check failed", error=type(exc).__name__)


def exit_process(overrun: Overrun) -> None:
    """The default action: log (no PHI: task name and Celery id), stop child processes, exit hard."""
    log.critical(
        "task exceeded the hard time limit; worker exits for a restart",
        task=overrun.task_name,
        task_id=overrun.task_id,
        elapsed_s=round(overrun.elapsed_s, 1),
        exit_code=EXIT_TASK_TIME_LIMIT,
    )
    # The embedded beat (`work --beat`) is a multiprocessing child: os._exit skips the atexit hook that would
    # stop it, and an orphaned beat would keep scheduling next to the restarted worker's own.
    for child in multiprocessing.active_children():
        try:
            child.terminate()
            child.join(timeout=3)
            if child.is_alive():
                child.kill()
        except Exception:  # exiting anyway
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
    os._exit(EXIT_TASK_TIME_LIMIT)


def install_watchdog(app: Any, *, limit_s: float, on_expire: Callable[[Overrun], None] | None = None) -> TaskWatchdog:
    """Watch every task of ``app`` run in this process (Celery signals), and start the watchdog thread."""
    from celery.signals import task_postrun, task_prerun

    watchdog = TaskWatchdog(limit_s, on_expire=on_expire)

    def _ours(sender: Any) -> bool:
        return getattr(sender, "app", None) is app

    def _prerun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        if task_id is not None and _ours(sender):
            watchdog.started(task_id, str(getattr(sender, "name", "?")))

    def _postrun(sender: Any = None, task_id: str | None = None, **_: Any) -> None:
        if task_id is not None and _ours(sender):
            watchdog.finished(task_id)

    # weak=False: the closures live only in the signal's receiver list.
    task_prerun.connect(_prerun, weak=False)
    task_postrun.connect(_postrun, weak=False)
    watchdog._receivers = (_prerun, _postrun)  # type: ignore[attr-defined]  # for uninstall_watchdog
    return watchdog.start()


def uninstall_watchdog(watchdog: TaskWatchdog) -> None:
    from celery.signals import task_postrun, task_prerun

    receivers = getattr(watchdog, "_receivers", None)
    if receivers:
        task_prerun.disconnect(receivers[0])
        task_postrun.disconnect(receivers[1])
    watchdog.stop()
