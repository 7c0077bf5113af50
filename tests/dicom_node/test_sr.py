"""SR builder: real source headers -> SR file that dciodvfy accepts and highdicom reads back."""

from __future__ import annotations

import copy
import dataclasses
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from cxr_triage.dicom_node.sr import (
    ABNORMAL_OPACITY,
    DEMO_MARK,
    PNEUMONIA,
    AlgorithmInfo,
    ImageFindings,
    OpacityRegion,
    Predecessor,
    build_study_sr,
    derive_sr_uids,
    sr_file_bytes,
)

SOURCES = ["siim-cr-pa-jpeg-baseline.dcm", "wg04-cr-chest-pa-j2k-monochrome1.dcm", "nih-dx-secondary-capture.dcm"]
WHEN = datetime(2024, 5, 1, 12, 30, 15)
ALGO = AlgorithmInfo(name="cxr-triage pneumonia", version="0.1.0", model_version="densenet121-2024.05")
STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
)


def _header(data_dir: Path, name: str) -> pydicom.Dataset:
    return pydicom.dcmread(data_dir / name, stop_before_pixels=True)


def _regions(src: pydicom.Dataset, n: int) -> tuple[OpacityRegion, ...]:
    cols, rows = int(src.Columns), int(src.Rows)
    boxes = [
        OpacityRegion(x0=10.5, y0=20.25, x1=cols * 0.4, y1=rows * 0.5, score=0.91),
        OpacityRegion(x0=cols * 0.55, y0=rows * 0.2, x1=cols * 0.9, y1=rows * 0.75, score=0.4234567),
        OpacityRegion(x0=0, y0=0, x1=cols, y1=rows, score=0.05),  # full frame: the edge is inside
    ]
    return tuple(boxes[:n])


def _findings(src: pydicom.Dataset, n_regions: int, *, p: float = 0.8734567891) -> ImageFindings:
    return ImageFindings(
        source=src, pneumonia_probability=p, flagged=p >= 0.5, threshold=0.5, regions=_regions(src, n_regions)
    )


def _dciodvfy(path: Path) -> list[str]:
    exe = shutil.which("dciodvfy")
    if exe is None:
        pytest.fail("dciodvfy (dicom3tools) not installed; ./scripts/test installs it")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    for line in lines:
        print("dciodvfy:", line)
    return lines


@pytest.mark.parametrize("n_regions", [0, 1, 3])
@pytest.mark.parametrize("source_name", SOURCES)
def test_sr_validates_and_round_trips(dicom_data_dir, tmp_path, source_name, n_regions):
    src = _header(dicom_data_dir, source_name)
    ds = build_study_sr(findings=[_findings(src, n_regions)], algorithm=ALGO, content_datetime=WHEN)
    path = tmp_path / "sr.dcm"
    path.write_bytes(sr_file_bytes(ds))

    lines = _dciodvfy(path)
    assert not [line for line in lines if "Error" in line], lines
    # The only warnings allowed come from values copied unchanged from the source (patient/study module).
    for line in lines:
        if line.startswith("Warning"):
            assert any(k in line for k in ("Patient's Name", "Referring Physician", "Study ID", "Study Date",
                                           "Study Time")), line

    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert back.Modality == "SR"
    assert back.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    assert back.SeriesInstanceUID != src.SeriesInstanceUID
    for keyword in STUDY_KEYWORDS:
        assert str(back.get(keyword, "") or "") == str(src.get(keyword, "") or ""), keyword
    evidence = back.CurrentRequestedProcedureEvidenceSequence[0]
    assert evidence.StudyInstanceUID == src.StudyInstanceUID
    ref = evidence.ReferencedSeriesSequence[0]
    assert ref.SeriesInstanceUID == src.SeriesInstanceUID
    assert ref.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    assert ref.ReferencedSOPSequence[0].ReferencedSOPClassUID == src.SOPClassUID
    assert back.CompletionFlag == "COMPLETE" and back.VerificationFlag == "UNVERIFIED"

    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.ComprehensiveSR)
    image_groups = sr.content.get_image_measurement_groups()
    assert len(image_groups) == 1
    group = image_groups[0]
    assert group.finding_type == PNEUMONIA
    (prob,) = group.get_measurements()
    assert prob.value == pytest.approx(0.8734567891, abs=1e-6)
    assert prob.unit.value == "1"
    (evaluation,) = group.get_qualitative_evaluations()
    assert evaluation.name == PNEUMONIA and evaluation.value == codes.SCT.Present
    assert group.source_images[0].referenced_sop_instance_uid == src.SOPInstanceUID

    roi_groups = sr.content.get_planar_roi_measurement_groups()
    assert len(roi_groups) == n_regions
    for roi_group, region in zip(roi_groups, _regions(src, n_regions), strict=True):
        assert roi_group.finding_type == ABNORMAL_OPACITY
        assert roi_group.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        expected = np.array(
            [[region.x0, region.y0], [region.x1, region.y0], [region.x1, region.y1], [region.x0, region.y1],
             [region.x0, region.y0]]
        )
        np.testing.assert_allclose(roi_group.roi.value, expected, rtol=1e-5)
        assert roi_group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        (score,) = roi_group.get_measurements()
        assert score.value == pytest.approx(region.score, abs=1e-6)


