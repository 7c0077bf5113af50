"""HTTP API against SQLite and PostgreSQL: authorisation of every route, ordering, results, export, admin."""

from __future__ import annotations

import csv
import io
import json
import re
from datetime import timedelta
from typing import Any

import pytest
from fastapi.routing import APIRoute
from starlette.routing import Mount

from tests.api.conftest import T0, add_study, auth

PUBLIC = {"/healthz", "/readyz", "/login"}
# Expected roles per route (method, path) -- a new route fails this test until it is listed here.
CLINICAL = {"radiologist", "admin"}
ALL = {"radiologist", "admin", "service"}
ROLES = {
    ("GET", "/"): CLINICAL,
    ("GET", "/worklist/rows"): CLINICAL,
    ("GET", "/studies/{study_id}"): CLINICAL,
    ("GET", "/admin"): {"admin"},
    ("GET", "/query"): CLINICAL,
    ("POST", "/query/export"): CLINICAL,
    ("POST", "/logout"): None,  # CSRF-protected, harmless
    ("GET", "/metrics"): {"service", "admin"},
    ("GET", "/api/worklist"): CLINICAL,
    ("GET", "/api/worklist/events"): CLINICAL,
    ("GET", "/api/studies/{study_id}"): CLINICAL,
    ("GET", "/api/instances/{instance_id}/image"): CLINICAL,
    ("POST", "/api/studies/{study_id}/read"): CLINICAL,
    ("GET", "/api/results"): ALL,
    ("GET", "/api/results/export"): ALL,
    ("GET", "/api/admin/status"): {"admin"},
    ("POST", "/api/admin/studies/{study_id}/requeue"): {"admin"},
    ("POST", "/api/admin/reports/{report_id}/resend"): {"admin"},
    ("GET", "/api/admin/reports"): {"admin"},
    ("GET", "/api/admin/audit"): {"admin"},
    ("GET", "/api/me"): ALL,
    ("GET", "/api/openapi.json"): ALL,
}


def _routes(routes, prefix=""):
    """Every (method, path) the app serves, including routers that FastAPI includes lazily."""
    for route in routes:
        if isinstance(route, Mount):
            assert prefix + route.path == "/static", f"unexpected mount {route.path}"
            continue
        if hasattr(route, "original_router"):  # FastAPI >= 0.16x: included routers stay nested
            ctx_prefix = getattr(getattr(route, "include_context", None), "prefix", "") or ""
            yield from _routes(route.original_router.routes, prefix + ctx_prefix)
            continue
        if isinstance(route, APIRoute) or getattr(route, "methods", None):
            for method in sorted(route.methods - {"HEAD"}):
                yield method, prefix + route.path
        else:
            raise AssertionError(f"unknown route type {type(route).__name__}: cannot check its authorisation")


def _concrete(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "999999", path)


def test_every_route_refuses_anonymous_and_wrong_roles(app, client, users):
    seen = set()
    for method, path in _routes(app.routes):
        seen.add((method, path))
        if path in PUBLIC:
            continue
        assert (method, path) in ROLES, f"route {method} {path} has no authorisation expectation in the test"
        url = _concrete(path)
        r = client.request(method, url, follow_redirects=False)
        # What the app answers an anonymous caller: pages redirect to the login form, the API and /metrics say
        # 401, and logout refuses a request without the session's CSRF token before anything else.
        if (method, path) == ("POST", "/logout"):
            anonymous, bad_token = 403, 403
        elif method == "GET" and not path.startswith("/api/") and path != "/metrics":
            anonymous, bad_token = 303, 401
        else:
            anonymous, bad_token = 401, 401
        assert r.status_code == anonymous, (method, path, r.status_code)
        if anonymous == 303:
            assert r.headers["location"].startswith("/login")
        bad = client.request(method, url, headers={"Authorization": "Bearer nope"}, follow_redirects=False)
        assert bad.status_code == bad_token, (method, path, bad.status_code)
        allowed = ROLES[(method, path)]
        if allowed is None:
            continue
        for role, token in users.items():
            if role in allowed:
                continue
            r = client.request(method, url, headers=auth(token), follow_redirects=False)
            assert r.status_code == 403, (method, path, role, r.status_code)
    assert ("GET", "/api/worklist") in seen and ("GET", "/healthz") in seen


