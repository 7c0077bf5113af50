"""Real DICOM peers for tests: DCMTK ``storescp`` and Orthanc on free localhost ports.

Plain context managers (not pytest fixtures) so any test module can use them::

    from tests.peers import run_storescp, run_orthanc

    with run_storescp(tmp_path, ae="PACS") as (host, port, out_dir):
        ...
    with run_orthanc(tmp_path) as (dicom_port, http_port):
        ...

Each peer writes its log to a file in ``tmpdir`` (``storescp-<port>.log``, ``orthanc-<port>.log``), is waited
for until it answers (bounded), and is terminated (then killed) on exit even when the body raises. When the
executable is missing the context manager fails the test (./scripts/test installs the peers).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from cxr_triage.dicom_node.netutil import free_port, wait_for_port

__all__ = [
    "run_storescp",
    "run_orthanc",
    "orthanc_get",
    "storescp_log",
    "count_storescp_associations",
    "storescp_receptions",
    "storescp_receptions_log",
    "ORTHANC_BIN",
]

HOST = "127.0.0.1"
# DCMTK, not pynetdicom's console script of the same name that a virtualenv puts first on PATH.
DCMTK_STORESCP = os.environ.get("CXR_TEST_STORESCP", "/usr/bin/storescp")
ORTHANC_BIN = os.environ.get("CXR_TEST_ORTHANC", shutil.which("Orthanc") or "/usr/sbin/Orthanc")
_START_TRIES = 3  # free_port() can race with another process binding the port first


def _skip(reason: str) -> None:
    import pytest

    pytest.fail(reason + " (./scripts/test installs it)")


def _stop(proc: subprocess.Popen, *, grace: float = 5.0) -> None:
    """Terminate our own child process (by its pid), kill it if it does not go within ``grace`` seconds."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(timeout=grace)


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return "<no log>"


def storescp_log(tmpdir: Path | str, port: int) -> Path:
    """Where :func:`run_storescp` writes the log of the storescp listening on ``port``."""
    return Path(tmpdir) / f"storescp-{port}.log"


def storescp_receptions_log(tmpdir: Path | str, port: int) -> Path:
    """Where :func:`run_storescp` with ``log_receptions=True`` appends one line per object it received."""
    return Path(tmpdir) / f"storescp-{port}.received"


def storescp_receptions(log: Path | str) -> Counter[str]:
    """SOP Instance UID -> how many times storescp received it (one C-STORE each, resends included).

    Counting files cannot see a duplicate delivery: storescp names a file after the SOP Instance UID, so a resend
    overwrites the first. The reception log has a line per received object (``--exec-on-reception``).
    """
    path = Path(log)
    if not path.exists():
        return Counter()
    counts: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        name = line.strip()
        if name:
            counts[name.split(".", 1)[1] if "." in name else name] += 1  # "<modality prefix>.<SOP UID>"
    return counts


def count_storescp_associations(log: Path | str) -> int:
    """Number of associations storescp accepted (acknowledged), counted from its verbose log.

    ("Association Received" also counts bare TCP connections such as the readiness probe.)
    """
    return sum(1 for line in Path(log).read_text(errors="replace").splitlines() if "Association Acknowledged" in line)


@contextlib.contextmanager
def run_storescp(
    tmpdir: Path | str,
    ae: str = "PACS",
    *,
    extra_args: Sequence[str] = (),
    config_file: tuple[Path | str, str] | None = None,
    port: int | None = None,
    nodelay: bool = True,
    log_receptions: bool = False,
    timeout: float = 10.0,
) -> Iterator[tuple[str, int, Path]]:
    """Start DCMTK ``storescp -v -aet AE -od OUT PORT`` on a free port; yield ``(host, port, out_dir)``.

    ``config_file=(path, profile)`` restricts what is accepted (``-xf``), e.g. to test "SOP class not supported";
    ``extra_args`` are passed through (``--refuse``, ``--sleep-during 5`` ...). Received files are named by
    storescp (``<modality>.<sop uid>``) under ``out_dir``. The log is :func:`storescp_log`.
    ``port`` reuses a known port (to restart a peer "at the same address"); otherwise a free one is picked.
    ``nodelay`` sets DCMTK's ``TCP_NODELAY=1`` environment switch (DCMTK leaves Nagle on by default, which
    adds ~40 ms to every C-STORE response); pass False to measure the untuned peer.
    ``log_receptions`` makes storescp append the file name of every object it receives to
    :func:`storescp_receptions_log` (read it with :func:`storescp_receptions`): the way to count C-STORE requests.
    """
    exe = DCMTK_STORESCP if os.path.exists(DCMTK_STORESCP) else None
    if exe is None:
        _skip("DCMTK storescp is not installed")
    tmp = Path(tmpdir)
    out_dir = tmp / f"storescp-{ae}-out"
    out_dir.mkdir(parents=True, exist_ok=True)
    last_error = ""
    env = dict(os.environ)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    else:
        env.pop("TCP_NODELAY", None)
    for _ in range(_START_TRIES if port is None else 1):
        port_ = free_port(HOST) if port is None else port
        log_path = storescp_log(tmp, port_)
        args = [exe, "-v", "-aet", ae, "-od", str(out_dir), "-dhl", "-ta", "10", "-ts", "30"]
        if config_file is not None:
            args += ["-xf", str(config_file[0]), config_file[1]]
        if log_receptions:
            receptions = storescp_receptions_log(tmp, port_)
            if "#" in str(receptions) or "'" in str(receptions):
                raise ValueError("reception log path must not contain # or ' (storescp placeholders, shell quoting)")
            # storescp runs this through /bin/sh after each received object; #f is the file name it stored.
            args += ["-xcr", f"echo '#f' >> '{receptions}'"]
        args += [*extra_args, str(port_)]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
        try:
            if _wait_listening(proc, HOST, port_, timeout):
                try:
                    yield HOST, port_, out_dir
                finally:
                    _stop(proc)
                return
            last_error = _tail(log_path)
        finally:
            _stop(proc)
    raise RuntimeError(f"storescp did not start: {last_error}")


