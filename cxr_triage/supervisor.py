"""`cxr-triage up`: the whole service in one supervised process tree on embedded defaults.

bundled Redis (AOF) + SQLite (WAL) + listener + analyze worker + deliver worker with beat + web UI.
Each part is a child process running the same `cxr-triage` sub-command a production deployment runs
separately; a child that dies is restarted with backoff; Ctrl-C (or SIGTERM) stops all of them cleanly.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from cxr_triage.bundled_redis import BundledRedis
from cxr_triage.core.settings import Settings
from cxr_triage.worker.watchdog import EXIT_TASK_TIME_LIMIT


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    history: list[int] = field(default_factory=list)


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cxr_triage", *args]


def children_for(settings: Settings) -> list[Child]:
    return [
        Child("listener", _cli("listen")),
        Child("worker-analyze", _cli("work", "--queues", "analyze")),
        Child("worker-deliver", _cli("work", "--queues", "deliver", "--beat")),
        Child("api", _cli("api")),
    ]


def supervise(
    children: list[Child],
    *,
    env: dict[str, str],
    should_stop: Callable[[], bool],
    echo: Callable[[str], object] = print,
    poll_s: float = 0.2,
) -> None:
    """Run the children until ``should_stop()``; restart any that exits, whatever its code, with backoff.

    Every exit is restarted: a worker whose task overran the hard time limit exits on purpose
    (:data:`cxr_triage.worker.watchdog.EXIT_TASK_TIME_LIMIT`) and relies on this, like a crash does. On the way
    out every child gets SIGTERM, then SIGKILL after 20 s.
    """
    try:
        while not should_stop():
            now = time.monotonic()
            for child in children:
                if child.process is not None and child.process.poll() is not None:
                    code = child.process.returncode
                    child.history.append(code)
                    child.process = None
                    backoff = min(30.0, 2 ** min(child.restarts, 5))
                    child.next_start = now + backoff
                    child.restarts += 1
                    why = " (task over the hard time limit)" if code == EXIT_TASK_TIME_LIMIT else ""
                    echo(f"{child.name} exited with {code}{why}; restarting in {backoff:.0f} s")
                if child.process is None and now >= child.next_start:
                    child.process = subprocess.Popen(child.argv, env=env, stdin=subprocess.DEVNULL)
                    child.started_at = now
                    echo(f"{child.name} started (pid {child.process.pid})")
                elif child.process is not None and now - child.started_at > 60:
                    child.restarts = 0  # ran long enough: reset the backoff
            time.sleep(poll_s)
    finally:
        echo("stopping ...")
        for child in children:
            if child.process is not None and child.process.poll() is None:
                child.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait()


def run_up(settings: Settings, *, echo: Callable[[str], object] = print) -> int:
    env = dict(os.environ)
    env["CXR_DATA_DIR"] = str(settings.data_dir.resolve())
    redis_server: BundledRedis | None = None
    if settings.bundled_redis:
        redis_server = BundledRedis(settings.redis_dir, socket_path=settings.bundled_redis_socket)
        redis_server.start()
        env["CXR_REDIS_URL"] = redis_server.url
        echo(f"broker    bundled Redis (AOF) at {redis_server.socket_path}")
    else:
        echo("broker    external Redis (CXR_REDIS_URL)")
    echo(f"database  {'SQLite (WAL) in ' + str(settings.data_dir) if settings.database_url is None else 'CXR_DATABASE_URL'}")
    echo(f"dicom     AE {settings.ae_title} listening on {settings.dicom_host}:{settings.dicom_port}")
    echo(f"results   {', '.join(str(d) for d in settings.pacs) or 'no PACS configured (CXR_PACS): SRs are kept in ' + str(settings.sr_dir)}")
    echo(f"web UI    http://{settings.api_host}:{settings.api_port}/")
    if settings.demo_models:
        echo("models    CXR_DEMO_MODELS=1: UNTRAINED DEMO MODEL weights - results are not clinically meaningful")

    stopping = False

    def _stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        supervise(children_for(settings), env=env, should_stop=lambda: stopping, echo=echo)
    finally:
        if redis_server is not None:
            redis_server.stop()
        echo("stopped")
    return 0
