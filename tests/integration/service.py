"""Run the real service as separate processes (as production does) for integration and fault tests.

Every part is a real `cxr-triage` sub-command in its own process: listener, analyze worker, deliver worker with
beat; the broker is a real redis-server with AOF in the test's directory; the database is SQLite or PostgreSQL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import func, select

from cxr_triage.bundled_redis import BundledRedis
from cxr_triage.core.states import TERMINAL_INSTANCE_STATES
from cxr_triage.db.migrate import upgrade
from cxr_triage.db.session import make_engine, make_session_factory
from cxr_triage.db.tables import Instance, OutboxItem, StructuredReport
from cxr_triage.dicom_node.netutil import free_port, wait_for_port

PART_ARGS = {
    "listener": ["listen"],
    "analyze": ["work", "--queues", "analyze"],
    "deliver": ["work", "--queues", "deliver", "--beat"],
}


def wait_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.25, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Service:
    root: Path
    models_dir: Path
    pacs: str = ""
    database_url: str | None = None
    extra_env: dict[str, str] = field(default_factory=dict)
    dicom_port: int = field(default_factory=free_port)
    redis: BundledRedis | None = None
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.data_dir = self.root / "var"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.redis = BundledRedis(self.root / "redis")
        self.db_url = self.database_url or f"sqlite:///{self.data_dir / 'cxr-triage.sqlite3'}"
        self.engine = make_engine(self.db_url)
        self.sessions = make_session_factory(self.engine)

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            CXR_DATA_DIR=str(self.data_dir),
            CXR_DATABASE_URL=self.db_url,
            CXR_REDIS_URL=self.redis.url if self.redis else "",
            CXR_DICOM_PORT=str(self.dicom_port),
            CXR_DICOM_HOST="127.0.0.1",
            CXR_PACS=self.pacs,
            CXR_DEMO_MODELS="1",
            CXR_MODELS_DIR=str(self.models_dir),
            CXR_STUDY_STABLE_SECONDS="1",
            CXR_RECONCILE_INTERVAL_S="2",
            # Default task time limit (300 s, Redis visibility 660 s): a killed worker's images must come back
            # through the renewable lease, not through either of those.
            CXR_ANALYSIS_LEASE_S="6",
            CXR_BATCH_SIZE="4",
            CXR_BATCH_WAIT_MS="100",
            CXR_DISK_RESERVE_MB="64",
            CXR_SR_RETRY_MAX_S="3",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def start(self, *parts: str) -> None:
        upgrade(self.db_url)
        if self.redis and (self.redis.process is None or self.redis.process.poll() is not None):
            self.redis.start()
        for part in parts or ("listener", "analyze", "deliver"):
            self.start_part(part)
        if "listener" in (parts or ("listener",)):
            assert wait_for_port("127.0.0.1", self.dicom_port, timeout=30), "listener did not open its port"

    def start_part(self, part: str, *, env: dict[str, str] | None = None) -> None:
        """Start one part; ``env`` overrides variables for this part only (e.g. a broker only it cannot reach)."""
        log = open(self.root / f"{part}.log", "ab")
        self.procs[part] = subprocess.Popen(
            [sys.executable, "-m", "cxr_triage", *PART_ARGS[part]],
            env={**self.env, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        if part == "listener":
            assert wait_for_port("127.0.0.1", self.dicom_port, timeout=30), "listener did not open its port"

    def kill_part(self, part: str, sig: int = signal.SIGKILL) -> None:
        proc = self.procs.pop(part)
        os.killpg(proc.pid, sig)  # the whole group: a worker's embedded beat child too
        proc.wait(timeout=30)

    def stop(self) -> None:
        for part in list(self.procs):
            proc = self.procs[part]
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for part, proc in list(self.procs.items()):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()
        if self.redis:
            self.redis.stop()

    def dispose(self) -> None:
        """Close the test's own connections (a PostgreSQL test database is dropped afterwards)."""
        self.engine.dispose()

    @contextlib.contextmanager
    def running(self) -> Iterator["Service"]:
        """Stop every part on the way out; on a failure print the parts' logs first (they explain it)."""
        try:
            yield self
        except BaseException:
            print(self.logs())
            raise
        finally:
            self.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-4000:]}" for p in sorted(self.root.glob("*.log")))

    # ------------------------------------------------------------------ observations
    def instance_states(self) -> list[tuple[int, str, str | None]]:
        with self.sessions() as s:
            return [(i.id, i.state, i.reason) for i in s.scalars(select(Instance).order_by(Instance.id))]

    def all_terminal(self, expected: int) -> bool:
        states = self.instance_states()
        return len(states) >= expected and all(state in TERMINAL_INSTANCE_STATES for _, state, _ in states)

    def reports(self) -> list[StructuredReport]:
        with self.sessions() as s:
            return list(s.scalars(select(StructuredReport)))

    def pending_outbox(self) -> int:
        with self.sessions() as s:
            return s.scalar(select(func.count()).select_from(OutboxItem).where(OutboxItem.state == "pending")) or 0

    def outbox(self) -> list[OutboxItem]:
        with self.sessions() as s:
            return list(s.scalars(select(OutboxItem)))


DCMTK_STORESCU = os.environ.get("CXR_TEST_STORESCU", "/usr/bin/storescu")  # not pynetdicom's namesake

_PROPOSE = {
    "1.2.840.10008.1.2.4.50": "-xy",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "-xx",  # JPEG extended
    "1.2.840.10008.1.2.4.70": "-xs",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.90": "-xv",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "-xw",  # JPEG 2000
    "1.2.840.10008.1.2.5": "-xr",  # RLE
}


def storescu_groups(files: list[Path]) -> dict[str, list[Path]]:
    """storescu proposes one compressed transfer syntax per run: group files by the flag they need."""
    import pydicom

    groups: dict[str, list[Path]] = {}
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(_PROPOSE.get(ts, "-x="), []).append(f)
    return groups


def storescu(port: int, files: list[Path], *, ae: str = "CXRTRIAGE", timeout: float = 300) -> list[subprocess.CompletedProcess[str]]:
    """Send files with DCMTK storescu: one association per transfer-syntax group, all groups concurrently."""
    procs = [
        subprocess.Popen(
            [DCMTK_STORESCU, "-aet", "MODALITY", "-aec", ae, flag, "-R", "127.0.0.1", str(port), *map(str, group)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for flag, group in storescu_groups(files).items()
    ]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, ""))
    return results
