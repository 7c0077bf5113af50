"""Findings + source headers -> one DICOM Comprehensive SR per study (TID 1500 Measurement Report). Pure: no I/O.

Document layout (IHE AI Results style, built with highdicom's typed templates):

* Root: TID 1500 "Imaging Measurement Report", procedure reported = plain chest X-ray.
* Observer context (TID 1002/1004): a *device* observer = the algorithm (name, version, manufacturer
  "cxr-triage"); with ``AlgorithmInfo.demo`` the name carries "UNTRAINED DEMO MODEL" (also in the series
  description and in every algorithm identification).
* Per source image, one TID 1501 measurement group: finding type "Pneumonia", source image reference,
  algorithm identification (TID 4019, with the decision threshold as a parameter), a qualitative evaluation
  "Pneumonia" = Present/Absent (present when flagged) and the probability as a numeric measurement.
* Per opacity region, one TID 1410 planar ROI group: finding type "Abnormal opacity" at finding site "Lung",
  SCOORD POLYLINE (closed rectangle, 5 points, source pixel coordinates: column x, row y) referencing the
  source image, algorithm identification, and its confidence as a numeric measurement.
* Evidence: every source instance in Current Requested Procedure Evidence; patient + study attributes are the
  source's; new series with Modality SR.

UIDs come from :func:`derive_sr_uids` (study UID + model version [+ revision]); dates and times come from the
caller's ``content_datetime``. Identical inputs therefore give byte-identical files, and a resend is the same object.

Codes used (all from standard terminologies):

* SNOMED CT 233604007 "Pneumonia" (disorder) - finding type and name of the present/absent evaluation.
* DICOM DCM 112033 "Abnormal opacity" - CID 6101 "Thoracic Findings" (Chest CAD SR, PS3.16). Chosen for
  "lung opacity" because it is the DICOM-standard code for exactly that chest-radiograph CAD finding; combined
  with finding site SNOMED CT 39607008 "Lung". (RSNA's "Lung Opacity" class has no own SNOMED concept.)
* SNOMED CT 52101004 "Present" / 272519000 "Absent" - qualitative value.
* DICOM DCM 111012 "Certainty of Finding" (Mammography/Chest CAD) - the probability / box confidence, unit UCUM
  "1" ("no units"), value in [0, 1].
* SNOMED CT 399208008 "Plain chest X-ray" (procedure) - procedure reported (CID 100 allows SNOMED procedures).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO

import highdicom as hd
import numpy as np
import pydicom
import pydicom.charset
from highdicom.sr import (
    AlgorithmIdentification,
    ComprehensiveSR,
    DeviceObserverIdentifyingAttributes,
    FindingSite,
    ImageRegion,
    Measurement,
    MeasurementReport,
    MeasurementsAndQualitativeEvaluations,
    ObservationContext,
    ObserverContext,
    PlanarROIMeasurementsAndQualitativeEvaluations,
    QualitativeEvaluation,
    SourceImageForMeasurementGroup,
    SourceImageForRegion,
    TrackingIdentifier,
)
from pydicom.datadict import dictionary_VR
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian
from pydicom.valuerep import VALIDATORS

from cxr_triage.core.contracts import Box
from cxr_triage.core.uids import derive_uid

__all__ = [
    "OpacityRegion",
    "ImageFindings",
    "AlgorithmInfo",
    "Predecessor",
    "SrUids",
    "derive_sr_uids",
    "build_study_sr",
    "sr_file_bytes",
    "DEMO_MARK",
    "PNEUMONIA",
    "ABNORMAL_OPACITY",
    "CERTAINTY_OF_FINDING",
    "SR_SERIES_NUMBER",
]

DEMO_MARK = "UNTRAINED DEMO MODEL"
SR_SERIES_NUMBER = 9901

# SNOMED CT 233604007 |Pneumonia (disorder)|
PNEUMONIA = hd.sr.CodedConcept(value="233604007", scheme_designator="SCT", meaning="Pneumonia")
# DICOM DCM 112033 "Abnormal opacity" (PS3.16 CID 6101 Thoracic Findings): the standard chest CAD opacity finding.
ABNORMAL_OPACITY = hd.sr.CodedConcept.from_code(codes.DCM.AbnormalOpacity)
# DICOM DCM 111012 "Certainty of Finding"
CERTAINTY_OF_FINDING = hd.sr.CodedConcept.from_code(codes.DCM.CertaintyOfFinding)
# SNOMED CT 399208008 |Plain chest X-ray (procedure)|
PLAIN_CHEST_XRAY = hd.sr.CodedConcept(value="399208008", scheme_designator="SCT", meaning="Plain chest X-ray")
_NO_UNITS = hd.sr.CodedConcept.from_code(codes.UCUM.NoUnits)

_UID_NAMESPACE = "cxr-triage/sr/v1"
# Patient and study attributes copied from the source header (Type 2 in the SR IOD: present, maybe empty).
_PATIENT_STUDY_KEYWORDS = (
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


OpacityRegion = Box  # the SR's name for a detected opacity box (original pixel coordinates)


@dataclass(frozen=True)
class ImageFindings:
    source: pydicom.Dataset  # header of the source image (read with stop_before_pixels=True)
    pneumonia_probability: float
    flagged: bool
    threshold: float
    regions: tuple[OpacityRegion, ...] = ()


@dataclass(frozen=True)
class AlgorithmInfo:
    name: str
    version: str
    model_version: str
    demo: bool = False
    manufacturer: str = "cxr-triage"


@dataclass(frozen=True)
class Predecessor:
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class SrUids:
    series_instance_uid: str
    sop_instance_uid: str


def derive_sr_uids(*, study_instance_uid: str, model_version: str, revision: int) -> SrUids:
    """Deterministic SR UIDs: one series per (study, model version); one instance per revision in it."""
    if not study_instance_uid:
        raise ValueError("study_instance_uid must not be empty")
    if not model_version:
        raise ValueError("model_version must not be empty")
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise ValueError("revision must be an integer >= 1")
    series = derive_uid(_UID_NAMESPACE, "series", study_instance_uid, model_version)
    sop = derive_uid(_UID_NAMESPACE, "instance", study_instance_uid, model_version, str(revision))
    return SrUids(series_instance_uid=series, sop_instance_uid=sop)


# ---------------------------------------------------------------------------------------------- validation


def _check_unit(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"{name} must be a number in [0, 1]")
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]")
    return value


def _check_findings(findings: Sequence[ImageFindings]) -> str:
    """Validate the findings; return the common StudyInstanceUID. Messages name the argument, never values."""
    if isinstance(findings, (str, bytes)) or not isinstance(findings, Sequence) or len(findings) == 0:
        raise ValueError("findings must be a non-empty sequence of ImageFindings")
    study_uid: str | None = None
    seen: set[str] = set()
    for i, f in enumerate(findings):
        where = f"findings[{i}]"
        if not isinstance(f, ImageFindings):
            raise ValueError(f"{where} must be an ImageFindings")
        src = f.source
        if not isinstance(src, Dataset):
            raise ValueError(f"{where}.source must be a pydicom Dataset")
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
            try:
                value = src[keyword].value if keyword in src else None
            except Exception:
                value = None
            if not value:
                raise ValueError(f"{where}.source lacks {keyword}")
            if not _valid_uid(str(value)):
                raise ValueError(f"{where}.source has an invalid {keyword}")  # never the value: it may be PHI
        if study_uid is None:
            study_uid = str(src.StudyInstanceUID)
        elif str(src.StudyInstanceUID) != study_uid:
            raise ValueError(f"{where}.source belongs to a different study than findings[0].source")
        if str(src.SOPInstanceUID) in seen:
            raise ValueError(f"{where}.source repeats an instance already in findings")
        seen.add(str(src.SOPInstanceUID))
        _check_unit(f.pneumonia_probability, f"{where}.pneumonia_probability")
        _check_unit(f.threshold, f"{where}.threshold")
        if not isinstance(f.flagged, (bool, np.bool_)):
            raise ValueError(f"{where}.flagged must be a bool")
        rows, cols = src.get("Rows"), src.get("Columns")
        if f.regions and (not rows or not cols):
            raise ValueError(f"{where}.source lacks Rows/Columns, needed to check regions")
        for j, r in enumerate(f.regions):
            rw = f"{where}.regions[{j}]"
            if not isinstance(r, OpacityRegion):
                raise ValueError(f"{rw} must be an OpacityRegion")
            coords = (r.x0, r.y0, r.x1, r.y1)
            if not all(isinstance(c, (int, float, np.floating, np.integer)) and math.isfinite(c) for c in coords):
                raise ValueError(f"{rw} coordinates must be finite numbers")
            if not (0 <= r.x0 < r.x1 <= int(cols) and 0 <= r.y0 < r.y1 <= int(rows)):
                raise ValueError(f"{rw} box lies (partly) outside the image or is empty")
            _check_unit(r.score, f"{rw}.score")
    assert study_uid is not None
    return study_uid


def _check_algorithm(algorithm: AlgorithmInfo) -> None:
    if not isinstance(algorithm, AlgorithmInfo):
        raise ValueError("algorithm must be an AlgorithmInfo")
    for field in ("name", "version", "model_version", "manufacturer"):
        value = getattr(algorithm, field)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"algorithm.{field} must be a non-empty string")
    for field in ("manufacturer", "version", "model_version"):  # LO values: Manufacturer, Software Versions
        value = getattr(algorithm, field)
        if len(value) > 64 or "\\" in value:
            raise ValueError(f"algorithm.{field} must be at most 64 characters without backslash")


# ---------------------------------------------------------------------------------------------- helpers


_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")  # none is allowed in PN/LO/SH/CS/DA/TM once decoded
_TIME = re.compile(r"^(?:[01]\d|2[0-3])(?:[0-5]\d(?:(?:[0-5]\d|60)(?:\.\d{1,6})?)?)?$")
_PATIENT_SEX = frozenset({"M", "F", "O"})
# Single-byte character sets whose Python codec can tell whether a value fits (ISO 2022 sets cannot simply).
_SINGLE_BYTE_CHARSETS = frozenset(
    {"ISO_IR 100", "ISO_IR 101", "ISO_IR 109", "ISO_IR 110", "ISO_IR 144", "ISO_IR 127", "ISO_IR 126",
     "ISO_IR 138", "ISO_IR 148", "ISO_IR 166", "ISO_IR 13", "ISO_IR 192"}
)
UTF8_CHARSET = "ISO_IR 192"


def _conformant_text(keyword: str, value: object) -> str:
    """A source attribute as text the SR can carry, or "" when it is absent or not conformant.

    Source headers come from any modality, often with values the standard does not allow (a birth date written
    1970-01-01, a sex of "X", a control character in a name). Copying them would make the SR invalid, and pydicom
    or highdicom would raise with the value in the message (PHI). These are Type 2 attributes of the SR, so an
    unusable value is dropped (left empty) instead of failing the report. Nothing here reports the value.
    """
    if value is None or isinstance(value, (bytes, bytearray, list, tuple, MultiValue)):
        return ""  # undecodable raw bytes, or several values where the SR allows one
    text = str(value).rstrip(" \x00")
    if not text:
        return ""
    if _CONTROL_CHARS.search(text):
        return ""
    vr = dictionary_VR(keyword)
    validator = VALIDATORS.get(vr)
    if validator is not None:
        try:
            ok, _ = validator(vr, text)
        except Exception:
            ok = False
        if not ok:
            return ""
    if vr == "DA":
        try:
            datetime.strptime(text, "%Y%m%d")
        except ValueError:
            return ""
    elif vr == "TM" and not _TIME.match(text):
        return ""
    if keyword == "PatientSex" and text not in _PATIENT_SEX:
        return ""
    return text


def _source_text(src: Dataset, keyword: str) -> str:
    try:
        value = src[keyword].value if keyword in src else None
    except Exception:  # a raw element pydicom cannot convert: treat as absent
        return ""
    return _conformant_text(keyword, value)


def _valid_uid(value: object) -> bool:
    return isinstance(value, str) and bool(value) and UID(value).is_valid


def _character_set(src: Dataset, texts: Sequence[str]) -> str | None:
    """The SR's Specific Character Set for the copied texts: none when all are ASCII (the default repertoire);
    else the source's own when it is a single-byte set that encodes them all; else UTF-8 (ISO_IR 192)."""
    if all(t.isascii() for t in texts):
        return None
    try:
        declared = src.get("SpecificCharacterSet", None)
    except Exception:
        declared = None
    if isinstance(declared, str) and declared.strip() in _SINGLE_BYTE_CHARSETS:
        declared = declared.strip()
        try:
            (codec,) = pydicom.charset.convert_encodings([declared])
            for t in texts:
                t.encode(codec)
            return declared
        except Exception:
            pass
    return UTF8_CHARSET


