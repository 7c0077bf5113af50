"""A late image after a study's SR was sent: the PACS receives an amended SR that covers both images and
references its predecessor, and each SR revision arrives exactly once."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from tests.dicomize import nih_pngs, png_to_dx
from tests.integration.service import Service, storescu, wait_until
from tests.peers import run_storescp, storescp_receptions, storescp_receptions_log

pytestmark = pytest.mark.slow


def _srs(out: Path) -> dict[str, pydicom.Dataset]:
    """The SRs storescp stored, by SOP Instance UID; one it is still writing is left for the next poll."""
    found: dict[str, pydicom.Dataset] = {}
    for p in out.rglob("*"):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p)
            found[str(ds.SOPInstanceUID)] = ds
        except Exception:  # noqa: BLE001 -- a partial file fails in many ways; the next poll reads it whole
            continue
    return found


def _referenced_images(sr: pydicom.Dataset) -> set[str]:
    return {str(inst.ReferencedSOPInstanceUID)
            for study in sr.CurrentRequestedProcedureEvidenceSequence
            for series in study.ReferencedSeriesSequence
            for inst in series.ReferencedSOPSequence}


def test_late_image_gets_an_amended_sr_referencing_its_predecessor(tmp_path: Path, demo_models_cache: Path) -> None:
    first_png, late_png = nih_pngs(2)
    first = png_to_dx(first_png, tmp_path / "in", study_key="late-study")
    late = png_to_dx(late_png, tmp_path / "in", study_key="late-study")
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in (first, late)]
    with run_storescp(tmp_path / "pacs", ae="PACS", log_receptions=True) as (host, port, out):
        receptions = storescp_receptions_log(tmp_path / "pacs", port)
        svc = Service(tmp_path, demo_models_cache, pacs=f"PACS@{host}:{port}")
        with svc.running():
            svc.start()
            assert all(r.returncode == 0 for r in storescu(svc.dicom_port, [first]))
            wait_until(lambda: len(_srs(out)) == 1, timeout=180, what="the first SR at the PACS")
            (original,) = _srs(out).values()
            assert _referenced_images(original) == {uids[0]}
            assert "PredecessorDocumentsSequence" not in original

            assert all(r.returncode == 0 for r in storescu(svc.dicom_port, [late]))
            wait_until(lambda: len(_srs(out)) == 2, timeout=180, what="the amended SR at the PACS")
            wait_until(lambda: svc.pending_outbox() == 0, timeout=60, what="empty outbox")
            time.sleep(1.0)  # nothing more may arrive
            srs = _srs(out)
            (amended,) = [ds for uid, ds in srs.items() if uid != str(original.SOPInstanceUID)]
            assert len(srs) == 2

    # Same patient, same study, same SR series; a new instance that covers both images and names its predecessor.
    assert amended.StudyInstanceUID == original.StudyInstanceUID and amended.PatientID == original.PatientID
    assert amended.SeriesInstanceUID == original.SeriesInstanceUID
    assert int(amended.InstanceNumber) == int(original.InstanceNumber) + 1
    assert _referenced_images(amended) == set(uids)
    (pre_study,) = amended.PredecessorDocumentsSequence
    (pre_series,) = pre_study.ReferencedSeriesSequence
    (pre,) = pre_series.ReferencedSOPSequence
    assert pre.ReferencedSOPInstanceUID == original.SOPInstanceUID
    assert pre_series.SeriesInstanceUID == original.SeriesInstanceUID
    # Both revisions validate, and each reached the PACS exactly once.
    for ds in (original, amended):
        path = next(p for p in out.rglob("*") if p.is_file() and pydicom.dcmread(p).SOPInstanceUID == ds.SOPInstanceUID)
        report = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
        assert [l for l in (report.stdout + report.stderr).splitlines() if l.startswith("Error")] == [], path
    assert storescp_receptions(receptions) == {str(original.SOPInstanceUID): 1, str(amended.SOPInstanceUID): 1}
