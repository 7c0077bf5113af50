"""The worker's steps as plain functions with their dependencies as arguments (Celery tasks stay thin).

analyze_instance: claim (attempt counted) -> decode + preprocess -> micro-batch inference -> persist.
build_report:     a stable study's analysed images -> one deterministic DICOM SR on disk -> outbox rows.
deliver:          one outbox row -> C-STORE to its destination -> sent / retry later / failed.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Protocol

import pydicom
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.core.errors import RetryableError
from cxr_triage.core.logging import get_logger
from cxr_triage.core.settings import Destination
from cxr_triage.core.states import NotAnalysedReason, OutboxState, ReportFailure
from cxr_triage.core.uids import derive_uid
from cxr_triage.db import repo
from cxr_triage.db.tables import StructuredReport, Study
from cxr_triage.worker.leases import LeaseKeeper

log = get_logger(__name__)

Clock = Callable[[], datetime]
_SPOOL_NAME = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}\.dcm$")


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def spool_path(spool_dir: Path, spool_name: str) -> Path:
    """Resolve a spool name we wrote ourselves; refuse anything else (defence against a tampered row)."""
    if not _SPOOL_NAME.match(spool_name):
        raise ValueError("invalid spool name")
    return spool_dir / spool_name


def fsync_write(path: Path, data: bytes) -> None:
    """Write a file atomically and durably: temp file, fsync, rename, fsync the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique temp name in the same directory (same filesystem, so the rename is atomic): the build_report task
    # and the tick run as threads of one process and may write the same SR at once; a pid-only name made them
    # write into one temp file and rename it from under each other.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# ---------------------------------------------------------------------------------------------- analyse
class AnalyzerLike(Protocol):
    model_version: str
    demo: bool

    def prepare(self, path: Path, *, key: str) -> Any: ...

    def infer(self, batch: Sequence[Any]) -> list[Any]: ...


class BatcherLike(Protocol):
    def submit(self, item: Any) -> Any: ...


@dataclass
class AnalysisDeps:
    session_factory: sessionmaker[Session]
    analyzer: AnalyzerLike
    batcher: BatcherLike
    spool_dir: Path
    lease: timedelta
    max_attempts: int
    threshold: float
    not_analysable: type[Exception]
    infer_timeout_s: float = 120.0
    clock: Clock = utcnow
    leases: LeaseKeeper | None = None  # renews the claim while the image is in flight


def analyze_instance(instance_id: int, deps: AnalysisDeps) -> str:
    """Analyse one instance. Returns an outcome code; raises RetryableError for transient failures."""
    with deps.session_factory() as session:
        claim = repo.claim_for_analysis(
            session, instance_id=instance_id, now=deps.clock(), lease=deps.lease, max_attempts=deps.max_attempts
        )
    if isinstance(claim, repo.ClaimRefusal):
        log.info("analysis skipped", instance=instance_id, why=claim.why)
        return claim.why
    if deps.leases is None:
        return _analyze_claimed(instance_id, claim, deps)
    with deps.leases.hold(instance_id):
        return _analyze_claimed(instance_id, claim, deps)