@dataclass(frozen=True)
class _PatientStudy:
    """The patient/study attributes of the SR root, already made conformant, and the character set they need."""

    values: dict[str, str]
    character_set: str | None


def _patient_study(src: Dataset) -> _PatientStudy:
    values = {k: _source_text(src, k) for k in _PATIENT_STUDY_KEYWORDS if k != "StudyInstanceUID"}
    values["StudyInstanceUID"] = str(src.StudyInstanceUID)
    return _PatientStudy(values=values, character_set=_character_set(src, list(values.values())))


def _evidence_header(src: Dataset, root: _PatientStudy | None = None) -> Dataset:
    """The subset of a source header the SR needs. For the first source (``root``), the conformant patient/study
    attributes and their character set, which highdicom copies to the SR root; absent ones set empty (Type 2)."""
    ds = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "SeriesInstanceUID"):
        setattr(ds, keyword, str(src[keyword].value))
    values = root.values if root is not None else _patient_study(src).values
    if root is not None and root.character_set is not None:
        ds.SpecificCharacterSet = root.character_set
    for keyword in _PATIENT_STUDY_KEYWORDS:
        setattr(ds, keyword, values[keyword])
    return ds


def _algorithm_name(algorithm: AlgorithmInfo) -> str:
    if algorithm.demo and DEMO_MARK not in algorithm.name:
        return f"{algorithm.name} ({DEMO_MARK})"
    return algorithm.name


