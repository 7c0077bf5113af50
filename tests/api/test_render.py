"""The browser render cache: content-addressed (never by database id), downsampled, bounded."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from cxr_triage.api.render import RenderError, evict, rendered_png


@pytest.fixture()
def spool(tmp_path: Path, shared_data: Path) -> Path:
    spool = tmp_path / "spool"
    (spool / "aa").mkdir(parents=True)
    (spool / "bb").mkdir(parents=True)
    shutil.copy(shared_data / "dicom" / "siim-cr-pa-monochrome1.dcm", spool / "aa" / "aa11.dcm")
    shutil.copy(shared_data / "dicom" / "nih-dx-secondary-capture.dcm", spool / "bb" / "bb22.dcm")
    return spool


def test_render_is_downsampled_and_cached_by_content(spool: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = rendered_png(spool_dir=spool, cache_dir=cache, instance_id=1, spool_name="aa/aa11.dcm")
    with Image.open(first) as img:
        assert img.mode == "L" and max(img.size) <= 1024
    # A cache hit needs no source: remove it and ask again.
    (spool / "aa" / "aa11.dcm").rename(spool / "aa" / "moved.dcm")
    assert rendered_png(spool_dir=spool, cache_dir=cache, instance_id=1, spool_name="aa/aa11.dcm") == first
    # The same database id for other content (a re-created database) must not get the old patient's image.
    other = rendered_png(spool_dir=spool, cache_dir=cache, instance_id=1, spool_name="bb/bb22.dcm")
    assert other != first and other.read_bytes() != first.read_bytes()
    with pytest.raises(RenderError, match="escapes"):
        rendered_png(spool_dir=spool, cache_dir=cache, instance_id=2, spool_name="../../etc/passwd")


def test_cache_evicts_least_recently_used(spool: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    a = rendered_png(spool_dir=spool, cache_dir=cache, instance_id=1, spool_name="aa/aa11.dcm")
    os.utime(a, (1_000_000, 1_000_000))  # long unused
    # A bound smaller than both renders: the new one stays, the least recently used goes.
    b = rendered_png(spool_dir=spool, cache_dir=cache, instance_id=2, spool_name="bb/bb22.dcm",
                     max_cache_bytes=a.stat().st_size)
    assert b.exists() and not a.exists()
    assert evict(cache, max_cache_bytes=10**12) == 0 and b.exists()
