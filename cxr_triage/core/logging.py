"""Structured logging with no PHI.

Log events carry ids we assign (instance id, study id, outbox id), states and reason codes. A processor drops any
key that could carry a DICOM header value, so a careless call site cannot leak a patient name into the log.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import MutableMapping
from typing import Any

import structlog

# Keys that must never reach a log line, even if a call site passes them.
PHI_KEYS = frozenset(
    {
        "patient_name", "patient_id", "patient_birth_date", "patient_sex", "accession_number",
        "study_instance_uid", "series_instance_uid", "sop_instance_uid", "referring_physician",
        "study_description", "institution", "other_patient_ids", "dataset", "ds", "header",
        "patientname", "patientid", "patientbirthdate", "accessionnumber", "studyinstanceuid", "sopinstanceuid",
    }
)


def drop_phi(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Pure processor: remove PHI-bearing keys (replaced by a marker so the omission is visible)."""
    for key in list(event_dict):
        if key.lower() in PHI_KEYS:
            event_dict[key] = "[redacted]"
    return event_dict


def shared_processors() -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        drop_phi,
    ]


def configure_logging(*, json: bool = False, level: int = logging.INFO) -> None:
    renderer: Any = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    structlog.configure(
        processors=[*shared_processors(), renderer],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # pynetdicom logs dataset contents at DEBUG (PHI): keep library loggers at WARNING.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    for name in ("pynetdicom", "celery", "kombu", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.showwarning = _show_warning_without_message


def _show_warning_without_message(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None, line: Any = None
) -> None:
    """Python warnings reach stderr as category and place only: library warnings quote the values they complain
    about (pydicom and highdicom quote header values), and we cannot vet every library's wording."""
    stream = file if file is not None else sys.stderr
    try:
        stream.write(f"WARNING py.warnings: {category.__name__} at {filename}:{lineno} (message withheld)\n")
    except Exception:
        pass


def get_logger(name: str) -> structlog.stdlib.BoundLogger:
    return structlog.get_logger(name)
