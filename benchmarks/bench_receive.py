"""Receive throughput: our listener vs DCMTK storescp, same files, same sender (DCMTK storescu), same run.

    .venv/bin/python benchmarks/bench_receive.py [--uncompressed 200] [--jpeg 100] [--processes 1]
        [--redis bundled|redis://127.0.0.1:6379/15]

Workloads (copies with fresh Study/Series/SOP Instance UIDs, written to a temp dir):
* ``uncompressed``: the 1 MB NIH Secondary Capture (Implicit VR LE), ``--uncompressed`` copies;
* ``jpeg``: the 127 KB SIIM JPEG-baseline CR, ``--jpeg`` copies (storescu ``-xy``, storescp ``+xa``).
Each is sent with 1 association (one storescu) and with 4 (four concurrent storescu, files split evenly).

Ours runs in its own process exactly as users run it: ``serve()`` with the callbacks ``cxr-triage listen`` wires
(:func:`cxr_triage.cli.listener_callbacks`): a real SQLite record (WAL, synchronous=FULL) and fsync of every file +
directory before the answer, then the Celery publish to a real Redis and the QUEUED mark on the listener's
background publisher thread (``--redis``: a bundled redis-server with AOF, as ``cxr-triage up`` runs it, by
default; or a URL). Every image must end QUEUED in the database, or the run is reported as failed. storescp writes files without fsync and
keeps no database (``--fork`` for the 4-association runs, as one storescp process handles one association at a
time). Both DCMTK tools get ``TCP_NODELAY=1`` in their environment (DCMTK leaves Nagle on otherwise); ours sets
TCP_NODELAY itself. Every response must be Success or the run is reported as failed.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402

from cxr_triage.dicom_node.netutil import free_port, wait_for_port  # noqa: E402

DATA = REPO.parent / "shared" / "data" / "dicom"
STORESCU = os.environ.get("CXR_STORESCU", "/usr/bin/storescu")
STORESCP = os.environ.get("CXR_STORESCP", "/usr/bin/storescp")
HOST = "127.0.0.1"

_OURS = """
import sys
sys.path.insert(0, {repo!r})
from cxr_triage.core.settings import Settings
from cxr_triage.db.migrate import upgrade
from cxr_triage.dicom_node.listener import serve
url = {url!r}
upgrade(url)
if {nosync!r}:
    # Benchmark-only: what the same code costs without durability (comparable to storescp, which neither fsyncs
    # nor commits a database row). Never a production mode.
    import os
    from sqlalchemy import event
    from cxr_triage.db import session as _session
    os.fsync = lambda fd: None
    _make = _session.make_engine
    def _nosync_engine(u, **kw):
        engine = _make(u, **kw)
        @event.listens_for(engine, "connect")
        def _off(conn, _):
            conn.execute("PRAGMA synchronous=OFF")
        return engine
    _session.make_engine = _nosync_engine
from cxr_triage.cli import listener_callbacks
settings = Settings(data_dir={data!r}, dicom_host="127.0.0.1", dicom_port={port}, disk_reserve_mb=0,
                    database_url=url, redis_url={redis_url!r}, _env_file=None)
