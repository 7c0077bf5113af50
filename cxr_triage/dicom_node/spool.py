"""The spool: the only writer of received files.

A received object becomes durable in four steps, all before the C-STORE is answered:

1. stream its bytes into ``<spool>/tmp/`` while hashing them (SHA-256),
2. ``fsync`` the file,
3. ``rename`` it to ``<spool>/<sha[:2]>/<sha>.dcm`` -- the name is the content hash, never a header value
   (path-traversal CVEs in DCMTK, pynetdicom and pydicom came from naming files after UIDs),
4. ``fsync`` the directory that holds the new name (and the spool root when the shard directory is new).

Identical bytes map to the same name, so storing the same object twice leaves one file. A file whose name does
not match its hash cannot appear: the rename happens only after the hash of exactly these bytes is known.

Free space is checked before writing (``reserve_bytes`` plus the incoming size must remain free) and a full disk
during the write (ENOSPC) is reported the same way, as :class:`SpoolFull`, so the listener answers 0xA700.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cxr_triage.core.errors import PermanentError, RetryableError

__all__ = ["Spool", "SpooledFile", "SpoolFull", "BadSpoolName", "SPOOL_NAME_RE"]

_CHUNK = 1 << 20
SPOOL_NAME_RE = re.compile(r"^[0-9a-f]{2}/[0-9a-f]{64}\.dcm$")


class SpoolFull(RetryableError):
    """Free space in the spool is below the reserve (or the disk filled up while writing)."""


class BadSpoolName(PermanentError):
    """A spool name that is not ``<sha[:2]>/<sha>.dcm`` (never derived from input)."""


@dataclass(frozen=True)
class SpooledFile:
    sha256: str
    size: int
    name: str  # relative to the spool root: "<sha[:2]>/<sha>.dcm"
    path: Path
    existed: bool  # the same bytes were already in the spool


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    """A content-addressed directory of received DICOM files."""

    def __init__(self, root: Path | str, *, reserve_bytes: int = 0) -> None:
        self.root = Path(root)
        self.tmp_dir = self.root / "tmp"
        self.reserve_bytes = int(reserve_bytes)

    def ensure(self) -> "Spool":
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        return self

    # ------------------------------------------------------------------ space
    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def has_room(self, incoming: int = 0) -> bool:
        """True when ``incoming`` more bytes still leave ``reserve_bytes`` free."""
        return self.free_bytes() - max(0, incoming) >= self.reserve_bytes

    # ------------------------------------------------------------------ names
    def path_of(self, name: str) -> Path:
        if not SPOOL_NAME_RE.match(name) or name[:2] != name[3:5]:
            raise BadSpoolName("not a spool name")
        return self.root / name

    @staticmethod
    def name_for(sha256: str) -> str:
        return f"{sha256[:2]}/{sha256}.dcm"

    def iter_names(self) -> Iterator[str]:
        """Every stored file's spool name (for a scan that adopts files whose DB record failed)."""
        for shard in sorted(self.root.glob("[0-9a-f][0-9a-f]")):
            for path in sorted(shard.glob("*.dcm")):
                name = f"{shard.name}/{path.name}"
                if SPOOL_NAME_RE.match(name) and name[:2] == name[3:5]:
                    yield name

    # ------------------------------------------------------------------ write
    def new_temp(self, suffix: str = ".part") -> tuple[BinaryIO, Path]:
        """An open temp file in ``tmp/`` (same filesystem as the final names, so the rename is atomic)."""
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix="rx-", suffix=suffix, dir=self.tmp_dir)
        return os.fdopen(fd, "w+b"), Path(name)

    def store(self, parts: list[bytes | BinaryIO], *, expected_size: int = 0) -> SpooledFile:
        """Write ``parts`` (bytes, or readable binary files copied from their current position) durably.

        Raises :class:`SpoolFull` when the reserve would be crossed or the disk fills; the temp file is removed.
        """
        if not self.has_room(expected_size):
            raise SpoolFull("spool free space below reserve")
        out, tmp_path = self.new_temp()
        digest = hashlib.sha256()
        size = 0
        try:
            with out:
                for part in parts:
                    if isinstance(part, (bytes, bytearray, memoryview)):
                        digest.update(part)
                        out.write(part)
                        size += len(part)
                        continue
                    while True:
                        chunk = part.read(_CHUNK)
                        if not chunk:
                            break
                        digest.update(chunk)
                        out.write(chunk)
                        size += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            if not self.has_room(0):
                raise SpoolFull("spool free space below reserve after write")
            sha = digest.hexdigest()
            name = self.name_for(sha)
            final = self.root / name
            shard_new = not final.parent.exists()
            final.parent.mkdir(parents=True, exist_ok=True)
            existed = final.exists()
            if existed:
                tmp_path.unlink(missing_ok=True)
            else:
                os.replace(tmp_path, final)
            _fsync_dir(final.parent)
            if shard_new:
                _fsync_dir(self.root)
            return SpooledFile(sha256=sha, size=size, name=name, path=final, existed=existed)
        except OSError as exc:
            tmp_path.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull("disk full while writing to the spool") from None
            raise
        except BaseException:
            tmp_path.unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------------ housekeeping
    def clean_tmp(self, *, older_than_s: float = 3600.0) -> int:
        """Remove temp files left by interrupted receives (older than ``older_than_s``). Returns the count.

        Only old files go: several listener processes share ``tmp/`` and a young file may be in flight.
        """
        if not self.tmp_dir.exists():
            return 0
        cutoff = time.time() - older_than_s
        removed = 0
        for path in self.tmp_dir.iterdir():
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                continue
        return removed

    def verify(self, name: str) -> bool:
        """Recompute the hash of a stored file and compare it with its name."""
        digest = hashlib.sha256()
        with open(self.path_of(name), "rb") as fh:
            for chunk in iter(lambda: fh.read(_CHUNK), b""):
                digest.update(chunk)
        return digest.hexdigest() == name[3:67]
