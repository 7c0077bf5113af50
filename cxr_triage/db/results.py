"""Serialisation of study results, shared by the `cxr-triage query` CLI and the HTTP API (same answers).

Pure functions over loaded `Study` objects (as returned by `repo.query_studies`, which eager-loads instances and
analyses). PHI -- patient name/ID, accession number and the DICOM UIDs -- appears only with ``include_phi=True``.
"""

from __future__ import annotations

import csv
import io
import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from cxr_triage.core.states import InstanceState, StudyState
from cxr_triage.db.tables import Analysis, Instance, Study

DEMO_NOTE = "UNTRAINED DEMO MODEL"

# Column order of CSV exports; PHI columns are dropped when not allowed.
PHI_COLUMNS = ("study_instance_uid", "accession_number", "patient_id", "patient_name")
COLUMNS = (
    "id", "study_instance_uid", "accession_number", "patient_id", "patient_name", "received_at", "state",
    "urgency", "pneumonia_score", "flagged", "model_version", "demo_model", "model_note", "n_images",
    "n_analysed", "not_analysed_reasons", "boxes", "read_at", "read_by",
)


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _counted_instances(study: Study) -> list[Instance]:
    # A duplicate is the same object again: it is not another image of the study.
    return [i for i in study.instances if i.state != InstanceState.DUPLICATE]


def current_analyses(study: Study) -> list[tuple[Instance, Analysis]]:
    """Analyses of the study's current model version, one per analysed instance (instance order)."""
    out: list[tuple[Instance, Analysis]] = []
    for inst in study.instances:
        if inst.state != InstanceState.ANALYSED:
            continue
        for analysis in inst.analyses:
            if study.model_version is None or analysis.model_version == study.model_version:
                out.append((inst, analysis))
                break
    return out


def not_analysed_reasons(study: Study) -> list[str]:
    """Distinct reasons of images that were not analysed or failed, in first-seen order."""
    reasons: list[str] = []
    for inst in study.instances:
        if inst.state in (InstanceState.NOT_ANALYSED, InstanceState.FAILED):
            text = inst.reason or inst.state
            if text not in reasons:
                reasons.append(text)
    return reasons


def study_record(study: Study, *, include_phi: bool) -> dict[str, Any]:
    """One flat, JSON-able row per study. Without `include_phi` the PHI/identifier keys are absent."""
    instances = _counted_instances(study)
    analysed = current_analyses(study)
    record: dict[str, Any] = {"id": study.id}
    if include_phi:
        record.update(
            study_instance_uid=study.study_instance_uid,
            accession_number=study.accession_number,
            patient_id=study.patient_id,
            patient_name=study.patient_name,
        )
    record.update(
        received_at=_iso(study.received_at),
        state=study.state,
        urgency=study.urgency,
        pneumonia_score=study.pneumonia_score,
        flagged=study.flagged,
        model_version=study.model_version,
        demo_model=bool(study.demo_model),
        model_note=DEMO_NOTE if study.demo_model else "",
        n_images=len(instances),
        n_analysed=sum(1 for i in instances if i.state == InstanceState.ANALYSED),
        not_analysed_reasons="; ".join(not_analysed_reasons(study)),
        boxes=sum(len(a.boxes) for _, a in analysed),
        read_at=_iso(study.read_at),
        read_by=study.read_by,
    )
    return record


def records_to_csv(records: Sequence[dict[str, Any]]) -> str:
    """CSV with a header row. Columns in `COLUMNS` order (those present in the records), then any extras."""
    present: list[str] = []
    for rec in records:
        for key in rec:
            if key not in present:
                present.append(key)
    if not present:
        present = [c for c in COLUMNS if c not in PHI_COLUMNS]
    ordered = [c for c in COLUMNS if c in present] + [c for c in present if c not in COLUMNS]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ordered, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: _csv_cell(rec.get(k)) for k in ordered})
    return buf.getvalue()


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        # CSV/formula injection: header values are attacker-controlled (a modality can send anything).
        return "'" + value
    return value


