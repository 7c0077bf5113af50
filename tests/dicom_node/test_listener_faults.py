"""Bad input and failing dependencies: every path answers a status (or aborts the association), nothing leaks."""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct

import pytest
from pydicom import config, dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from cxr_triage.core.states import InstanceState
from cxr_triage.dicom_node.listener import (
    STATUS_CANNOT_UNDERSTAND,
    STATUS_DATASET_MISMATCH,
    STATUS_DB_UNAVAILABLE,
    STATUS_OUT_OF_RESOURCES,
    STATUS_TRUNCATED,
)
from cxr_triage.dicom_node.spool import Spool
from tests.dicom_node.listener_support import (
    HOST,
    Publisher,
    Recorder,
    accepted_context_ids,
    associate_rq,
    echoscu,
    make_settings,
    migrated,
    pynetdicom_store,
    raw_association,
    recv_pdu,
    release,
    rss_kb,
    running_listener,
    send_raw_store,
    wait_closed,
)

pytestmark = pytest.mark.timeout(90)

CR = "1.2.840.10008.5.1.4.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
DX = "1.2.840.10008.5.1.4.1.1.1.1"
EXPLICIT = "1.2.840.10008.1.2.1"


@pytest.fixture
def listener(tmp_path):
    recorder = Recorder(migrated(f"sqlite:///{tmp_path / 'db.sqlite3'}"))
    publisher = Publisher()
    settings = make_settings(tmp_path)
    with running_listener(settings, recorder, publisher) as server:
        yield settings, recorder, publisher, server
    recorder.dispose()


def _cr_dataset(*, rows: int = 4, columns: int = 4, sop_class: str = CR) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientName = "Test^Patient"
    ds.PatientID = "P1"
    ds.Rows = rows
    ds.Columns = columns
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = b"\x00\x01" * (4 * 4)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _encode(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def _store_raw(port: int, ds_bytes: bytes, *, context_class: str, command_class: str, instance: str) -> int | None:
    sock, ac = raw_association(port, [(1, context_class, [EXPLICIT])])
    assert ac is not None and ac[0] == 0x02 and accepted_context_ids(ac[1]) == {1: EXPLICIT}
    try:
        return send_raw_store(sock, 1, command_class, instance, ds_bytes)
    finally:
        release(sock)


def test_truncated_pixel_data_is_refused(listener):
    settings, recorder, publisher, _ = listener
    ds = _cr_dataset()
    ds.Rows = ds.Columns = 1024  # header promises 2 MiB ...
    encoded = _encode(ds)
    # ... and the Pixel Data element claims it, but the data set ends after 32 bytes of it.
    head = encoded[: encoded.index(b"\xe0\x7f\x10\x00")]
    pixel = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, 1024 * 1024 * 2) + b"\x00" * 32
    status = _store_raw(settings.dicom_port, head + pixel, context_class=CR, command_class=CR,
                        instance=str(ds.SOPInstanceUID))
    assert status == STATUS_TRUNCATED
    # Cut inside the header (no pixel data at all for an image SOP class): refused as well.
    status = _store_raw(settings.dicom_port, encoded[:150], context_class=CR, command_class=CR,
                        instance=str(ds.SOPInstanceUID))
    assert status in (STATUS_TRUNCATED, STATUS_CANNOT_UNDERSTAND)
    # Garbage that is not a data set at all.
    status = _store_raw(settings.dicom_port, b"\x08\x00\x16\x00UI\xff\xff" + os.urandom(64), context_class=CR,
                        command_class=CR, instance=str(ds.SOPInstanceUID))
    assert status in (STATUS_CANNOT_UNDERSTAND, STATUS_TRUNCATED, STATUS_DATASET_MISMATCH)
    assert recorder.instances() == [] and publisher.published == []
    assert list(Spool(settings.spool_dir).iter_names()) == []