def test_openapi_spec(client, users):
    spec = client.get("/api/openapi.json", headers=auth(users["service"])).json()
    assert "/api/results/export" in spec["paths"]


def test_health_ready_metrics(client, users):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["database"] is True
    assert client.get("/metrics").status_code == 401
    r = client.get("/metrics", headers=auth(users["service"]))
    assert r.status_code == 200
    assert "cxr_stage_latency_seconds" in r.text and "cxr_instances" in r.text


def test_metrics_latency_from_db(client, users, session_factory, clock):
    with session_factory() as s:
        add_study(s, received_at=clock.now - timedelta(minutes=5), score=0.5, flagged=False)
    text = client.get("/metrics", headers=auth(users["admin"])).text
    # total = stored - received = 4 s in the seed
    assert re.search(r'cxr_stage_latency_seconds_gcount\{stage="total"\} 1\.0', text), text
    assert 'cxr_stage_latency_seconds_bucket{le="5.0",stage="total"} 1.0' in text


def test_worklist_order_score_urgency_and_ageing(client, users, session_factory, clock):
    with session_factory() as s:
        low = add_study(s, received_at=clock.now - timedelta(minutes=10), score=0.10, flagged=False).id
        high = add_study(s, received_at=clock.now - timedelta(minutes=5), score=0.91, flagged=True).id
        mid = add_study(s, received_at=clock.now - timedelta(minutes=3), score=0.40, flagged=False).id
        stat = add_study(s, received_at=clock.now - timedelta(minutes=1), urgency="STAT", score=0.05, flagged=False).id
        na = add_study(s, received_at=clock.now - timedelta(minutes=2), state="not_analysed",
                       reasons=["not-frontal-view"]).id
        add_study(s, received_at=clock.now - timedelta(minutes=20), score=0.99, flagged=True, read_at=clock.now)
    tok = auth(users["radiologist"])
    items = client.get("/api/worklist", headers=tok).json()["items"]
    assert [i["study_id"] for i in items] == [stat, high, na, mid, low]
    assert "suspected pneumonia 0.91" in items[1]["reasons"]
    assert items[0]["reasons"][0] == "STAT"
    assert any("not-frontal-view" in r for r in items[2]["reasons"])
    assert items[2]["score"] is None and items[2]["state"] == "not_analysed"

    # 231 min later the routine low-score study has waited 241 min > its 240 min cap. Read the others and add
    # fresh STAT and flagged studies: the overdue routine study is still promoted above them.
    clock.advance(minutes=231)
    for sid in (stat, high, na):
        assert client.post(f"/api/studies/{sid}/read", headers=tok).status_code == 200
    with session_factory() as s:
        stat2 = add_study(s, received_at=clock.now, urgency="STAT", score=0.05, flagged=False).id
        flag2 = add_study(s, received_at=clock.now, score=0.95, flagged=True).id
    items = client.get("/api/worklist", headers=tok).json()["items"]
    assert [i["study_id"] for i in items] == [low, stat2, flag2, mid]
    assert items[0]["overdue"] and items[0]["tier_name"] == "overdue"
    assert re.match(r"waited 4\.0 h > 4\.0 h cap for routine", items[0]["reasons"][0]), items[0]["reasons"]
    assert not items[3]["overdue"]  # mid has waited 234 min < 240

    # Marking read removes it from the worklist.
    r = client.post(f"/api/studies/{low}/read", headers=tok)
    assert r.status_code == 200 and r.json()["read_by"] == "radiologist1"
    ids = [i["study_id"] for i in client.get("/api/worklist", headers=tok).json()["items"]]
    assert low not in ids
    r = client.post(f"/api/studies/{low}/read", headers=tok, json={"read": False})
    assert r.json()["read_at"] is None
    assert client.post("/api/studies/424242/read", headers=tok).status_code == 404