def _analyze_claimed(instance_id: int, claim: repo.Claim, deps: AnalysisDeps) -> str:
    try:
        path = spool_path(deps.spool_dir, claim.spool_name)
    except ValueError:
        return _not_analysed(deps, instance_id, NotAnalysedReason.UNREADABLE)
    if not path.is_file():
        return _not_analysed(deps, instance_id, NotAnalysedReason.UNREADABLE)
    try:
        prepared = deps.analyzer.prepare(path, key=str(instance_id))
    except deps.not_analysable as exc:
        return _not_analysed(deps, instance_id, str(getattr(exc, "reason", NotAnalysedReason.DECODE_FAILED)))
    except Exception as exc:  # a file the decoders choke on is bad input, not a reason to retry
        log.warning("decode failed", instance=instance_id, error=type(exc).__name__)
        return _not_analysed(deps, instance_id, NotAnalysedReason.DECODE_FAILED)
    try:
        result = deps.batcher.submit(prepared).result(timeout=deps.infer_timeout_s)
    except Exception as exc:
        # Engine trouble (out of memory, a GPU reset) is transient: give the claim back and let Celery retry.
        # The attempt stays counted, so a poison image ends quarantined after max_attempts.
        with deps.session_factory() as session:
            repo.release_claim(session, instance_id=instance_id)
        raise RetryableError(f"inference failed: {type(exc).__name__}") from None
    inferred_at = deps.clock()
    record = repo.AnalysisRecord(
        pneumonia_probability=float(result.pneumonia_probability),
        flagged=bool(result.flagged),
        threshold=deps.threshold,
        boxes=list(result.boxes),
        label_probabilities=dict(result.label_probabilities),
        heatmap=None if result.heatmap is None else [[round(float(v), 4) for v in row] for row in result.heatmap],
    )
    with deps.session_factory() as session:
        repo.save_analysis(
            session,
            instance_id=instance_id,
            model_version=deps.analyzer.model_version,
            demo_model=deps.analyzer.demo,
            result=record,
            inferred_at=inferred_at,
            now=deps.clock(),
        )
    log.info("analysed", instance=instance_id, attempt=claim.attempt, flagged=record.flagged)
    return "analysed"


def _not_analysed(deps: AnalysisDeps, instance_id: int, reason: str) -> str:
    with deps.session_factory() as session:
        repo.mark_not_analysed(session, instance_id=instance_id, reason=reason, now=deps.clock())
    log.info("not analysed", instance=instance_id, reason=reason)
    return "not_analysed"


def study_of(session_factory: sessionmaker[Session], instance_id: int) -> int | None:
    from cxr_triage.db.tables import Instance

    with session_factory() as session:
        inst = session.get(Instance, instance_id)
        return None if inst is None else inst.study_pk


# ---------------------------------------------------------------------------------------------- report
@dataclass(frozen=True)
class AlgorithmLabel:
    """How an SR names the algorithm that produced a model version's results."""

    name: str
    version: str  # at most 64 characters (DICOM LO)


def fallback_algorithm_label(model_version: str, demo: bool) -> AlgorithmLabel:
    """The label when the model cards of `model_version` are not at hand: the analyzer's own formula, so the
    demo mark is never lost."""
    from cxr_triage.models.analyzer import algorithm_identity

    name, version = algorithm_identity(model_version, demo)
    return AlgorithmLabel(name=name, version=version)


@dataclass
class ReportDeps:
    session_factory: sessionmaker[Session]
    spool_dir: Path
    sr_dir: Path
    destinations: Sequence[Destination]
    stable: timedelta
    # (model version, any analysis from a demo model) -> name and version; the worker context reads them from
    # the model cards (Analyzer.algorithm_name), so an SR says what the analyzer says, UNTRAINED DEMO MODEL too.
    algorithm: Callable[[str, bool], AlgorithmLabel] = fallback_algorithm_label
    clock: Clock = utcnow


def sr_file_name(sop_instance_uid: str) -> str:
    digest = derive_uid(sop_instance_uid).split(".")[-1]
    return f"{digest[-2:]}/{digest}.dcm"


class _ReportNotBuilt(Exception):
    """The SR for a study cannot be built from its inputs (permanent). Carries a reason code, never a value."""

    def __init__(self, reason: ReportFailure, error: str) -> None:
        super().__init__(reason.value)
        self.reason = reason
        self.error = error  # the exception type only


