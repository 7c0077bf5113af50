"""Repository functions: keyword-only, each takes a Session and leaves committing to the caller
unless its name says otherwise. HTTP and Celery concerns stay out of here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import and_, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from cxr_triage.core.contracts import Box, ReceivedObject, RecordOutcome
from cxr_triage.core.states import (
    TERMINAL_INSTANCE_STATES,
    InstanceState,
    NotAnalysedReason,
    OutboxState,
    StudyState,
)
from cxr_triage.db.tables import Analysis, Finding, Instance, OutboxItem, Study, StructuredReport

_STUDY_FIELDS = (
    "patient_id", "patient_name", "patient_birth_date", "patient_sex", "accession_number", "study_id",
    "study_date", "study_time", "study_description", "referring_physician_name", "urgency",
)


# ---------------------------------------------------------------------------------------------- receive
def _get_or_create_study(session: Session, obj: ReceivedObject) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == obj.study_instance_uid))
    if study is not None:
        study.last_received_at = max(study.last_received_at, obj.received_at)
        if study.state != StudyState.RECEIVING:
            study.state = StudyState.RECEIVING
        return study
    study = Study(
        study_instance_uid=obj.study_instance_uid,
        received_at=obj.received_at,
        last_received_at=obj.received_at,
        state=StudyState.RECEIVING,
        **{name: getattr(obj, name) for name in _STUDY_FIELDS},
    )
    try:
        with session.begin_nested():
            session.add(study)
    except IntegrityError:  # another association created it concurrently
        study = session.scalars(select(Study).where(Study.study_instance_uid == obj.study_instance_uid)).one()
    return study


def record_received(session: Session, *, obj: ReceivedObject) -> RecordOutcome:
    """Record a durable received object. Idempotent on (SOP Instance UID, content hash); commits."""
    for _ in range(3):
        existing = session.scalars(
            select(Instance).where(Instance.sop_instance_uid == obj.sop_instance_uid).order_by(Instance.id)
        ).all()
        for inst in existing:
            if inst.file_sha256 == obj.file_sha256:
                session.rollback()
                return RecordOutcome(instance_id=inst.id, created=False, needs_analysis=False)
        conflict_with = existing[0].id if existing else None
        study = _get_or_create_study(session, obj)
        reason = obj.out_of_scope_reason
        if conflict_with is not None:
            # Keep both; don't analyse the second copy: which bytes are right is a human decision.
            reason = reason or NotAnalysedReason.UID_CONFLICT
        inst = Instance(
            study_pk=study.id,
            sop_instance_uid=obj.sop_instance_uid,
            sop_class_uid=obj.sop_class_uid,
            series_instance_uid=obj.series_instance_uid,
            transfer_syntax_uid=obj.transfer_syntax_uid,
            modality=obj.modality,
            body_part=obj.body_part,
            view_position=obj.view_position,
            rows=obj.rows,
            columns=obj.columns,
            file_sha256=obj.file_sha256,
            file_size=obj.file_size,
            spool_name=obj.spool_name,
            calling_ae=obj.calling_ae,
            state=InstanceState.NOT_ANALYSED if reason else InstanceState.RECEIVED,
            reason=reason,
            attempts=0,
            conflicts_with=conflict_with,
            received_at=obj.received_at,
            stored_at=obj.received_at if reason else None,
        )
        try:
            with session.begin_nested():
                session.add(inst)
            if reason:
                refresh_study(session, study=study)
            else:
                session.flush()
            session.commit()
        except IntegrityError:
            session.rollback()
            continue  # a concurrent identical store won the race: loop and find it
        return RecordOutcome(
            instance_id=inst.id, created=True, needs_analysis=reason is None, conflict=conflict_with is not None
        )
    raise RuntimeError("could not record instance after concurrent retries")


def recorded_hashes(session: Session, *, sha256s: Sequence[str]) -> set[str]:
    """Which of these content hashes some instance row already references (the spool adoption scan)."""
    if not sha256s:
        return set()
    rows = session.scalars(select(Instance.file_sha256).where(Instance.file_sha256.in_(list(sha256s))))
    return set(rows)


def mark_queued(session: Session, *, instance_ids: Sequence[int], now: datetime) -> None:
    session.execute(
        update(Instance)
        .where(Instance.id.in_(instance_ids), Instance.state == InstanceState.RECEIVED)
        .values(state=InstanceState.QUEUED, queued_at=now)
    )


# ---------------------------------------------------------------------------------------------- analyse
@dataclass(frozen=True)
class Claim:
    """What a worker needs to analyse one instance. No PHI."""

    instance_id: int
    spool_name: str
    attempt: int


@dataclass(frozen=True)
class ClaimRefusal:
    instance_id: int
    why: str  # "missing" | "terminal" | "busy" | "quarantined"


def claim_for_analysis(
    session: Session, *, instance_id: int, now: datetime, lease: timedelta, max_attempts: int
) -> Claim | ClaimRefusal:
    """Count an attempt and take a lease before inference; commits.

    An instance already being analysed under an unexpired lease is left alone ("busy"): its worker is alive
    or the reconciler will re-queue it when the lease runs out. After `max_attempts` the instance is
    quarantined as FAILED instead of being tried again (a poison image must not loop forever).
    """
    inst = session.get(Instance, instance_id, with_for_update=True)
    if inst is None:
        session.rollback()
        return ClaimRefusal(instance_id, "missing")
    if inst.state in TERMINAL_INSTANCE_STATES:
        session.rollback()
        return ClaimRefusal(instance_id, "terminal")
    if inst.state == InstanceState.ANALYSING and _lease_end(inst, lease) > now:
        session.rollback()
        return ClaimRefusal(instance_id, "busy")
    if inst.attempts >= max_attempts:
        inst.state = InstanceState.FAILED
        inst.reason = f"quarantined after {inst.attempts} attempts"
        inst.stored_at = now
        refresh_study(session, study=inst.study)
        session.commit()
        return ClaimRefusal(instance_id, "quarantined")
    inst.attempts += 1
    inst.state = InstanceState.ANALYSING
    inst.started_at = now
    inst.lease_until = now + lease
    if inst.queued_at is None:
        inst.queued_at = now
    session.commit()
    return Claim(instance_id=inst.id, spool_name=inst.spool_name, attempt=inst.attempts)


def _lease_end(inst: Instance, lease: timedelta) -> datetime:
    if inst.lease_until is not None:
        return inst.lease_until
    if inst.started_at is not None:  # claimed before leases were renewable (schema 0003)
        return inst.started_at + lease
    return datetime.min.replace(tzinfo=timezone.utc)


def renew_leases(session: Session, *, instance_ids: Sequence[int], until: datetime) -> int:
    """Extend the claims of instances still being analysed (a live worker's heartbeat); commits. Returns the count."""
    if not instance_ids:
        return 0
    result = session.execute(
        update(Instance)
        .where(Instance.id.in_(list(instance_ids)), Instance.state == InstanceState.ANALYSING)
        .values(lease_until=until)
    )
    session.commit()
    return int(result.rowcount or 0)


BoxRecord = Box  # boxes are stored exactly as the analyzer produced them


@dataclass(frozen=True)
class AnalysisRecord:
    pneumonia_probability: float
    flagged: bool
    threshold: float
    boxes: Sequence[BoxRecord]
    label_probabilities: dict[str, float]
    heatmap: list[list[float]] | None


def save_analysis(
    session: Session,
    *,
    instance_id: int,
    model_version: str,
    demo_model: bool,
    result: AnalysisRecord,
    inferred_at: datetime,
    now: datetime,
) -> bool:
    """Persist one result idempotently (unique on instance + model version); commits. False if it existed."""
    inst = session.get(Instance, instance_id, with_for_update=True)
    if inst is None:
        session.rollback()
        return False
    created = False
    found = session.scalar(
        select(Analysis).where(Analysis.instance_pk == instance_id, Analysis.model_version == model_version)
    )
    if found is None:
        analysis = Analysis(
            instance_pk=inst.id,
            model_version=model_version,
            demo_model=demo_model,
            pneumonia_probability=float(result.pneumonia_probability),
            flagged=bool(result.flagged),
            threshold=float(result.threshold),
            label_probabilities={k: float(v) for k, v in result.label_probabilities.items()},
            heatmap=result.heatmap,
            created_at=now,
            boxes=[Finding(x0=b.x0, y0=b.y0, x1=b.x1, y1=b.y1, score=b.score) for b in result.boxes],
        )
        try:
            with session.begin_nested():
                session.add(analysis)
            created = True
        except IntegrityError:
            created = False
    inst.state = InstanceState.ANALYSED
    inst.reason = None
    inst.inferred_at = inst.inferred_at or inferred_at
    inst.stored_at = inst.stored_at or now
    study = inst.study
    refresh_study(session, study=study)
    session.commit()
    return created


def mark_not_analysed(session: Session, *, instance_id: int, reason: str, now: datetime, failed: bool = False) -> None:
    """Terminal: not analysed (out of scope / unreadable) or failed (quarantined); commits."""
    inst = session.get(Instance, instance_id, with_for_update=True)
    if inst is None or inst.state in TERMINAL_INSTANCE_STATES:
        session.rollback()
        return
    inst.state = InstanceState.FAILED if failed else InstanceState.NOT_ANALYSED
    inst.reason = reason[:64]
    inst.stored_at = now
    refresh_study(session, study=inst.study)
    session.commit()


def release_claim(session: Session, *, instance_id: int) -> None:
    """Give an instance back to the queue after a transient error (the attempt stays counted); commits."""
    session.execute(
        update(Instance)
        .where(Instance.id == instance_id, Instance.state == InstanceState.ANALYSING)
        .values(state=InstanceState.QUEUED)
    )
    session.commit()


def refresh_study(session: Session, *, study: Study) -> None:
    """Derive the study's state and score from its instances (no commit)."""
    session.flush()
    instances = session.scalars(
        select(Instance).where(Instance.study_pk == study.id).options(selectinload(Instance.analyses))
    ).all()
    states = {inst.state for inst in instances}
    analyses = [a for inst in instances if inst.state == InstanceState.ANALYSED for a in inst.analyses]
    if analyses:
        latest_version = max(analyses, key=lambda a: a.created_at).model_version
        current = [a for a in analyses if a.model_version == latest_version]
        study.pneumonia_score = max(a.pneumonia_probability for a in current)
        study.flagged = any(a.flagged for a in current)
        study.model_version = latest_version
        study.demo_model = any(a.demo_model for a in current)
    if not states <= TERMINAL_INSTANCE_STATES:
        study.state = StudyState.RECEIVING
    elif analyses:
        study.state = StudyState.ANALYSED
    elif InstanceState.FAILED in states:
        study.state = StudyState.FAILED
    else:
        study.state = StudyState.NOT_ANALYSED


# ---------------------------------------------------------------------------------------------- reconcile
def _unfinished_filter(*, now: datetime, grace: timedelta, lease: timedelta, requeue_after: timedelta | None) -> Any:
    waiting = and_(
        Instance.state.in_([InstanceState.RECEIVED, InstanceState.QUEUED]), Instance.received_at < now - grace
    )
    abandoned = or_(
        and_(Instance.state == InstanceState.ANALYSING, Instance.lease_until < now),
        # Claims taken before leases were renewable (schema 0003) carry no lease_until.
        and_(Instance.state == InstanceState.ANALYSING, Instance.lease_until.is_(None),
             Instance.started_at < now - lease),
    )
    if requeue_after is None:
        return or_(waiting, abandoned)
    # Published (by the listener or an earlier round) within `requeue_after`: its message is most likely still in
    # the broker; publishing it again every round would copy a whole backlog into the queue each interval.
    not_recent = or_(Instance.queued_at.is_(None), Instance.queued_at < now - requeue_after)
    # An abandoned claim consumed the message it was queued with (queued before the claim started): it needs a
    # new one now, not `requeue_after` later.
    consumed = Instance.queued_at <= Instance.started_at
    return or_(and_(waiting, not_recent), and_(abandoned, or_(not_recent, consumed)))


def unfinished_instances(
    session: Session,
    *,
    now: datetime,
    grace: timedelta,
    lease: timedelta,
    requeue_after: timedelta | None = None,
    limit: int | None = None,
) -> list[int]:
    """Instances that should be in the queue but may not be: received/queued for longer than `grace`,
    or analysing with an expired lease (its worker died); with `requeue_after`, only those not (re)queued
    within it. Oldest first (by when they were last queued), at most `limit`."""
    stmt = _unfinished_select(Instance.id, now=now, grace=grace, lease=lease, requeue_after=requeue_after,
                              limit=limit)
    return list(session.scalars(stmt))


def _unfinished_select(entity: Any, *, now: datetime, grace: timedelta, lease: timedelta,
                       requeue_after: timedelta | None, limit: int | None) -> Any:
    """The reconciler's candidates, oldest first (by when they were last queued), at most ``limit``."""
    stmt = (
        select(entity)
        .where(_unfinished_filter(now=now, grace=grace, lease=lease, requeue_after=requeue_after))
        .order_by(func.coalesce(Instance.queued_at, Instance.received_at), Instance.id)
    )
    return stmt if limit is None else stmt.limit(limit)


def take_for_requeue(
    session: Session, *, now: datetime, grace: timedelta, lease: timedelta, requeue_after: timedelta, limit: int
) -> list[int]:
    """The reconciler's batch: pick at most `limit` unfinished instances not (re)queued within `requeue_after`,
    stamp them queued now (RECEIVED -> QUEUED; `queued_at` = now, so the next rounds skip them), commit, and
    return their ids for the caller to publish. Rows another transaction holds locked are skipped (PostgreSQL:
    SKIP LOCKED), so the reconciler never waits behind a worker's claim."""
    stmt = _unfinished_select(Instance, now=now, grace=grace, lease=lease, requeue_after=requeue_after,
                              limit=limit).with_for_update(skip_locked=True)
    rows = list(session.scalars(stmt))
    for inst in rows:
        inst.queued_at = now
        if inst.state == InstanceState.RECEIVED:
            inst.state = InstanceState.QUEUED
    ids = [inst.id for inst in rows]
    session.commit()
    return ids


# ---------------------------------------------------------------------------------------------- results
def studies_due_for_report(session: Session, *, stable_before: datetime) -> list[int]:
    """Studies whose images are all terminal, quiet since `stable_before`, with analysed images that no SR of
    the current model version covers yet."""
    candidates = session.scalars(
        select(Study).where(
            Study.state == StudyState.ANALYSED,
            Study.last_received_at <= stable_before,
            # A permanent build failure is not retried until an image arrives after it.
            or_(Study.report_failure.is_(None), Study.report_failed_at < Study.last_received_at),
        )
    ).all()
    return [s.id for s in candidates if report_plan(session, study_id=s.id) is not None]


def report_failed_for_current_images(study: Study) -> bool:
    """True while the study's last SR build failed permanently and no image arrived since."""
    return (
        study.report_failure is not None
        and study.report_failed_at is not None
        and study.report_failed_at >= study.last_received_at
    )


def record_report_failure(session: Session, *, study_id: int, reason: str, now: datetime) -> None:
    """Record a permanent SR build failure (a reason code, never a value); commits."""
    session.rollback()  # whatever the failed build had pending is not to be committed
    session.execute(
        update(Study).where(Study.id == study_id).values(report_failure=reason[:64], report_failed_at=now)
    )
    session.commit()


@dataclass(frozen=True)
class ReportPlan:
    study_id: int
    model_version: str
    revision: int
    predecessor_id: int | None
    instance_ids: tuple[int, ...]


def report_plan(session: Session, *, study_id: int, stable_before: datetime | None = None) -> ReportPlan | None:
    """What the next SR for a study would contain, or None if the latest SR already covers everything
    (or, with `stable_before`, if the study received an image after that time and may still be growing)."""
    study = session.get(Study, study_id)
    if study is None or study.model_version is None or study.state != StudyState.ANALYSED:
        return None
    if stable_before is not None and study.last_received_at > stable_before:
        return None
    instance_ids = tuple(
        session.scalars(
            select(Instance.id)
            .join(Analysis, Analysis.instance_pk == Instance.id)
            .where(
                Instance.study_pk == study_id,
                Instance.state == InstanceState.ANALYSED,
                Analysis.model_version == study.model_version,
            )
            .order_by(Instance.id)
        )
    )
    if not instance_ids:
        return None
    latest = session.scalar(
        select(StructuredReport)
        .where(StructuredReport.study_pk == study_id, StructuredReport.model_version == study.model_version)
        .order_by(StructuredReport.revision.desc())
        .limit(1)
    )
    if latest is not None and tuple(latest.instance_pks) == instance_ids:
        return None
    return ReportPlan(
        study_id=study_id,
        model_version=study.model_version,
        revision=1 if latest is None else latest.revision + 1,
        predecessor_id=None if latest is None else latest.id,
        instance_ids=instance_ids,
    )


def add_report(
    session: Session,
    *,
    plan: ReportPlan,
    sop_instance_uid: str,
    series_instance_uid: str,
    file_name: str,
    destinations: Sequence[str],
    now: datetime,
) -> tuple[int, list[int]] | None:
    """Record an SR and its outbox rows in one transaction; commits. None if another worker already did."""
    report = StructuredReport(
        study_pk=plan.study_id,
        model_version=plan.model_version,
        revision=plan.revision,
        sop_instance_uid=sop_instance_uid,
        series_instance_uid=series_instance_uid,
        predecessor_pk=plan.predecessor_id,
        instance_pks=list(plan.instance_ids),
        file_name=file_name,
        created_at=now,
        outbox=[
            OutboxItem(destination=d, state=OutboxState.PENDING, attempts=0, next_attempt_at=now, created_at=now)
            for d in destinations
        ],
    )
    try:
        with session.begin_nested():
            session.add(report)
        study = session.get(Study, plan.study_id)
        if study is not None:
            study.sr_generated_at = now
            study.report_failure = None
            study.report_failed_at = None
        session.commit()
    except IntegrityError:
        session.rollback()
        return None
    return report.id, [o.id for o in report.outbox]


def due_outbox(session: Session, *, now: datetime, limit: int = 100) -> list[int]:
    stmt = (
        select(OutboxItem.id)
        .where(OutboxItem.state == OutboxState.PENDING, OutboxItem.next_attempt_at <= now)
        .order_by(OutboxItem.next_attempt_at)
        .limit(limit)
    )
    return list(session.scalars(stmt))


def record_delivery(
    session: Session,
    *,
    outbox_id: int,
    state: OutboxState,
    status: int | None,
    error: str | None,
    now: datetime,
    next_attempt_at: datetime | None = None,
) -> None:
    item = session.get(OutboxItem, outbox_id, with_for_update=True)
    if item is None:
        session.rollback()
        return
    item.attempts += 1
    item.state = state
    item.last_status = status
    item.last_error = error
    if state == OutboxState.SENT:
        item.sent_at = now
    if next_attempt_at is not None:
        item.next_attempt_at = next_attempt_at
    session.commit()


# ---------------------------------------------------------------------------------------------- query
@dataclass(frozen=True)
class ResultFilter:
    since: datetime | None = None
    until: datetime | None = None
    min_score: float | None = None
    max_score: float | None = None
    flagged: bool | None = None
    status: str | None = None
    model_version: str | None = None
    accession_number: str | None = None
    patient_id: str | None = None


def _study_conditions(filters: ResultFilter) -> list[Any]:
    """The WHERE clauses of a results query: one definition for the page and its total."""
    conditions: list[Any] = []
    if filters.since is not None:
        conditions.append(Study.received_at >= filters.since)
    if filters.until is not None:
        conditions.append(Study.received_at < filters.until)
    if filters.min_score is not None:
        conditions.append(Study.pneumonia_score >= filters.min_score)
    if filters.max_score is not None:
        conditions.append(Study.pneumonia_score <= filters.max_score)
    if filters.flagged is not None:
        conditions.append(Study.flagged.is_(filters.flagged))
    if filters.status is not None:
        conditions.append(Study.state == filters.status)
    if filters.model_version is not None:
        conditions.append(Study.model_version == filters.model_version)
    if filters.accession_number is not None:
        conditions.append(Study.accession_number == filters.accession_number)
    if filters.patient_id is not None:
        conditions.append(Study.patient_id == filters.patient_id)
    return conditions


def query_studies(session: Session, *, filters: ResultFilter, limit: int = 100, offset: int = 0) -> list[Study]:
    """Studies matching the filters, newest first. The CLI and the API share this one query."""
    stmt = (
        select(Study)
        .options(selectinload(Study.instances).selectinload(Instance.analyses))
        .where(*_study_conditions(filters))
        .order_by(Study.received_at.desc(), Study.id.desc())
        .limit(limit)
        .offset(offset)
    )
    return list(session.scalars(stmt))


def count_studies(session: Session, *, filters: ResultFilter) -> int:
    """How many studies match the filters (all pages), for pagination."""
    return int(session.scalar(select(func.count()).select_from(Study).where(*_study_conditions(filters))) or 0)


def count_by_state(session: Session) -> dict[str, int]:
    rows = session.execute(select(Instance.state, func.count()).group_by(Instance.state)).all()
    return {state: n for state, n in rows}



def claim_outbox(session: Session, *, outbox_id: int, now: datetime, lease: timedelta) -> OutboxItem | None:
    """Take a pending, due outbox row for one send attempt (a compare-and-set on next_attempt_at); commits.

    Two workers (a sweep and an admin re-send, say) can't send the same row at the same time; if the sender dies,
    the row becomes due again when the lease runs out.
    """
    result = session.execute(
        update(OutboxItem)
        .where(OutboxItem.id == outbox_id, OutboxItem.state == OutboxState.PENDING, OutboxItem.next_attempt_at <= now)
        .values(next_attempt_at=now + lease)
    )
    session.commit()
    if result.rowcount != 1:  # type: ignore[attr-defined]
        return None
    return session.scalars(
        select(OutboxItem).where(OutboxItem.id == outbox_id).options(selectinload(OutboxItem.report))
    ).one()


def report_sources(session: Session, *, plan: ReportPlan) -> list[tuple[Instance, Analysis]]:
    """The analysed instances an SR covers, each with its analysis of the plan's model version."""
    rows = session.execute(
        select(Instance, Analysis)
        .join(Analysis, Analysis.instance_pk == Instance.id)
        .where(Instance.id.in_(plan.instance_ids), Analysis.model_version == plan.model_version)
        .options(selectinload(Analysis.boxes))
        .order_by(Instance.id)
    ).all()
    return [(inst, analysis) for inst, analysis in rows]
