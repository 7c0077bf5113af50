"""Faults: a worker killed mid-batch, Redis restarted (and Redis losing its data), PACS down then up, the
listener restarted mid-stream. Every acknowledged image must end analysed or explicitly not analysed, with
exactly one SR per study per model version, and nothing lost."""

from __future__ import annotations

import shutil
import signal
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from cxr_triage.core.states import InstanceState
from cxr_triage.dicom_node.netutil import free_port
from tests.dicomize import nih_pngs, png_to_dx
from tests.integration.service import DCMTK_STORESCU, Service, storescu, wait_until
from tests.peers import run_storescp

pytestmark = pytest.mark.slow


@pytest.fixture
def pacs(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    with run_storescp(tmp_path / "pacs", ae="PACS") as (host, port, out):
        yield f"PACS@{host}:{port}", out


def dx_inputs(tmp_path: Path, n: int) -> list[Path]:
    return [png_to_dx(p, tmp_path / "in") for p in nih_pngs(n)]


def sr_studies(out: Path) -> Counter[str]:
    return Counter(str(pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID) for p in out.rglob("*") if p.is_file())


def assert_nothing_lost(svc: Service, files: list[Path], pacs_out: Path) -> None:
    expected = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in files}
    wait_until(lambda: svc.all_terminal(len(files)), timeout=240, what="every instance terminal")
    states = svc.instance_states()
    assert len(states) == len(files)
    assert all(state == InstanceState.ANALYSED for _, state, _ in states), states
    wait_until(lambda: set(sr_studies(pacs_out)) == expected, timeout=120, what="one SR per study at the PACS")
    wait_until(lambda: svc.pending_outbox() == 0, timeout=60, what="empty outbox")
    counts = sr_studies(pacs_out)
    assert all(n == 1 for n in counts.values()), counts
    assert len(svc.reports()) == len(expected)


def test_worker_killed_mid_batch(tmp_path: Path, demo_models_cache: Path, pacs: tuple[str, Path]) -> None:
    dest, out = pacs
    svc = Service(tmp_path, demo_models_cache, pacs=dest)
    files = dx_inputs(tmp_path, 8)
    with svc.running():
        svc.start()
        assert all(r.returncode == 0 for r in storescu(svc.dicom_port, files))
        wait_until(lambda: any(s == InstanceState.ANALYSING for _, s, _ in svc.instance_states()), timeout=120,
                   interval=0.05, what="a batch in flight")
        svc.kill_part("analyze", signal.SIGKILL)
        svc.start_part("analyze")
        assert_nothing_lost(svc, files, out)


def test_redis_restart_and_redis_data_loss(tmp_path: Path, demo_models_cache: Path, pacs: tuple[str, Path]) -> None:
    dest, out = pacs
    svc = Service(tmp_path, demo_models_cache, pacs=dest)
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
        assert_nothing_lost(svc, files, out)


def test_pacs_down_then_up(tmp_path: Path, demo_models_cache: Path) -> None:
    port = free_port()
    svc = Service(tmp_path, demo_models_cache, pacs=f"PACS@127.0.0.1:{port}")
    files = dx_inputs(tmp_path, 3)
    with svc.running():
        svc.start()
        assert all(r.returncode == 0 for r in storescu(svc.dicom_port, files))
        wait_until(lambda: any(o.attempts >= 1 and o.state == "pending" for o in svc.outbox()), timeout=180,
                   what="a failed delivery attempt while the PACS is down")
        with run_storescp(tmp_path / "late-pacs", ae="PACS", port=port) as (_, _, out):
            assert_nothing_lost(svc, files, out)
        items = svc.outbox()
        assert all(o.state == "sent" for o in items)
        assert any(o.attempts >= 2 for o in items), "delivery was retried after the PACS came back"


def test_listener_restarted_mid_stream(tmp_path: Path, demo_models_cache: Path, pacs: tuple[str, Path]) -> None:
    import subprocess
    import time

    dest, out = pacs
    svc = Service(tmp_path, demo_models_cache, pacs=dest)
    files = dx_inputs(tmp_path, 10)
    with svc.running():
        svc.start()
        sender = subprocess.Popen(
            [DCMTK_STORESCU, "-aet", "MODALITY", "-aec", "CXRTRIAGE", "-R", "127.0.0.1", str(svc.dicom_port), *map(str, files)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        wait_until(lambda: len(svc.instance_states()) >= 2, timeout=60, interval=0.02, what="first stores")
        svc.kill_part("listener", signal.SIGKILL)
        sender.communicate(timeout=60)
        acknowledged = len(svc.instance_states())
        assert 0 < acknowledged < len(files), "the restart must interrupt the stream"
        time.sleep(0.5)
        svc.start_part("listener")
        # The modality resends the whole series (as modalities do after an aborted association).
        assert all(r.returncode == 0 for r in storescu(svc.dicom_port, files))
        assert_nothing_lost(svc, files, out)
