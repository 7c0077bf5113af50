"""Helpers for the listener tests: a real recorder (migrated database + record_received), a running listener on a
free port, DCMTK storescu/echoscu runners, and a scripted raw-socket peer."""

from __future__ import annotations

import contextlib
import io
import os
import re
import socket
import struct
import subprocess
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from cxr_triage.core.contracts import ReceivedObject, RecordOutcome
from cxr_triage.core.settings import Settings
from cxr_triage.db.migrate import upgrade
from cxr_triage.db.repo import record_received, recorded_hashes
from cxr_triage.db.session import make_engine, make_session_factory
from cxr_triage.db.tables import Instance
from cxr_triage.dicom_node.netutil import free_port

HOST = "127.0.0.1"
# The DCMTK tools, not pynetdicom's same-named apps that the virtual environment puts first on PATH.
STORESCU = os.environ.get("CXR_TEST_STORESCU", "/usr/bin/storescu")
ECHOSCU = os.environ.get("CXR_TEST_ECHOSCU", "/usr/bin/echoscu")
DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "dicom"


class Recorder:
    """``record`` for the listener: one engine per process (fork-safe), ``record_received`` per object."""

    def __init__(self, url: str) -> None:
        self.url = url
        self._pid: int | None = None
        self._factory: Any = None
        self._engine: Any = None
        self.fail = False  # simulate the database being down
        self.calls = 0

    def _session_factory(self) -> Any:
        if self._pid != os.getpid():
            self._engine = make_engine(self.url)
            self._factory = make_session_factory(self._engine)
            self._pid = os.getpid()
        return self._factory

    def __call__(self, obj: ReceivedObject) -> RecordOutcome:
        self.calls += 1
        if self.fail:
            raise ConnectionError("database unavailable (simulated)")
        with self._session_factory()() as session:
            return record_received(session, obj=obj)

    def recorded(self, sha256s: list[str]) -> set[str]:
        """The listener's spool-adoption query (fails like ``__call__`` while the database is "down")."""
        if self.fail:
            raise ConnectionError("database unavailable (simulated)")
        with self._session_factory()() as session:
            return recorded_hashes(session, sha256s=sha256s)

    def instances(self) -> list[Instance]:
        with self._session_factory()() as session:
            return list(session.scalars(select(Instance).order_by(Instance.id)))

    def dispose(self) -> None:
        if self._engine is not None:
            self._engine.dispose()


@dataclass
class Publisher:
    published: list[int] = field(default_factory=list)
    fail: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, instance_id: int) -> None:
        if self.fail:
            raise ConnectionError("broker down (simulated)")
        with self.lock:
            self.published.append(instance_id)


def migrated(url: str) -> str:
    upgrade(url)
    return url


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "var",
        "dicom_host": HOST,
        "dicom_port": free_port(),
        "disk_reserve_mb": 0,
        "ae_title": "CXRTRIAGE",
    }
    values.update(overrides)
    return Settings(**values)


@contextlib.contextmanager
def running_listener(settings: Settings, recorder: Any, publisher: Any, **kwargs: Any) -> Iterator[Any]:
    from cxr_triage.dicom_node.listener import serve

    server = serve(settings, record=recorder, publish=publisher, block=False, **kwargs)
    try:
        # serve() returns once the socket listens. No TCP probe: pynetdicom keeps a connection that closes
        # without an A-ASSOCIATE-RQ as an association until its ARTIM timer (acse_timeout) expires.
        yield server
    finally:
        server.shutdown()


