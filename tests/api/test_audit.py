"""The audit trail records what was returned, not just that something was asked (PS3.15 A.5), and sign-in/out."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.db.tables import Study
from cxr_triage.db.tables_auth import AuditEvent
from tests.api.conftest import T0, add_study, auth


def _events(session_factory: sessionmaker[Session], code: str) -> list[AuditEvent]:
    with session_factory() as s:
        return list(s.scalars(select(AuditEvent).where(AuditEvent.event_code == code).order_by(AuditEvent.id)))


def test_results_query_records_the_returned_study_ids(client: Any, users: dict[str, str],
                                                      session_factory: sessionmaker[Session]) -> None:
    with session_factory() as s:
        a = add_study(s, received_at=T0 - timedelta(hours=2), score=0.9, flagged=True).id
        b = add_study(s, received_at=T0 - timedelta(hours=1), score=0.2, flagged=False).id
        add_study(s, received_at=T0, state="failed", reasons=["decode-failed"])
    r = client.get("/api/results", params={"min_score": 0.1, "patient_id": "PAT1"}, headers=auth(users["radiologist"]))
    assert r.status_code == 200 and [i["id"] for i in r.json()["items"]] == [b, a]
    [event] = _events(session_factory, "110112")
    assert (event.event_name, event.action, event.username, event.role) == ("Query", "E", "radiologist1", "radiologist")
    # Filter names, never their values (a patient ID is PHI).
    assert event.detail == {"filters": ["min_score", "patient_id"], "studies": [b, a], "count": 2, "phi": True}
    assert "PAT1" not in repr(event.detail)


def test_export_records_every_exported_id_beyond_1000(client: Any, users: dict[str, str],
                                                      session_factory: sessionmaker[Session]) -> None:
    n = 1005
    with session_factory() as s:  # bare study rows, one commit: enough for the query and quick on both backends
        s.add_all([Study(study_instance_uid=f"1.2.826.0.1.77.{i}", received_at=T0 - timedelta(seconds=i),
                         last_received_at=T0 - timedelta(seconds=i), state="receiving") for i in range(n)])
        s.commit()
        expected = list(s.scalars(select(Study.id).order_by(Study.received_at.desc(), Study.id.desc())))
    r = client.get("/api/results/export", params={"format": "json", "limit": 2000}, headers=auth(users["service"]))
    assert r.status_code == 200 and len(r.json()) == n
    [event] = _events(session_factory, "110106")
    assert event.action == "R" and event.detail["count"] == n
    assert event.detail["studies"] == expected  # all of them, in export order: no silent truncation
    assert event.detail["phi"] is False and event.detail["via"] == "api"


def _sign_in(client: Any, username: str, password: str) -> int:
    page = client.get("/login").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    return client.post("/login", data={"username": username, "password": password, "csrf_token": csrf},
                       follow_redirects=False).status_code


def test_login_and_logout_are_user_authentication_events(client: Any, users: dict[str, str],
                                                         session_factory: sessionmaker[Session], clock: Any) -> None:
    assert _sign_in(client, "radiologist1", "wrong-password") == 401
    clock.advance(seconds=1)
    assert _sign_in(client, "radiologist1", "radiologist-password") == 303
    clock.advance(seconds=1)
    home = client.get("/").text
    csrf = re.search(r'name="csrf-token" content="([^"]+)"', home).group(1)  # type: ignore[union-attr]
    r = client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/", follow_redirects=False).status_code == 303  # the session really ended
    # A logout without a session records nothing (there is nobody to log out).
    page = client.get("/login").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)  # type: ignore[union-attr]
    assert client.post("/logout", data={"csrf_token": csrf}, follow_redirects=False).status_code == 303

    got = [(e.event_name, e.action, e.outcome, e.username, e.role, e.detail)
           for e in _events(session_factory, "110114")]
    assert got == [
        ("User Authentication", "E", 4, "radiologist1", None, {"event_type": ["110122", "Login"], "method": "password"}),
        ("User Authentication", "E", 0, "radiologist1", "radiologist",
         {"event_type": ["110122", "Login"], "method": "password"}),
        ("User Authentication", "E", 0, "radiologist1", "radiologist",
         {"event_type": ["110123", "Logout"], "method": "session"}),
    ]
