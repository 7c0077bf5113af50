"""Database tables (SQLAlchemy 2.0 typed mappings). The database is the record of what exists and its state.

PHI (names, ids, accession numbers) lives here and only here (plus the spooled files): it is needed to build
SRs and worklists, and it never goes to logs or task messages.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator

# Stable constraint names so Alembic migrations work the same on SQLite (batch mode) and PostgreSQL.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UID = String(64)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC on both SQLite (which has no time zones) and PostgreSQL (timestamptz)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime: use datetime.now(timezone.utc)")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value.astimezone(timezone.utc)


UTC_DATETIME = UTCDateTime()


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Study(Base):
    """One imaging study (Study Instance UID). Patient/study attributes are copied from its first instance."""

    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    accession_number: Mapped[str | None] = mapped_column(String(16), index=True)
    study_id: Mapped[str | None] = mapped_column(String(16))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    study_description: Mapped[str | None] = mapped_column(String(64))
    referring_physician_name: Mapped[str | None] = mapped_column(String(324))
    # Urgency as the headers carry it (Requested Procedure Priority / Scheduled Procedure Priority...), normalised.
    urgency: Mapped[str | None] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    last_received_at: Mapped[datetime] = mapped_column(UTC_DATETIME, index=True)
    state: Mapped[str] = mapped_column(String(16), index=True)
    # Study-level result: max over analysed images (for the worklist); None until an image is analysed.
    pneumonia_score: Mapped[float | None] = mapped_column(Float, index=True)
    flagged: Mapped[bool | None] = mapped_column(Boolean, index=True)
    model_version: Mapped[str | None] = mapped_column(String(128))
    demo_model: Mapped[bool] = mapped_column(Boolean, default=False)
    # When the last SR for the current set of analysed images was generated (None: an SR is due once stable).
    sr_generated_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    # The last SR build failed permanently (a reason code, never a value): not retried until an image arrives
    # after `report_failed_at` (or someone clears it); a transient failure is retried and never recorded here.
    report_failure: Mapped[str | None] = mapped_column(String(64))
    report_failed_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    read_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    read_by: Mapped[str | None] = mapped_column(String(128))

    instances: Mapped[list[Instance]] = relationship(back_populates="study", order_by="Instance.id")


class Instance(Base):
    """One received object. A file on disk named by its content hash; the row says what happened to it."""

    __tablename__ = "instances"
    __table_args__ = (
        # Same UID with the same bytes is the same object (idempotent receive).
        UniqueConstraint("sop_instance_uid", "file_sha256", name="uq_instances_uid_sha256"),
        Index("ix_instances_state_received", "state", "received_at"),
        Index("ix_instances_file_sha256", "file_sha256"),  # the spool adoption scan looks files up by hash
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    rows: Mapped[int | None] = mapped_column(Integer)
    columns: Mapped[int | None] = mapped_column(Integer)
    file_sha256: Mapped[str] = mapped_column(String(64))
    file_size: Mapped[int] = mapped_column(BigInteger)
    spool_name: Mapped[str] = mapped_column(String(128))  # relative to the spool dir; derived from the hash only
    calling_ae: Mapped[str | None] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # Same SOP Instance UID arrived earlier with different bytes: both are kept, this row points at the first.
    conflicts_with: Mapped[int | None] = mapped_column(ForeignKey("instances.id"))
    # Per-stage clock.
    received_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    queued_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    started_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    inferred_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    stored_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    # While ANALYSING: the claim holds until this time. The worker renews it while the image is in flight, so a
    # worker that dies is noticed within one lease (the reconciler re-queues), not after the task time limit.
    lease_until: Mapped[datetime | None] = mapped_column(UTC_DATETIME)

    study: Mapped[Study] = relationship(back_populates="instances")
    analyses: Mapped[list[Analysis]] = relationship(back_populates="instance")


class Analysis(Base):
    """Model output for one instance and one model version (idempotent: unique on the pair)."""

    __tablename__ = "analyses"
    __table_args__ = (UniqueConstraint("instance_pk", "model_version", name="uq_analyses_instance_model"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_pk: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    model_version: Mapped[str] = mapped_column(String(128))
    demo_model: Mapped[bool] = mapped_column(Boolean, default=False)
    pneumonia_probability: Mapped[float] = mapped_column(Float)
    flagged: Mapped[bool] = mapped_column(Boolean)
    threshold: Mapped[float] = mapped_column(Float)  # operating point the flag was decided with
    label_probabilities: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    heatmap: Mapped[list[Any] | None] = mapped_column(JSON)  # small grid (rows of floats) over the image extent
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME)

    instance: Mapped[Instance] = relationship(back_populates="analyses")
    boxes: Mapped[list[Finding]] = relationship(back_populates="analysis", order_by="Finding.id")


class Finding(Base):
    """One detected lung opacity, in original pixel coordinates (column x, row y) of the source image."""

    __tablename__ = "findings"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    analysis_pk: Mapped[int] = mapped_column(ForeignKey("analyses.id", ondelete="CASCADE"), index=True)
    x0: Mapped[float] = mapped_column(Float)
    y0: Mapped[float] = mapped_column(Float)
    x1: Mapped[float] = mapped_column(Float)
    y1: Mapped[float] = mapped_column(Float)
    score: Mapped[float] = mapped_column(Float)

    analysis: Mapped[Analysis] = relationship(back_populates="boxes")


class StructuredReport(Base):
    """A generated SR. `revision` 1 is the first; later ones amend it and reference their predecessor."""

    __tablename__ = "structured_reports"
    __table_args__ = (UniqueConstraint("study_pk", "model_version", "revision", name="uq_sr_study_model_rev"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_pk: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    model_version: Mapped[str] = mapped_column(String(128))
    revision: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_instance_uid: Mapped[str] = mapped_column(UID)
    predecessor_pk: Mapped[int | None] = mapped_column(ForeignKey("structured_reports.id"))
    instance_pks: Mapped[list[Any]] = mapped_column(JSON)  # the analysed instances this SR covers
    file_name: Mapped[str] = mapped_column(String(128))  # relative to the SR dir; derived from the SR UID hash
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME)

    outbox: Mapped[list[OutboxItem]] = relationship(back_populates="report")


class OutboxItem(Base):
    """Delivery of one SR to one destination: exactly once per (SR UID, destination)."""

    __tablename__ = "outbox"
    __table_args__ = (
        UniqueConstraint("report_pk", "destination", name="uq_outbox_report_destination"),
        Index("ix_outbox_state_next", "state", "next_attempt_at"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    report_pk: Mapped[int] = mapped_column(ForeignKey("structured_reports.id"))
    destination: Mapped[str] = mapped_column(String(300))
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    last_status: Mapped[int | None] = mapped_column(Integer)  # last DICOM status from the peer
    last_error: Mapped[str | None] = mapped_column(Text)  # never PHI: status codes and exception classes only
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    sent_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)

    report: Mapped[StructuredReport] = relationship(back_populates="outbox")
import cxr_triage.db.tables_auth  # noqa: E402,F401  (registers User/ApiToken/AuditEvent on Base.metadata)