def test_sop_class_mismatches_are_refused(listener):
    settings, recorder, _, _ = listener
    ds = _cr_dataset(sop_class=CT)  # the data set says CT ...
    status = _store_raw(settings.dicom_port, _encode(ds), context_class=CR, command_class=CR,
                        instance=str(ds.SOPInstanceUID))  # ... sent on a CR context with a CR command
    assert status == STATUS_DATASET_MISMATCH
    ds = _cr_dataset()
    status = _store_raw(settings.dicom_port, _encode(ds), context_class=CR, command_class=DX,
                        instance=str(ds.SOPInstanceUID))  # command differs from the negotiated context
    assert status is not None and status != 0
    status = _store_raw(settings.dicom_port, _encode(ds), context_class=CR, command_class=CR,
                        instance=generate_uid())  # command's instance UID differs from the data set's
    assert status == STATUS_DATASET_MISMATCH
    with config.disable_value_validation():  # an over-long SOP Instance UID in command and data set
        long_uid = "1.2.840." + "9" * 70
        ds.SOPInstanceUID = long_uid
        status = _store_raw(settings.dicom_port, _encode(ds), context_class=CR, command_class=CR, instance=long_uid)
    assert status is None  # pynetdicom cannot decode such a command: the association ends, nothing is stored
    ds.SOPInstanceUID = generate_uid()
    del ds.StudyInstanceUID
    status = _store_raw(settings.dicom_port, _encode(ds), context_class=CR, command_class=CR,
                        instance=str(ds.SOPInstanceUID))
    assert status == STATUS_DATASET_MISMATCH
    assert recorder.instances() == []
    assert list(Spool(settings.spool_dir).iter_names()) == []  # refused before anything was spooled


def test_header_claiming_gigabytes_is_accepted_without_allocating(listener):
    settings, recorder, publisher, _ = listener
    ds = _cr_dataset(rows=65535, columns=65535)  # 8 GiB if anyone decoded it
    before = rss_kb()
    assert pynetdicom_store(settings.dicom_port, ds) == 0
    assert rss_kb() - before < 50 * 1024
    (row,) = recorder.instances()
    assert (row.rows, row.columns) == (65535, 65535) and row.state == InstanceState.RECEIVED
    assert publisher.published == [row.id]


def test_garbage_pdus_abort_without_allocating(listener):
    settings, _, _, _ = listener
    port = settings.dicom_port
    before = rss_kb()

    # Random bytes (an unknown PDU type).
    sock = socket.create_connection((HOST, port))
    sock.sendall(b"\x42" + os.urandom(4095))
    assert wait_closed(sock)
    sock.close()

    # An A-ASSOCIATE-RQ claiming 2 GiB: A-ABORT before reading (or allocating) the body.
    sock = socket.create_connection((HOST, port))
    sock.sendall(struct.pack(">BBL", 0x01, 0, 0x7FFFFFFF) + b"\x00" * 64)
    pdu = recv_pdu(sock)
    assert pdu is not None and pdu[0] == 0x07  # A-ABORT
    assert wait_closed(sock)
    sock.close()

    # A valid association, then a P-DATA-TF claiming 1 GiB.
    sock, ac = raw_association(port, [(1, CR, [EXPLICIT])])
    assert ac is not None and ac[0] == 0x02
    sock.sendall(struct.pack(">BBL", 0x04, 0, 1 << 30) + b"\x00" * 1024)
    pdu = recv_pdu(sock)
    assert pdu is not None and pdu[0] == 0x07
    assert wait_closed(sock)
    sock.close()

    # A malformed A-ASSOCIATE-RQ of plausible length.
    sock = socket.create_connection((HOST, port))
    rq = bytearray(associate_rq(contexts=[(1, CR, [EXPLICIT])]))
    rq[80:90] = b"\xff" * 10
    sock.sendall(bytes(rq))
    assert wait_closed(sock) or recv_pdu(sock) is None
    sock.close()

    assert rss_kb() - before < 50 * 1024
    assert echoscu(port)  # still answering


def test_disk_reserve_refuses_with_out_of_resources(tmp_path, dicom_data_dir):
    recorder = Recorder(migrated(f"sqlite:///{tmp_path / 'db.sqlite3'}"))
    free_mb = shutil.disk_usage(tmp_path).free >> 20
    settings = make_settings(tmp_path, disk_reserve_mb=free_mb + 1024)
    with running_listener(settings, recorder, Publisher()):
        assert pynetdicom_store(settings.dicom_port, dicom_data_dir / "veterinary-dx-lateral-thorax.dcm") == (
            STATUS_OUT_OF_RESOURCES
        )
        assert echoscu(settings.dicom_port)
    assert recorder.instances() == []
    assert list(Spool(settings.spool_dir).iter_names()) == []
    assert not list((settings.spool_dir / "tmp").iterdir())


def test_database_down_then_resend(listener, dicom_data_dir):
    """DB unavailable: refused (0xA701) with the file kept; the resend is stored once and analysed once."""
    settings, recorder, publisher, server = listener
    path = dicom_data_dir / "nih-dx-secondary-capture.dcm"
    recorder.fail = True
    assert pynetdicom_store(settings.dicom_port, path) == STATUS_DB_UNAVAILABLE
    names = list(Spool(settings.spool_dir).iter_names())
    assert len(names) == 1  # kept for adoption / the resend
    recorder.fail = False
    assert pynetdicom_store(settings.dicom_port, path) == 0
    assert server.ae.publisher.flush(10)  # published after the answer, by the listener's publisher thread
    (row,) = recorder.instances()
    assert row.spool_name == names[0] and publisher.published == [row.id]