def test_study_detail_and_audit(client, users, session_factory, clock):
    with session_factory() as s:
        sid = add_study(s, received_at=clock.now, score=0.8, flagged=True, demo=True,
                        boxes=[(10, 20, 300, 400, 0.7)], heatmap=[[0.1, 0.9], [0.2, 0.3]]).id
    d = client.get(f"/api/studies/{sid}", headers=auth(users["radiologist"])).json()
    assert d["study"]["patient_id"] == "PAT1" and d["study"]["model_note"] == "UNTRAINED DEMO MODEL"
    inst = d["instances"][0]
    assert inst["analysis"]["boxes"][0]["x1"] == 300 and inst["analysis"]["heatmap"][0][1] == 0.9
    assert inst["timings"]["stored_at"]
    audit = client.get("/api/admin/audit", headers=auth(users["admin"])).json()["items"]
    assert any(e["event_code"] == "110103" and e["study_id"] == sid and e["username"] == "radiologist1" for e in audit)
    assert client.get("/api/studies/777777", headers=auth(users["admin"])).status_code == 404


def test_results_query_phi_and_exports(client, users, session_factory, clock):
    with session_factory() as s:
        a = add_study(s, received_at=T0 - timedelta(days=1), score=0.9, flagged=True, boxes=[(1, 2, 3, 4, 0.5)],
                      patient_id="P-A", accession="A1").id
        b = add_study(s, received_at=T0 - timedelta(hours=1), score=0.2, flagged=False, patient_id="P-B",
                      accession="=cmd()").id
        c = add_study(s, received_at=T0, state="failed", reasons=["decode-failed"], patient_id="P-C").id
    rad, svc = auth(users["radiologist"]), auth(users["service"])
    r = client.get("/api/results", headers=rad).json()
    assert [i["id"] for i in r["items"]] == [c, b, a]
    assert r["items"][0]["patient_id"] == "P-C" and r["items"][0]["not_analysed_reasons"] == "decode-failed"
    assert r["items"][0]["pneumonia_score"] is None and r["items"][0]["flagged"] is None
    assert [i["id"] for i in client.get("/api/results?flagged=true", headers=rad).json()["items"]] == [a]
    assert [i["id"] for i in client.get("/api/results?min_score=0.1&max_score=0.5", headers=rad).json()["items"]] == [b]
    assert [i["id"] for i in client.get("/api/results?state=failed", headers=rad).json()["items"]] == [c]
    assert [i["id"] for i in client.get("/api/results?patient_id=P-A", headers=rad).json()["items"]] == [a]
    since = (T0 - timedelta(hours=2)).isoformat()
    got = client.get("/api/results", params={"since": since}, headers=rad).json()["items"]
    assert [i["id"] for i in got] == [c, b]
    page = client.get("/api/results?limit=1&offset=1", headers=rad).json()
    assert [i["id"] for i in page["items"]] == [b]
    # the total counts every match across pages, with the filters applied
    assert (page["count"], page["total"]) == (1, 3)
    assert client.get("/api/results?flagged=true&limit=1", headers=rad).json()["total"] == 1
    assert client.get("/api/results", params={"since": since, "offset": 5}, headers=rad).json()["total"] == 2
    # naive datetimes are taken as UTC
    assert len(client.get("/api/results?since=2026-01-05T07:30:00", headers=rad).json()["items"]) == 1

    # service: no PHI, may not filter by PHI
    items = client.get("/api/results", headers=svc).json()["items"]
    assert all("patient_id" not in i and "study_instance_uid" not in i for i in items)
    assert client.get("/api/results?patient_id=P-A", headers=svc).status_code == 403

    text = client.get("/api/results/export?format=csv", headers=rad).text
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["accession_number"] for r in rows} >= {"A1", "'=cmd()"}  # formula injection neutralised
    text = client.get("/api/results/export?format=csv", headers=svc).text
    assert "patient_id" not in text.splitlines()[0] and "P-A" not in text
    js = json.loads(client.get("/api/results/export?format=json", headers=rad).text)
    assert len(js) == 3
    bundle = client.get("/api/results/export?format=fhir", headers=svc).json()
    assert bundle["resourceType"] == "Bundle" and "P-A" not in json.dumps(bundle)
    audit = client.get("/api/admin/audit", headers=auth(users["admin"])).json()["items"]
    codes = {e["event_code"] for e in audit}
    assert {"110106", "110112"} <= codes
    exports = [e for e in audit if e["event_code"] == "110106"]
    assert all("P-A" not in json.dumps(e) for e in exports)