def storescu(
    port: int, files: Sequence[Path | str], *, aet: str = "MODALITY", aec: str = "CXRTRIAGE", extra: Sequence[str] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu, verbose, one association for all files. Output is parsed by :func:`storescu_statuses`."""
    cmd = [STORESCU, "-v", "-aet", aet, "-aec", aec, *extra, HOST, str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


_RSP_RE = re.compile(r"Received Store Response \(([^)]*)\)")


def storescu_statuses(output: str) -> list[str]:
    """The status text of every C-STORE response storescu received ("Success", "Error: ..." ...)."""
    return _RSP_RE.findall(output)


def echoscu(port: int, *, aet: str = "MODALITY", aec: str = "CXRTRIAGE", timeout: float = 30) -> bool:
    proc = subprocess.run(
        [ECHOSCU, "-aet", aet, "-aec", aec, HOST, str(port)], capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode == 0


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


# ------------------------------------------------------------------------------------------------ raw peer
def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def _uid_bytes(uid: str) -> bytes:
    raw = uid.encode("ascii")
    return raw + (b"\x00" if len(raw) % 2 else b"")


def associate_rq(
    *, called: str = "CXRTRIAGE", calling: str = "SCRIPTED", contexts: Sequence[tuple[int, str, Sequence[str]]],
    max_pdu: int = 16384,
) -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU."""
    variable = _item(0x10, _uid_bytes("1.2.840.10008.3.1.1.1"))
    for cx_id, abstract, syntaxes in contexts:
        sub = _item(0x30, _uid_bytes(abstract)) + b"".join(_item(0x40, _uid_bytes(ts)) for ts in syntaxes)
        variable += _item(0x20, bytes([cx_id, 0, 0, 0]) + sub)
    user = _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, _uid_bytes("1.2.826.0.1.3680043.9.7433.1.1"))
    variable += _item(0x50, user)
    body = struct.pack(">H", 1) + b"\x00\x00" + called.ljust(16).encode() + calling.ljust(16).encode() + b"\x00" * 32
    body += variable
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def p_data(cx_id: int, control: int, fragment: bytes) -> bytes:
    pdv = struct.pack(">LB", len(fragment) + 2, cx_id) + bytes([control]) + fragment
    return struct.pack(">BBL", 0x04, 0, len(pdv)) + pdv


def recv_pdu(sock: socket.socket, timeout: float = 10.0) -> tuple[int, bytes] | None:
    """Read one PDU (type, body); None when the peer closed the connection."""
    sock.settimeout(timeout)
    head = b""
    while len(head) < 6:
        chunk = sock.recv(6 - len(head))
        if not chunk:
            return None
        head += chunk
    pdu_type, _, length = struct.unpack(">BBL", head)
    body = b""
    while len(body) < length:
        chunk = sock.recv(min(65536, length - len(body)))
        if not chunk:
            return None
        body += chunk
    return pdu_type, body


def accepted_context_ids(ac_body: bytes) -> dict[int, str]:
    """Presentation context id -> accepted transfer syntax, from an A-ASSOCIATE-AC body."""
    pos, out = 68, {}
    while pos + 4 <= len(ac_body):
        item_type, _, length = struct.unpack(">BBH", ac_body[pos : pos + 4])
        value = ac_body[pos + 4 : pos + 4 + length]
        if item_type == 0x21 and value[2] == 0:
            sub = value[4:]
            ts_len = struct.unpack(">H", sub[2:4])[0]
            out[value[0]] = sub[4 : 4 + ts_len].rstrip(b"\x00").decode()
        pos += 4 + length
    return out


def wait_closed(sock: socket.socket, timeout: float = 10.0) -> bool:
    """True once the peer closes (after reading and discarding whatever it sends, e.g. an A-ABORT)."""
    sock.settimeout(timeout)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except (socket.timeout, TimeoutError):
        return False


# ------------------------------------------------------------------------------------------------ senders
_TS_OPTION = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",
    "1.2.840.10008.1.2.4.70": "-xs",
    "1.2.840.10008.1.2.4.90": "-xv",
    "1.2.840.10008.1.2.4.91": "-xw",
    "1.2.840.10008.1.2.4.80": "-xt",
    "1.2.840.10008.1.2.4.81": "-xu",
    "1.2.840.10008.1.2.5": "-xr",
}


def transfer_syntax_of(path: Path | str) -> str:
    from pydicom.filereader import read_file_meta_info

    return str(read_file_meta_info(path).TransferSyntaxUID)


