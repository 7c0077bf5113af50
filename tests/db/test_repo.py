"""Repository behaviour on both databases: idempotent receive, conflicts, claims, quarantine, reports."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.core.contracts import ReceivedObject
from cxr_triage.core.states import InstanceState, NotAnalysedReason, StudyState
from cxr_triage.db import repo
from cxr_triage.db.migrate import upgrade
from cxr_triage.db.session import make_engine, make_session_factory
from cxr_triage.db.tables import Instance, Study
from tests.databases import database

T0 = datetime(2026, 11, 22, 8, 0, tzinfo=timezone.utc)


@pytest.fixture(params=["sqlite", "postgresql"])
def sessions(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    with database(request.param, tmp_path) as url:
        upgrade(url)
        engine = make_engine(url)
        yield make_session_factory(engine)
        engine.dispose()


def received(uid: str = "1.2.3.4", sha: str = "a" * 64, study: str = "1.2.3", **kw: object) -> ReceivedObject:
    fields: dict[str, object] = dict(
        sop_instance_uid=uid, sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", study_instance_uid=study,
        series_instance_uid=study + ".1", transfer_syntax_uid="1.2.840.10008.1.2.1", file_sha256=sha,
        file_size=10, spool_name=f"{sha[:2]}/{sha}.dcm", received_at=T0, patient_name="DOE^JANE", urgency=None,
    )
    fields.update(kw)
    return ReceivedObject(**fields)  # type: ignore[arg-type]


def test_same_uid_same_bytes_is_idempotent(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        first = repo.record_received(s, obj=received())
    with sessions() as s:
        again = repo.record_received(s, obj=received())
    assert first.created and first.needs_analysis
    assert not again.created and not again.needs_analysis and again.instance_id == first.instance_id


def test_same_uid_different_bytes_keeps_both_and_flags_conflict(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        first = repo.record_received(s, obj=received(sha="a" * 64))
    with sessions() as s:
        second = repo.record_received(s, obj=received(sha="b" * 64))
    assert second.created and second.conflict and not second.needs_analysis
    with sessions() as s:
        inst = s.get(Instance, second.instance_id)
        assert inst is not None
        assert inst.conflicts_with == first.instance_id
        assert inst.state == InstanceState.NOT_ANALYSED and inst.reason == NotAnalysedReason.UID_CONFLICT


def test_out_of_scope_is_recorded_not_analysed(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        out = repo.record_received(s, obj=received(out_of_scope_reason=NotAnalysedReason.NOT_HUMAN))
    assert not out.needs_analysis
    with sessions() as s:
        study = s.get(Study, s.get(Instance, out.instance_id).study_pk)  # type: ignore[union-attr]
        assert study is not None and study.state == StudyState.NOT_ANALYSED


def test_claim_counts_attempts_and_quarantines(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        iid = repo.record_received(s, obj=received()).instance_id
    lease = timedelta(seconds=30)
    for attempt in (1, 2):
        with sessions() as s:
            claim = repo.claim_for_analysis(s, instance_id=iid, now=T0 + timedelta(minutes=attempt), lease=lease, max_attempts=2)
        assert isinstance(claim, repo.Claim) and claim.attempt == attempt
        with sessions() as s:  # a second delivery while the lease runs is refused, not double-processed
            busy = repo.claim_for_analysis(s, instance_id=iid, now=T0 + timedelta(minutes=attempt, seconds=1), lease=lease, max_attempts=2)
        assert isinstance(busy, repo.ClaimRefusal) and busy.why == "busy"
    with sessions() as s:
        final = repo.claim_for_analysis(s, instance_id=iid, now=T0 + timedelta(minutes=5), lease=lease, max_attempts=2)
    assert isinstance(final, repo.ClaimRefusal) and final.why == "quarantined"
    with sessions() as s:
        inst = s.get(Instance, iid)
        assert inst is not None and inst.state == InstanceState.FAILED and "2 attempts" in (inst.reason or "")


def test_reconciler_finds_stale_work(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        stale = repo.record_received(s, obj=received(uid="1.1", sha="c" * 64)).instance_id
        busy = repo.record_received(s, obj=received(uid="1.2", sha="d" * 64)).instance_id
    with sessions() as s:
        repo.claim_for_analysis(s, instance_id=busy, now=T0, lease=timedelta(seconds=30), max_attempts=3)
    with sessions() as s:
        early = repo.unfinished_instances(s, now=T0 + timedelta(seconds=10), grace=timedelta(seconds=60), lease=timedelta(seconds=30))
        late = repo.unfinished_instances(s, now=T0 + timedelta(seconds=120), grace=timedelta(seconds=60), lease=timedelta(seconds=30))
    assert early == []
    assert late == [stale, busy]


def test_reconciler_requeues_each_row_once_per_interval_in_bounded_batches(sessions: sessionmaker[Session]) -> None:
    grace = after = timedelta(seconds=30)
    lease = timedelta(seconds=30)
    with sessions() as s:
        ids = [repo.record_received(s, obj=received(uid=f"4.{n}", sha=f"{n}" * 64)).instance_id for n in range(5)]
    with sessions() as s:  # the listener published two of them a moment ago
        repo.mark_queued(s, instance_ids=ids[3:], now=T0 + timedelta(seconds=50))
        s.commit()

    def take(at: float, limit: int = 2) -> list[int]:
        with sessions() as s:
            return repo.take_for_requeue(s, now=T0 + timedelta(seconds=at), grace=grace, lease=lease,
                                         requeue_after=after, limit=limit)

    assert take(60) == ids[:2]  # bounded batch, oldest first; the two just published are left alone
    assert take(61) == ids[2:3]  # the next round continues with the rest, not the rows it just re-queued
    assert take(62) == []  # everything was (re)queued within the interval: nothing is published again
    with sessions() as s:
        rows = {i.id: i for i in s.query(Instance).all()}
        assert all(rows[i].state == InstanceState.QUEUED for i in ids)
        assert rows[ids[0]].queued_at == T0 + timedelta(seconds=60)
        assert rows[ids[3]].queued_at == T0 + timedelta(seconds=50)
    assert take(100, limit=10) == [ids[3], ids[4], ids[0], ids[1], ids[2]]  # lost messages come back, oldest first
    # A dead worker's claim (its lease expired) needs a new message as soon as the lease ends, even though it was
    # queued recently (that message was consumed by the claim); once re-queued it is left for an interval.
    with sessions() as s:
        repo.claim_for_analysis(s, instance_id=ids[0], now=T0 + timedelta(seconds=101), lease=timedelta(seconds=10),
                                max_attempts=3)
    assert take(110, limit=10) == []  # lease still running
    assert take(112, limit=10) == [ids[0]]
    assert take(113, limit=10) == []


def test_reconciler_skips_rows_locked_by_another_transaction(tmp_path: Path) -> None:
    """PostgreSQL: a row held by a worker's open transaction is skipped (SKIP LOCKED), never waited for."""
    import time

    from sqlalchemy import select

    with database("postgresql", tmp_path) as url:
        upgrade(url)
        engine = make_engine(url)
        factory = make_session_factory(engine)
        try:
            with factory() as s:
                locked, free = (repo.record_received(s, obj=received(uid=f"5.{n}", sha=f"{n}" * 64)).instance_id
                                for n in range(2))
            with factory() as holder:
                holder.execute(select(Instance).where(Instance.id == locked).with_for_update())
                started = time.monotonic()
                with factory() as s:
                    got = repo.take_for_requeue(s, now=T0 + timedelta(minutes=5), grace=timedelta(seconds=30),
                                                lease=timedelta(seconds=30), requeue_after=timedelta(seconds=30),
                                                limit=10)
                assert got == [free] and time.monotonic() - started < 5
                holder.rollback()
        finally:
            engine.dispose()