def test_admin_status_and_actions(client, users, session_factory, clock, actions):
    from cxr_triage.db.tables import OutboxItem, StructuredReport

    with session_factory() as s:
        failed = add_study(s, received_at=clock.now - timedelta(minutes=3), state="failed",
                           reasons=["quarantined after 3 attempts"])
        ok = add_study(s, received_at=clock.now - timedelta(minutes=2), score=0.3, flagged=False)
        rep = StructuredReport(study_pk=ok.id, model_version="cxr-demo@1", revision=1, sop_instance_uid="2.25.1",
                               series_instance_uid="2.25.2", instance_pks=[ok.instances[0].id], file_name="x.dcm",
                               created_at=clock.now - timedelta(minutes=1))
        rep.outbox = [OutboxItem(destination="PACS@h:104", state="failed", attempts=3, next_attempt_at=clock.now,
                                 created_at=clock.now - timedelta(minutes=1), last_status=0xA700)]
        s.add(rep)
        s.commit()
        failed_id, rep_id, failed_inst = failed.id, rep.id, failed.instances[0].id
    adm = auth(users["admin"])
    st = client.get("/api/admin/status", headers=adm).json()
    assert st["errors"]["failed_total"] == 1 and st["throughput"]["analysed_last_5_min"] == 1
    assert st["not_analysed"][0]["study_id"] == failed_id
    assert st["oldest_unsent_sr"] is None  # failed, not pending
    r = client.post(f"/api/admin/studies/{failed_id}/requeue", headers=adm)
    assert r.status_code == 200 and actions.requeued == [[failed_inst]]
    assert r.json() == {"study_id": failed_id, "instance_ids": [failed_inst]}
    r = client.post(f"/api/admin/reports/{rep_id}/resend", headers=adm)
    assert r.status_code == 200 and actions.resent == [rep_id]
    st = client.get("/api/admin/status", headers=adm).json()
    assert st["oldest_unsent_sr"]["age_s"] == pytest.approx(60)
    assert st["queue"]["received"] == 1  # the quarantined image was reset for another try
    assert client.post("/api/admin/reports/5555/resend", headers=adm).status_code == 404
    assert client.post("/api/admin/studies/5555/requeue", headers=adm).status_code == 404
    assert client.get("/admin", headers=adm).status_code == 200

    from cxr_triage.db.tables_auth import AuditEvent
    from sqlalchemy import select

    with session_factory() as s:
        rows = s.scalars(select(AuditEvent).where(AuditEvent.detail["action"].as_string().in_(["requeue", "resend"]))
                         .order_by(AuditEvent.id)).all()
        got = [(e.event_code, e.event_name, e.action, e.username, e.study_pk, e.detail) for e in rows]
    assert got == [
        ("110103", "DICOM Instances Accessed", "U", "admin1", failed_id,
         {"action": "requeue", "instances": [failed_inst]}),
        ("110102", "Begin Transferring DICOM Instances", "E", "admin1", ok.id,
         {"action": "resend", "report": rep_id, "outbox": [rep.outbox[0].id]}),
    ]