def test_deterministic_bytes_and_uids(dicom_data_dir):
    src = _header(dicom_data_dir, SOURCES[0])
    a = sr_file_bytes(build_study_sr(findings=[_findings(src, 3)], algorithm=ALGO, content_datetime=WHEN))
    b = sr_file_bytes(build_study_sr(findings=[_findings(src, 3)], algorithm=ALGO, content_datetime=WHEN))
    assert a == b

    ds1 = build_study_sr(findings=[_findings(src, 1)], algorithm=ALGO, content_datetime=WHEN)
    other = dataclasses.replace(ALGO, model_version="densenet121-2024.06")
    ds2 = build_study_sr(findings=[_findings(src, 1)], algorithm=other, content_datetime=WHEN)
    assert ds1.SOPInstanceUID != ds2.SOPInstanceUID
    assert ds1.SeriesInstanceUID != ds2.SeriesInstanceUID
    uids = derive_sr_uids(study_instance_uid=src.StudyInstanceUID, model_version=ALGO.model_version, revision=1)
    assert (ds1.SeriesInstanceUID, ds1.SOPInstanceUID) == (uids.series_instance_uid, uids.sop_instance_uid)
    assert (str(ds1.ContentDate), str(ds1.ContentTime)) == ("20240501", "123015")
    assert (str(ds1.InstanceCreationDate), str(ds1.InstanceCreationTime)) == ("20240501", "123015")
    # A time-zone-aware datetime is accepted and gives the same wall-clock content time.
    ds3 = build_study_sr(findings=[_findings(src, 1)], algorithm=ALGO,
                         content_datetime=WHEN.replace(tzinfo=timezone.utc))
    assert str(ds3.ContentTime) == "123015"


def test_revision_two_references_predecessor(dicom_data_dir, tmp_path):
    src = _header(dicom_data_dir, SOURCES[0])
    first = build_study_sr(findings=[_findings(src, 1)], algorithm=ALGO, content_datetime=WHEN)
    pred = Predecessor(
        sop_instance_uid=first.SOPInstanceUID, series_instance_uid=first.SeriesInstanceUID,
        sop_class_uid=first.SOPClassUID,
    )
    second = build_study_sr(
        findings=[_findings(src, 2, p=0.3)], algorithm=ALGO, revision=2, predecessor=pred, content_datetime=WHEN
    )
    assert second.SeriesInstanceUID == first.SeriesInstanceUID
    assert second.SOPInstanceUID != first.SOPInstanceUID
    assert second.InstanceNumber == 2
    item = second.PredecessorDocumentsSequence[0]
    assert item.StudyInstanceUID == src.StudyInstanceUID
    series = item.ReferencedSeriesSequence[0]
    assert series.SeriesInstanceUID == first.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == first.SOPInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPClassUID == first.SOPClassUID
    assert second.CompletionFlag == "COMPLETE" and second.VerificationFlag == "UNVERIFIED"
    path = tmp_path / "sr2.dcm"
    path.write_bytes(sr_file_bytes(second))
    assert not [line for line in _dciodvfy(path) if "Error" in line]
    group = hd.sr.srread(path).content.get_image_measurement_groups()[0]
    assert group.get_qualitative_evaluations()[0].value == codes.SCT.Absent

    with pytest.raises(ValueError, match="predecessor"):
        build_study_sr(findings=[_findings(src, 0)], algorithm=ALGO, revision=2, content_datetime=WHEN)
    with pytest.raises(ValueError, match="predecessor"):
        build_study_sr(findings=[_findings(src, 0)], algorithm=ALGO, predecessor=pred, content_datetime=WHEN)


def test_demo_model_is_marked(dicom_data_dir, tmp_path):
    src = _header(dicom_data_dir, SOURCES[0])
    demo = dataclasses.replace(ALGO, demo=True)
    ds = build_study_sr(findings=[_findings(src, 1)], algorithm=demo, content_datetime=WHEN)
    path = tmp_path / "demo.dcm"
    path.write_bytes(sr_file_bytes(ds))
    sr = hd.sr.srread(path)
    texts = [item.TextValue for item in _walk(sr.ContentSequence) if item.ValueType == "TEXT"]
    assert any(DEMO_MARK in t for t in texts)
    assert DEMO_MARK in sr.SeriesDescription
    algo_names = [
        item.TextValue for item in _walk(sr.ContentSequence)
        if item.ValueType == "TEXT" and item.ConceptNameCodeSequence[0].CodeValue == "111001"  # Algorithm Name
    ]
    assert algo_names and all(DEMO_MARK in n for n in algo_names)
    # A real model carries no such mark.
    real = build_study_sr(findings=[_findings(src, 1)], algorithm=ALGO, content_datetime=WHEN)
    assert DEMO_MARK.encode() not in sr_file_bytes(real)


