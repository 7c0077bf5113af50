"""Reading worklist, study detail, admin overview: read-mostly repository functions (keyword-only, Session first).

They commit only where the docstring says so (mark_read, prepare_requeue, reset_outbox_for_resend).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, selectinload

from cxr_triage.core.states import TERMINAL_INSTANCE_STATES, InstanceState, OutboxState, StudyState
from cxr_triage.db.repo import refresh_study
from cxr_triage.db.results import not_analysed_reasons
from cxr_triage.db.tables import Analysis, Instance, OutboxItem, StructuredReport, Study

WORKLIST_CAP = 5000  # unread studies considered at once (oldest first, so overdue ones are never cut off)


def unread_studies(session: Session, *, limit: int = WORKLIST_CAP) -> list[Study]:
    """Unread studies, oldest first, with instances loaded (for not-analysed reasons)."""
    stmt = (
        select(Study)
        .where(Study.read_at.is_(None))
        .options(selectinload(Study.instances))
        .order_by(Study.received_at, Study.id)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def study_reasons(study: Study) -> tuple[str, ...]:
    return tuple(not_analysed_reasons(study))


def load_study(session: Session, *, study_id: int) -> Study | None:
    """A study with instances, analyses, boxes, reports and outbox rows loaded."""
    stmt = (
        select(Study)
        .where(Study.id == study_id)
        .options(
            selectinload(Study.instances).selectinload(Instance.analyses).selectinload(Analysis.boxes),
        )
    )
    return session.scalar(stmt)


def study_reports(session: Session, *, study_id: int) -> list[StructuredReport]:
    stmt = (
        select(StructuredReport)
        .where(StructuredReport.study_pk == study_id)
        .options(selectinload(StructuredReport.outbox))
        .order_by(StructuredReport.id)
    )
    return list(session.scalars(stmt))


def mark_read(session: Session, *, study_id: int, by: str, now: datetime, read: bool = True) -> Study | None:
    """Mark a study read (or unread again); commits. None if the study does not exist."""
    study = session.get(Study, study_id)
    if study is None:
        session.rollback()
        return None
    if read:
        if study.read_at is None:
            study.read_at = now
            study.read_by = by[:128]
    else:
        study.read_at = None
        study.read_by = None
    session.commit()
    return study


def change_marker(session: Session) -> tuple[Any, ...]:
    """A cheap fingerprint of everything the worklist shows; it changes when a result, a study, a state change
    or a read mark arrives. Polled by the live-update stream."""
    s = session.execute(
        select(func.count(Study.id), func.max(Study.read_at), func.count(Study.read_at), func.max(Study.last_received_at))
    ).one()
    i = session.execute(select(func.max(Instance.id), func.max(Instance.stored_at), func.max(Instance.started_at))).one()
    a = session.scalar(select(func.max(Analysis.id)))
    return tuple(str(v) for v in (*s, *i, a))


# ------------------------------------------------------------------------------------------------ admin
@dataclass(frozen=True)
class AdminOverview:
    queue: dict[str, int]
    instances_by_state: dict[str, int]
    analysed_last_5_min: int
    analysed_last_60_min: int
    failed_total: int
    failed_last_60_min: int
    outbox_by_state: dict[str, int]
    oldest_pending_sr_created_at: datetime | None
    oldest_pending_sr_id: int | None
    not_analysed: list[dict[str, Any]]


def admin_overview(session: Session, *, now: datetime, limit: int = 50) -> AdminOverview:
    by_state = {state: n for state, n in session.execute(select(Instance.state, func.count()).group_by(Instance.state))}
    queue = {s: by_state.get(s, 0) for s in (InstanceState.RECEIVED, InstanceState.QUEUED, InstanceState.ANALYSING)}

    def analysed_since(delta: timedelta) -> int:
        return session.scalar(select(func.count(Analysis.id)).where(Analysis.created_at >= now - delta)) or 0

    failed_recent = session.scalar(
        select(func.count(Instance.id)).where(Instance.state == InstanceState.FAILED, Instance.stored_at >= now - timedelta(hours=1))
    ) or 0
    outbox = {s: n for s, n in session.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state))}
    oldest = session.execute(
        select(OutboxItem.id, OutboxItem.created_at)
        .where(OutboxItem.state == OutboxState.PENDING)
        .order_by(OutboxItem.created_at, OutboxItem.id)
        .limit(1)
    ).first()
    studies = session.scalars(
        select(Study)
        .where(Study.state.in_([StudyState.NOT_ANALYSED, StudyState.FAILED]))
        .options(selectinload(Study.instances))
        .order_by(Study.received_at.desc())
        .limit(limit)
    ).all()
    not_analysed = [
        {"study_id": s.id, "state": s.state, "received_at": s.received_at.isoformat(),
         "reasons": list(not_analysed_reasons(s)), "read": s.read_at is not None}
        for s in studies
    ]
    return AdminOverview(
        queue={str(k): v for k, v in queue.items()},
        instances_by_state={str(k): v for k, v in by_state.items()},
        analysed_last_5_min=analysed_since(timedelta(minutes=5)),
        analysed_last_60_min=analysed_since(timedelta(minutes=60)),
        failed_total=by_state.get(InstanceState.FAILED, 0),
        failed_last_60_min=failed_recent,
        outbox_by_state={str(k): v for k, v in outbox.items()},
        oldest_pending_sr_created_at=oldest.created_at if oldest else None,
        oldest_pending_sr_id=oldest.id if oldest else None,
        not_analysed=not_analysed,
    )


def recent_reports(session: Session, *, limit: int = 50) -> list[StructuredReport]:
    stmt = (
        select(StructuredReport)
        .options(selectinload(StructuredReport.outbox))
        .order_by(StructuredReport.id.desc())
        .limit(limit)
    )
    return list(session.scalars(stmt))


def prepare_requeue(session: Session, *, study_id: int) -> list[int] | None:
    """The instances of a study to hand to `AdminActions.requeue_instances`; commits.

    FAILED (quarantined) instances are reset to RECEIVED with their attempt count cleared so a worker will claim
    them again; instances still in flight (received, queued, analysing) are included so a lost task is
    republished. Terminal ones (analysed, out of scope, duplicates) and UID conflicts are left out: the claim
    refuses them, so listing them would report work that never happens. None if no such study; [] if nothing
    of it can be re-queued.
    """
    study = session.get(Study, study_id)
    if study is None:
        session.rollback()
        return None
    ids: list[int] = []
    for inst in session.scalars(select(Instance).where(Instance.study_pk == study_id).order_by(Instance.id)):
        if inst.conflicts_with is not None:
            continue
        if inst.state == InstanceState.FAILED:
            inst.state = InstanceState.RECEIVED
            inst.reason = None
            inst.attempts = 0
            inst.started_at = None
            inst.stored_at = None
        if inst.state in TERMINAL_INSTANCE_STATES:
            continue
        ids.append(inst.id)
    if ids:
        refresh_study(session, study=study)
    session.commit()
    return ids


def reset_outbox_for_resend(session: Session, *, report_id: int, now: datetime) -> list[int] | None:
    """Set every outbox row of a report back to pending, due now; commits. None if no such report."""
    report = session.get(StructuredReport, report_id)
    if report is None:
        session.rollback()
        return None
    session.execute(
        update(OutboxItem)
        .where(OutboxItem.report_pk == report_id)
        .values(state=OutboxState.PENDING, next_attempt_at=now, sent_at=None)
    )
    ids = list(session.scalars(select(OutboxItem.id).where(OutboxItem.report_pk == report_id).order_by(OutboxItem.id)))
    session.commit()
    return ids


# ------------------------------------------------------------------------------------------------ metrics
def recent_instance_timings(session: Session, *, since: datetime, limit: int = 20000) -> list[tuple[Any, ...]]:
    """(received_at, queued_at, started_at, inferred_at, stored_at) of instances finished since `since`."""
    stmt = (
        select(Instance.received_at, Instance.queued_at, Instance.started_at, Instance.inferred_at, Instance.stored_at)
        .where(Instance.stored_at >= since, Instance.state == InstanceState.ANALYSED)
        .order_by(Instance.stored_at.desc())
        .limit(limit)
    )
    return [tuple(r) for r in session.execute(stmt)]


def recent_delivery_timings(session: Session, *, since: datetime, limit: int = 20000) -> list[tuple[Any, Any]]:
    """(created_at, sent_at) of SR deliveries sent since `since`."""
    stmt = (
        select(OutboxItem.created_at, OutboxItem.sent_at)
        .where(OutboxItem.sent_at >= since)
        .limit(limit)
    )
    return [tuple(r) for r in session.execute(stmt)]
