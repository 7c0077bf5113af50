"""results.py serialisation shared by the CLI and the API; FHIR R4 shape."""

from __future__ import annotations

import csv
import io
import json
from datetime import timedelta

import pytest

from cxr_triage.db.repo import ResultFilter, query_studies
from cxr_triage.db.results import records_to_csv, records_to_json, study_record, to_fhir_bundle
from tests.api.conftest import add_study


@pytest.fixture
def studies(session_factory, clock):
    with session_factory() as s:
        add_study(s, received_at=clock.now - timedelta(minutes=2), score=0.91, flagged=True, demo=True,
                  boxes=[(10, 20, 110, 220, 0.8), (300, 40, 400, 140, 0.3)], patient_id="PX", accession="AX")
        add_study(s, received_at=clock.now - timedelta(minutes=1), state="not_analysed", reasons=["not-chest"])
        add_study(s, received_at=clock.now, state="receiving")
    with session_factory() as s:
        yield query_studies(s, filters=ResultFilter(), limit=10)


def test_study_record_phi_and_demo(studies):
    pending, na, flagged = studies
    rec = study_record(flagged, include_phi=True)
    assert rec["patient_id"] == "PX" and rec["accession_number"] == "AX" and rec["study_instance_uid"]
    assert rec["model_note"] == "UNTRAINED DEMO MODEL" and rec["boxes"] == 2 and rec["n_analysed"] == 1
    anon = study_record(flagged, include_phi=False)
    assert not {"patient_id", "patient_name", "accession_number", "study_instance_uid"} & set(anon)
    rec = study_record(na, include_phi=False)
    assert rec["not_analysed_reasons"] == "not-chest" and rec["pneumonia_score"] is None and rec["flagged"] is None
    json.loads(records_to_json([rec]))
    rows = list(csv.DictReader(io.StringIO(records_to_csv([study_record(s, include_phi=False) for s in studies]))))
    assert len(rows) == 3 and rows[2]["flagged"] == "true" and rows[1]["flagged"] == ""
    assert records_to_csv([]).startswith("id,")


def test_fhir_bundle_shape(studies):
    bundle = to_fhir_bundle(studies, include_phi=True)
    assert bundle["resourceType"] == "Bundle" and bundle["type"] == "collection"
    reports = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "DiagnosticReport"]
    assert len(reports) == 3
    urls = {e["fullUrl"] for e in bundle["entry"]}
    for rep in reports:
        assert rep["status"] in ("final", "preliminary") and rep["code"]["coding"][0]["code"] == "18748-4"
        assert rep["imagingStudy"][0]["identifier"]["value"].startswith("urn:oid:")
        for ref in rep.get("result", []):
            assert ref["reference"] in urls
    flagged = next(r for r in reports if "result" in r)
    assert len(flagged["result"]) == 3 and flagged["subject"]["identifier"]["value"] == "PX"
    na = next(r for r in reports if "NOT ANALYSED" in r["conclusion"])
    assert "not a negative" in na["conclusion"]
    obs = [e["resource"] for e in bundle["entry"] if e["resource"]["resourceType"] == "Observation"]
    box = next(o for o in obs if o["code"]["coding"][0]["code"] == "lung-opacity")
    assert box["bodySite"]["coding"][0]["code"] == "39607008" and len(box["component"]) == 4
    anon = json.dumps(to_fhir_bundle(studies, include_phi=False))
    assert "PX" not in anon and "urn:oid:" not in anon and "subject" not in anon


def test_fhir_validates_with_fhir_resources(studies):
    import fhir.resources.R4B.bundle as r4
    bundle = r4.Bundle.model_validate(to_fhir_bundle(studies, include_phi=True))
    assert len(bundle.entry) == 3 + 3