def test_publish_failure_still_acknowledges(listener, dicom_data_dir):
    settings, recorder, publisher, _ = listener
    publisher.fail = True
    assert pynetdicom_store(settings.dicom_port, dicom_data_dir / "wg04-cr-chest-pa-j2k-monochrome1.dcm") == 0
    (row,) = recorder.instances()
    assert row.state == InstanceState.RECEIVED  # the reconciler will queue it


def test_a_hanging_broker_does_not_delay_the_answer(tmp_path, dicom_data_dir):
    """Commit, answer, then publish: while publishing hangs, C-STORE still answers 0x0000 at once."""
    import threading
    import time

    recorder = Recorder(migrated(f"sqlite:///{tmp_path / 'db.sqlite3'}"))
    unblock = threading.Event()
    published: list[int] = []

    def hanging_publish(instance_id: int) -> None:  # a broker that accepts the connection and never answers
        unblock.wait(30)
        published.append(instance_id)

    settings = make_settings(tmp_path)
    files = ["nih-dx-secondary-capture.dcm", "wg04-cr-chest-pa-j2k-monochrome1.dcm", "siim-cr-pa-jpeg-baseline.dcm"]
    try:
        with running_listener(settings, recorder, hanging_publish) as server:
            for name in files:
                started = time.monotonic()
                assert pynetdicom_store(settings.dicom_port, dicom_data_dir / name) == 0
                assert time.monotonic() - started < 2.0, "the answer waited for the broker"
            rows = recorder.instances()
            assert [r.state for r in rows] == [InstanceState.RECEIVED] * 3 and published == []
            unblock.set()
            assert server.ae.publisher.flush(10)
            assert sorted(published) == sorted(r.id for r in rows)
    finally:
        unblock.set()
        recorder.dispose()


def test_out_of_scope_classes_are_accepted_and_recorded(listener):
    settings, recorder, publisher, _ = listener
    ds = _cr_dataset(sop_class=CT)
    ds.Modality = "CT"
    assert pynetdicom_store(settings.dicom_port, ds) == 0
    (row,) = recorder.instances()
    assert row.state == InstanceState.NOT_ANALYSED and row.reason == "sop-class-out-of-scope"
    assert publisher.published == []


def test_no_phi_in_logs(listener, dicom_data_dir, capsys):
    settings, _, _, _ = listener
    path = dicom_data_dir / "veterinary-dx-lateral-thorax.dcm"
    ds = dcmread(path)
    assert pynetdicom_store(settings.dicom_port, ds) == 0
    with config.disable_value_validation():  # the peer is wrong on purpose
        ds.SOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = "1.2.3.4.5.6.7.8.9." + "1" * 60  # over-long UID: refused, must not be echoed
        assert pynetdicom_store(settings.dicom_port, ds) == STATUS_DATASET_MISMATCH
    out = capsys.readouterr()
    text = out.out + out.err
    # The absence below means something only if the listener's log lines were captured at all: one per store.
    assert re.search(r"\bc_store\b(?!_)", text), "the accepted store's log line was not captured"
    assert "c_store_refused" in text, "the refused store's log line was not captured"
    for value in ("Dog", "AVeryGood", "123456", "16387a", str(ds.SOPInstanceUID), "1" * 60):
        assert value not in text


def test_object_larger_than_max_image_bytes_is_aborted_mid_stream(tmp_path, dicom_data_dir):
    recorder = Recorder(migrated(f"sqlite:///{tmp_path / 'db.sqlite3'}"))
    settings = make_settings(tmp_path, max_image_bytes=1 << 20)
    big = dicom_data_dir / "nih-dx-secondary-capture.dcm"  # its data set is just over 1 MiB
    with running_listener(settings, recorder, Publisher()):
        assert pynetdicom_store(settings.dicom_port, big) == -1  # association aborted, no response
        assert pynetdicom_store(settings.dicom_port, dicom_data_dir / "veterinary-dx-lateral-thorax.dcm") == 0
    assert len(recorder.instances()) == 1
    # pynetdicom streamed the partial object into the spool's tmp dir (not /tmp) and left it: clean_tmp sweeps it.
    spool = Spool(settings.spool_dir)
    assert [p.name.startswith("pnd-") for p in spool.tmp_dir.iterdir()] == [True]
    assert spool.clean_tmp(older_than_s=0) == 1
    recorder.dispose()