def _version_text(algorithm: AlgorithmInfo) -> str:
    if algorithm.version == algorithm.model_version:
        return algorithm.version
    return f"{algorithm.version}/{algorithm.model_version}"


def _model_name(algorithm: AlgorithmInfo) -> str:
    """Manufacturer's Model Name (LO, 64 chars): the algorithm name, keeping the demo mark when shortened."""
    if not algorithm.demo:
        return algorithm.name[:64]
    suffix = f" ({DEMO_MARK})"
    return algorithm.name.replace(suffix, "").replace(DEMO_MARK, "").strip()[: 64 - len(suffix)] + suffix


def _fmt(value: float) -> float:
    """Round so the DS encoding fits 16 characters and is stable across platforms."""
    return float(f"{float(value):.6g}")


def _region_polyline(r: OpacityRegion) -> np.ndarray:
    x0, y0, x1, y1 = (_fmt(v) for v in (r.x0, r.y0, r.x1, r.y1))
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]], dtype=np.float32)


def _image_groups(
    f: ImageFindings, index: int, algorithm: AlgorithmInfo, algorithm_name: str, sop_uid: str
) -> list:
    src = f.source
    source_uid = str(src.SOPInstanceUID)
    algo_id = AlgorithmIdentification(
        name=algorithm_name,
        version=_version_text(algorithm),
        parameters=[f"threshold={_fmt(f.threshold)}"],
        manufacturer=algorithm.manufacturer,
    )
    groups: list = [
        MeasurementsAndQualitativeEvaluations(
            tracking_identifier=TrackingIdentifier(
                uid=derive_uid(_UID_NAMESPACE, "tracking", sop_uid, source_uid, "pneumonia"),
                identifier=f"Pneumonia, image {index + 1}",
            ),
            finding_type=PNEUMONIA,
            algorithm_id=algo_id,
            source_images=[
                SourceImageForMeasurementGroup(
                    referenced_sop_class_uid=str(src.SOPClassUID), referenced_sop_instance_uid=source_uid
                )
            ],
            qualitative_evaluations=[
                QualitativeEvaluation(
                    name=PNEUMONIA, value=codes.SCT.Present if bool(f.flagged) else codes.SCT.Absent
                )
            ],
            measurements=[
                Measurement(name=CERTAINTY_OF_FINDING, value=_fmt(f.pneumonia_probability), unit=_NO_UNITS)
            ],
        )
    ]
    for j, r in enumerate(f.regions):
        groups.append(
            PlanarROIMeasurementsAndQualitativeEvaluations(
                tracking_identifier=TrackingIdentifier(
                    uid=derive_uid(_UID_NAMESPACE, "tracking", sop_uid, source_uid, "opacity", str(j)),
                    identifier=f"Opacity {j + 1}, image {index + 1}",
                ),
                referenced_region=ImageRegion(
                    graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
                    graphic_data=_region_polyline(r),
                    source_image=SourceImageForRegion(
                        referenced_sop_class_uid=str(src.SOPClassUID), referenced_sop_instance_uid=source_uid
                    ),
                ),
                finding_type=ABNORMAL_OPACITY,
                finding_sites=[FindingSite(anatomic_location=codes.SCT.Lung)],
                algorithm_id=algo_id,
                measurements=[Measurement(name=CERTAINTY_OF_FINDING, value=_fmt(r.score), unit=_NO_UNITS)],
            )
        )
    return groups


