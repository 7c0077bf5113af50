"""The whole service as a user runs it (`cxr-triage up`), fed by DCMTK storescu, answering to a real DCMTK
storescp and a real Orthanc: every SR that arrives must validate with dciodvfy and open with highdicom."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import highdicom as hd
import httpx
import pydicom
import pytest

from cxr_triage.dicom_node.netutil import free_port, wait_for_port
from tests.dicomize import DICOM_FILES, nih_pngs, png_to_dx
from tests.integration.service import storescu, wait_until
from tests.peers import orthanc_get, run_orthanc, run_storescp, storescp_receptions, storescp_receptions_log

pytestmark = pytest.mark.slow

N_NIH = 6


def dciodvfy_errors(path: Path) -> list[str]:
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def test_up_receives_analyses_and_reports_to_two_pacs(tmp_path: Path, demo_models_cache: Path) -> None:
    inputs = sorted(DICOM_FILES.glob("*.dcm")) + [png_to_dx(p, tmp_path / "in") for p in nih_pngs(N_NIH)]
    # In scope and analysable: the SC file, one of the conflicting SIIM pair, the J2K CR, and the NIH images;
    # the veterinary lateral is recorded as not analysed and gets no SR.
    expected_studies = {str(pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID) for f in inputs
                        if "veterinary" not in f.name}
    with run_storescp(tmp_path / "scp", ae="PACS", log_receptions=True) as (host, scp_port, scp_out), run_orthanc(
        tmp_path / "orthanc"
    ) as (
        orthanc_dicom, orthanc_http
    ):
        dicom_port, api_port = free_port(), free_port()
        env = dict(
            os.environ,
            CXR_DATA_DIR=str(tmp_path / "var"),
            CXR_DICOM_PORT=str(dicom_port),
            CXR_API_PORT=str(api_port),
            CXR_PACS=f"PACS@{host}:{scp_port},ORTHANC@127.0.0.1:{orthanc_dicom}",
            CXR_DEMO_MODELS="1",
            CXR_MODELS_DIR=str(demo_models_cache),
            CXR_STUDY_STABLE_SECONDS="1",
            CXR_DISK_RESERVE_MB="64",
            PYTHONUNBUFFERED="1",
        )
        env.pop("CXR_REDIS_URL", None)
        env.pop("CXR_DATABASE_URL", None)
        log = open(tmp_path / "up.log", "wb")
        up = subprocess.Popen([sys.executable, "-m", "cxr_triage", "up"], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            assert wait_for_port("127.0.0.1", dicom_port, timeout=120), (tmp_path / "up.log").read_text()
            results = storescu(dicom_port, inputs)
            assert all(r.returncode == 0 for r in results), [r.stdout for r in results]

            def arrived() -> list[Path]:
                return [p for p in scp_out.rglob("*") if p.is_file()]

            wait_until(lambda: len(arrived()) >= len(expected_studies), timeout=240, what="SRs at storescp")
            wait_until(lambda: len(orthanc_get(orthanc_http, "/instances")) >= len(expected_studies), timeout=60,
                       what="SRs at Orthanc")
            srs = [pydicom.dcmread(p) for p in arrived()]
            assert {str(ds.StudyInstanceUID) for ds in srs} == expected_studies
            assert len(srs) == len(expected_studies), "exactly one SR per study"
            for path, ds in zip(arrived(), srs, strict=True):
                assert ds.Modality == "SR"
                assert dciodvfy_errors(path) == [], path
                report = hd.sr.srread(path)
                assert "UNTRAINED DEMO MODEL" in str(ds.ContentSequence) or "UNTRAINED DEMO MODEL" in str(report)
                assert report.PatientID == ds.PatientID
            orthanc_uids = {orthanc_get(orthanc_http, f"/instances/{i}/simplified-tags")["SOPInstanceUID"]
                            for i in orthanc_get(orthanc_http, "/instances")}
            assert orthanc_uids == {str(ds.SOPInstanceUID) for ds in srs}
            # Exactly one C-STORE per SR UID reached storescp (files alone would hide a resend: same name).
            receptions = storescp_receptions_log(tmp_path / "scp", scp_port)
            wait_until(lambda: set(storescp_receptions(receptions)) == orthanc_uids, timeout=30,
                       what="storescp reception log")
            assert set(storescp_receptions(receptions).values()) == {1}, storescp_receptions(receptions)

            query = subprocess.run([sys.executable, "-m", "cxr_triage", "query", "--format", "json", "--limit", "1000"],
                                   env=env, capture_output=True, text=True, timeout=60)
            assert query.returncode == 0, query.stderr
            rows = json.loads(query.stdout)
            states = sorted(r["state"] for r in rows)
            assert states.count("analysed") == len(expected_studies)
            assert states.count("not_analysed") == 1  # the veterinary lateral
            assert all(r["model_note"] == "UNTRAINED DEMO MODEL" for r in rows if r["state"] == "analysed")

            # The web API of the same running service gives the same answers, and an admin re-send really
            # sends the same SR object again through the deliver worker.
            cli = [sys.executable, "-m", "cxr_triage", "users"]
            made = subprocess.run([*cli, "create", "admin", "--role", "admin", "--password", "s3cret-pass-word"],
                                  env=env, capture_output=True, text=True, timeout=60)
            assert made.returncode == 0, made.stderr
            token = subprocess.run([*cli, "token", "admin"], env=env, capture_output=True, text=True, timeout=60)
            assert token.returncode == 0, token.stderr
            auth = {"Authorization": f"Bearer {token.stdout.strip().splitlines()[-1]}"}
            base = f"http://127.0.0.1:{api_port}"
            assert wait_for_port("127.0.0.1", api_port, timeout=60)
            assert httpx.get(f"{base}/api/worklist").status_code == 401
            api_rows = httpx.get(f"{base}/api/results", params={"limit": 1000}, headers=auth, timeout=30).json()
            api_items = api_rows["items"] if isinstance(api_rows, dict) else api_rows
            assert sorted(r["state"] for r in api_items) == states
            worklist = httpx.get(f"{base}/api/worklist", headers=auth, timeout=30)
            assert worklist.status_code == 200
            reports = httpx.get(f"{base}/api/admin/reports", headers=auth, timeout=30).json()
            report_list = reports["items"] if isinstance(reports, dict) else reports
            first = report_list[0]
            before = _attempts(env, first["id"])
            r = httpx.post(f"{base}/api/admin/reports/{first['id']}/resend", headers=auth, timeout=30)
            assert r.status_code == 200, r.text
            wait_until(lambda: _attempts(env, first["id"]) > before, timeout=60, what="SR re-sent")
            assert len(arrived()) == len(expected_studies)  # same SR UID: the PACS replaced, not added
        finally:
            up.send_signal(signal.SIGINT)
            try:
                code = up.wait(timeout=60)
            except subprocess.TimeoutExpired:
                up.kill()
                code = -9
            log.close()
        assert code == 0, (tmp_path / "up.log").read_text()[-5000:]


def _attempts(env: dict[str, str], report_id: int) -> int:
    from sqlalchemy import func, select

    from cxr_triage.db.session import make_engine, make_session_factory
    from cxr_triage.db.tables import OutboxItem

    url = f"sqlite:///{Path(env['CXR_DATA_DIR']).resolve() / 'cxr-triage.sqlite3'}"
    engine = make_engine(url)
    try:
        with make_session_factory(engine)() as s:
            return s.scalar(select(func.sum(OutboxItem.attempts)).where(OutboxItem.report_pk == report_id)) or 0
    finally:
        engine.dispose()