def test_renewed_lease_keeps_a_live_claim_and_an_unrenewed_one_expires(sessions: sessionmaker[Session]) -> None:
    lease = timedelta(seconds=30)
    with sessions() as s:
        live = repo.record_received(s, obj=received(uid="2.1", sha="e" * 64)).instance_id
        dead = repo.record_received(s, obj=received(uid="2.2", sha="f" * 64)).instance_id
        done = repo.record_received(s, obj=received(uid="2.3", sha="1" * 64)).instance_id
    with sessions() as s:
        for iid in (live, dead):
            repo.claim_for_analysis(s, instance_id=iid, now=T0, lease=lease, max_attempts=3)
    with sessions() as s:
        assert s.get(Instance, live).lease_until == T0 + lease
    # The live worker renews at 20 s and 40 s; the dead one's claim is never renewed.
    for at in (20, 40):
        with sessions() as s:
            # Only ANALYSING rows are extended (a finished or unknown id is ignored).
            assert repo.renew_leases(s, instance_ids=[live, done, 999], until=T0 + timedelta(seconds=at) + lease) == 1
    with sessions() as s:
        found = repo.unfinished_instances(s, now=T0 + timedelta(seconds=45), grace=timedelta(hours=1), lease=lease)
        busy = repo.claim_for_analysis(s, instance_id=live, now=T0 + timedelta(seconds=45), lease=lease, max_attempts=3)
    assert found == [dead]  # dead worker noticed after one lease, long before any task time limit
    assert isinstance(busy, repo.ClaimRefusal) and busy.why == "busy"
    with sessions() as s:  # the re-queued instance can be claimed again at once
        again = repo.claim_for_analysis(s, instance_id=dead, now=T0 + timedelta(seconds=46), lease=lease, max_attempts=3)
    assert isinstance(again, repo.Claim) and again.attempt == 2