# ---------------------------------------------------------------------------------------------- public API


def build_study_sr(
    *,
    findings: Sequence[ImageFindings],
    algorithm: AlgorithmInfo,
    revision: int = 1,
    predecessor: Predecessor | None = None,
    content_datetime: datetime,
) -> Dataset:
    """Build the Comprehensive SR (TID 1500) for one study. Deterministic in its arguments.

    Raises ``ValueError`` naming the bad argument: empty ``findings``, sources of different studies, a box outside
    its image, a probability outside [0, 1], a revision < 1, a predecessor missing (or given) for the revision.
    """
    study_uid = _check_findings(findings)
    _check_algorithm(algorithm)
    if isinstance(revision, bool) or not isinstance(revision, int) or revision < 1:
        raise ValueError("revision must be an integer >= 1")
    if revision == 1 and predecessor is not None:
        raise ValueError("predecessor must be None for revision 1")
    if revision > 1:
        if not isinstance(predecessor, Predecessor):
            raise ValueError("predecessor is required (a Predecessor) when revision > 1")
        if not all((predecessor.sop_instance_uid, predecessor.series_instance_uid, predecessor.sop_class_uid)):
            raise ValueError("predecessor UIDs must not be empty")
    if not isinstance(content_datetime, datetime):
        raise ValueError("content_datetime must be a datetime")
    # Drop the time zone and sub-second part: DA/TM carry no offset, and a stable value keeps resends identical.
    when = content_datetime.replace(tzinfo=None, microsecond=0)

    uids = derive_sr_uids(study_instance_uid=study_uid, model_version=algorithm.model_version, revision=revision)
    algorithm_name = _algorithm_name(algorithm)

    device = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derive_uid(_UID_NAMESPACE, "device", algorithm.name, algorithm.version, algorithm.model_version),
            name=algorithm_name,
            manufacturer_name=algorithm.manufacturer,
            model_name=_version_text(algorithm),
        ),
    )
    groups: list = []
    for i, f in enumerate(findings):
        groups.extend(_image_groups(f, i, algorithm, algorithm_name, uids.sop_instance_uid))
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=device),
        procedure_reported=PLAIN_CHEST_XRAY,
        imaging_measurements=groups,
    )

    root = _patient_study(findings[0].source)
    evidence = [_evidence_header(f.source, root if i == 0 else None) for i, f in enumerate(findings)]
    previous = None
    if predecessor is not None:
        pre = Dataset()
        pre.SOPClassUID = predecessor.sop_class_uid
        pre.SOPInstanceUID = predecessor.sop_instance_uid
        pre.SeriesInstanceUID = predecessor.series_instance_uid
        pre.StudyInstanceUID = study_uid
        previous = [pre]

    description = "cxr-triage AI results"
    if algorithm.demo:
        description += f" ({DEMO_MARK})"
    sr = ComprehensiveSR(
        evidence=evidence,
        content=report,
        series_instance_uid=uids.series_instance_uid,
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids.sop_instance_uid,
        instance_number=revision,
        manufacturer=algorithm.manufacturer,
        is_complete=True,
        is_final=False,
        is_verified=False,
        previous_versions=previous,
        series_description=description,
        manufacturer_model_name=_model_name(algorithm),
        software_versions=(
            algorithm.version
            if algorithm.version == algorithm.model_version
            else [algorithm.version, algorithm.model_version]
        ),
        content_date=when.date(),
        content_time=when.time(),
        series_date=when.date(),
        series_time=when.time(),
    )
    ds = Dataset(sr)  # plain Dataset: callers and pickling need no highdicom subclass
    ds.file_meta = sr.file_meta if hasattr(sr, "file_meta") else FileMetaDataset()
    # highdicom stamps wall-clock times in these; replace them with the caller's time for determinism.
    for prefix in ("InstanceCreation", "Content", "Series"):
        setattr(ds, f"{prefix}Date", when.strftime("%Y%m%d"))
        setattr(ds, f"{prefix}Time", when.strftime("%H%M%S"))
    for item in ds.get("ContributingEquipmentSequence", []):
        if "ContributionDateTime" in item:
            item.ContributionDateTime = when.strftime("%Y%m%d%H%M%S")
    # The SR copies the patient/study module of the source (conformant values only; absent Type 2 ones empty),
    # with the character set those values need at the root.
    for keyword in _PATIENT_STUDY_KEYWORDS:
        setattr(ds, keyword, root.values[keyword])
    if root.character_set is not None:
        ds.SpecificCharacterSet = root.character_set
    elif "SpecificCharacterSet" in ds:
        del ds.SpecificCharacterSet
    _fill_file_meta(ds)
    return ds


def _fill_file_meta(ds: Dataset) -> None:
    meta = ds.file_meta if isinstance(getattr(ds, "file_meta", None), FileMetaDataset) else FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta


def sr_file_bytes(ds: Dataset) -> bytes:
    """Serialise ``ds`` as a DICOM Part 10 file (preamble, file meta, Explicit VR Little Endian)."""
    _fill_file_meta(ds)
    buf = BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True, little_endian=True, implicit_vr=False)
    return buf.getvalue()
