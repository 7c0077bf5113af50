"""Spool adoption: record files that reached the spool but whose database record failed.

The listener makes an object durable in the spool *before* it records it. When the record fails (database down),
the peer is answered 0xA701 and the file stays in the spool under its content-hash name. Usually the peer
resends and the resend records it (same bytes, same name). A peer that gives up would leave the image unknown to
us, so the listener also records every spool file that no instance row references: "nothing is lost" holds even
when the sender stops retrying. At start it scans the whole spool (a process that crashed between spooling and
recording leaves no other trace); while running it re-checks only the names whose record failed in this process
(:class:`OrphanSuspects`), so a large spool is not walked every few minutes.

Recording is idempotent on (SOP Instance UID, content hash), so a resend racing the scan stores one row. Files
younger than ``min_age_s`` are skipped: a receive in another listener process may be between its rename and its
commit. Adopted rows carry no calling AE (we no longer know it) and their file time as ``received_at``.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone

from cxr_triage.core.contracts import ReceivedObject, RecordOutcome
from cxr_triage.core.logging import get_logger
from cxr_triage.dicom_node.headers import HeaderError, read_header, received_object
from cxr_triage.dicom_node.spool import Spool

__all__ = ["AdoptionReport", "OrphanSuspects", "adopt_orphans"]

LOG = get_logger(__name__)
_BATCH = 500


@dataclass
class AdoptionReport:
    scanned: int = 0  # spool files looked at
    adopted: int = 0  # newly recorded
    too_young: int = 0  # skipped: may still be in flight
    unreadable: int = 0  # header could not be read again (left in place, logged)
    failed: int = 0  # record or publish raised (database still down?): retried on the next scan
    pending: list[str] = field(default_factory=list)  # too young or failed: look again next time


class OrphanSuspects:
    """Spool names whose database record failed in this process (thread-safe)."""

    def __init__(self) -> None:
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def add(self, name: str) -> None:
        with self._lock:
            self._names.add(name)

    def update(self, names: Iterable[str]) -> None:
        with self._lock:
            self._names.update(names)

    def take(self) -> list[str]:
        with self._lock:
            names, self._names = sorted(self._names), set()
        return names

    def __len__(self) -> int:
        with self._lock:
            return len(self._names)


def _batches(names: Iterable[str], size: int) -> Iterator[list[str]]:
    it = iter(names)
    while batch := list(itertools.islice(it, size)):
        yield batch


def adopt_orphans(
    spool: Spool,
    *,
    recorded: Callable[[list[str]], set[str]],
    record: Callable[[ReceivedObject], RecordOutcome],
    publish: Callable[[int], None],
    min_age_s: float = 120.0,
    now: float | None = None,
    names: Iterable[str] | None = None,
) -> AdoptionReport:
    """Record every spool file (or every one of ``names``) that no instance references (see the module
    docstring). Never raises for one file.

    ``recorded(sha256s)`` returns the subset of hashes the database knows; ``record``/``publish`` are the
    listener's own callbacks, so an adopted object goes through exactly the path a received one does.
    """
    report = AdoptionReport()
    cutoff = (now if now is not None else datetime.now(timezone.utc).timestamp()) - min_age_s
    for names in _batches(spool.iter_names() if names is None else names, _BATCH):
        report.scanned += len(names)
        known = recorded([name[3:67] for name in names])
        for name in names:
            sha = name[3:67]
            if sha in known:
                continue
            path = spool.path_of(name)
            try:
                stat = os.stat(path)
            except OSError:
                continue  # removed meanwhile
            if stat.st_mtime > cutoff:
                report.too_young += 1
                report.pending.append(name)
                continue
            try:
                header = read_header(path)
                obj = received_object(
                    header,
                    sha256=sha,
                    size=stat.st_size,
                    spool_name=name,
                    calling_ae=None,
                    received_at=datetime.fromtimestamp(stat.st_mtime, timezone.utc),
                )
            except HeaderError as exc:
                # It passed the same checks when it was received, so this is damage on disk: keep it for a human.
                report.unreadable += 1
                LOG.error("spool_orphan_unreadable", spool_name=name, error=type(exc).__name__)
                continue
            try:
                outcome = record(obj)
                if outcome.needs_analysis:
                    publish(outcome.instance_id)
            except Exception as exc:  # the next scan tries again (the reconciler queues a recorded one anyway)
                report.failed += 1
                report.pending.append(name)
                LOG.warning("spool_adopt_failed", spool_name=name, error=type(exc).__name__)
                continue
            if outcome.created:
                report.adopted += 1
                LOG.warning("spool_orphan_adopted", spool_name=name, instance_id=outcome.instance_id)
    return report