def dcmtk_env() -> dict[str, str]:
    """DCMTK disables Nagle only when TCP_NODELAY=1 is in its environment (dcmnet dul.cc)."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu_popen(port: int, files: Sequence[Path | str], *, aet: str = "MODALITY", option: str | None = None) -> subprocess.Popen[str]:
    cmd = [STORESCU, "-v", "-aet", aet, "-aec", "CXRTRIAGE"]
    if option:
        cmd.append(option)
    cmd += [HOST, str(port), *map(str, files)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dcmtk_env())


def send_all(port: int, files: Sequence[Path | str], *, aet: str = "MODALITY", timeout: float = 120) -> dict[str, str]:
    """Send files with concurrent DCMTK storescu processes (one per transfer syntax group, each proposing what its
    files need). Returns {file path: response status text} for every file storescu got a response for."""
    groups: dict[str | None, list[str]] = {}
    for path in files:
        groups.setdefault(_TS_OPTION.get(transfer_syntax_of(path)), []).append(str(path))
    procs = [(storescu_popen(port, group, aet=aet, option=option), group) for option, group in groups.items()]
    results: dict[str, str] = {}
    for proc, _ in procs:
        out, _ = proc.communicate(timeout=timeout)
        results.update(acknowledged(out))
    return results


_SENDING_RE = re.compile(r"Sending file: (.+)$")


def acknowledged(output: str) -> dict[str, str]:
    """{file: status text} from storescu -v output (a file without a response line is absent)."""
    out: dict[str, str] = {}
    current: str | None = None
    for line in output.splitlines():
        match = _SENDING_RE.search(line)
        if match:
            current = match.group(1).strip()
            continue
        rsp = _RSP_RE.search(line)
        if rsp and current is not None:
            out[current] = rsp.group(1)
            current = None
    return out


def pynetdicom_store(port: int, dataset: Any, *, calling: str = "PYSCU", ts: str | None = None) -> int:
    """C-STORE one pydicom Dataset (or file path) with a pynetdicom SCU; returns the status (-1: no response)."""
    from pydicom import dcmread
    from pynetdicom import AE

    ds = dcmread(dataset) if isinstance(dataset, (str, Path)) else dataset
    ae = AE(ae_title=calling)
    ae.add_requested_context(ds.SOPClassUID, ts or ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate(HOST, port, ae_title="CXRTRIAGE")
    if not assoc.is_established:
        return -2
    try:
        rsp = assoc.send_c_store(ds)
        return int(rsp.Status) if rsp is not None and "Status" in rsp else -1
    finally:
        if assoc.is_established:
            assoc.release()


# ------------------------------------------------------------------------------------------------ raw C-STORE
def c_store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    from pydicom.dataset import Dataset
    from pynetdicom.dsutils import encode

    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_class
    cmd.CommandField = 0x0001
    cmd.MessageID = message_id
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    cmd.AffectedSOPInstanceUID = sop_instance
    body = encode(cmd, True, True)
    group = Dataset()
    group.CommandGroupLength = len(body)
    return encode(group, True, True) + body


def response_status(sock: socket.socket, timeout: float = 30.0) -> int | None:
    """Read PDUs until a DIMSE response command arrives; its Status (None if the association ended)."""
    from pynetdicom.dsutils import decode

    command = b""
    while True:
        pdu = recv_pdu(sock, timeout)
        if pdu is None or pdu[0] != 0x04:
            return None
        body = pdu[1]
        pos = 0
        while pos < len(body):
            length = struct.unpack(">L", body[pos : pos + 4])[0]
            control = body[pos + 5]
            command += body[pos + 6 : pos + 4 + length]
            pos += 4 + length
            if control & 0x03 == 0x03:
                return int(decode(io.BytesIO(command), True, True).Status)


def raw_association(port: int, contexts: Sequence[tuple[int, str, Sequence[str]]], *, calling: str = "SCRIPTED") -> tuple[socket.socket, tuple[int, bytes] | None]:
    sock = socket.create_connection((HOST, port), timeout=10)
    sock.sendall(associate_rq(calling=calling, contexts=contexts))
    return sock, recv_pdu(sock)


def send_raw_store(sock: socket.socket, cx_id: int, sop_class: str, sop_instance: str, dataset_bytes: bytes, *, fragment: int = 16000) -> int | None:
    sock.sendall(p_data(cx_id, 0x03, c_store_command(sop_class, sop_instance)))
    for start in range(0, max(len(dataset_bytes), 1), fragment):
        chunk = dataset_bytes[start : start + fragment]
        last = start + fragment >= len(dataset_bytes)
        sock.sendall(p_data(cx_id, 0x02 if last else 0x00, chunk))
    return response_status(sock)


def release(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(struct.pack(">BBL", 0x05, 0, 4) + b"\x00" * 4)
        recv_pdu(sock, timeout=5)
    sock.close()
