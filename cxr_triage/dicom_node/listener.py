"""The DICOM listener: a pynetdicom SCP that accepts C-ECHO and C-STORE.

C-STORE, in this order, every path ending in a status (never an unhandled exception):

1. the negotiated context's abstract syntax must equal the request's Affected SOP Class (else 0xA900);
2. pynetdicom has already streamed the data set to a temp file (``_config.STORE_RECV_CHUNKED_DATASET``; the temp
   file goes to ``<spool>/tmp``, see :func:`_spool_tempfile`), so nothing big is in memory;
3. header-only parse of that file (:mod:`.headers`): unreadable -> 0xC000, pixel data shorter than announced ->
   0xC001, data set SOP Class / Instance UID differing from the command, or a missing/invalid UID -> 0xA900;
4. free space: incoming size + ``disk_reserve_mb`` must fit (else 0xA700); the spool writes our own file meta +
   the received data set bytes into ``<spool>/tmp``, hashing, fsyncs, renames to ``<sha[:2]>/<sha>.dcm``,
   fsyncs the directory (:mod:`.spool`);
5. ``record(ReceivedObject)`` commits the database row. If it raises (database unavailable) -> 0xA701 (Refused:
   out of resources -- transient, the sender should retry). The file stays in the spool: a resend has the same
   bytes, hence the same name, and a spool scan can adopt it (``Spool.iter_names``);
6. only now 0x0000 is answered. When ``outcome.needs_analysis`` the instance id is handed to this process's
   :class:`~cxr_triage.dicom_node.publisher.BackgroundPublisher` (a non-blocking put), which calls
   ``publish(instance_id)`` on its own thread: a slow or unreachable broker never delays the answer. A hint
   that is not published (queue full, broker down) is logged, never a failure status: the row is committed and
   stays RECEIVED, and the reconciler re-queues it.

Our file meta is written by us with a fixed implementation UID/version (not pynetdicom's, whose version name
changes with upgrades), and without the calling AE title, so identical data sets always hash the same: resending
an object gives the same spool name and ``record_received`` answers ``created=False`` (no second analysis).

Transfer syntaxes: pynetdicom (3.0) negotiates as acceptor by walking *our* list for each proposed context and
taking the first one the requestor also proposed, so the order of :data:`TRANSFER_SYNTAXES` is our preference
within one context. Which context a requestor then uses for a given object (storescu proposes one context per
transfer syntax) is the requestor's choice; we cannot influence it beyond what we accept.

Network hygiene (all in the server built here, also when a caller uses ``ae.start_server`` directly):
* TCP_NODELAY on every accepted socket before the first PDU is read;
* a PDU length above the limit for its type (A-ASSOCIATE-RQ: 1 MiB; P-DATA-TF: ``max_pdu_bytes`` + 1 KiB, we
  advertise ``max_pdu_bytes``) makes us send an A-ABORT and drop the connection *before* anything is allocated;
* a data set growing beyond ``max_image_bytes``, or the spool's free space falling below half the reserve while
  one streams in (checked every 16 MiB), aborts the association: nothing unbounded reaches the disk;
* ``max_associations``; ``allowed_calling_ae`` (association rejected: "calling AE title not recognised");
  called AE title checked only when ``require_called_aet=True`` (default off: peers often mistype it);
* SO_REUSEPORT, so ``serve(..., processes=N)`` runs N processes on one port; the kernel spreads connections over
  them (pynetdicom's receive does not scale with associations inside one process).

``STORE_RECV_CHUNKED_DATASET`` and the temp-file redirection are process-wide pynetdicom settings, set by
:func:`build_ae`; this module is meant to own the DICOM receive of its process.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pynetdicom import AE, _config, evt
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

from cxr_triage.core.contracts import ReceivedObject, RecordOutcome
from cxr_triage.core.dicom_config import configure_pydicom
from cxr_triage.core.logging import get_logger
from cxr_triage.core.settings import Settings
from cxr_triage.core.uids import derive_uid
from cxr_triage.dicom_node import scope
from cxr_triage.dicom_node.adopt import OrphanSuspects, adopt_orphans
from cxr_triage.dicom_node.headers import (
    BadHeader,
    TruncatedDataset,
    UnreadableHeader,
    read_header,
    received_object,
)
from cxr_triage.dicom_node.netutil import set_nodelay
from cxr_triage.dicom_node.publisher import BackgroundPublisher
from cxr_triage.dicom_node.spool import Spool, SpoolFull

__all__ = [
    "build_ae",
    "serve",
    "TriageAE",
    "TriageServer",
    "TRANSFER_SYNTAXES",
    "STATUS_SUCCESS",
    "STATUS_OUT_OF_RESOURCES",
    "STATUS_DB_UNAVAILABLE",
    "STATUS_DATASET_MISMATCH",
    "STATUS_CANNOT_UNDERSTAND",
    "STATUS_TRUNCATED",
    "STATUS_PROCESSING_FAILURE",
    "IMPLEMENTATION_CLASS_UID",
    "IMPLEMENTATION_VERSION_NAME",
]

LOG = get_logger("cxr_triage.dicom_node.listener")

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700  # spool free space below the reserve
STATUS_DB_UNAVAILABLE = 0xA701  # record() failed: file kept in the spool, sender should retry
STATUS_DATASET_MISMATCH = 0xA900  # context/command/data set SOP class or instance mismatch; missing UIDs
STATUS_CANNOT_UNDERSTAND = 0xC000  # data set unparseable
STATUS_TRUNCATED = 0xC001  # pixel data shorter than its header announces
STATUS_PROCESSING_FAILURE = 0xC211  # anything unexpected (a bug): logged with the exception type

IMPLEMENTATION_CLASS_UID = derive_uid("cxr-triage", "implementation-class")
IMPLEMENTATION_VERSION_NAME = "CXRTRIAGE_1"

# Our preference order within one presentation context (see module docstring).
TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, SV1
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (process 14)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (process 2 & 4)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
)

_ASSOC_RQ_LIMIT = 1 << 20  # an A-ASSOCIATE-RQ with 128 contexts x 20 syntaxes is ~200 KB
_SMALL_PDU_LIMIT = 1 << 10  # A-RELEASE / A-ABORT bodies are 4 bytes
_PDATA_SLACK = 1 << 10
_SPACE_CHECK_EVERY = 16 << 20  # re-check the spool reserve every 16 MiB of a data set being received
_NETWORK_TIMEOUT_S = 60.0
_ACSE_TIMEOUT_S = 30.0
_DIMSE_TIMEOUT_S = 60.0
_A_ABORT_INVALID_PDU = bytes([0x07, 0x00, 0, 0, 0, 4, 0, 0, 0x02, 0x06])  # source: provider, reason: invalid value


# ------------------------------------------------------------------------------------------------ C-STORE
@dataclass(frozen=True)
class StoreDeps:
    """What the C-STORE handler needs; bound to the handler as an argument (no globals)."""

    spool: Spool
    record: Callable[[ReceivedObject], RecordOutcome]
    publish: Callable[[int], object]  # non-blocking hand-over (BackgroundPublisher.submit); False: not queued
    suspects: OrphanSuspects | None = None  # spool names whose record failed: the adoption thread re-checks them


def _file_meta_bytes(*, sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = transfer_syntax
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    buf = DicomBytesIO()
    buf.is_little_endian = True
    buf.is_implicit_VR = False
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


def _dataset_offset(path: Path) -> int:
    """Where the data set starts in a pynetdicom temp file (after preamble + its file meta)."""
    with open(path, "rb") as fh:
        head = fh.read(144)
    if len(head) == 144 and head[128:132] == b"DICM" and head[132:140] == b"\x02\x00\x00\x00UL\x04\x00":
        return 144 + struct.unpack("<L", head[140:144])[0]
    raise UnreadableHeader("unexpected temp file layout")


def _request_priority(req: Any) -> int | None:
    with contextlib.suppress(Exception):
        return int(req.Priority)
    return None


def handle_store(event: Any, deps: StoreDeps) -> int:
    """``evt.EVT_C_STORE`` handler. Returns a status on every path."""
    started = time.perf_counter()
    try:
        status, fields = _store(event, deps)
    except Exception as exc:  # a bug: never let it escape as an unhandled exception
        LOG.error("c_store_failed", status=f"0x{STATUS_PROCESSING_FAILURE:04X}", error=type(exc).__name__)
        return STATUS_PROCESSING_FAILURE
    fields["ms"] = round((time.perf_counter() - started) * 1000, 1)
    if status == STATUS_SUCCESS:
        LOG.info("c_store", status=f"0x{status:04X}", **fields)
    else:
        LOG.warning("c_store_refused", status=f"0x{status:04X}", **fields)
    return status


def _store(event: Any, deps: StoreDeps) -> tuple[int, dict[str, Any]]:
    req = event.request
    context = event.context
    sop_class = str(req.AffectedSOPClassUID or "")
    sop_instance = str(req.AffectedSOPInstanceUID or "")
    if sop_class != str(context.abstract_syntax):
        return STATUS_DATASET_MISMATCH, {"why": "sop-class-differs-from-context"}
    transfer_syntax = str(context.transfer_syntax)

    try:
        source: Path | None = Path(event.dataset_path)
    except AttributeError:
        source = None  # chunked receive switched off by someone else: fall back to the in-memory bytes
    if source is not None:
        offset = _dataset_offset(source)
        parse_path = source
    else:
        raw = event.encoded_dataset(include_meta=True)
        fh, parse_path = deps.spool.new_temp(".mem")
        with fh:
            fh.write(raw)
        offset = _dataset_offset(parse_path)
    try:
        return _store_file(event, deps, parse_path, offset, sop_class, sop_instance, transfer_syntax)
    finally:
        if source is None:
            parse_path.unlink(missing_ok=True)


def _store_file(
    event: Any, deps: StoreDeps, path: Path, offset: int, sop_class: str, sop_instance: str, transfer_syntax: str
) -> tuple[int, dict[str, Any]]:
    # 1. Header only, from the received bytes (nothing is in the spool yet if we refuse).
    try:
        header = read_header(path)
    except TruncatedDataset:
        return STATUS_TRUNCATED, {"why": "truncated"}
    except UnreadableHeader:
        return STATUS_CANNOT_UNDERSTAND, {"why": "unreadable"}
    ds = header.dataset
    if str(ds.get("SOPClassUID", "")) != sop_class:
        return STATUS_DATASET_MISMATCH, {"why": "sop-class-differs-from-command"}
    if str(ds.get("SOPInstanceUID", "")) != sop_instance:
        return STATUS_DATASET_MISMATCH, {"why": "sop-instance-differs-from-command"}
    if sop_class in scope.IN_SCOPE_SOP_CLASSES and not header.has_pixel_data:
        return STATUS_TRUNCATED, {"why": "no-pixel-data"}
    # The record, built from the header now, so a missing/invalid UID is refused before anything is spooled.
    calling_ae = str(event.assoc.requestor.ae_title or "").strip() or None
    try:
        draft = received_object(
            header,
            sha256="",
            size=0,
            spool_name="",
            calling_ae=calling_ae,
            received_at=datetime.now(timezone.utc),
            command_priority=_request_priority(event.request),
        )
    except BadHeader as exc:
        return STATUS_DATASET_MISMATCH, {"why": str(exc).replace(" ", "-")}

    # 2. Durable in the spool.
    size = path.stat().st_size - offset
    meta = _file_meta_bytes(sop_class=sop_class, sop_instance=sop_instance, transfer_syntax=transfer_syntax)
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            stored = deps.spool.store([meta, fh], expected_size=len(meta) + size)
    except SpoolFull:
        return STATUS_OUT_OF_RESOURCES, {"why": "disk-reserve"}

    # 3. Record (commits).
    obj = draft.model_copy(update={"file_sha256": stored.sha256, "file_size": stored.size, "spool_name": stored.name})
    try:
        outcome = deps.record(obj)
    except Exception as exc:
        # The file stays: a resend has the same name; the adoption thread records it if nobody resends.
        LOG.error("record_failed", error=type(exc).__name__, spool_name=stored.name)
        if deps.suspects is not None:
            deps.suspects.add(stored.name)
        return STATUS_DB_UNAVAILABLE, {"why": "record-failed"}

    fields: dict[str, Any] = {
        "instance_id": outcome.instance_id,
        "created": outcome.created,
        "conflict": outcome.conflict,
        "reason": obj.out_of_scope_reason,
    }
    # 4. Hand the hint to the background publisher (it publishes after we answer). The row is committed: a
    # failure here is observed, not reported to the peer; the reconciler queues what was not handed over.
    if outcome.needs_analysis:
        try:
            handed_over = deps.publish(outcome.instance_id) is not False
        except Exception as exc:
            LOG.warning("publish_failed", instance_id=outcome.instance_id, error=type(exc).__name__)
            handed_over = False
        fields["publish_queued"] = handed_over
    return STATUS_SUCCESS, fields


def handle_echo(event: Any) -> int:
    return STATUS_SUCCESS


# ------------------------------------------------------------------------------------------------ transport
class _GuardedSocket(AssociationSocket):
    """Refuses to read a PDU whose claimed length is above the limit for its type (no allocation), and stops a
    data set that grows beyond ``max_image_bytes`` or eats into the spool's free-space reserve while it streams.
    """

    _cxr_pdata_limit: int = 1 << 20
    _cxr_last_type: int = 0
    _cxr_max_object: int = 1 << 62
    _cxr_spool: Spool | None = None
    _cxr_object_bytes: int = 0
    _cxr_next_space_check: int = 0

    def _abort(self, why: str, **fields: Any) -> bytearray:
        LOG.warning("association_aborted", why=why, **fields)
        sock = self.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.sendall(_A_ABORT_INVALID_PDU)
        # A short read makes pynetdicom treat the transport as closed (Evt17) and end the association.
        return bytearray()

    def _account(self, body: bytearray) -> bool:
        """Track the size of the data set being received (PDV items); False when it must stop."""
        pos = 0
        while pos + 6 <= len(body):
            length = int.from_bytes(body[pos : pos + 4], "big")
            control = body[pos + 5]
            if control & 0x01:  # a command fragment: a new message starts
                self._cxr_object_bytes = 0
                self._cxr_next_space_check = 0
            else:
                self._cxr_object_bytes += max(0, length - 2)
            pos += 4 + length
        if self._cxr_object_bytes > self._cxr_max_object:
            return False
        if self._cxr_spool is not None and self._cxr_object_bytes >= self._cxr_next_space_check:
            self._cxr_next_space_check = self._cxr_object_bytes + _SPACE_CHECK_EVERY
            # Half the reserve: the normal case (reserve crossed) is answered 0xA700 by the handler once the
            # object is in; aborting mid-stream is for a disk that is really filling up.
            if self._cxr_spool.free_bytes() < self._cxr_spool.reserve_bytes // 2:
                return False
        return True

    def recv(self, nr_bytes: int) -> bytearray:
        if nr_bytes == 6:  # pynetdicom reads the PDU header (type, reserved, length) on its own
            data = super().recv(6)
            if len(data) == 6:
                self._cxr_last_type = data[0]
            return data
        pdu_type = self._cxr_last_type
        if pdu_type == 0x04:
            limit = self._cxr_pdata_limit
        elif pdu_type in (0x01, 0x02, 0x03):
            limit = _ASSOC_RQ_LIMIT
        else:
            limit = _SMALL_PDU_LIMIT
        if nr_bytes > limit:
            return self._abort("pdu-too-long", pdu_type=pdu_type, claimed=nr_bytes, limit=limit)
        data = super().recv(nr_bytes)
        if pdu_type == 0x04 and len(data) == nr_bytes and not self._account(data):
            return self._abort("object-too-large-or-disk-low", received=self._cxr_object_bytes)
        return data


class _GuardedRequestHandler(RequestHandler):
    def _create_association(self) -> Any:
        raw = self.request
        if isinstance(raw, socket.socket):
            set_nodelay(raw)
        assoc = super()._create_association()
        sock = assoc.dul.socket
        if type(sock) is AssociationSocket:
            sock.__class__ = _GuardedSocket  # same state, guarded recv()
            ae = self.server.ae
            sock._cxr_pdata_limit = int(getattr(ae, "max_pdu_bytes", 1 << 20)) + _PDATA_SLACK
            sock._cxr_max_object = int(getattr(ae, "max_object_bytes", 1 << 62))
            sock._cxr_spool = getattr(ae, "spool", None)
        return assoc


class TriageServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with SO_REUSEPORT and child listener processes it shuts down with it."""

    daemon_threads = True

    def server_bind(self) -> None:
        if getattr(self.ae, "reuse_port", False) and hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    @property
    def children(self) -> list[multiprocessing.process.BaseProcess]:
        return getattr(self, "_cxr_children", [])

    def shutdown(self) -> None:
        sweeper_stop = getattr(self, "_cxr_sweeper_stop", None)
        if sweeper_stop is not None:
            sweeper_stop.set()
        for child in self.children:
            if child.is_alive() and child.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child.pid, signal.SIGTERM)
        for child in self.children:
            child.join(timeout=15)
            if child.is_alive():
                child.kill()
                child.join(timeout=5)
        super().shutdown()
        # Stop receiving now: abort live associations. An object whose C-STORE response was not sent yet is not
        # acknowledged, so the sender keeps responsibility for it; acknowledged ones are already committed.
        for assoc in self.active_associations:
            with contextlib.suppress(Exception):
                assoc.abort()
        self._close_publisher()

    def _close_publisher(self) -> None:
        # Hints still queued get a few seconds; any left stay RECEIVED in the database for the reconciler.
        publisher: BackgroundPublisher | None = getattr(self.ae, "publisher", None)
        if publisher is not None:
            publisher.close(timeout=5.0)


