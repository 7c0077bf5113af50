"""The spool: content-addressed names, durability steps, idempotence, the free-space reserve, headers."""

from __future__ import annotations

import hashlib
import io
import os
import time
from datetime import datetime, timezone

import pytest

from cxr_triage.dicom_node.headers import read_header, received_object, TruncatedDataset
from cxr_triage.dicom_node.spool import BadSpoolName, Spool, SpoolFull


def test_store_names_by_hash_and_is_idempotent(tmp_path):
    spool = Spool(tmp_path / "spool").ensure()
    data = os.urandom(3 << 20)
    first = spool.store([b"head", io.BytesIO(data)])
    digest = hashlib.sha256(b"head" + data).hexdigest()
    assert first.sha256 == digest and first.name == f"{digest[:2]}/{digest}.dcm" and not first.existed
    assert first.path.read_bytes() == b"head" + data and first.size == len(data) + 4
    again = spool.store([b"head" + data])
    assert again.existed and again.name == first.name
    assert list(spool.iter_names()) == [first.name] and spool.verify(first.name)
    assert list(spool.tmp_dir.iterdir()) == []


def test_reserve_refuses_and_leaves_nothing(tmp_path):
    spool = Spool(tmp_path / "spool", reserve_bytes=1 << 60).ensure()
    with pytest.raises(SpoolFull):
        spool.store([b"x" * 100])
    assert list(spool.iter_names()) == [] and list(spool.tmp_dir.iterdir()) == []


@pytest.mark.parametrize("name", ["../etc/passwd", "ab/../../x.dcm", "ab/" + "a" * 64 + ".dcm", "/abs.dcm"])
def test_path_of_rejects_anything_but_hash_names(tmp_path, name):
    with pytest.raises(BadSpoolName):
        Spool(tmp_path).path_of(name)


def test_clean_tmp_removes_only_old_files(tmp_path):
    spool = Spool(tmp_path / "spool").ensure()
    old, young = spool.tmp_dir / "old.part", spool.tmp_dir / "young.part"
    old.write_bytes(b"1")
    young.write_bytes(b"2")
    past = time.time() - 7200
    os.utime(old, (past, past))
    assert spool.clean_tmp(older_than_s=3600) == 1
    assert not old.exists() and young.exists()


def test_header_only_parse_of_real_files(dicom_data_dir):
    for path in sorted(dicom_data_dir.glob("*.dcm")):
        header = read_header(path)
        assert header.has_pixel_data
        obj = received_object(header, sha256="0" * 64, size=1, spool_name="00/" + "0" * 64 + ".dcm",
                              calling_ae="A" * 40, received_at=datetime.now(timezone.utc))
        assert obj.calling_ae == "A" * 16  # clipped to the column size
        assert isinstance(obj.patient_name, str) and obj.rows and obj.columns


def test_header_detects_truncated_pixel_data(tmp_path, dicom_data_dir):
    for name in ("nih-dx-secondary-capture.dcm", "siim-cr-pa-jpeg-baseline.dcm"):  # defined / encapsulated
        data = (dicom_data_dir / name).read_bytes()
        cut = tmp_path / name
        cut.write_bytes(data[: len(data) - 1000])
        with pytest.raises(TruncatedDataset):
            read_header(cut)
