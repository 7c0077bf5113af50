"""Scope and urgency decisions from header values (pure functions), on the real files and on crafted headers."""

from __future__ import annotations

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from cxr_triage.core.states import NotAnalysedReason as R
from cxr_triage.dicom_node.headers import read_header
from cxr_triage.dicom_node.scope import CR_IMAGE, DX_PRESENTATION, SECONDARY_CAPTURE, out_of_scope_reason, urgency

CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.mark.parametrize(
    "name, expected",
    [
        ("siim-cr-pa-jpeg-baseline.dcm", None),  # SC with Modality CR: the RSNA challenge format
        ("siim-cr-pa-monochrome1.dcm", None),
        ("wg04-cr-chest-pa-j2k-monochrome1.dcm", None),
        ("nih-dx-secondary-capture.dcm", None),  # SC with Modality DX
        ("veterinary-dx-lateral-thorax.dcm", R.NOT_HUMAN),  # a dog, and lateral: not-human wins
    ],
)
def test_shared_files(dicom_data_dir, name, expected):
    ds = dcmread(dicom_data_dir / name, stop_before_pixels=True)
    assert out_of_scope_reason(ds) == expected
    assert out_of_scope_reason(read_header(dicom_data_dir / name).dataset) == expected


def _hdr(**values) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = values.pop("sop", CR_IMAGE)
    ds.Modality = values.pop("Modality", "CR")
    for key, value in values.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(
    "header, expected",
    [
        (_hdr(), None),
        (_hdr(BodyPartExamined="CHEST", ViewPosition="AP"), None),
        (_hdr(BodyPartExamined="THORAX"), None),
        (_hdr(BodyPartExamined=""), None),  # blank is allowed
        (_hdr(sop=DX_PRESENTATION, Modality="DX"), None),
        (_hdr(sop=SECONDARY_CAPTURE, Modality="CR"), None),
        (_hdr(sop=SECONDARY_CAPTURE, Modality="OT"), R.MODALITY),
        (_hdr(sop=CT, Modality="CT"), R.SOP_CLASS),
        (_hdr(Modality="MG"), R.MODALITY),
        (_hdr(BodyPartExamined="ABDOMEN"), R.NOT_CHEST),
        (_hdr(BodyPartExamined="SKULL", ViewPosition="LL"), R.NOT_CHEST),
        (_hdr(ViewPosition="LL"), R.NOT_FRONTAL),
        (_hdr(ViewPosition="RL"), R.NOT_FRONTAL),
        (_hdr(ViewPosition="LATERAL"), R.NOT_FRONTAL),
        (_hdr(SeriesDescription="CHEST LAT"), R.NOT_FRONTAL),
        (_hdr(ProtocolName="Thorax lateral"), R.NOT_FRONTAL),
        (_hdr(SeriesDescription="Chest bilateral ribs"), None),
        (_hdr(SeriesDescription="Chest left lateral decubitus"), None),  # a frontal projection
        (_hdr(PatientSpeciesDescription="Canis lupus familiaris"), R.NOT_HUMAN),
        (_hdr(PatientSpeciesDescription="Homo sapiens"), None),
        (_hdr(PatientBreedDescription="Labrador"), R.NOT_HUMAN),
        (_hdr(StudyDescription="FELINE THORAX"), R.NOT_HUMAN),
        (_hdr(InstitutionName="City Veterinary Hospital"), R.NOT_HUMAN),
        (_hdr(StudyDescription="CATHETER CHECK"), None),  # "CAT" inside a word is not a cat
    ],
)
def test_crafted_headers(header, expected):
    assert out_of_scope_reason(header) == expected


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def test_code_sequences():
    assert out_of_scope_reason(_hdr(PatientSpeciesCodeSequence=[_code("448771007", "SCT", "Canis lupus familiaris")])) == R.NOT_HUMAN
    assert out_of_scope_reason(_hdr(PatientSpeciesCodeSequence=[_code("337915000", "SCT", "Homo sapiens")])) is None
    assert out_of_scope_reason(_hdr(ViewCodeSequence=[_code("399173006", "SCT", "left lateral")])) == R.NOT_FRONTAL
    assert out_of_scope_reason(_hdr(ViewCodeSequence=[_code("399300004", "SCT", "postero-anterior")])) is None


def test_urgency():
    assert urgency(_hdr()) is None
    assert urgency(_hdr(RequestedProcedurePriority="STAT")) == "STAT"
    assert urgency(_hdr(RequestedProcedurePriority="ROUTINE", CurrentPatientLocation="ED")) == "ROUTINE"
    assert urgency(_hdr(ScheduledProcedureStepPriority="LOW")) == "LOW"
    assert urgency(_hdr(RequestedProcedurePriority="bogus")) is None
    assert urgency(_hdr(CurrentPatientLocation="Emergency Dept bay 3")) == "HIGH"
    assert urgency(_hdr(CurrentPatientLocation="WARD 7")) is None
    assert urgency(_hdr(), command_priority=0x0001) == "HIGH"  # C-STORE priority HIGH
    assert urgency(_hdr(), command_priority=0x0000) is None  # MEDIUM says nothing