def test_requeue_of_out_of_scope_study_says_nothing_to_do(client, users, session_factory, clock, actions):
    """Out-of-scope images would be refused by the worker's claim: no button, and the API says so (409)."""
    with session_factory() as s:
        na = add_study(s, received_at=clock.now, state="not_analysed", reasons=["not-chest"]).id
        failed = add_study(s, received_at=clock.now, state="failed", reasons=["decode-failed"]).id
    adm = auth(users["admin"])
    r = client.post(f"/api/admin/studies/{na}/requeue", headers=adm)
    assert r.status_code == 409 and "nothing to re-queue" in r.json()["detail"]
    assert actions.requeued == []
    page = client.get("/admin", headers=adm).text
    assert f'data-url="/api/admin/studies/{failed}/requeue"' in page
    assert f'data-url="/api/admin/studies/{na}/requeue"' not in page


def test_admin_actions_unconfigured_answer_404_before_503(settings, session_factory, clock, users):
    from fastapi.testclient import TestClient

    from cxr_triage.api.app import create_app
    from tests.api.conftest import _api_settings

    app = create_app(settings, session_factory=session_factory, actions=None, clock=clock,
                     api_settings=_api_settings())
    with session_factory() as s:
        failed = add_study(s, received_at=clock.now, state="failed", reasons=["decode-failed"]).id
    adm = auth(users["admin"])
    with TestClient(app) as c:
        assert c.post("/api/admin/reports/5555/resend", headers=adm).status_code == 404
        assert c.post("/api/admin/studies/5555/requeue", headers=adm).status_code == 404
        r = c.post(f"/api/admin/studies/{failed}/requeue", headers=adm)
        assert r.status_code == 503
    with session_factory() as s:  # the 503 changed nothing: the study is still quarantined
        from cxr_triage.db.tables import Study

        assert s.get(Study, failed).state == "failed"