def records_to_json(records: Sequence[dict[str, Any]]) -> str:
    return json.dumps(list(records), indent=2, ensure_ascii=False)


# ------------------------------------------------------------------------------------------------ FHIR R4
_NS = uuid.UUID("6f1c1b8e-7a52-4d55-9b43-2a1f0e7c9d10")
LOCAL_CODES = "urn:cxr-triage:codes"
LOINC = "http://loinc.org"
SNOMED = "http://snomed.info/sct"
UCUM = "http://unitsofmeasure.org"


def _urn(*parts: object) -> str:
    return "urn:uuid:" + str(uuid.uuid5(_NS, "/".join(str(p) for p in parts)))


def _fhir_instant(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _quantity(value: float, unit: str, code: str) -> dict[str, Any]:
    return {"value": round(float(value), 6), "unit": unit, "system": UCUM, "code": code}


def _model_text(study: Study) -> str:
    text = f"cxr-triage model {study.model_version or 'unknown'}"
    return f"{text} ({DEMO_NOTE})" if study.demo_model else text


def conclusion_text(study: Study) -> str:
    """Plain-language conclusion. A study without a result says so: never reads as a negative."""
    reasons = not_analysed_reasons(study)
    prefix = f"{DEMO_NOTE}: " if study.demo_model else ""
    if study.state == StudyState.RECEIVING and study.pneumonia_score is None:
        return "Analysis in progress: no result yet."
    if study.pneumonia_score is None:
        why = "; ".join(reasons) or study.state
        return f"NOT ANALYSED ({why}): no automated result; this is not a negative finding."
    verdict = "Suspected pneumonia" if study.flagged else "Pneumonia not suspected by the model"
    text = f"{prefix}{verdict} (probability {study.pneumonia_score:.2f})."
    if reasons:
        text += f" Some images not analysed: {'; '.join(reasons)}."
    return text


def to_fhir_bundle(studies: Sequence[Study], *, include_phi: bool) -> dict[str, Any]:
    """FHIR R4 Bundle (type collection): one DiagnosticReport per study plus its Observations.

    * DiagnosticReport.status: ``preliminary`` while images are still arriving/being analysed, else ``final``.
    * code: LOINC 18748-4 "Diagnostic imaging study" (not 36643-5 "XR Chest 2 Views": the view count varies).
    * result: an Observation with the pneumonia probability (valueQuantity, UCUM "1"), and one Observation per
      detected opacity (bodySite lung, components x0/y0/x1/y1 in source pixels and the detector score).
    * subject (patient identifier) and imagingStudy (Study Instance UID as urn:oid) only with `include_phi`.
    """
    entries: list[dict[str, Any]] = []
    for study in studies:
        report_url = _urn("report", study.id, study.model_version or "")
        result_refs: list[dict[str, str]] = []
        observations: list[dict[str, Any]] = []
        subject = None
        if include_phi and study.patient_id:
            subject = {"identifier": {"value": study.patient_id}, "display": study.patient_name or None}
            subject = {k: v for k, v in subject.items() if v is not None}
        analysed = current_analyses(study)
        if study.pneumonia_score is not None:
            obs_url = _urn("obs-pneumonia", study.id, study.model_version or "")
            obs: dict[str, Any] = {
                "resourceType": "Observation",
                "status": "final" if study.state != StudyState.RECEIVING else "preliminary",
                "category": [_category("imaging", "Imaging", "http://terminology.hl7.org/CodeSystem/observation-category")],
                "code": {
                    "coding": [{"system": LOCAL_CODES, "code": "pneumonia-probability",
                                "display": "Pneumonia probability (AI)"}],
                    "text": "Pneumonia probability (AI)",
                },
                "valueQuantity": _quantity(study.pneumonia_score, "probability", "1"),
                "interpretation": [{
                    "coding": [{
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation",
                        "code": "A" if study.flagged else "N",
                        "display": "Abnormal" if study.flagged else "Normal",
                    }],
                    "text": "suspected pneumonia" if study.flagged else "not suspected",
                }],
                "method": {"text": _model_text(study)},
            }
            if subject:
                obs["subject"] = subject
            observations.append({"fullUrl": obs_url, "resource": obs})
            result_refs.append({"reference": obs_url})
        for inst, analysis in analysed:
            for n, box in enumerate(analysis.boxes):
                url = _urn("obs-opacity", study.id, analysis.id, n)
                resource: dict[str, Any] = {
                    "resourceType": "Observation",
                    "status": "final" if study.state != StudyState.RECEIVING else "preliminary",
                    "category": [_category("imaging", "Imaging",
                                           "http://terminology.hl7.org/CodeSystem/observation-category")],
                    "code": {
                        "coding": [{"system": LOCAL_CODES, "code": "lung-opacity", "display": "Lung opacity (AI)"}],
                        "text": "Lung opacity (AI)",
                    },
                    "bodySite": {"coding": [{"system": SNOMED, "code": "39607008", "display": "Lung structure"}]},
                    "valueQuantity": _quantity(box.score, "probability", "1"),
                    "method": {"text": _model_text(study)},
                    "component": [
                        {
                            "code": {"coding": [{"system": LOCAL_CODES, "code": f"bbox-{name}"}],
                                     "text": f"bounding box {name} (source image pixels)"},
                            "valueQuantity": _quantity(value, "pixel", "{pixel}"),
                        }
                        for name, value in (("x0", box.x0), ("y0", box.y0), ("x1", box.x1), ("y1", box.y1))
                    ],
                }
                if include_phi:
                    resource["derivedFrom"] = [{
                        "type": "ImagingStudy",
                        "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_instance_uid}"},
                        "display": f"SOP Instance urn:oid:{inst.sop_instance_uid}",
                    }]
                if subject:
                    resource["subject"] = subject
                observations.append({"fullUrl": url, "resource": resource})
                result_refs.append({"reference": url})
        issued = max((a.created_at for _, a in analysed), default=None)
        report: dict[str, Any] = {
            "resourceType": "DiagnosticReport",
            "identifier": [{"system": LOCAL_CODES + ":report", "value": f"study-{study.id}"}],
            "status": "preliminary" if study.state == StudyState.RECEIVING else "final",
            "category": [_category("RAD", "Radiology", "http://terminology.hl7.org/CodeSystem/v2-0074")],
            "code": {
                "coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}],
                "text": "Chest radiograph AI triage",
            },
            "effectiveDateTime": _fhir_instant(study.received_at),
            "conclusion": conclusion_text(study),
        }
        if issued is not None:
            report["issued"] = _fhir_instant(issued)
        if subject:
            report["subject"] = subject
        if include_phi:
            report["imagingStudy"] = [{
                "type": "ImagingStudy",
                "identifier": {"system": "urn:dicom:uid", "value": f"urn:oid:{study.study_instance_uid}"},
            }]
            if study.accession_number:
                report["identifier"].append({
                    "type": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0203", "code": "ACSN"}]},
                    "value": study.accession_number,
                })
        if result_refs:
            report["result"] = result_refs
        entries.append({"fullUrl": report_url, "resource": report})
        entries.extend(observations)
    return {"resourceType": "Bundle", "type": "collection", "entry": entries}


def _category(code: str, display: str, system: str) -> dict[str, Any]:
    return {"coding": [{"system": system, "code": code, "display": display}]}


__all__ = [
    "COLUMNS", "DEMO_NOTE", "PHI_COLUMNS", "conclusion_text", "current_analyses", "not_analysed_reasons",
    "records_to_csv", "records_to_json", "study_record", "to_fhir_bundle",
]
