"""Render a spooled DICOM image for the browser: windowed greyscale, at most 1024 px, PNG, cached on disk.

Windowing (modality LUT, VOI LUT / window, MONOCHROME1 inversion) is `cxr_triage.models.preprocess.load_image`'s
job; this module only downsamples and encodes. Cache files are named after the spooled file's content hash (never a
header value, and never a database id: ids restart after a database is re-created or restored, and a cache keyed
by id would then show one patient's image on another's study). The cache is bounded: past ``max_cache_bytes`` the
least recently used renders are removed.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

MAX_SIDE = 1024
MAX_CACHE_BYTES = 2 * 1024**3


class RenderError(Exception):
    """The image cannot be rendered (missing file, undecodable). Message carries no PHI."""


def safe_spool_path(spool_dir: Path, spool_name: str) -> Path:
    """Resolve a spool name inside the spool dir; refuse anything that escapes it."""
    root = spool_dir.resolve()
    path = (root / spool_name).resolve()
    if root != path and root not in path.parents:
        raise RenderError("spool name escapes the spool directory")
    return path


def to_png_bytes(image01: np.ndarray, *, max_side: int = MAX_SIDE) -> bytes:
    """float [0,1] HxW -> 8-bit greyscale PNG, downsampled (area filter) so the longer side is <= max_side."""
    from io import BytesIO

    from PIL import Image

    img = np.nan_to_num(np.asarray(image01, dtype=np.float32), nan=0.0, posinf=1.0, neginf=0.0)
    img8 = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    pil = Image.fromarray(img8, mode="L")
    h, w = img8.shape
    scale = min(1.0, max_side / max(h, w))
    if scale < 1.0:
        pil = pil.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BOX)
    out = BytesIO()
    pil.save(out, format="PNG", optimize=False, compress_level=6)
    return out.getvalue()


def cache_name(spool_name: str) -> str:
    """The render's file name: a digest of the spool name, which is itself the file's content hash."""
    return hashlib.sha256(spool_name.encode("utf-8")).hexdigest()[:40] + ".png"


def rendered_png(*, spool_dir: Path, cache_dir: Path, instance_id: int, spool_name: str,
                 max_bytes: int | None = None, max_cache_bytes: int = MAX_CACHE_BYTES) -> Path:
    """Path of the cached PNG for an instance, rendering it first if needed (atomic write).

    ``instance_id`` is only for the caller's bookkeeping: the cache is keyed by content (see the module notes).
    """
    del instance_id
    target = cache_dir / cache_name(spool_name)
    if target.exists():
        os.utime(target)  # mark as recently used for the eviction below
        return target
    source = safe_spool_path(spool_dir, spool_name)
    if not source.is_file():
        raise RenderError("spooled file is missing")
    from cxr_triage.models.preprocess import load_image

    try:
        image = load_image(source, max_bytes=max_bytes) if max_bytes else load_image(source)
    except Exception as exc:  # noqa: BLE001 -- any decoder failure is "cannot render"
        raise RenderError(f"cannot decode image: {type(exc).__name__}") from exc
    if image.ndim != 2:
        raise RenderError("not a single-frame greyscale image")
    data = to_png_bytes(image)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".render-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    evict(cache_dir, max_cache_bytes=max_cache_bytes, keep=target)
    return target


def evict(cache_dir: Path, *, max_cache_bytes: int, keep: Path | None = None) -> int:
    """Remove the least recently used renders until the cache fits; returns how many were removed."""
    entries: list[tuple[float, int, Path]] = []
    for path in cache_dir.glob("*.png"):
        try:
            st = path.stat()
        except FileNotFoundError:  # removed by a concurrent eviction
            continue
        entries.append((st.st_mtime, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    removed = 0
    for _, size, path in sorted(entries):
        if total <= max_cache_bytes:
            break
        if keep is not None and path == keep:
            continue
        path.unlink(missing_ok=True)
        total -= size
        removed += 1
    return removed