def _listening_inodes(port: int) -> set[str]:
    """Socket inodes of the TCP sockets LISTENing on ``port`` (any address), from /proc/net/tcp{,6}."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    return inodes


def _owns_listener(pid: int, port: int) -> bool:
    """True when process ``pid`` itself holds a socket listening on ``port``.

    A TCP probe is not enough: under load, the port picked as free can be taken by another test's server between
    the pick and the bind; the probe then reaches that server while our peer is still exiting on EADDRINUSE.
    """
    inodes = _listening_inodes(port)
    if not inodes:
        return False
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _wait_listening(proc: subprocess.Popen, host: str, port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        if os.path.isdir("/proc/self/fd"):
            if _owns_listener(proc.pid, port):
                return True
            time.sleep(0.02)
        elif wait_for_port(host, port, timeout=0.2):  # no /proc: best effort
            time.sleep(0.05)  # a process that lost the port race exits right after bind() fails
            return proc.poll() is None
    return False


def orthanc_get(http_port: int, path: str, *, timeout: float = 5.0) -> object:
    """GET ``http://127.0.0.1:<http_port><path>`` from Orthanc's REST API and decode the JSON."""
    with urllib.request.urlopen(f"http://{HOST}:{http_port}{path}", timeout=timeout) as rsp:
        return json.loads(rsp.read().decode("utf-8"))


@contextlib.contextmanager
def run_orthanc(
    tmpdir: Path | str,
    *,
    aet: str = "ORTHANC",
    check_called_aet: bool = False,
    extra_config: dict | None = None,
    timeout: float = 30.0,
) -> Iterator[tuple[int, int]]:
    """Start a real Orthanc with its own storage; yield ``(dicom_port, http_port)`` once its REST API answers.

    Config: DicomAet ``aet``, DicomCheckCalledAet ``check_called_aet`` (default False), RemoteAccessAllowed,
    AuthenticationEnabled false, no plugins, storage under ``tmpdir/orthanc-<port>/``. Log:
    ``tmpdir/orthanc-<http_port>.log``.
    """
    if not (os.path.isfile(ORTHANC_BIN) and os.access(ORTHANC_BIN, os.X_OK)):
        _skip(f"Orthanc is not installed at {ORTHANC_BIN}")
    tmp = Path(tmpdir)
    last_error = ""
    for _ in range(_START_TRIES):
        dicom_port, http_port = free_port(HOST), free_port(HOST)
        if dicom_port == http_port:
            continue
        root = tmp / f"orthanc-{http_port}"
        (root / "db").mkdir(parents=True, exist_ok=True)
        config = {
            "Name": f"cxr-triage-test-{http_port}",
            "StorageDirectory": str(root / "db"),
            "IndexDirectory": str(root / "db"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": http_port,
            "RemoteAccessAllowed": True,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": aet,
            "DicomPort": dicom_port,
            "DicomCheckCalledAet": check_called_aet,
            "DicomAlwaysAllowStore": True,
            "DicomCheckModalityHost": False,
            "DicomModalities": {},
            "UnknownSopClassAccepted": False,
            "ConcurrentJobs": 1,
            "SaveJobs": False,
            "HttpThreadsCount": 4,
            "StableAge": 1,
        }
        if extra_config:
            config.update(extra_config)
        cfg_path = root / "orthanc.json"
        cfg_path.write_text(json.dumps(config, indent=2))
        log_path = tmp / f"orthanc-{http_port}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(
                [ORTHANC_BIN, "--verbose", str(cfg_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=root,
            )
        try:
            if _wait_orthanc(proc, http_port, dicom_port, timeout):
                try:
                    yield dicom_port, http_port
                finally:
                    _stop(proc, grace=10.0)
                return
            last_error = _tail(log_path)
        finally:
            _stop(proc, grace=10.0)
    raise RuntimeError(f"Orthanc did not start: {last_error}")


def _wait_orthanc(proc: subprocess.Popen, http_port: int, dicom_port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            orthanc_get(http_port, "/system", timeout=1.0)
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            time.sleep(0.1)
            continue
        return wait_for_port(HOST, dicom_port, timeout=max(0.1, deadline - time.monotonic()))
    return False
