"""Faults: a worker killed mid-batch, Redis restarted (and Redis losing its data), PACS down then up, the
listener restarted mid-stream. Every acknowledged image must end analysed or explicitly not analysed, with
exactly one SR per study per model version, and nothing lost."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
import redis

from cxr_triage.core.states import InstanceState
from cxr_triage.db.migrate import upgrade
from cxr_triage.dicom_node.netutil import free_port
from tests.databases import database
from tests.dicomize import nih_pngs, png_to_dx
from tests.integration.service import DCMTK_STORESCU, Service, storescu, wait_until
from tests.peers import run_storescp, storescp_receptions, storescp_receptions_log

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Pacs:
    destination: str
    out: Path  # files as storescp stored them (one per SOP Instance UID: a resend overwrites)
    receptions: Path  # one line per C-STORE storescp received


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[Pacs]:
    with run_storescp(tmp_path / "pacs", ae="PACS", log_receptions=True) as (host, port, out):
        yield Pacs(f"PACS@{host}:{port}", out, storescp_receptions_log(tmp_path / "pacs", port))


def dx_inputs(tmp_path: Path, n: int) -> list[Path]:
    return [png_to_dx(p, tmp_path / "in") for p in nih_pngs(n)]


def sr_studies(out: Path) -> Counter[str]:
    """Study UID -> SR files storescp stored for it. A file storescp is still writing is not counted yet (the
    callers poll; a file that never becomes readable keeps its study missing, so they time out and fail)."""
    counts: Counter[str] = Counter()
    for p in out.rglob("*"):
        if not p.is_file():
            continue
        try:
            counts[str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID)] += 1
        except Exception:  # noqa: BLE001 -- a partial file fails in many ways; the next poll reads it whole
            continue
    return counts


def assert_nothing_lost(svc: Service, files: list[Path], pacs: Pacs) -> None:
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    wait_until(lambda: svc.all_terminal(len(files)), timeout=240, what="every instance terminal")
    states = svc.instance_states()
    assert len(states) == len(files)
    assert all(state == InstanceState.ANALYSED for _, state, _ in states), states
    wait_until(lambda: set(sr_studies(pacs.out)) == expected, timeout=120, what="one SR per study at the PACS")
    wait_until(lambda: svc.pending_outbox() == 0, timeout=60, what="empty outbox")
    counts = sr_studies(pacs.out)
    assert all(n == 1 for n in counts.values()), counts
    reports = svc.reports()
    assert len(reports) == len(expected)
    # Exactly once per SR UID at this destination, counted in C-STOREs received (a resend would overwrite the
    # file and go unseen above). storescp logs each reception from a child process: give the lines a moment.
    sr_uids = {r.sop_instance_uid for r in reports}
    wait_until(lambda: set(storescp_receptions(pacs.receptions)) == sr_uids, timeout=30, what="reception log")
    time.sleep(1.0)
    received = storescp_receptions(pacs.receptions)
    assert set(received) == sr_uids and all(n == 1 for n in received.values()), received


# The one fault test that also runs on PostgreSQL: a killed worker exercises what differs most between the
# backends (row claims and leases taken by concurrent processes, the reconciler's re-queue, outbox exactly-once),
# with every part a separate process connected to the server, as in production.
@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
def test_worker_killed_mid_batch(tmp_path: Path, demo_models_cache: Path, pacs: Pacs, db_kind: str) -> None:
    with database(db_kind, tmp_path) as url:
        svc = Service(tmp_path, demo_models_cache, pacs=pacs.destination, database_url=url)
        try:
            _worker_killed_mid_batch(svc, dx_inputs(tmp_path, 8), pacs)
        finally:
            svc.dispose()  # our own connections, before the database is dropped


def _worker_killed_mid_batch(svc: Service, files: list[Path], pacs: Pacs) -> None:
    with svc.running():
        svc.start()
        assert all(r.returncode == 0 for r in storescu(svc.dicom_port, files))
        wait_until(lambda: any(s == InstanceState.ANALYSING for _, s, _ in svc.instance_states()), timeout=120,
                   interval=0.05, what="a batch in flight")
        svc.kill_part("analyze", signal.SIGKILL)
        svc.start_part("analyze")
        assert_nothing_lost(svc, files, pacs)


def test_redis_restart_and_redis_data_loss(tmp_path: Path, demo_models_cache: Path, pacs: Pacs) -> None:
    svc = Service(tmp_path, demo_models_cache, pacs=pacs.destination)
    files = dx_inputs(tmp_path, 6)
    with svc.running():
        svc.start("listener", "deliver")  # no analyze worker yet: tasks wait in Redis
        assert all(r.returncode == 0 for r in storescu(svc.dicom_port, files[:3]))
        assert svc.redis is not None
        svc.redis.stop()  # clean restart: AOF keeps the queued tasks
        svc.redis.start()
        # A broker that loses its data: killed without a flush, its files gone. The reconciler must re-queue.
        assert all(r.returncode == 0 for r in storescu(svc.dicom_port, files[3:]))
        assert svc.redis.process is not None
        svc.redis.process.kill()
        svc.redis.process.wait()
        for f in svc.redis.directory.glob("appendonly*"):
            shutil.rmtree(f) if f.is_dir() else f.unlink()
        svc.redis.start()
        svc.start_part("analyze")
        assert_nothing_lost(svc, files, pacs)


def test_pacs_down_then_up(tmp_path: Path, demo_models_cache: Path) -> None:
    port = free_port()
    svc = Service(tmp_path, demo_models_cache, pacs=f"PACS@127.0.0.1:{port}")
    files = dx_inputs(tmp_path, 3)
    with svc.running():
        svc.start()
        assert all(r.returncode == 0 for r in storescu(svc.dicom_port, files))
        wait_until(lambda: any(o.attempts >= 1 and o.state == "pending" for o in svc.outbox()), timeout=180,
                   what="a failed delivery attempt while the PACS is down")
        with run_storescp(tmp_path / "late-pacs", ae="PACS", port=port, log_receptions=True) as (_, _, out):
            assert_nothing_lost(svc, files, Pacs(svc.pacs, out, storescp_receptions_log(tmp_path / "late-pacs", port)))
        items = svc.outbox()
        assert all(o.state == "sent" for o in items)
        assert any(o.attempts >= 2 for o in items), "delivery was retried after the PACS came back"


def acknowledged_files(storescu_verbose_output: str) -> list[Path]:
    """The files storescu -v saw answered with Success: each "Sending file" line is followed by its response."""
    acked: list[Path] = []
    current: Path | None = None
    for line in storescu_verbose_output.splitlines():
        if line.startswith("I: Sending file: "):
            current = Path(line.removeprefix("I: Sending file: ").strip())
        elif line.startswith("I: Received Store Response (Success)") and current is not None:
            acked.append(current)
            current = None
    return acked


def test_listener_restarted_mid_stream(tmp_path: Path, demo_models_cache: Path, pacs: Pacs) -> None:
    svc = Service(tmp_path, demo_models_cache, pacs=pacs.destination)
    files = dx_inputs(tmp_path, 10)
    with svc.running():
        svc.start()
        sender = subprocess.Popen(
            [DCMTK_STORESCU, "-v", "-aet", "MODALITY", "-aec", "CXRTRIAGE", "-R", "127.0.0.1", str(svc.dicom_port),
             *map(str, files)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        wait_until(lambda: len(svc.instance_states()) >= 2, timeout=60, interval=0.02, what="first stores")
        svc.kill_part("listener", signal.SIGKILL)
        out, _ = sender.communicate(timeout=60)
        acked = acknowledged_files(out)
        assert 0 < len(acked) < len(files), "the restart must interrupt the stream after some acknowledgements"
        time.sleep(0.5)
        svc.start_part("listener")
        # The modality resends only what it never saw acknowledged: an image answered 0x0000 before the kill
        # must reach the end on its own (on disk and in the database when the answer left).
        rest = [f for f in files if f not in set(acked)]
        assert all(r.returncode == 0 for r in storescu(svc.dicom_port, rest))
        assert_nothing_lost(svc, files, pacs)


@contextlib.contextmanager
def silent_broker() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: a hung broker (worse than a refused one)."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.2)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


def test_broker_unreachable_at_receive_answers_at_once_and_the_reconciler_queues_later(
    tmp_path: Path, demo_models_cache: Path
) -> None:
    """Commit, answer, then publish: with the listener's broker hanging, C-STORE still answers 0x0000 at once; the
    rows stay RECEIVED and the reconciler queues them from the database."""
    from tests.dicom_node.listener_support import pynetdicom_store

    svc = Service(tmp_path, demo_models_cache)
    files = dx_inputs(tmp_path, 3)
    with svc.running(), silent_broker() as port:
        upgrade(svc.db_url)
        svc.start_part("listener", env={"CXR_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
        for f in files:
            started = time.monotonic()
            assert pynetdicom_store(svc.dicom_port, f) == 0
            assert time.monotonic() - started < 1.0, "the C-STORE answer waited for the broker"
        time.sleep(1.0)
        states = svc.instance_states()
        assert [s for _, s, _ in states] == [InstanceState.RECEIVED] * 3, states
        assert svc.redis is not None
        svc.redis.start()
        svc.start_part("deliver")  # its beat runs the reconciler every CXR_RECONCILE_INTERVAL_S
        wait_until(lambda: all(s == InstanceState.QUEUED for _, s, _ in svc.instance_states()), timeout=60,
                   what="the reconciler queueing the received rows")
        client = redis.Redis(unix_socket_path=str(svc.redis.socket_path))
        queued = [json.loads(m)["headers"]["task"] for m in client.lrange("analyze", 0, -1)]
        assert queued.count("cxr.analyze") >= 3


def test_hung_task_exits_the_worker_and_the_image_is_analysed_after_restart(
    tmp_path: Path, demo_models_cache: Path
) -> None:
    """A task that hangs (here: the analysis claim blocked behind a row lock the test holds on PostgreSQL) makes
    the threads-pool worker exit with the watchdog's code at CXR_TASK_TIME_LIMIT_S; restarted, as `up` and
    systemd do, it analyses the image (re-queued by the reconciler)."""
    from sqlalchemy import text

    from cxr_triage.db.session import make_engine
    from cxr_triage.worker.watchdog import EXIT_TASK_TIME_LIMIT
    from tests.databases import postgres_database

    with postgres_database() as url:
        svc = Service(tmp_path, demo_models_cache, database_url=url, extra_env={"CXR_TASK_TIME_LIMIT_S": "10"})
        files = dx_inputs(tmp_path, 1)
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        with svc.running():
            svc.start("listener", "deliver")
            assert all(r.returncode == 0 for r in storescu(svc.dicom_port, files))
            wait_until(lambda: [s for _, s, _ in svc.instance_states()] == [InstanceState.QUEUED], timeout=30,
                       what="the image queued")
            ((iid, _, _),) = svc.instance_states()
            engine = make_engine(url)
            try:
                with engine.connect() as conn:
                    tx = conn.begin()
                    conn.execute(text("SELECT id FROM instances WHERE id = :i FOR UPDATE"), {"i": iid})
                    started = time.monotonic()
                    svc.start_part("analyze")
                    worker = svc.procs.pop("analyze")
                    code = worker.wait(timeout=180)
                    elapsed = time.monotonic() - started
                    tx.rollback()
            finally:
                engine.dispose()
            assert code == EXIT_TASK_TIME_LIMIT
            assert elapsed >= 10
            log = (tmp_path / "analyze.log").read_text(errors="replace")
            assert "hard time limit" in log and "cxr.analyze" in log
            for value in (str(header.PatientName), str(header.PatientID), str(header.AccessionNumber),
                          str(header.SOPInstanceUID)):
                assert value not in log
            svc.start_part("analyze")  # what the supervisor of `cxr-triage up` (or systemd) does next
            wait_until(lambda: [s for _, s, _ in svc.instance_states()] == [InstanceState.ANALYSED], timeout=180,
                       what="the image analysed after the restart")