def build_report(study_id: int, deps: ReportDeps) -> list[int]:
    """Make the next SR of a study if one is due; returns the new outbox ids ([] if nothing to do).

    A permanent failure (a source header unreadable, an input the builder refuses, an SR that cannot be encoded)
    is recorded on the study with a reason code and not retried until another image arrives; database and disk
    errors propagate as before (transient: the task retries, the tick tries again).
    """
    from cxr_triage.dicom_node import sr as srmod  # SR building needs highdicom; import where used

    with deps.session_factory() as session:
        plan = repo.report_plan(session, study_id=study_id, stable_before=deps.clock() - deps.stable)
        if plan is None:
            return []
        study = session.get(Study, study_id)
        assert study is not None
        if repo.report_failed_for_current_images(study):
            return []
        sources = repo.report_sources(session, plan=plan)
        predecessor_row = None if plan.predecessor_id is None else session.get(StructuredReport, plan.predecessor_id)
        try:
            ds, data = _compose_report(srmod, plan, sources, predecessor_row, deps)
        except _ReportNotBuilt as exc:
            repo.record_report_failure(session, study_id=study_id, reason=exc.reason, now=deps.clock())
            log.error("report not built", study=study_id, reason=exc.reason.value, error=exc.error)
            return []
        file_name = sr_file_name(str(ds.SOPInstanceUID))
        fsync_write(deps.sr_dir / file_name, data)
        created = repo.add_report(
            session,
            plan=plan,
            sop_instance_uid=str(ds.SOPInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            file_name=file_name,
            destinations=[str(d) for d in deps.destinations],
            now=deps.clock(),
        )
    if created is None:
        return []
    report_id, outbox_ids = created
    log.info("report created", study=study_id, report=report_id, revision=plan.revision, outbox=len(outbox_ids))
    return outbox_ids


def _compose_report(
    srmod: Any, plan: repo.ReportPlan, sources: Sequence[tuple[Any, Any]], predecessor_row: Any, deps: ReportDeps
) -> tuple[pydicom.Dataset, bytes]:
    """Source headers + analyses -> the SR data set and its file bytes. Raises only _ReportNotBuilt.

    Exceptions from pydicom and highdicom quote header values: only their type leaves this function.
    """
    headers = []
    try:
        for inst, _ in sources:
            headers.append(pydicom.dcmread(spool_path(deps.spool_dir, inst.spool_name), stop_before_pixels=True))
        prev_header = None
        if predecessor_row is not None:
            prev_header = pydicom.dcmread(deps.sr_dir / predecessor_row.file_name, stop_before_pixels=True)
    except Exception as exc:
        raise _ReportNotBuilt(ReportFailure.SOURCE_UNREADABLE, type(exc).__name__) from None
    try:
        findings = []
        demo = False
        for header, (_, analysis) in zip(headers, sources, strict=True):
            demo = demo or analysis.demo_model
            findings.append(
                srmod.ImageFindings(
                    source=header,
                    pneumonia_probability=analysis.pneumonia_probability,
                    flagged=analysis.flagged,
                    threshold=analysis.threshold,
                    regions=tuple(srmod.OpacityRegion(b.x0, b.y0, b.x1, b.y1, b.score) for b in analysis.boxes),
                )
            )
        predecessor = None
        if predecessor_row is not None:
            assert prev_header is not None
            predecessor = srmod.Predecessor(
                sop_instance_uid=predecessor_row.sop_instance_uid,
                series_instance_uid=predecessor_row.series_instance_uid,
                sop_class_uid=str(prev_header.SOPClassUID),
            )
        # Deterministic content time: the newest analysis this SR covers, so a rebuild is byte-identical.
        content_dt = max(analysis.created_at for _, analysis in sources)
        label = deps.algorithm(plan.model_version, demo)
        algorithm = srmod.AlgorithmInfo(name=label.name, version=label.version, model_version=label.version, demo=demo)
        ds = srmod.build_study_sr(
            findings=findings,
            algorithm=algorithm,
            revision=plan.revision,
            predecessor=predecessor,
            content_datetime=content_dt,
        )
    except ValueError as exc:
        raise _ReportNotBuilt(ReportFailure.INVALID_INPUT, type(exc).__name__) from None
    except Exception as exc:
        raise _ReportNotBuilt(ReportFailure.BUILD_FAILED, type(exc).__name__) from None
    try:
        return ds, srmod.sr_file_bytes(ds)
    except Exception as exc:
        raise _ReportNotBuilt(ReportFailure.BUILD_FAILED, type(exc).__name__) from None


def due_reports(deps: ReportDeps) -> list[int]:
    with deps.session_factory() as session:
        return repo.studies_due_for_report(session, stable_before=deps.clock() - deps.stable)


# ---------------------------------------------------------------------------------------------- deliver
class StoreClientLike(Protocol):
    def send(self, ds_or_path: Any) -> Any: ...

    def close(self) -> None: ...


@dataclass
class DeliveryDeps:
    session_factory: sessionmaker[Session]
    sr_dir: Path
    client_for: Callable[[str], StoreClientLike]  # destination string -> a (persistent) client
    retry_base_s: float = 2.0
    retry_max_s: float = 300.0
    lease: timedelta = timedelta(seconds=120)
    clock: Clock = utcnow
    rng: random.Random = field(default_factory=random.Random)


def retry_delay(attempts: int, *, base: float, cap: float, rng: random.Random) -> float:
    """Capped exponential backoff with full jitter (AWS architecture blog's recommendation)."""
    return rng.uniform(base / 2, min(cap, base * 2 ** max(attempts - 1, 0)))


def deliver(outbox_id: int, deps: DeliveryDeps) -> str:
    """One send attempt of one outbox row. Returns the outcome."""
    with deps.session_factory() as session:
        item = repo.claim_outbox(session, outbox_id=outbox_id, now=deps.clock(), lease=deps.lease)
        if item is None:
            return "not-due"
        destination = item.destination
        path = deps.sr_dir / item.report.file_name
        attempts = item.attempts + 1
    try:
        result = deps.client_for(destination).send(path)
        outcome, status, detail = result.outcome, result.status, result.detail
    except Exception as exc:  # a sender bug must not lose the row: treat as transient
        outcome, status, detail = "transient", None, type(exc).__name__
    now = deps.clock()
    with deps.session_factory() as session:
        if outcome in ("success", "warning"):
            repo.record_delivery(session, outbox_id=outbox_id, state=OutboxState.SENT, status=status, error=None, now=now)
        elif outcome == "permanent":
            repo.record_delivery(
                session, outbox_id=outbox_id, state=OutboxState.FAILED, status=status, error=detail, now=now
            )
            log.error("report rejected permanently", outbox=outbox_id, status=status, detail=detail)
        else:
            delay = retry_delay(attempts, base=deps.retry_base_s, cap=deps.retry_max_s, rng=deps.rng)
            repo.record_delivery(
                session,
                outbox_id=outbox_id,
                state=OutboxState.PENDING,
                status=status,
                error=detail,
                now=now,
                next_attempt_at=now + timedelta(seconds=delay),
            )
            log.warning("report delivery will be retried", outbox=outbox_id, status=status, in_s=round(delay, 1))
    log.info("delivery attempt", outbox=outbox_id, outcome=outcome, status=status)
    return outcome


def due_deliveries(deps: DeliveryDeps) -> list[int]:
    with deps.session_factory() as session:
        return repo.due_outbox(session, now=deps.clock())


# ---------------------------------------------------------------------------------------------- reconcile
def instances_to_requeue(
    session_factory: sessionmaker[Session],
    *,
    grace: timedelta,
    lease: timedelta,
    requeue_after: timedelta | None = None,
    limit: int = 500,
    clock: Clock = utcnow,
) -> list[int]:
    """The reconciler's next batch, already stamped as queued (see :func:`repo.take_for_requeue`)."""
    with session_factory() as session:
        return repo.take_for_requeue(
            session, now=clock(), grace=grace, lease=lease, requeue_after=requeue_after or grace, limit=limit
        )