def _walk(seq):
    for item in seq:
        yield item
        if "ContentSequence" in item:
            yield from _walk(item.ContentSequence)


def test_multi_image_study(dicom_data_dir, tmp_path):
    src = _header(dicom_data_dir, SOURCES[0])
    second = copy.deepcopy(src)  # a second view of the same study
    second.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["second view"])
    ds = build_study_sr(
        findings=[_findings(src, 1), _findings(second, 2, p=0.2)], algorithm=ALGO, content_datetime=WHEN
    )
    path = tmp_path / "multi.dcm"
    path.write_bytes(sr_file_bytes(ds))
    assert not [line for line in _dciodvfy(path) if "Error" in line]
    sr = hd.sr.srread(path)
    assert len(sr.content.get_image_measurement_groups()) == 2
    assert len(sr.content.get_planar_roi_measurement_groups()) == 3
    refs = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0].ReferencedSOPSequence
    assert {r.ReferencedSOPInstanceUID for r in refs} == {src.SOPInstanceUID, second.SOPInstanceUID}


def test_invalid_arguments_are_named(dicom_data_dir):
    src = _header(dicom_data_dir, SOURCES[0])
    other = copy.deepcopy(src)
    other.StudyInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["other study"])
    other.SOPInstanceUID = pydicom.uid.generate_uid(entropy_srcs=["other instance"])
    cases = [
        (dict(findings=[]), "findings"),
        (dict(findings=[_findings(src, 0), _findings(other, 0)]), r"findings\[1\].source"),
        (dict(findings=[_findings(src, 0, p=1.5)]), r"findings\[0\].pneumonia_probability"),
        (dict(findings=[_findings(src, 0, p=float("nan"))]), r"findings\[0\].pneumonia_probability"),
        (dict(findings=[dataclasses.replace(_findings(src, 0), regions=(
            OpacityRegion(0, 0, int(src.Columns) + 1, 10, 0.5),))]), r"findings\[0\].regions\[0\]"),
        (dict(findings=[dataclasses.replace(_findings(src, 0), regions=(
            OpacityRegion(50, 50, 40, 60, 0.5),))]), r"findings\[0\].regions\[0\]"),
        (dict(findings=[dataclasses.replace(_findings(src, 0), regions=(
            OpacityRegion(1, 1, 40, 60, -0.1),))]), r"findings\[0\].regions\[0\].score"),
        (dict(findings=[_findings(src, 0)], revision=0), "revision"),
        (dict(findings=[_findings(src, 0)], algorithm=dataclasses.replace(ALGO, model_version="")),
         "algorithm.model_version"),
    ]
    for kwargs, pattern in cases:
        kwargs = {"algorithm": ALGO, "content_datetime": WHEN, **kwargs}
        with pytest.raises(ValueError, match=pattern):
            build_study_sr(**kwargs)


def test_bytes_identical_across_processes(dicom_data_dir):
    """No hidden randomness (generated UIDs, wall-clock times): another interpreter builds the same bytes."""
    import hashlib
    import sys

    src = _header(dicom_data_dir, SOURCES[1])
    here = hashlib.sha256(
        sr_file_bytes(build_study_sr(findings=[_findings(src, 3)], algorithm=ALGO, content_datetime=WHEN))
    ).hexdigest()
    script = f"""
import hashlib, sys, warnings
warnings.simplefilter("ignore")
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
import pydicom
from test_sr import _findings, ALGO, WHEN
from cxr_triage.dicom_node.sr import build_study_sr, sr_file_bytes
src = pydicom.dcmread({str(dicom_data_dir / SOURCES[1])!r}, stop_before_pixels=True)
ds = build_study_sr(findings=[_findings(src, 3)], algorithm=ALGO, content_datetime=WHEN)
print(hashlib.sha256(sr_file_bytes(ds)).hexdigest())
"""
    repo = str(Path(__file__).resolve().parents[2])
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=repo,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "123", "PYTHONPATH": repo})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == here


def test_long_model_version_and_long_demo_name(dicom_data_dir, tmp_path):
    """A content-hash model version (64 chars) equal to the version, and a long demo name, still validate."""
    src = _header(dicom_data_dir, SOURCES[0])
    digest = "f" * 64
    algo = AlgorithmInfo(name="x" * 80, version=digest, model_version=digest, demo=True)
    ds = build_study_sr(findings=[_findings(src, 1)], algorithm=algo, content_datetime=WHEN)
    assert ds.SoftwareVersions == digest
    assert len(ds.ManufacturerModelName) <= 64 and DEMO_MARK in ds.ManufacturerModelName
    path = tmp_path / "long.dcm"
    path.write_bytes(sr_file_bytes(ds))
    assert not [line for line in _dciodvfy(path) if "Error" in line]
    two = build_study_sr(findings=[_findings(src, 0)], algorithm=ALGO, content_datetime=WHEN)
    assert list(two.SoftwareVersions) == [ALGO.version, ALGO.model_version]