record, publish, recorded = listener_callbacks(settings)
serve(settings, record=record, publish=publish, block=True, processes={processes})
"""


def make_copies(source: Path, directory: Path, n: int) -> list[Path]:
    ds = dcmread(source)
    directory.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        path = directory / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def send(port: int, files: list[Path], associations: int, option: str | None) -> tuple[float, int]:
    """Send with `associations` concurrent storescu processes; (seconds, number of Success responses)."""
    chunks = [files[i::associations] for i in range(associations)]
    started = time.perf_counter()
    procs = []
    for chunk in chunks:
        cmd = [STORESCU, "-v", "-aet", "BENCH", "-aec", "CXRTRIAGE"] + ([option] if option else [])
        cmd += [HOST, str(port), *map(str, chunk)]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                      env=dcmtk_env()))
    ok = 0
    for proc in procs:
        out, _ = proc.communicate(timeout=900)
        ok += out.count("Received Store Response (Success)")
    return time.perf_counter() - started, ok


def ours_db_url(work: Path) -> str:
    return f"sqlite:///{work / 'ours-var' / 'db.sqlite3'}"


def start_ours(work: Path, port: int, processes: int, redis_url: str, nosync: bool = False) -> subprocess.Popen:
    data = work / "ours-var"
    shutil.rmtree(data, ignore_errors=True)
    data.mkdir(parents=True)
    code = _OURS.format(repo=str(REPO), url=ours_db_url(work), data=str(data), port=port,
                        processes=processes, nosync=nosync, redis_url=redis_url)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if not wait_for_port(HOST, port, timeout=30):
        proc.kill()
        raise RuntimeError("our listener did not start")
    time.sleep(0.5)
    return proc


def queued_rows(work: Path, expected: int, timeout: float = 30.0) -> int:
    """How many instances reached QUEUED (published and marked) once the background publisher caught up."""
    from sqlalchemy import func, select

    from cxr_triage.core.states import InstanceState
    from cxr_triage.db.session import make_engine
    from cxr_triage.db.tables import Instance

    engine = make_engine(ours_db_url(work))
    try:
        deadline = time.monotonic() + timeout
        while True:
            with engine.connect() as conn:
                n = conn.scalar(select(func.count()).select_from(Instance).where(Instance.state == InstanceState.QUEUED))
            if n >= expected or time.monotonic() > deadline:
                return int(n or 0)
            time.sleep(0.2)
    finally:
        engine.dispose()


def purge_analyze_queue(redis_url: str) -> None:
    """Drop the analyze messages a run left (no worker consumes them here); each run starts on an empty queue."""
    import redis

    client = (redis.Redis(unix_socket_path=redis_url.split("://", 1)[1]) if redis_url.startswith("redis+socket://")
              else redis.Redis.from_url(redis_url))
    client.delete("analyze")
    client.close()


def start_storescp(work: Path, port: int, fork: bool) -> subprocess.Popen:
    out = work / "storescp-out"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cmd = [STORESCP, "-aet", "CXRTRIAGE", "+xa", "-od", str(out)] + (["--fork"] if fork else []) + [str(port)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=dcmtk_env(),
                            start_new_session=True)
    if not wait_for_port(HOST, port, timeout=10):
        proc.kill()
        raise RuntimeError("storescp did not start")
    return proc


def stop(proc: subprocess.Popen, *, group: bool = False) -> None:
    if proc.poll() is None:
        if group:
            os.killpg(proc.pid, signal.SIGTERM)
        else:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            if group:
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uncompressed", type=int, default=200)
    parser.add_argument("--jpeg", type=int, default=100)
    parser.add_argument("--processes", type=int, default=1, help="our listener processes (SO_REUSEPORT)")
    parser.add_argument("--nosync", action="store_true",
                        help="also run ours with fsync and SQLite sync switched off (to separate protocol cost "
                             "from durability cost; never a production mode)")
    parser.add_argument("--redis", default="bundled",
                        help="broker for our publish path: 'bundled' (a redis-server with AOF in the temp dir, as "
                             "`cxr-triage up` runs it) or a Redis URL, e.g. redis://127.0.0.1:6379/15")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="bench-receive-") as tmp, contextlib.ExitStack() as stack:
        work = Path(tmp)
        if args.redis == "bundled":
            from cxr_triage.bundled_redis import BundledRedis

            broker = stack.enter_context(BundledRedis(Path(tmp) / "redis"))
            redis_url, redis_label = broker.url, "bundled redis-server (AOF everysec)"
        else:
            redis_url, redis_label = args.redis, "redis at " + args.redis
        workloads = [
            ("uncompressed 1MB", make_copies(DATA / "nih-dx-secondary-capture.dcm", work / "u", args.uncompressed), None),
            ("jpeg-baseline 127KB", make_copies(DATA / "siim-cr-pa-jpeg-baseline.dcm", work / "j", args.jpeg), "-xy"),
        ]
        print(f"# {os.cpu_count()} CPUs; ours: serve(processes={args.processes}) + SQLite FULL sync + fsync, then "
              f"Celery publish to {redis_label} + QUEUED mark (after the answer); "
              f"storescp: no fsync, no DB; sender: DCMTK storescu, TCP_NODELAY=1")
        print(f"{'workload':22s} {'assoc':>5s} {'receiver':>12s} {'images/s':>9s} {'MB/s':>7s} {'ok':>9s} {'ours/scp':>8s}")
        for label, files, option in workloads:
            total_mb = sum(p.stat().st_size for p in files) / 1e6
            for associations in (1, 4):
                rates = {}
                receivers = ("ours", "ours-nosync", "storescp") if args.nosync else ("ours", "storescp")
                for receiver in receivers:
                    port = free_port()
                    if receiver.startswith("ours"):
                        purge_analyze_queue(redis_url)
                        proc = start_ours(work, port, args.processes, redis_url, nosync=receiver == "ours-nosync")
                    else:
                        proc = start_storescp(work, port, fork=associations > 1)
                    try:
                        seconds, ok = send(port, files, associations, option)
                        drain = ""
                        if receiver.startswith("ours"):
                            # The rate counts until the last answer; publishing then finishes in the background.
                            # Every image must still reach QUEUED (published), or the run is not valid.
                            waited = time.perf_counter()
                            ok = min(ok, queued_rows(work, len(files)))
                            drain = f"queued +{time.perf_counter() - waited:.1f}s"
                    finally:
                        stop(proc, group=receiver == "storescp")
                    rate = len(files) / seconds
                    rates[receiver] = rate
                    status = f"{ok}/{len(files)}"
                    ratio = ""
                    if receiver == "storescp":
                        ratio = f"{rates['ours'] / rate:8.2f}"
                        if "ours-nosync" in rates:
                            ratio += f"  (nosync/scp {rates['ours-nosync'] / rate:.2f})"
                    print(f"{label:22s} {associations:5d} {receiver:>12s} {rate:9.1f} {total_mb / seconds:7.1f} "
                          f"{status:>9s} {ratio or drain}", flush=True)


if __name__ == "__main__":
    main()
