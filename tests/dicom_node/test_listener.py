"""The listener against real DCMTK storescu/echoscu on localhost, with a real migrated database behind it."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from cxr_triage.core.states import InstanceState, NotAnalysedReason
from cxr_triage.dicom_node.netutil import association_socket, nodelay_of, wait_for_port
from cxr_triage.dicom_node.spool import Spool
from tests.databases import database
from tests.dicom_node.listener_support import (
    HOST,
    Publisher,
    Recorder,
    acknowledged,
    echoscu,
    make_settings,
    migrated,
    raw_association,
    release,
    running_listener,
    send_all,
    storescu_popen,
)

pytestmark = pytest.mark.timeout(120)

CONFLICT_A = "siim-cr-pa-jpeg-baseline.dcm"
CONFLICT_B = "siim-cr-pa-monochrome1.dcm"
VET = "veterinary-dx-lateral-thorax.dcm"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("db_kind", ["sqlite", "postgresql"])
def test_every_shared_file_is_stored_recorded_and_published_once(tmp_path, dicom_data_dir, db_kind):
    files = sorted(dicom_data_dir.glob("*.dcm"))
    assert len(files) == 5
    with database(db_kind, tmp_path) as url:
        recorder, publisher = Recorder(migrated(url)), Publisher()
        settings = make_settings(tmp_path)
        try:
            with running_listener(settings, recorder, publisher):
                # Concurrent storescu processes (one per transfer syntax group) ...
                results = send_all(settings.dicom_port, files)
                assert sorted(results) == sorted(map(str, files))
                assert set(results.values()) == {"Success"}, results
                # ... then the same file again: success, no second row, no second analysis.
                again = send_all(settings.dicom_port, [dicom_data_dir / "nih-dx-secondary-capture.dcm"])
                assert set(again.values()) == {"Success"}
            rows = recorder.instances()
        finally:
            recorder.dispose()

    # One row per distinct (UID, bytes): 5 files, of which 2 share a UID with different bytes.
    assert len(rows) == 5
    spool = Spool(settings.spool_dir)
    names = list(spool.iter_names())
    assert sorted(names) == sorted(r.spool_name for r in rows)
    for row in rows:
        path = spool.path_of(row.spool_name)
        assert _sha(path) == row.file_sha256 == path.stem  # named by content hash
        assert row.file_size == path.stat().st_size
        assert row.calling_ae == "MODALITY"
        # What we stored is the object that was sent: same data set (our file meta replaces the sender's).
        sent = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        assert row.sop_instance_uid in sent
    assert not list((settings.spool_dir / "tmp").iterdir())  # no temp files left behind

    by_uid: dict[str, list] = {}
    for row in rows:
        by_uid.setdefault(row.sop_instance_uid, []).append(row)
    vet_uid = str(dcmread(dicom_data_dir / VET, stop_before_pixels=True).SOPInstanceUID)
    (vet,) = by_uid[vet_uid]
    assert vet.state == InstanceState.NOT_ANALYSED and vet.reason == NotAnalysedReason.NOT_HUMAN

    pair_uid = str(dcmread(dicom_data_dir / CONFLICT_A, stop_before_pixels=True).SOPInstanceUID)
    pair = by_uid[pair_uid]
    assert len(pair) == 2  # both kept, each file under its own hash
    assert pair[0].file_sha256 != pair[1].file_sha256 and pair[0].spool_name != pair[1].spool_name
    first, second = sorted(pair, key=lambda r: r.id)
    assert second.conflicts_with == first.id and second.reason == NotAnalysedReason.UID_CONFLICT

    in_scope = [r for r in rows if r.state == InstanceState.RECEIVED]
    # nih (SC/DX), wg04 (CR), first of the SIIM pair: published exactly once each, the resend not again.
    assert len(in_scope) == 3
    assert sorted(publisher.published) == sorted(r.id for r in in_scope)


def _wait_idle(server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while server.active_associations and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not server.active_associations


def test_echo_nodelay_and_association_limits(tmp_path):
    recorder = Recorder(migrated(f"sqlite:///{tmp_path / 'db.sqlite3'}"))
    settings = make_settings(tmp_path, max_associations=2, allowed_calling_ae=("MODALITY", "SCRIPTED"))
    contexts = [(1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]
    with running_listener(settings, recorder, Publisher()) as server:
        assert echoscu(settings.dicom_port)

        # Allow-list: an unknown calling AE is rejected with "calling AE title not recognised" (source 1, reason 3).
        sock, reply = raw_association(settings.dicom_port, contexts, calling="INTRUDER")
        sock.close()
        assert reply is not None and reply[0] == 0x03
        assert reply[1][1:4] == bytes([0x01, 0x01, 0x03])
        assert not echoscu(settings.dicom_port, aet="INTRUDER")

        # TCP_NODELAY is set on accepted sockets, and the third concurrent association is refused.
        _wait_idle(server)
        first, ac1 = raw_association(settings.dicom_port, contexts)
        second, ac2 = raw_association(settings.dicom_port, contexts)
        assert ac1 is not None and ac1[0] == 0x02 and ac2 is not None and ac2[0] == 0x02
        deadline = time.monotonic() + 5
        while len(server.active_associations) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        sockets = [association_socket(a) for a in server.active_associations]
        assert len(sockets) == 2 and all(s is not None and nodelay_of(s) for s in sockets)
        third, rj = raw_association(settings.dicom_port, contexts)
        third.close()
        assert rj is not None and rj[0] == 0x03  # A-ASSOCIATE-RJ: local limit exceeded
        release(first)
        release(second)
        _wait_idle(server)
        assert echoscu(settings.dicom_port)


def _copies(source: Path, directory: Path, n: int) -> list[Path]:
    """``n`` copies of a file, each with new Study/Series/SOP Instance UIDs (same pixels)."""
    ds = dcmread(source)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        path = directory / f"copy-{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


_CHILD = """
import sys, time
sys.path.insert(0, {repo!r})
from cxr_triage.core.settings import Settings
from cxr_triage.dicom_node.listener import serve
from tests.dicom_node.listener_support import Recorder, Publisher
settings = Settings(data_dir={data!r}, dicom_host="127.0.0.1", dicom_port={port}, disk_reserve_mb=0)
serve(settings, record=Recorder({url!r}), publish=Publisher(), block=True)
"""


def _start_child(tmp_path: Path, port: int, url: str) -> subprocess.Popen:
    repo = str(Path(__file__).resolve().parents[2])
    code = _CHILD.format(repo=repo, data=str(tmp_path / "var"), port=port, url=url)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert wait_for_port(HOST, port, timeout=20), "listener did not start"
    return proc


def test_listener_killed_mid_stream_loses_nothing_acknowledged(tmp_path, dicom_data_dir):
    """SIGKILL the listener process while storescu sends a batch; restart; resend: every object storescu saw
    acknowledged with Success is recorded (row + file), and after the resend everything is, exactly once."""
    files = _copies(dicom_data_dir / VET, tmp_path / "batch", 60)
    url = migrated(f"sqlite:///{tmp_path / 'db.sqlite3'}")
    settings = make_settings(tmp_path)
    proc = _start_child(tmp_path, settings.dicom_port, url)
    try:
        sender = storescu_popen(settings.dicom_port, files)
        recorder = Recorder(url)
        deadline = time.monotonic() + 30
        while len(recorder.instances()) < 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        out, _ = sender.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    acked = {path for path, status in acknowledged(out).items() if status == "Success"}
    # Not exactly 10: the kill can land between a commit and its response (recorded, not acknowledged: allowed),
    # and a reset connection can swallow responses in flight.
    assert 0 < len(acked) < len(files), f"kill did not land mid-stream ({len(acked)} acknowledged)"
    uid_of = {str(p): str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    recorded = {r.sop_instance_uid: r for r in recorder.instances()}
    spool = Spool(settings.spool_dir)
    for path in acked:
        row = recorded[uid_of[path]]
        assert spool.verify(row.spool_name)

    proc = _start_child(tmp_path, settings.dicom_port, url)
    try:
        resend = send_all(settings.dicom_port, files)
        assert set(resend.values()) == {"Success"} and len(resend) == len(files)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    rows = recorder.instances()
    assert sorted(r.sop_instance_uid for r in rows) == sorted(uid_of.values())  # each exactly once
    assert all(spool.verify(r.spool_name) for r in rows)
    recorder.dispose()


def test_several_processes_share_the_port(tmp_path, dicom_data_dir):
    files = _copies(dicom_data_dir / VET, tmp_path / "batch", 24)
    recorder = Recorder(migrated(f"sqlite:///{tmp_path / 'db.sqlite3'}"))
    settings = make_settings(tmp_path)
    with running_listener(settings, recorder, Publisher(), processes=2) as server:
        assert len(server.children) == 1 and server.children[0].is_alive()
        procs = [storescu_popen(settings.dicom_port, files[i::4]) for i in range(4)]
        results: dict[str, str] = {}
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            results.update(acknowledged(out))
        assert len(results) == len(files) and set(results.values()) == {"Success"}
        child = server.children[0]
    assert not child.is_alive()  # shut down with the parent's server
    assert len(recorder.instances()) == len(files)
    recorder.dispose()
