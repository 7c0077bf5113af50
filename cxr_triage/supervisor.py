"""`cxr-triage up`: the whole service in one supervised process tree on embedded defaults.

bundled Redis (AOF) + SQLite (WAL) + listener + analyze worker + deliver worker with beat + web UI.
Each part is a child process running the same `cxr-triage` sub-command a production deployment runs
separately; a child that dies is restarted with backoff, and so is the bundled Redis; Ctrl-C (or SIGTERM) stops
all of them cleanly.
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


BACKOFF_CAP_S = 30.0


@dataclass
class Child:
    name: str
    argv: list[str]
    process: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    history: list[int] = field(default_factory=list)


@dataclass
class Broker:
    """The bundled redis-server under supervision: restarted on the same socket and AOF directory, so the
    children's URL stays valid and the tasks it had queued (persisted in the AOF) survive its death."""

    server: BundledRedis
    restarts: int = 0
    started_at: float = 0.0
    next_start: float = 0.0
    history: list[int] = field(default_factory=list)


def _backoff(restarts: int) -> float:
    # 1, 2, 4 ... 30 s: a part that crashes at once must not spin, one that crashed once comes back quickly.
    return min(BACKOFF_CAP_S, 2.0 ** min(restarts, 5))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "cxr_triage", *args]


def children_for(settings: Settings) -> list[Child]:
    return [
        Child("listener", _cli("listen")),
        Child("worker-analyze", _cli("work", "--queues", "analyze")),
        Child("worker-deliver", _cli("work", "--queues", "deliver", "--beat")),
        Child("api", _cli("api")),
    ]


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    """Signal the child's whole process group (it leads its own: started with a new session).

    A `work --beat` child runs beat in a grandchild; signalling only the child's pid would leave that grandchild
    orphaned when the child dies, and its replacement would start a second beat (two ticks, two reconcilers).
    """
    try:
        os.killpg(process.pid, sig)  # the group id is the leader's pid, valid while any member lives
    except ProcessLookupError:
        pass  # the group is empty already


def _supervise_broker(broker: Broker, now: float, echo: Callable[[str], object]) -> None:
    process = broker.server.process
    if process is not None and process.poll() is not None:
        broker.history.append(process.returncode)
        broker.server.process = None
        backoff = _backoff(broker.restarts)
        broker.next_start = now + backoff
        broker.restarts += 1
        echo(f"bundled Redis exited with {process.returncode}; restarting in {backoff:.0f} s")
    if broker.server.process is None and now >= broker.next_start:
        try:
            broker.server.start()  # same socket, same AOF dir: blocks until it answers PING (AOF loaded)
        except (OSError, RuntimeError, TimeoutError) as exc:
            broker.server.stop()  # one that never answered must not linger holding the socket
            broker.server.process = None
            backoff = _backoff(broker.restarts)
            broker.next_start = time.monotonic() + backoff
            broker.restarts += 1
            echo(f"bundled Redis did not start ({exc}); retrying in {backoff:.0f} s")
            return
        broker.started_at = time.monotonic()
        echo(f"bundled Redis started (pid {broker.server.process.pid if broker.server.process else '?'})")
    elif broker.server.process is not None and now - broker.started_at > 60:
        broker.restarts = 0  # ran long enough: reset the backoff


def supervise(
    children: list[Child],
    *,
    env: dict[str, str],
    should_stop: Callable[[], bool],
    echo: Callable[[str], object] = print,
    poll_s: float = 0.2,
    broker: Broker | None = None,
) -> None:
    """Run the children (and the bundled broker, if given) until ``should_stop()``; restart any that exits,
    whatever its code, with backoff.

    Every exit is restarted: a worker whose task overran the hard time limit exits on purpose
    (:data:`cxr_triage.worker.watchdog.EXIT_TASK_TIME_LIMIT`) and relies on this, like a crash does. Each child
    leads its own process group; when it exits, what is left of its group is killed before the replacement
    starts. On the way out every group gets SIGTERM, then SIGKILL after 20 s. The broker, which is started
    before ``supervise`` and only restarted here, is left running for the caller to stop after the children.
    """
    try:
        while not should_stop():
            now = time.monotonic()
            if broker is not None:
                _supervise_broker(broker, now, echo)
                now = time.monotonic()  # a broker restart may have taken a while
            for child in children:
                if child.process is not None and child.process.poll() is not None:
                    code = child.process.returncode
                    _signal_group(child.process, signal.SIGKILL)  # orphans of a dead child (its beat)
                    child.history.append(code)
                    child.process = None
                    backoff = _backoff(child.restarts)
                    child.next_start = now + backoff
                    child.restarts += 1
                    why = " (task over the hard time limit)" if code == EXIT_TASK_TIME_LIMIT else ""
                    echo(f"{child.name} exited with {code}{why}; restarting in {backoff:.0f} s")
                if child.process is None and now >= child.next_start:
                    # A new session makes the child a group leader (so its group can be signalled as one) and
                    # keeps the terminal's Ctrl-C to us alone: we stop the children in order, once.
                    child.process = subprocess.Popen(child.argv, env=env, stdin=subprocess.DEVNULL,
                                                     start_new_session=True)
                    child.started_at = now
                    echo(f"{child.name} started (pid {child.process.pid})")
                elif child.process is not None and now - child.started_at > 60:
                    child.restarts = 0  # ran long enough: reset the backoff
            time.sleep(poll_s)
    finally:
        echo("stopping ...")
        for child in children:
            if child.process is not None and child.process.poll() is None:
                _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + 20
        for child in children:
            if child.process is None:
                continue
            try:
                child.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                pass
            # Leader gone or not: nothing of its group may outlive us.
            _signal_group(child.process, signal.SIGKILL)
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
        supervise(children_for(settings), env=env, should_stop=lambda: stopping, echo=echo,
                  broker=Broker(redis_server) if redis_server is not None else None)
    finally:
        if redis_server is not None:
            redis_server.stop()
        echo("stopped")
    return 0
