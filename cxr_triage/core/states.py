"""Every state of every record, named once (mercure ``common/types.py`` habit)."""

from __future__ import annotations

from enum import StrEnum


class InstanceState(StrEnum):
    RECEIVED = "received"  # on disk and in the database; not yet handed to a worker
    QUEUED = "queued"  # a task was published
    ANALYSING = "analysing"  # a worker took it (attempt counted)
    ANALYSED = "analysed"
    NOT_ANALYSED = "not_analysed"  # out of scope or unreadable; `reason` says why
    FAILED = "failed"  # quarantined after max attempts; `reason` says why
    DUPLICATE = "duplicate"  # same UID and same bytes as an earlier instance: nothing to do


TERMINAL_INSTANCE_STATES = frozenset(
    {InstanceState.ANALYSED, InstanceState.NOT_ANALYSED, InstanceState.FAILED, InstanceState.DUPLICATE}
)


class StudyState(StrEnum):
    RECEIVING = "receiving"  # images arriving or being analysed
    ANALYSED = "analysed"  # at least one image analysed, all images terminal
    NOT_ANALYSED = "not_analysed"  # every image terminal, none analysed
    FAILED = "failed"  # every image terminal, none analysed, at least one failed


class OutboxState(StrEnum):
    PENDING = "pending"
    SENT = "sent"  # the peer answered 0x0000 (or a warning)
    FAILED = "failed"  # permanent rejection or attempts exhausted


class NotAnalysedReason(StrEnum):
    """Short machine-readable codes. Stored in the database and shown to users; never carry PHI."""

    NOT_CHEST = "not-chest"
    NOT_FRONTAL = "not-frontal-view"
    NOT_HUMAN = "not-human"
    MODALITY = "modality-out-of-scope"
    SOP_CLASS = "sop-class-out-of-scope"
    UNREADABLE = "unreadable-file"
    NO_PIXELS = "no-pixel-data"
    TOO_LARGE = "image-too-large"
    MULTI_FRAME = "multi-frame"
    DECODE_FAILED = "decode-failed"
    UID_CONFLICT = "uid-conflict"


class ReportFailure(StrEnum):
    """Why a study's SR could not be built (permanent: retrying the same inputs cannot help). Never PHI."""

    SOURCE_UNREADABLE = "sr-source-unreadable"  # a source header could not be read back from the spool
    INVALID_INPUT = "sr-invalid-input"  # the builder refused its inputs (e.g. an invalid UID)
    BUILD_FAILED = "sr-build-failed"  # anything else while building or encoding the SR
