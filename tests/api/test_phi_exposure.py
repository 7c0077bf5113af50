"""PHI stays out of URLs and out of browser/proxy caches; times on the query page are labelled UTC."""

from __future__ import annotations

import csv
import hashlib
import io
import re
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.db.tables_auth import AuditEvent
from tests.api.conftest import T0, add_study, auth


def _login(client: Any, username: str, password: str) -> str:
    page = client.get("/login").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    r = client.post("/login", data={"username": username, "password": password, "csrf_token": csrf},
                    follow_redirects=False)
    assert r.status_code == 303
    return re.search(r'name="csrf-token" content="([^"]+)"', client.get("/").text).group(1)  # type: ignore[union-attr]


def test_query_page_posts_phi_filters_with_csrf(client: Any, users: dict[str, str],
                                                session_factory: sessionmaker[Session]) -> None:
    with session_factory() as s:
        a = add_study(s, received_at=T0 - timedelta(hours=1), score=0.9, flagged=True, patient_id="P-A",
                      accession="A1").id
        add_study(s, received_at=T0, score=0.2, flagged=False, patient_id="P-B", accession="B1")
    csrf = _login(client, "radiologist1", "radiologist-password")
    page = client.get("/query").text
    form = re.search(r"<form[^>]*id=\"query-form\"[^>]*>", page).group(0)  # type: ignore[union-attr]
    assert 'method="post"' in form and 'action="/query/export"' in form
    assert f'name="csrf_token" value="{csrf}"' in page
    assert "Received from (UTC)" in page and "until (UTC)" in page

    # Empty fields mean "no filter" (as a browser without the page script sends them).
    fields = {"patient_id": "P-A", "accession_number": "", "since": "2026-01-05T06:30", "until": "",
              "min_score": "", "max_score": "", "flagged": "", "state": "", "model_version": "", "format": "csv",
              "limit": "1000"}
    refused = client.post("/query/export", data=fields)
    assert refused.status_code == 403  # cookie session without the CSRF token
    r = client.post("/query/export", data={**fields, "csrf_token": csrf})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    assert "P-A" not in str(r.url) and r.url.path == "/query/export"
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert [int(row["id"]) for row in rows] == [a] and rows[0]["patient_id"] == "P-A"
    # datetime-local values are naive: read as UTC (07:00 UTC received, 06:30 bound).
    late = client.post("/query/export", data={**fields, "since": "2026-01-05T07:30", "csrf_token": csrf})
    assert list(csv.DictReader(io.StringIO(late.text))) == []
    bad = client.post("/query/export", data={**fields, "min_score": "2", "csrf_token": csrf})
    assert bad.status_code == 422

    with session_factory() as s:
        exports = list(s.scalars(select(AuditEvent).where(AuditEvent.event_code == "110106").order_by(AuditEvent.id)))
    assert [e.detail["via"] for e in exports] == ["page", "page"]
    assert exports[0].detail["filters"] == ["patient_id", "since"] and exports[0].detail["studies"] == [a]
    assert all("P-A" not in repr(e.detail) for e in exports)


def test_phi_bearing_responses_are_not_cached(client: Any, users: dict[str, str], settings: Any,
                                              session_factory: sessionmaker[Session], clock: Any,
                                              shared_data: Path) -> None:
    dicom = shared_data / "dicom" / "siim-cr-pa-monochrome1.dcm"
    digest = hashlib.sha256(dicom.read_bytes()).hexdigest()
    name = f"{digest[:2]}/{digest}.dcm"
    (settings.spool_dir / digest[:2]).mkdir(parents=True)
    shutil.copyfile(dicom, settings.spool_dir / name)
    with session_factory() as s:
        study = add_study(s, received_at=clock.now, score=0.7, flagged=True, spool_name=name)
        sid, iid = study.id, study.instances[0].id
    tok = auth(users["radiologist"])
    image = client.get(f"/api/instances/{iid}/image", headers=tok)
    assert image.status_code == 200 and image.headers["content-type"] == "image/png"
    assert image.content[:8] == b"\x89PNG\r\n\x1a\n"
    assert image.headers["cache-control"] == "no-store"
    for url in ("/", "/worklist/rows", f"/studies/{sid}", "/query", "/api/results", "/api/worklist",
                "/api/results/export?format=json", f"/api/studies/{sid}"):
        r = client.get(url, headers=tok)
        assert r.status_code == 200, url
        assert r.headers["cache-control"] == "no-store", url
    assert "no-store" not in client.get("/static/app.css").headers.get("cache-control", "")