def _spool_tempfile(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom's NamedTemporaryFile for chunked receive, redirected into the receiving AE's spool tmp dir.

    Keeps in-flight data on the spool's filesystem (covered by the disk reserve; cleaned by
    ``Spool.clean_tmp`` when an association dies mid-object, which pynetdicom does not clean up).
    """
    thread = threading.current_thread()
    assoc = thread if hasattr(thread, "dul") else getattr(thread, "assoc", None)
    ae = getattr(assoc, "ae", None)
    spool = getattr(ae, "spool", None)
    if spool is not None and "dir" not in kwargs:
        kwargs["dir"] = str(spool.tmp_dir)
        kwargs.setdefault("prefix", "pnd-")
    return tempfile.NamedTemporaryFile(*args, **kwargs)


class TriageAE(AE):
    """A pynetdicom AE whose servers carry our handlers, PDU guard, TCP_NODELAY and SO_REUSEPORT."""

    spool: Spool
    orphan_suspects: OrphanSuspects
    publisher: BackgroundPublisher
    triage_handlers: list[Any]
    max_pdu_bytes: int
    max_object_bytes: int
    reuse_port: bool = False

    def start_server(  # type: ignore[override]
        self,
        address: tuple[str, int],
        block: bool = True,
        ssl_context: Any = None,
        evt_handlers: list[Any] | None = None,
        ae_title: str | None = None,
        contexts: Any = None,
    ) -> ThreadedAssociationServer | None:
        server = self.make_server(
            address,
            ae_title=ae_title,
            contexts=contexts,
            ssl_context=ssl_context,
            evt_handlers=[*self.triage_handlers, *(evt_handlers or [])],
            server_class=TriageServer,
            request_handler=_GuardedRequestHandler,
        )
        self._servers.append(server)
        if block:
            try:
                server.serve_forever()
            except KeyboardInterrupt:
                server.shutdown()
            return None
        thread = threading.Thread(target=server.serve_forever, name="cxr-dicom-server", daemon=True)
        thread.start()
        return server


def build_ae(
    settings: Settings,
    *,
    record: Callable[[ReceivedObject], RecordOutcome],
    publish: Callable[[int], None],
    require_called_aet: bool = False,
) -> TriageAE:
    """Our SCP: Verification + every storage SOP class (out-of-scope ones are recorded as not analysed)."""
    import logging

    logging.getLogger("pynetdicom").setLevel(logging.WARNING)  # it dumps data sets (PHI) at DEBUG
    # Received headers are validated by us where it matters (UIDs); pydicom's value warnings quote values (PHI).
    # The one process-wide configuration (also applied by the CLI at start), here too for embedded use.
    configure_pydicom()
    _config.STORE_RECV_CHUNKED_DATASET = True
    _dimse_messages.NamedTemporaryFile = _spool_tempfile  # type: ignore[attr-defined]

    spool = Spool(settings.spool_dir, reserve_bytes=settings.disk_reserve_mb << 20).ensure()
    spool.clean_tmp()
    ae = TriageAE(ae_title=settings.ae_title)
    ae.spool = spool
    ae.max_pdu_bytes = settings.max_pdu_bytes
    ae.max_object_bytes = settings.max_image_bytes
    ae.maximum_pdu_size = settings.max_pdu_bytes
    ae.maximum_associations = settings.max_associations
    ae.network_timeout = _NETWORK_TIMEOUT_S
    ae.acse_timeout = _ACSE_TIMEOUT_S
    ae.dimse_timeout = _DIMSE_TIMEOUT_S
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.require_calling_aet = list(settings.allowed_calling_ae)
    ae.require_called_aet = require_called_aet
    ae.add_supported_context(Verification)
    seen: set[str] = set()
    in_scope_first = [*sorted(scope.IN_SCOPE_SOP_CLASSES), *(str(cx.abstract_syntax) for cx in AllStoragePresentationContexts)]
    for sop_class in in_scope_first:
        if sop_class not in seen:
            seen.add(sop_class)
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    ae.orphan_suspects = OrphanSuspects()
    # Built here, in the process that serves (after serve() forked its children): one publisher thread each.
    ae.publisher = BackgroundPublisher(publish)
    deps = StoreDeps(spool=spool, record=record, publish=ae.publisher.submit, suspects=ae.orphan_suspects)
    ae.triage_handlers = [
        (evt.EVT_C_STORE, handle_store, [deps]),
        (evt.EVT_C_ECHO, handle_echo),
    ]
    return ae


# ------------------------------------------------------------------------------------------------ serve
def _child_main(
    settings: Settings, record: Any, publish: Any, host: str, port: int, adoption: dict[str, Any] | None
) -> None:
    def _stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ae = build_ae(settings, record=record, publish=publish)
    if adoption is not None:  # this process's own failed records; the parent scans the whole spool
        _start_adoption(ae, record=record, publish=publish, full_scan_first=False, **adoption)
    ae.reuse_port = True
    with contextlib.suppress(KeyboardInterrupt):
        ae.start_server((host, port), block=True)


def _start_adoption(
    ae: "TriageAE",
    *,
    recorded: Callable[[list[str]], set[str]],
    record: Callable[[ReceivedObject], RecordOutcome],
    publish: Callable[[int], None],
    interval_s: float,
    min_age_s: float,
    full_scan_first: bool,
) -> threading.Event:
    """A daemon thread that adopts orphaned spool files (:mod:`cxr_triage.dicom_node.adopt`): the whole spool
    once (``full_scan_first``), then every ``interval_s`` the names whose record failed in this process."""
    stop = threading.Event()
    suspects: OrphanSuspects = ae.orphan_suspects

    def _round(full: bool) -> None:
        names = None if full else suspects.take()
        if names == []:
            return
        try:
            report = adopt_orphans(ae.spool, recorded=recorded, record=record, publish=publish,
                                   min_age_s=min_age_s, names=names)
        except Exception as exc:  # database down for the "recorded" query: look again next round
            if names:
                suspects.update(names)
            LOG.warning("spool_scan_failed", error=type(exc).__name__)
            return
        suspects.update(report.pending)
        if report.adopted or report.unreadable or report.failed:
            LOG.warning("spool_scan", full=full, scanned=report.scanned, adopted=report.adopted,
                        unreadable=report.unreadable, failed=report.failed, pending=len(report.pending))

    def _loop() -> None:
        full = full_scan_first
        while not stop.is_set():
            _round(full)
            full = False
            stop.wait(interval_s)

    threading.Thread(target=_loop, name="cxr-spool-adoption", daemon=True).start()
    return stop


def serve(
    settings: Settings,
    *,
    record: Callable[[ReceivedObject], RecordOutcome],
    publish: Callable[[int], None],
    block: bool = True,
    processes: int = 1,
    recorded: Callable[[list[str]], set[str]] | None = None,
    adopt_interval_s: float = 60.0,
    adopt_min_age_s: float = 120.0,
) -> ThreadedAssociationServer | None:
    """Listen on ``settings.dicom_host:dicom_port``.

    ``processes > 1``: ``processes - 1`` forked children plus this process each bind the same port with
    SO_REUSEPORT (Linux spreads new connections over them). The children are forked *before* this process binds
    or starts threads; ``record``/``publish`` must therefore be fork-safe: open database/broker connections
    lazily, per process (a pool created before the fork must not be shared). Shutting down the returned server
    (or Ctrl-C / SIGTERM when ``block``) stops the children too.

    ``recorded(sha256s) -> known subset`` switches on spool adoption (:mod:`cxr_triage.dicom_node.adopt`): this
    process scans the whole spool at start, and every process re-checks the files whose record failed in it every
    ``adopt_interval_s``; files younger than ``adopt_min_age_s`` are left for the receive in flight.
    """
    if processes < 1:
        raise ValueError("processes must be >= 1")
    host, port = settings.dicom_host, settings.dicom_port
    adoption = None if recorded is None else {
        "recorded": recorded, "interval_s": adopt_interval_s, "min_age_s": adopt_min_age_s,
    }
    children: list[multiprocessing.process.BaseProcess] = []
    if processes > 1:
        ctx = multiprocessing.get_context("fork")
        for _ in range(processes - 1):
            child = ctx.Process(target=_child_main, args=(settings, record, publish, host, port, adoption),
                                daemon=True)
            child.start()
            children.append(child)
    ae = build_ae(settings, record=record, publish=publish)
    ae.reuse_port = processes > 1
    LOG.info("listening", port=port, processes=processes, ae_title=settings.ae_title)
    try:
        server = ae.start_server((host, port), block=False)
    except BaseException:
        for child in children:
            child.terminate()
        raise
    assert server is not None
    server._cxr_children = children  # type: ignore[attr-defined]
    if adoption is not None:
        server._cxr_sweeper_stop = _start_adoption(  # type: ignore[attr-defined]
            ae, record=record, publish=publish, full_scan_first=True, **adoption
        )
    if not block:
        return server
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    with contextlib.suppress(ValueError):  # not the main thread: only Ctrl-C via KeyboardInterrupt
        signal.signal(signal.SIGTERM, _on_signal)
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
    return None

