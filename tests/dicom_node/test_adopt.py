"""Spool adoption: a file whose record failed (peer answered 0xA701) is recorded later even if nobody resends."""

from __future__ import annotations

import os
import time
from pathlib import Path

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


def test_orphans_left_by_a_previous_process_are_adopted_at_start(tmp_path, recorder, dicom_data_dir):
    """A listener that crashed between spooling and recording leaves only the file: the next start's full scan."""
    settings = make_settings(tmp_path)
    publisher = Publisher()
    name = _orphan(settings, recorder, publisher, dicom_data_dir / "nih-dx-secondary-capture.dcm")
    with running_listener(settings, recorder, publisher, recorded=recorder.recorded, adopt_min_age_s=0):
        deadline = time.monotonic() + 10
        while not recorder.instances() and time.monotonic() < deadline:
            time.sleep(0.1)
        (row,) = recorder.instances()
    assert row.spool_name == name and publisher.published == [row.id]


def test_a_named_round_looks_only_at_the_names_given(tmp_path, recorder, dicom_data_dir):
    settings = make_settings(tmp_path)
    publisher = Publisher()
    first = _orphan(settings, recorder, publisher, dicom_data_dir / "nih-dx-secondary-capture.dcm")
    with running_listener(settings, recorder, publisher):
        recorder.fail = True
        assert pynetdicom_store(settings.dicom_port, dicom_data_dir / "siim-cr-pa-jpeg-baseline.dcm") == (
            STATUS_DB_UNAVAILABLE
        )
        recorder.fail = False
    spool = Spool(settings.spool_dir)
    assert len(list(spool.iter_names())) == 2  # two orphans, different bytes
    report = adopt_orphans(spool, recorded=recorder.recorded, record=recorder, publish=publisher, min_age_s=0,
                           names=[first])
    assert report.scanned == 1 and report.adopted == 1
    assert [r.spool_name for r in recorder.instances()] == [first]


class FlagRecorder(Recorder):
    """A recorder whose database is "down" while a flag file exists: the switch reaches forked listener processes."""

    def __init__(self, url: str, flag: Path) -> None:
        super().__init__(url)
        self.flag = flag

    def __call__(self, obj):  # type: ignore[no-untyped-def]
        self.fail = self.flag.exists()
        return super().__call__(obj)

    def recorded(self, sha256s):  # type: ignore[no-untyped-def]
        self.fail = self.flag.exists()
        return super().recorded(sha256s)


def test_every_listener_process_adopts_its_own_failed_records(tmp_path, dicom_data_dir):
    from tests.dicom_node.listener_support import acknowledged, storescu_popen
    from tests.dicom_node.test_listener import _copies

    flag = tmp_path / "db-down"
    flag.touch()
    recorder = FlagRecorder(migrated(f"sqlite:///{tmp_path / 'db.sqlite3'}"), flag)
    settings = make_settings(tmp_path)
    files = _copies(dicom_data_dir / "veterinary-dx-lateral-thorax.dcm", tmp_path / "batch", 12)
    with running_listener(settings, recorder, Publisher(), processes=2, recorded=recorder.recorded,
                          adopt_interval_s=0.3, adopt_min_age_s=0):
        procs = [storescu_popen(settings.dicom_port, files[i::4], option="--no-halt") for i in range(4)]
        answers: dict[str, str] = {}
        for proc in procs:
            out, _ = proc.communicate(timeout=60)
            answers.update(acknowledged(out))
        assert len(answers) == len(files) and all("OutOfResources" in a for a in answers.values()), set(answers.values())
        assert recorder.instances() == []
        flag.unlink()  # the database is back; nobody resends
        deadline = time.monotonic() + 20
        while len(recorder.instances()) < len(files) and time.monotonic() < deadline:
            time.sleep(0.2)
        rows = recorder.instances()
    assert len(rows) == len(files) and len({r.sop_instance_uid for r in rows}) == len(files)
    recorder.dispose()
