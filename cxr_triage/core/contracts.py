"""Typed messages that cross a package or process boundary (one model per boundary, extra fields forbidden)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


@dataclass(frozen=True)
class Box:
    """A detected opacity in ORIGINAL pixel coordinates of its source image: x = column, y = row, (x0, y0) the
    top-left corner. The detector produces it, the database stores it, the SR draws it: one type for all three."""

    x0: float
    y0: float
    x1: float
    y1: float
    score: float


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ReceivedObject(_Message):
    """What the listener hands to the recorder after the file is durable on disk.

    Carries header values (PHI) to the database only. Never log it, never put it on the queue.
    """

    sop_instance_uid: str
    sop_class_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    file_sha256: str
    file_size: int
    spool_name: str
    calling_ae: str | None = None
    modality: str | None = None
    body_part: str | None = None
    view_position: str | None = None
    rows: int | None = None
    columns: int | None = None
    # None when in scope; otherwise a NotAnalysedReason code decided from the header alone.
    out_of_scope_reason: str | None = None
    patient_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    accession_number: str | None = None
    study_id: str | None = None
    study_date: str | None = None
    study_time: str | None = None
    study_description: str | None = None
    referring_physician_name: str | None = None
    urgency: str | None = None
    received_at: datetime


class RecordOutcome(_Message):
    """What the recorder answers. The listener publishes a task only when `needs_analysis` is true."""

    instance_id: int
    created: bool  # False: identical object already recorded (same UID, same bytes)
    needs_analysis: bool
    conflict: bool = False  # same UID, different bytes: both kept, this one flagged


class AnalyzeTask(_Message):
    """Queue message: ids only, never pixels or PHI."""

    instance_ids: list[int] = Field(min_length=1)
