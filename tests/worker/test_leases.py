"""LeaseKeeper against a real migrated database (SQLite and PostgreSQL): holds are renewed, released ones and overlong ones not."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cxr_triage.core.contracts import ReceivedObject
from cxr_triage.db import repo
from cxr_triage.db.migrate import upgrade
from cxr_triage.db.session import make_engine, make_session_factory
from cxr_triage.db.tables import Instance
from cxr_triage.worker.leases import LeaseKeeper
from tests.databases import database

T0 = datetime(2026, 11, 22, 8, 0, tzinfo=timezone.utc)


class _Clock:
    def __init__(self) -> None:
        self.now = T0
        self.mono = 1000.0

    def __call__(self) -> datetime:
        return self.now

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
        self.mono += seconds


@pytest.fixture(params=["sqlite", "postgresql"])
def claimed(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    with database(request.param, tmp_path) as url:
        yield from _claimed(url)


def _claimed(url: str):  # type: ignore[no-untyped-def]
    upgrade(url)
    engine = make_engine(url)
    sessions = make_session_factory(engine)
    ids = []
    for n in range(3):
        sha = f"{n}" * 64
        obj = ReceivedObject(
            sop_instance_uid=f"1.2.{n}", sop_class_uid="1.2.840.10008.5.1.4.1.1.1", study_instance_uid="1.2.3",
            series_instance_uid="1.2.3.1", transfer_syntax_uid="1.2.840.10008.1.2.1", file_sha256=sha,
            file_size=10, spool_name=f"{sha[:2]}/{sha}.dcm", received_at=T0,
        )
        with sessions() as s:
            ids.append(repo.record_received(s, obj=obj).instance_id)
        with sessions() as s:
            repo.claim_for_analysis(s, instance_id=ids[-1], now=T0, lease=timedelta(seconds=30), max_attempts=3)
    yield sessions, ids
    engine.dispose()


def _lease_until(sessions, iid: int) -> datetime:  # type: ignore[no-untyped-def]
    with sessions() as s:
        return s.get(Instance, iid).lease_until


def test_holds_are_renewed_until_released_or_held_too_long(claimed) -> None:  # type: ignore[no-untyped-def]
    sessions, (a, b, c) = claimed
    clock = _Clock()
    keeper = LeaseKeeper(sessions, lease=timedelta(seconds=30), max_hold=timedelta(seconds=100), clock=clock,
                         monotonic=clock.monotonic, background=False)  # the test drives renew_now() itself
    with keeper.hold(a):
        clock.advance(20)
        with keeper.hold(b):
            assert keeper.held() == [a, b]
            assert keeper.renew_now() == 2
            assert _lease_until(sessions, a) == _lease_until(sessions, b) == T0 + timedelta(seconds=50)
        clock.advance(60)  # a is held 80 s: still renewed; b was released
        assert keeper.renew_now() == 1
        assert _lease_until(sessions, a) == T0 + timedelta(seconds=110)
        assert _lease_until(sessions, b) == T0 + timedelta(seconds=50)
        clock.advance(30)  # a held 110 s > max_hold: given up (a hung decoder must not hold it forever)
        assert keeper.renew_now() == 0
    assert keeper.held() == []
    assert _lease_until(sessions, c) == T0 + timedelta(seconds=30)  # never held here: never renewed


def test_background_thread_renews_in_real_time(claimed) -> None:  # type: ignore[no-untyped-def]
    sessions, (a, _b, _c) = claimed
    keeper = LeaseKeeper(sessions, lease=timedelta(seconds=1.5), max_hold=timedelta(minutes=5),
                         clock=lambda: datetime.now(timezone.utc))
    with keeper.hold(a):
        first = _lease_until(sessions, a)
        deadline = time.monotonic() + 10
        while _lease_until(sessions, a) == first and time.monotonic() < deadline:
            time.sleep(0.1)
        renewed = _lease_until(sessions, a)
        assert renewed > first and renewed > datetime.now(timezone.utc)
    time.sleep(1.0)
    assert keeper._thread is None  # idle keeper stops its thread
