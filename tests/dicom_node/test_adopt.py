"""Spool adoption: a file whose record failed (peer answered 0xA701) is recorded later even if nobody resends."""

from __future__ import annotations

import os
import time

import pytest

from cxr_triage.core.states import InstanceState
from cxr_triage.dicom_node.adopt import adopt_orphans
from cxr_triage.dicom_node.listener import STATUS_DB_UNAVAILABLE
from cxr_triage.dicom_node.spool import Spool
from tests.dicom_node.listener_support import (
    Publisher,
    Recorder,
    make_settings,
    migrated,
    pynetdicom_store,
    running_listener,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def recorder(tmp_path):
    rec = Recorder(migrated(f"sqlite:///{tmp_path / 'db.sqlite3'}"))
    yield rec
    rec.dispose()


def _orphan(settings, recorder, publisher, path) -> str:
    """Receive ``path`` while the database is down: refused 0xA701, file left in the spool."""
    recorder.fail = True
    with running_listener(settings, recorder, publisher):
        assert pynetdicom_store(settings.dicom_port, path) == STATUS_DB_UNAVAILABLE
    recorder.fail = False
    (name,) = Spool(settings.spool_dir).iter_names()
    assert recorder.instances() == []
    return name


def test_orphan_is_adopted_once_and_a_later_resend_is_a_duplicate(tmp_path, recorder, dicom_data_dir):
    settings = make_settings(tmp_path)
    publisher = Publisher()
    source = dicom_data_dir / "nih-dx-secondary-capture.dcm"
    name = _orphan(settings, recorder, publisher, source)
    spool = Spool(settings.spool_dir)

    report = adopt_orphans(spool, recorded=recorder.recorded, record=recorder, publish=publisher, min_age_s=0)
    assert (report.scanned, report.adopted, report.failed) == (1, 1, 0)
    (row,) = recorder.instances()
    assert row.spool_name == name and row.state == InstanceState.RECEIVED and row.calling_ae is None
    assert publisher.published == [row.id]

    again = adopt_orphans(spool, recorded=recorder.recorded, record=recorder, publish=publisher, min_age_s=0)
    assert again.adopted == 0 and publisher.published == [row.id]

    with running_listener(settings, recorder, publisher):
        assert pynetdicom_store(settings.dicom_port, source) == 0
    assert [r.id for r in recorder.instances()] == [row.id]  # same bytes: same row, not re-analysed
    assert publisher.published == [row.id]


def test_young_files_are_left_for_the_receive_in_flight(tmp_path, recorder, dicom_data_dir):
    settings = make_settings(tmp_path)
    publisher = Publisher()
    name = _orphan(settings, recorder, publisher, dicom_data_dir / "nih-dx-secondary-capture.dcm")
    spool = Spool(settings.spool_dir)
    report = adopt_orphans(spool, recorded=recorder.recorded, record=recorder, publish=publisher, min_age_s=600)
    assert report.too_young == 1 and recorder.instances() == []
    old = time.time() - 601
    os.utime(spool.path_of(name), (old, old))
    report = adopt_orphans(spool, recorded=recorder.recorded, record=recorder, publish=publisher, min_age_s=600)
    assert report.adopted == 1 and len(recorder.instances()) == 1


def test_database_still_down_is_counted_and_retried(tmp_path, recorder, dicom_data_dir):
    settings = make_settings(tmp_path)
    publisher = Publisher()
    _orphan(settings, recorder, publisher, dicom_data_dir / "nih-dx-secondary-capture.dcm")
    spool = Spool(settings.spool_dir)
    publisher.fail = True  # recorded, but the hint cannot be published: the reconciler queues RECEIVED rows
    report = adopt_orphans(spool, recorded=recorder.recorded, record=recorder, publish=publisher, min_age_s=0)
    assert report.failed == 1
    (row,) = recorder.instances()
    assert row.state == InstanceState.RECEIVED


def test_damaged_orphan_is_reported_not_recorded(tmp_path, recorder, dicom_data_dir):
    settings = make_settings(tmp_path)
    publisher = Publisher()
    name = _orphan(settings, recorder, publisher, dicom_data_dir / "nih-dx-secondary-capture.dcm")
    spool = Spool(settings.spool_dir)
    spool.path_of(name).write_bytes(b"not dicom at all")
    report = adopt_orphans(spool, recorded=recorder.recorded, record=recorder, publish=publisher, min_age_s=0)
    assert report.unreadable == 1 and report.adopted == 0 and recorder.instances() == []
    assert spool.path_of(name).exists()  # kept for a human


def test_listener_adopts_after_the_database_comes_back(tmp_path, recorder, dicom_data_dir):
    """End to end: the peer gets 0xA701 and never resends; the running listener's scan records the image."""
    settings = make_settings(tmp_path)
    publisher = Publisher()
    recorder.fail = True
    with running_listener(
        settings, recorder, publisher, recorded=recorder.recorded, adopt_interval_s=0.2, adopt_min_age_s=0
    ):
        assert pynetdicom_store(settings.dicom_port, dicom_data_dir / "wg04-cr-chest-pa-j2k-monochrome1.dcm") == (
            STATUS_DB_UNAVAILABLE
        )
        time.sleep(0.5)  # scans while the database is down fail quietly and are retried
        assert recorder.instances() == []  # (reading the database directly works: only the listener's calls fail)
        recorder.fail = False
        deadline = time.monotonic() + 10
        while not recorder.instances() and time.monotonic() < deadline:
            time.sleep(0.1)
        (row,) = recorder.instances()
        assert publisher.published == [row.id]
