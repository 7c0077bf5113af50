"""The `up` supervisor with real processes: a SIGKILLed bundled redis-server comes back on the same socket with
its queued tasks, and a dead child's grandchildren (a worker's embedded beat) die with it instead of lingering."""

from __future__ import annotations

import json
import os
import signal
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from cxr_triage.bundled_redis import BundledRedis
from cxr_triage.core.settings import Settings
from cxr_triage.supervisor import Broker, Child, supervise
from cxr_triage.worker.celery_app import ANALYZE_QUEUE, make_celery


def _wait(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _alive(pid: int) -> bool:
    """Running, not a zombie: an orphan reparented to a PID 1 that never reaps stays in the table as Z."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


class _Supervisor:
    """supervise() on a thread, as `up` runs it on its main thread; stopped and joined on exit."""

    def __init__(self, children: list[Child], broker: Broker | None = None) -> None:
        self.lines: list[str] = []
        self.stop = threading.Event()
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, args=(children, broker), daemon=True)

    def _run(self, children: list[Child], broker: Broker | None) -> None:
        try:
            supervise(children, env=dict(os.environ), should_stop=self.stop.is_set, echo=self.lines.append,
                      poll_s=0.05, broker=broker)
        except BaseException as exc:  # surfaced by the test, not lost on the thread
            self.errors.append(exc)

    def __enter__(self) -> _Supervisor:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive(), "supervise did not return"
        assert self.errors == []


@pytest.fixture
def server(tmp_path: Path) -> Iterator[BundledRedis]:
    with BundledRedis(tmp_path / "redis") as srv:
        yield srv


def test_a_sigkilled_bundled_redis_is_restarted_with_its_queue_and_takes_new_work(
    tmp_path: Path, server: BundledRedis,
) -> None:
    settings = Settings(data_dir=tmp_path, redis_url=server.url, _env_file=None)  # type: ignore[call-arg]
    app = make_celery(settings)  # the children's client: same URL before and after the restart
    try:
        with app.connection_for_write() as conn:  # declare and bind the queues, as a worker does at start
            for q in app.amqp.queues.values():
                q.bind(conn.default_channel).declare()
        app.cxr_publish_analyze(1)  # type: ignore[attr-defined]
        broker = Broker(server)
        assert server.process is not None
        first_pid = server.process.pid
        with _Supervisor([], broker) as sup:
            os.kill(first_pid, signal.SIGKILL)  # no AOF flush on the way out: only what reached the kernel

            def answers_again() -> bool:
                proc = server.process
                if proc is None or proc.pid == first_pid:
                    return False
                try:
                    return bool(redis.Redis(unix_socket_path=str(server.socket_path), socket_timeout=1).ping())
                except (redis.exceptions.ConnectionError, FileNotFoundError):
                    return False

            _wait(answers_again, 30, "the restarted redis-server to answer PING on the same socket")
            assert broker.history == [-signal.SIGKILL]
            assert any("bundled Redis exited with -9" in line for line in sup.lines), sup.lines

            # The existing client reconnects and publishes; both messages are then consumed from the queue.
            app.cxr_publish_analyze(2)  # type: ignore[attr-defined]
            consumed: list[dict[str, object]] = []
            with app.connection_for_read() as conn:
                queue = conn.SimpleQueue(ANALYZE_QUEUE)
                for _ in range(2):
                    message = queue.get(timeout=10)
                    consumed.append({"task": message.headers["task"], "kwargs": _kwargs(message.body)})
                    message.ack()
                queue.close()
            assert consumed == [{"task": "cxr.analyze", "kwargs": {"instance_id": n}} for n in (1, 2)], consumed
    finally:
        app.close()


def _kwargs(body: object) -> object:
    """Celery protocol 2 body: (args, kwargs, embed), JSON-encoded."""
    decoded = json.loads(body) if isinstance(body, (str, bytes)) else body
    return decoded[1]  # type: ignore[index]


def test_broker_restarts_back_off_and_stop_leaves_the_broker_to_the_caller(server: BundledRedis) -> None:
    broker = Broker(server)
    with _Supervisor([], broker):
        for n in range(2):
            assert server.process is not None
            pid = server.process.pid
            os.kill(pid, signal.SIGKILL)
            started = time.monotonic()
            _wait(lambda: server.process is not None and server.process.pid != pid
                  and server.process.poll() is None, 30, f"restart {n + 1}")
            # First restart after 1 s, the second after 2 s: a redis that dies at once does not spin.
            assert time.monotonic() - started >= 0.9 * (2**n)
    assert broker.restarts == 2
    assert server.process is not None and server.process.poll() is None  # run_up stops it after the children


GRANDPARENT = textwrap.dedent("""
    import subprocess, sys, time
    # Like celery -B: the beat runs in a child of the worker's main process.
    beat = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    open(sys.argv[1], "a").write(f"{beat.pid}\\n")
    time.sleep(600)
""")


def test_a_killed_childs_grandchild_dies_with_it_and_stop_kills_the_group(tmp_path: Path) -> None:
    pids = tmp_path / "beat-pids"
    child = Child("worker-deliver", [sys.executable, "-c", GRANDPARENT, str(pids)])

    def beats() -> list[int]:
        return [int(p) for p in pids.read_text().split()] if pids.exists() else []

    with _Supervisor([child]):
        _wait(lambda: len(beats()) == 1, 30, "the first beat grandchild")
        assert child.process is not None
        first_child = child.process.pid
        os.kill(first_child, signal.SIGKILL)  # the worker's main process only, as the OOM killer would
        _wait(lambda: len(beats()) == 2, 30, "the restarted child's beat")
        first_beat, second_beat = beats()
        _wait(lambda: not _alive(first_beat), 10, "the orphaned beat to be killed")
        assert child.history == [-signal.SIGKILL] and _alive(second_beat)
    # Ctrl-C of `up`: the child and its beat both go.
    _wait(lambda: not _alive(second_beat), 10, "the second beat to stop with its group")
    assert child.process is not None and child.process.poll() is not None


def _children_of(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def test_the_real_beat_of_a_sigkilled_work_beat_child_is_not_left_orphaned(tmp_path: Path, server: BundledRedis) -> None:
    from cxr_triage.db.migrate import upgrade
    from cxr_triage.supervisor import children_for

    data = tmp_path / "var"
    data.mkdir()
    settings = Settings(data_dir=data, redis_url=server.url, _env_file=None)  # type: ignore[call-arg]
    upgrade(settings.effective_database_url)
    (worker,) = [c for c in children_for(settings) if c.name == "worker-deliver"]
    env = {**os.environ, "CXR_DATA_DIR": str(data), "CXR_REDIS_URL": server.url}
    env.pop("CXR_DATABASE_URL", None)
    lines: list[str] = []
    stop = threading.Event()
    thread = threading.Thread(target=supervise, args=([worker],), daemon=True,
                              kwargs=dict(env=env, should_stop=stop.is_set, echo=lines.append, poll_s=0.05))
    thread.start()
    try:
        _wait(lambda: worker.process is not None and bool(_children_of(worker.process.pid)), 60, "the embedded beat")
        assert worker.process is not None
        main = worker.process.pid
        (beat,) = _children_of(main)
        os.kill(main, signal.SIGKILL)
        _wait(lambda: not _alive(beat), 15, "the orphaned beat to be killed with its group")
        _wait(lambda: worker.process is not None and worker.process.pid != main, 15, "the restarted worker")
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
    assert worker.history == [-signal.SIGKILL]