def test_login_session_csrf_and_pages(client, users, session_factory, clock):
    with session_factory() as s:
        sid = add_study(s, received_at=clock.now, score=0.8, flagged=True).id
    r = client.get("/", follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    page = client.get("/login").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    bad = client.post("/login", data={"username": "radiologist1", "password": "wrong", "csrf_token": csrf})
    assert bad.status_code == 401
    no_csrf = client.post("/login", data={"username": "radiologist1", "password": "radiologist-password"})
    assert no_csrf.status_code == 403
    page = client.get("/login").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    r = client.post("/login", data={"username": "radiologist1", "password": "radiologist-password",
                                    "csrf_token": csrf, "next": "//evil.example/x"}, follow_redirects=False)
    assert r.status_code == 303 and r.headers["location"] == "/"
    home = client.get("/")
    assert home.status_code == 200 and f'data-study-id="{sid}"' in home.text
    assert client.get(f"/studies/{sid}").status_code == 200
    assert client.get("/admin", follow_redirects=False).status_code == 403
    # cookie-authenticated POST without the CSRF header is refused; with it, accepted
    assert client.post(f"/api/studies/{sid}/read").status_code == 403
    token = re.search(r'name="csrf-token" content="([^"]+)"', home.text).group(1)
    assert client.post(f"/api/studies/{sid}/read", headers={"X-CSRF-Token": token}).status_code == 200
    audit = client.get("/api/admin/audit", headers=auth(users["admin"])).json()["items"]
    logins = [e for e in audit if e["event_code"] == "110114"]
    assert {e["outcome"] for e in logins} == {0, 4}


def test_image_render_missing_file_is_422(client, users, session_factory, clock):
    with session_factory() as s:
        inst = add_study(s, received_at=clock.now, score=0.5, flagged=False, spool_name="../../etc/passwd").instances[0].id
    r = client.get(f"/api/instances/{inst}/image", headers=auth(users["radiologist"]))
    assert r.status_code == 422


def test_study_detail_shows_every_model_card_of_a_combined_version(
    client: Any, session_factory: Any, users: dict[str, str], clock: Any, settings: Any
) -> None:
    import json

    models = settings.models_path
    models.mkdir(parents=True, exist_ok=True)
    for name, version, task in (("cls-a", "1", "classification"), ("det-b", "2", "detection")):
        (models / f"{name}.card.json").write_text(json.dumps({"name": name, "version": version, "task": task,
                                                              "weights": {"sha256": "ab" * 32}}))
    with session_factory() as s:
        sid = add_study(s, received_at=clock.now, score=0.4, flagged=False, model_version="cls-a@1+det-b@2").id
        s.commit()
    body = client.get(f"/api/studies/{sid}", headers=auth(users["radiologist"])).json()
    assert [c["name"] for c in body["model_cards"]] == ["cls-a", "det-b"]


def test_password_guessing_is_throttled_per_user_and_the_lock_expires(client, users, clock):
    """5 wrong passwords for a user name within 15 min: the 6th attempt, even with the right password, is 429
    without the password being checked; the lock ends once fewer than 5 guesses remain in the window."""

    def sign_in(password: str) -> int:
        page = client.get("/login").text
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
        return client.post("/login", data={"username": "radiologist1", "password": password, "csrf_token": csrf},
                           follow_redirects=False).status_code

    for _ in range(5):
        assert sign_in("guess") == 401
        clock.advance(seconds=30)
    assert sign_in("radiologist-password") == 429
    assert sign_in("guess") == 429
    # Another user is not affected by this user name's lock.
    page = client.get("/login").text
    csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
    other = client.post("/login", data={"username": "admin1", "password": "admin-password", "csrf_token": csrf},
                        follow_redirects=False)
    assert other.status_code == 303
    clock.advance(minutes=12)  # t = 14.5 min: all five guesses are still inside the 15-minute window
    assert sign_in("radiologist-password") == 429
    clock.advance(minutes=1)  # t = 15.5 min: the first guess has left the window, four remain
    assert sign_in("radiologist-password") == 303
    audit = client.get("/api/admin/audit", headers=auth(users["admin"]), params={"limit": 100}).json()["items"]
    outcomes = [e["outcome"] for e in audit if e["event_code"] == "110114" and e["username"] == "radiologist1"]
    assert sorted(outcomes) == sorted([4] * 5 + [8] * 3 + [0])


def test_password_guessing_from_one_address_is_throttled(app, users, clock):
    from fastapi.testclient import TestClient

    app.state.ctx.api_settings.login_max_failures_per_ip = 3  # type: ignore[attr-defined]
    with TestClient(app) as c:
        codes = []
        for name in ("u1", "u2", "u3", "radiologist1"):
            page = c.get("/login").text
            csrf = re.search(r'name="csrf_token" value="([^"]+)"', page).group(1)
            pw = "radiologist-password" if name == "radiologist1" else "x"
            codes.append(c.post("/login", data={"username": name, "password": pw, "csrf_token": csrf},
                                follow_redirects=False).status_code)
    assert codes == [401, 401, 401, 429]


def test_time_outside_the_utc_range_is_422_not_500(client: Any, users: dict[str, str]) -> None:
    """0001-01-01T00:00+14:00 is valid ISO 8601 but falls before year 1 in UTC (OverflowError in Python)."""
    rad = auth(users["radiologist"])
    for params in ({"since": "0001-01-01T00:00:00+14:00"}, {"until": "9999-12-31T23:59:59-14:00"}):
        for url in ("/api/results", "/api/results/export"):
            r = client.get(url, params=params, headers=rad)
            assert r.status_code == 422, (url, params, r.status_code)
            assert "out of range" in r.json()["detail"]
    # The extremes themselves, already in UTC, are fine.
    assert client.get("/api/results", params={"since": "0001-01-01T00:00:00+00:00"}, headers=rad).status_code == 200