def test_claims_from_before_renewable_leases_still_expire(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        iid = repo.record_received(s, obj=received(uid="3.1", sha="2" * 64)).instance_id
    with sessions() as s:
        repo.claim_for_analysis(s, instance_id=iid, now=T0, lease=timedelta(seconds=30), max_attempts=3)
        inst = s.get(Instance, iid)
        inst.lease_until = None  # as a row claimed by the previous version looks after the upgrade
        s.commit()
    with sessions() as s:
        assert repo.unfinished_instances(s, now=T0 + timedelta(seconds=20), grace=timedelta(hours=1),
                                         lease=timedelta(seconds=30)) == []
        assert repo.unfinished_instances(s, now=T0 + timedelta(seconds=31), grace=timedelta(hours=1),
                                         lease=timedelta(seconds=30)) == [iid]


def _analyse(sessions: sessionmaker[Session], iid: int, p: float, when: datetime) -> None:
    with sessions() as s:
        repo.claim_for_analysis(s, instance_id=iid, now=when, lease=timedelta(seconds=30), max_attempts=3)
    with sessions() as s:
        record = repo.AnalysisRecord(
            pneumonia_probability=p, flagged=p >= 0.5, threshold=0.5,
            boxes=[repo.BoxRecord(1, 2, 30, 40, 0.9)], label_probabilities={"Pneumonia": p}, heatmap=[[0.0, 1.0]],
        )
        assert repo.save_analysis(s, instance_id=iid, model_version="m@1", demo_model=False, result=record, inferred_at=when, now=when)
    with sessions() as s:  # saving again is a no-op (unique on instance + model version)
        assert not repo.save_analysis(s, instance_id=iid, model_version="m@1", demo_model=False, result=record, inferred_at=when, now=when)


def test_report_plan_and_amendment(sessions: sessionmaker[Session]) -> None:
    with sessions() as s:
        a = repo.record_received(s, obj=received(uid="2.1", sha="e" * 64)).instance_id
    _analyse(sessions, a, 0.8, T0)
    with sessions() as s:
        assert repo.studies_due_for_report(s, stable_before=T0 - timedelta(seconds=1)) == []
        due = repo.studies_due_for_report(s, stable_before=T0 + timedelta(seconds=1))
        assert len(due) == 1
        plan = repo.report_plan(s, study_id=due[0])
        assert plan is not None and plan.revision == 1 and plan.instance_ids == (a,)
        created = repo.add_report(s, plan=plan, sop_instance_uid="9.1", series_instance_uid="9", file_name="x", destinations=["P@h:1"], now=T0)
        assert created is not None and len(created[1]) == 1
    with sessions() as s:  # the same plan again (a racing worker) is refused by the unique key
        assert repo.add_report(s, plan=plan, sop_instance_uid="9.2", series_instance_uid="9", file_name="y", destinations=[], now=T0) is None
        assert repo.report_plan(s, study_id=due[0]) is None
    # A late image in the same study: the next plan amends revision 1.
    with sessions() as s:
        b = repo.record_received(s, obj=received(uid="2.2", sha="f" * 64, received_at=T0 + timedelta(minutes=1))).instance_id
    _analyse(sessions, b, 0.2, T0 + timedelta(minutes=1))
    with sessions() as s:
        plan2 = repo.report_plan(s, study_id=due[0])
        assert plan2 is not None and plan2.revision == 2 and plan2.predecessor_id == created[0]
        assert plan2.instance_ids == (a, b)
        study = s.get(Study, due[0])
        assert study is not None and study.pneumonia_score == pytest.approx(0.8) and study.flagged
