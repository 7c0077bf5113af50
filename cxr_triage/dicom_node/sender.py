"""C-STORE SCU for results (and a storescu-like bulk sender), built on pynetdicom.

* :class:`StoreClient` keeps one association to a :class:`~cxr_triage.core.settings.Destination` open across
  sends, re-associates when it was dropped (and retries once when a *reused* association turns out dead), sets
  TCP_NODELAY on the socket (48 ms -> 4.6 ms per object measured here), and classifies every outcome:

  ============  =======================================================================================
  success       0x0000
  warning       0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007 (the object was stored: counts as delivered)
  transient     0xA7xx (out of resources), 0x0213 (resource limitation), 0x0110 (processing failure, often
                a full disk or a busy database on the peer), 0xFE00 (cancel); connection refused, timeouts,
                aborts, association rejected-transient (e.g. peer at its association limit)
  permanent     0xA9xx, 0xCxxx, 0x0122 (SOP class not supported), 0x0124, 0x0117, 0x0211, 0x0212 and any other
                failure status; association rejected-permanent (e.g. called AE title not recognised); no
                presentation context accepted for the object's SOP class / transfer syntax; unreadable input
  ============  =======================================================================================

  ``SendResult.detail`` carries only status codes, UIDs of SOP classes / transfer syntaxes, and exception
  class names: never header values (PHI).

* :func:`send_paths` walks files and folders like ``storescu +sd +r``, skips non-DICOM files (counted),
  proposes the presentation contexts the files need (grouped by SOP class and transfer syntax, at most 128 per
  association), and sends over ``associations`` concurrent associations with a progress bar.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)
from pynetdicom import AE, build_context, evt
from pynetdicom.presentation import PresentationContext

from cxr_triage.core.settings import Destination
from cxr_triage.dicom_node.netutil import association_socket, nodelay_handler

__all__ = [
    "Outcome",
    "SendResult",
    "SendSummary",
    "StoreClient",
    "classify_status",
    "send_paths",
    "result_contexts",
    "MAX_CONTEXTS",
]

log = logging.getLogger(__name__)

Outcome = Literal["success", "warning", "transient", "permanent"]
MAX_CONTEXTS = 128  # PS3.8: presentation context IDs are odd numbers 1..255
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_UNCOMPRESSED_ALL = {ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian}

# What we send as results: SRs (all flavours we might build), KOS, GSPS, secondary capture.
RESULT_SOP_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection Document
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image
)

_WARNING_STATUSES = frozenset({0x0001, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})
_TRANSIENT_STATUSES = frozenset({0x0110, 0x0213, 0xFE00})


def classify_status(status: int) -> Outcome:
    """Map a C-STORE response status to an outcome (see the module docstring for the table)."""
    if status == 0x0000:
        return "success"
    if status in _WARNING_STATUSES:
        return "warning"
    if 0xA700 <= status <= 0xA7FF or status in _TRANSIENT_STATUSES:
        return "transient"
    return "permanent"


@dataclass(frozen=True)
class SendResult:
    status: int | None
    outcome: Outcome
    detail: str

    @property
    def delivered(self) -> bool:
        """True when the peer stored the object (success or a warning status)."""
        return self.outcome in ("success", "warning")


def result_contexts(sop_classes: Iterable[str] = RESULT_SOP_CLASSES) -> list[PresentationContext]:
    """One context per SOP class offering Explicit and Implicit VR Little Endian."""
    return [build_context(uid, list(UNCOMPRESSED)) for uid in dict.fromkeys(sop_classes)]


class _AssociationFailed(Exception):
    def __init__(self, result: SendResult) -> None:
        super().__init__(result.detail)
        self.result = result


class StoreClient:
    """A persistent C-STORE association to one destination. One thread at a time (calls are serialised).

    Parameters are bounded timeouts in seconds: ``connection_timeout`` (TCP connect), ``acse_timeout``
    (association negotiation/release), ``dimse_timeout`` (waiting for a C-STORE response), ``network_timeout``
    (idle socket). An association idle for longer than ``max_idle_s`` is released and re-opened before the next
    send, so peers that silently drop idle associations (Orthanc's DicomScpTimeout, storescp -ts) do not cost a
    failed send. ``contexts`` defaults to :func:`result_contexts`; an object of another SOP class adds a
    context for it and re-associates.
    """

    def __init__(
        self,
        destination: Destination,
        *,
        calling_ae: str,
        contexts: Sequence[PresentationContext] | None = None,
        connection_timeout: float = 5.0,
        acse_timeout: float = 10.0,
        dimse_timeout: float = 30.0,
        network_timeout: float = 30.0,
        max_idle_s: float = 20.0,
        max_pdu: int = 65536,
        evt_handlers: Sequence[tuple[Any, ...]] = (),
    ) -> None:
        if not isinstance(destination, Destination):
            raise ValueError("destination must be a Destination")
        if not isinstance(calling_ae, str) or not 0 < len(calling_ae.strip()) <= 16 or "\\" in calling_ae:
            raise ValueError("calling_ae must be 1-16 characters without backslash")
        self.destination = destination
        self.calling_ae = calling_ae.strip()
        self._contexts: list[PresentationContext] = list(contexts) if contexts else result_contexts()
        if len(self._contexts) > MAX_CONTEXTS:
            raise ValueError(f"contexts: at most {MAX_CONTEXTS} presentation contexts per association")
        self._timeouts = dict(
            connection_timeout=connection_timeout,
            acse_timeout=acse_timeout,
            dimse_timeout=dimse_timeout,
            network_timeout=network_timeout,
        )
        self._max_idle_s = max_idle_s
        self._max_pdu = max_pdu
        # Extra pynetdicom handlers bound on every association this client opens (e.g. a benchmark's clock).
        self._evt_handlers = list(evt_handlers)
        self._assoc = None
        self._last_used = 0.0
        self._lock = threading.RLock()
        self.associations_opened = 0  # how many associations this client has established (for tests/metrics)

    # -- association management ---------------------------------------------------------------------------

    def _new_ae(self) -> AE:
        ae = AE(ae_title=self.calling_ae)
        for name, value in self._timeouts.items():
            setattr(ae, name, value)
        ae.maximum_pdu_size = self._max_pdu
        return ae

    @property
    def is_associated(self) -> bool:
        return self._assoc is not None and self._assoc.is_established

    @property
    def socket(self):
        """The live OS socket of the current association (None when not associated)."""
        return association_socket(self._assoc) if self.is_associated else None

    def _associate(self) -> None:
        self._drop()
        ae = self._new_ae()
        try:
            assoc = ae.associate(
                self.destination.host,
                self.destination.port,
                contexts=self._contexts,
                ae_title=self.destination.ae_title,
                evt_handlers=[(evt.EVT_CONN_OPEN, nodelay_handler), *self._evt_handlers],
            )
        except (OSError, RuntimeError) as exc:  # name resolution errors and the like
            raise _AssociationFailed(SendResult(None, "transient", f"association failed: {type(exc).__name__}"))
        if assoc.is_established:
            self._assoc = assoc
            self._last_used = time.monotonic()
            self.associations_opened += 1
            return
        raise _AssociationFailed(self._failed_association(assoc))

    @staticmethod
    def _failed_association(assoc) -> SendResult:
        if assoc.is_rejected:
            rsp = getattr(assoc.acceptor, "primitive", None)
            result = getattr(rsp, "result", None)
            source = getattr(rsp, "result_source", None)
            reason = getattr(rsp, "diagnostic", None)
            detail = (
                f"association rejected (result=0x{result or 0:02X}, source=0x{source or 0:02X},"
                f" reason=0x{reason or 0:02X})"
            )
            # PS3.8 9.3.4: result 1 = rejected-permanent, 2 = rejected-transient.
            return SendResult(None, "transient" if result == 0x02 else "permanent", detail)
        rsp = getattr(assoc.acceptor, "primitive", None)
        if getattr(rsp, "result", None) == 0x00 and not assoc.accepted_contexts:
            # The peer accepted the association but none of our contexts (pynetdicom then aborts it):
            # it does not support the SOP class / transfer syntaxes we need. Retrying cannot help.
            detail = "peer accepted no proposed presentation context (SOP class not supported)"
            return SendResult(None, "permanent", detail)
        if assoc.is_aborted:
            return SendResult(None, "transient", "association aborted by peer during negotiation")
        return SendResult(None, "transient", "association failed: peer unreachable or ACSE timeout")

    def _drop(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is None:
            return
        try:
            if assoc.is_established:
                assoc.release()
            else:
                assoc.abort()
        except Exception as exc:  # noqa: BLE001 - closing must never raise
            log.debug("closing association failed: %s", type(exc).__name__)

    def _ensure_context(self, sop_class: str, transfer_syntax: str) -> None:
        """Propose ``sop_class`` (with this transfer syntax) if no requested context covers it; re-associate."""
        uncompressed = transfer_syntax in _UNCOMPRESSED_ALL
        for cx in self._contexts:
            if cx.abstract_syntax != sop_class:
                continue
            if transfer_syntax in cx.transfer_syntax or (
                uncompressed and any(ts in _UNCOMPRESSED_ALL for ts in cx.transfer_syntax)
            ):
                return
        if len(self._contexts) >= MAX_CONTEXTS:
            raise _AssociationFailed(
                SendResult(None, "permanent", f"no room for another presentation context ({MAX_CONTEXTS} in use)")
            )
        syntaxes = list(UNCOMPRESSED) if uncompressed else [transfer_syntax]
        self._contexts.append(build_context(sop_class, syntaxes))
        self._drop()

    # -- sending ------------------------------------------------------------------------------------------

    def send(self, ds_or_path: Dataset | str | os.PathLike) -> SendResult:
        """C-STORE one dataset or DICOM file. Never raises for network or peer problems: see :class:`SendResult`."""
        with self._lock:
            try:
                payload, sop_class, transfer_syntax = _payload(ds_or_path)
            except _AssociationFailed as exc:
                return exc.result
            try:
                self._ensure_context(sop_class, transfer_syntax)
            except _AssociationFailed as exc:
                return exc.result
            for attempt in (1, 2):
                reused = self._reuse_or_drop()
                if not reused:
                    try:
                        self._associate()
                    except _AssociationFailed as exc:
                        return exc.result
                result = self._store_once(payload)
                if result.outcome == "transient" and result.status is None and reused and attempt == 1:
                    # A reused association was dead (peer timed it out or restarted): retry once on a fresh one.
                    # Re-sending the same SOP Instance UID is safe for a storage SCP.
                    log.info("reused association failed (%s); re-associating", result.detail)
                    self._drop()
                    continue
                return result
            raise AssertionError("unreachable")

    def _reuse_or_drop(self) -> bool:
        if not self.is_associated:
            self._drop()
            return False
        if self._max_idle_s is not None and time.monotonic() - self._last_used > self._max_idle_s:
            self._drop()
            return False
        return True

    def _store_once(self, payload: Dataset | Path) -> SendResult:
        assoc = self._assoc
        assert assoc is not None
        try:
            rsp = assoc.send_c_store(payload)
        except ValueError as exc:
            # pynetdicom: no accepted presentation context for this SOP class / transfer syntax.
            if "presentation context" in str(exc):
                return SendResult(None, "permanent", "peer accepted no presentation context for this object")
            return SendResult(None, "permanent", f"cannot encode object: {type(exc).__name__}")
        except (AttributeError, TypeError, InvalidDicomError) as exc:
            return SendResult(None, "permanent", f"cannot encode object: {type(exc).__name__}")
        except (OSError, RuntimeError) as exc:
            self._drop()
            return SendResult(None, "transient", f"send failed: {type(exc).__name__}")
        self._last_used = time.monotonic()
        status = getattr(rsp, "Status", None) if rsp is not None else None
        if status is None:
            # Empty response: DIMSE timeout, abort or connection lost. The association is no longer usable.
            self._drop()
            return SendResult(None, "transient", "no C-STORE response (DIMSE timeout, abort or connection lost)")
        status = int(status)
        outcome = classify_status(status)
        return SendResult(status, outcome, f"C-STORE status 0x{status:04X}")

    def close(self) -> None:
        """Release the association (if any). The client can be used again afterwards."""
        with self._lock:
            self._drop()

    def __enter__(self) -> "StoreClient":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _payload(ds_or_path: Dataset | str | os.PathLike) -> tuple[Dataset | Path, str, str]:
    """What to hand to pynetdicom, plus the SOP class and transfer syntax needed for context negotiation."""
    if isinstance(ds_or_path, Dataset):
        ds = ds_or_path
        sop_class = str(ds.get("SOPClassUID", "") or "")
        meta = getattr(ds, "file_meta", None)
        ts = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
        if not ts:  # an in-memory dataset: any uncompressed context will do (pynetdicom converts)
            ts = ExplicitVRLittleEndian
        if not sop_class or "SOPInstanceUID" not in ds:
            raise _AssociationFailed(SendResult(None, "permanent", "dataset lacks SOPClassUID/SOPInstanceUID"))
        return ds, sop_class, ts
    path = Path(ds_or_path)
    info = _probe(path)
    if info is None:
        raise _AssociationFailed(SendResult(None, "permanent", "not a readable DICOM file"))
    return path, info[0], info[1]


def _probe(path: Path) -> tuple[str, str] | None:
    """(SOP class UID, transfer syntax UID) of a DICOM Part 10 file, or None if it is not one we can send."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    except (InvalidDicomError, OSError, ValueError, KeyError, TypeError, EOFError):
        return None
    except Exception:  # noqa: BLE001 - any parser failure means "not DICOM we can send"
        return None
    meta = getattr(ds, "file_meta", None)
    ts = str(getattr(meta, "TransferSyntaxUID", "") or "") if meta is not None else ""
    sop_class = str(ds.get("SOPClassUID", "") or "") or str(getattr(meta, "MediaStorageSOPClassUID", "") or "")
    if not ts or not sop_class or "SOPInstanceUID" not in ds or sop_class == MediaStorageDirectoryStorage:
        return None
    return sop_class, ts


# ---------------------------------------------------------------------------------------------- bulk sending


@dataclass
class SendSummary:
    """Result of :func:`send_paths`. ``failures`` pairs each failed file with its (PHI-free) result."""

    files: int = 0
    sent: int = 0
    warnings: int = 0
    skipped: int = 0  # not DICOM (or a DICOMDIR)
    failed: int = 0
    associations: int = 0
    elapsed_s: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    failures: list[tuple[Path, SendResult]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    @property
    def delivered(self) -> int:
        return self.sent + self.warnings

    def __str__(self) -> str:
        lines = [
            f"{self.files} files: {self.sent} sent, {self.warnings} stored with warnings, {self.failed} failed, "
            f"{self.skipped} skipped (not DICOM); {self.associations} association(s), {self.elapsed_s:.1f} s"
        ]
        shown = 10
        for path, result in self.failures[:shown]:
            lines.append(f"  {result.outcome}: {path} ({result.detail})")
        if len(self.failures) > shown:
            lines.append(f"  ... and {len(self.failures) - shown} more")
        return "\n".join(lines)


def _walk(paths: Sequence[Path | str]) -> Iterator[Path]:
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for root, dirs, files in os.walk(p):
                dirs.sort()
                for name in sorted(files):
                    yield Path(root) / name
        else:
            yield p


def _plan_contexts(keys: Sequence[tuple[str, str]]) -> list[PresentationContext]:
    """Contexts for (SOP class, transfer syntax) keys: one uncompressed context per SOP class that has
    uncompressed files, and one exact-syntax context per compressed transfer syntax."""
    contexts: list[PresentationContext] = []
    seen_uncompressed: set[str] = set()
    seen: set[tuple[str, str]] = set()
    for sop, ts in keys:
        if ts in _UNCOMPRESSED_ALL:
            if sop in seen_uncompressed:
                continue
            seen_uncompressed.add(sop)
            contexts.append(build_context(sop, [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]))
        elif (sop, ts) not in seen:
            seen.add((sop, ts))
            contexts.append(build_context(sop, [ts]))
    return contexts


def _batches(items: list[tuple[Path, str, str]]) -> list[tuple[list[PresentationContext], list[Path]]]:
    """Split files into batches whose contexts fit one association (<= 128)."""
    by_key: dict[tuple[str, str], list[Path]] = {}
    for path, sop, ts in items:
        by_key.setdefault((sop, "U" if ts in _UNCOMPRESSED_ALL else ts), []).append(path)
    batches: list[tuple[list[PresentationContext], list[Path]]] = []
    keys: list[tuple[str, str]] = []
    files: list[Path] = []
    for (sop, ts), paths in sorted(by_key.items()):
        real_ts = ExplicitVRLittleEndian if ts == "U" else ts
        if keys and len(_plan_contexts([*keys, (sop, real_ts)])) > MAX_CONTEXTS:
            batches.append((_plan_contexts(keys), files))
            keys, files = [], []
        keys.append((sop, real_ts))
        files.extend(paths)
    if keys:
        batches.append((_plan_contexts(keys), files))
    return batches


class _Progress:
    """A thread-safe progress bar (rich), or nothing."""

    def __init__(self, total: int, enabled: bool) -> None:
        self._bar = None
        self._lock = threading.Lock()
        if enabled and total:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

            self._bar = Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=Console(stderr=True),
                transient=False,
            )
            self._task = self._bar.add_task("C-STORE", total=total)

    def __enter__(self) -> "_Progress":
        if self._bar is not None:
            self._bar.start()
        return self

    def advance(self) -> None:
        if self._bar is not None:
            with self._lock:
                self._bar.advance(self._task)

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def send_paths(
    paths: Sequence[Path | str],
    destination: Destination,
    *,
    calling_ae: str,
    associations: int = 1,
    progress: bool = True,
    max_consecutive_transient: int = 3,
    client_factory: Callable[..., StoreClient] = StoreClient,
    **client_options: float,
) -> SendSummary:
    """Send every DICOM file under ``paths`` (files or folders, recursively) to ``destination``.

    Non-DICOM files are skipped and counted. Files are grouped by SOP class and transfer syntax; each group
    gets a presentation context (at most 128 per association: more groups are sent in successive batches).
    ``associations`` workers each hold one association. A worker that meets ``max_consecutive_transient``
    transient failures in a row (peer down) gives up, and the files left are counted as failed (transient).
    """
    if associations < 1:
        raise ValueError("associations must be >= 1")
    started = time.monotonic()
    summary = SendSummary()
    items: list[tuple[Path, str, str]] = []
    for path in _walk(paths):
        summary.files += 1
        info = _probe(path)
        if info is None:
            summary.skipped += 1
            continue
        items.append((path, info[0], info[1]))

    lock = threading.Lock()

    def record(path: Path, result: SendResult) -> None:
        with lock:
            summary.outcomes[result.outcome] += 1
            if result.outcome == "success":
                summary.sent += 1
            elif result.outcome == "warning":
                summary.warnings += 1
            else:
                summary.failed += 1
                summary.failures.append((path, result))

    with _Progress(len(items), progress) as bar:
        for contexts, files in _batches(items):
            work: queue.Queue[Path] = queue.Queue()
            for f in files:
                work.put(f)

            def worker() -> None:
                client = client_factory(destination, calling_ae=calling_ae, contexts=contexts, **client_options)
                streak = 0
                try:
                    while True:
                        try:
                            path = work.get_nowait()
                        except queue.Empty:
                            return
                        result = client.send(path)
                        record(path, result)
                        bar.advance()
                        streak = streak + 1 if result.outcome == "transient" else 0
                        if streak >= max_consecutive_transient:
                            give_up = SendResult(None, "transient", "not attempted: peer failing")
                            while True:
                                try:
                                    rest = work.get_nowait()
                                except queue.Empty:
                                    return
                                record(rest, give_up)
                                bar.advance()
                finally:
                    client.close()
                    with lock:
                        summary.associations += client.associations_opened

            n = min(associations, len(files))
            threads = [threading.Thread(target=worker, name=f"cstore-{i}", daemon=True) for i in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    summary.elapsed_s = time.monotonic() - started
    return summary
