"""The hard time limit of the threads pool: the watchdog with real threads and real Celery signals, a real process
that exits with the watchdog's code, and the supervisor restarting a child that exits."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
from celery import Celery

from cxr_triage.supervisor import Child, supervise
from cxr_triage.worker.watchdog import (
    EXIT_TASK_TIME_LIMIT,
    Overrun,
    TaskWatchdog,
    install_watchdog,
    uninstall_watchdog,
)


class _Fired:
    def __init__(self) -> None:
        self.overruns: list[Overrun] = []
        self.event = threading.Event()

    def __call__(self, overrun: Overrun) -> None:
        self.overruns.append(overrun)
        self.event.set()


def _run_as_task(watchdog: TaskWatchdog, task_id: str, seconds: float) -> threading.Thread:
    def body() -> None:
        watchdog.started(task_id, "cxr.analyze")
        try:
            time.sleep(seconds)
        finally:
            watchdog.finished(task_id)

    thread = threading.Thread(target=body)
    thread.start()
    return thread


def test_a_task_over_the_limit_fires_once_and_quick_ones_never() -> None:
    fired = _Fired()
    watchdog = TaskWatchdog(0.3, on_expire=fired, interval_s=0.02).start()
    try:
        quick = [_run_as_task(watchdog, f"quick-{n}", 0.05) for n in range(4)]
        for t in quick:
            t.join()
        time.sleep(0.4)
        assert fired.overruns == [] and watchdog.running() == 0
        hung = _run_as_task(watchdog, "hung-1", 1.0)
        assert fired.event.wait(2.0), "the watchdog did not fire for a task past its limit"
        hung.join()
        time.sleep(0.2)
    finally:
        watchdog.stop()
    (overrun,) = fired.overruns  # fired once, although the task stayed over the limit for a while
    assert overrun.task_id == "hung-1" and overrun.task_name == "cxr.analyze"
    assert 0.3 < overrun.elapsed_s < 1.0


def test_celery_signals_register_and_unregister_tasks() -> None:
    app = Celery("watchdog-test", broker="memory://")
    release = threading.Event()

    @app.task(name="test.block")
    def block() -> str:
        release.wait(5)
        return "done"

    @app.task(name="test.quick")
    def quick() -> str:
        return "done"

    fired = _Fired()
    watchdog = install_watchdog(app, limit_s=0.3, on_expire=fired)
    try:
        assert quick.apply().get() == "done"
        assert watchdog.running() == 0 and fired.overruns == []
        runner = threading.Thread(target=lambda: block.apply())
        runner.start()
        assert fired.event.wait(3.0), "a blocked Celery task was not noticed"
        assert fired.overruns[0].task_name == "test.block"
        release.set()
        runner.join(5)
        assert watchdog.running() == 0
    finally:
        release.set()
        uninstall_watchdog(watchdog)


HANGING_WORKER = textwrap.dedent(
    """
    import threading
    from celery import Celery
    from cxr_triage.core.logging import configure_logging
    from cxr_triage.worker.watchdog import install_watchdog

    configure_logging()
    app = Celery("hang", broker="memory://")

    @app.task(name="cxr.analyze")
    def analyze(*, instance_id):
        threading.Event().wait()  # a decode that never returns

    install_watchdog(app, limit_s=0.5)
    analyze.apply(kwargs={"instance_id": 424242})
    print("NOT REACHED")
    """
)


def test_a_hung_task_makes_the_process_exit_with_the_watchdog_code(tmp_path: Path) -> None:
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", HANGING_WORKER], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - started
    assert proc.returncode == EXIT_TASK_TIME_LIMIT, proc.stderr
    assert "NOT REACHED" not in proc.stdout
    assert "hard time limit" in proc.stderr and "cxr.analyze" in proc.stderr
    assert "424242" not in proc.stderr + proc.stdout  # task arguments are never logged
    assert elapsed < 30


def test_supervisor_restarts_a_child_that_exits() -> None:
    flaky = Child("worker-analyze", [sys.executable, "-c", f"import os; os._exit({EXIT_TASK_TIME_LIMIT})"])
    lines: list[str] = []
    deadline = time.monotonic() + 30
    supervise(
        [flaky], env={}, echo=lines.append, poll_s=0.05,
        should_stop=lambda: len(flaky.history) >= 2 or time.monotonic() > deadline,
    )
    assert flaky.history[:2] == [EXIT_TASK_TIME_LIMIT, EXIT_TASK_TIME_LIMIT]
    assert sum("worker-analyze started" in line for line in lines) >= 2
    assert any("hard time limit" in line for line in lines)


@pytest.mark.parametrize("limit", [0, -1])
def test_limit_must_be_positive(limit: float) -> None:
    with pytest.raises(ValueError):
        TaskWatchdog(limit)
