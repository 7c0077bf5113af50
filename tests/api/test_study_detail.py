"""Study detail (API and page): per-stage durations and the SR delivery status per destination."""

from __future__ import annotations

import re
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.db.tables import OutboxItem, StructuredReport
from tests.api.conftest import add_study, auth


def _seed(session_factory: sessionmaker[Session], now: Any) -> dict[str, int]:
    """One analysed image (stages 1 s apart, see add_study), two SR revisions, three destinations."""
    with session_factory() as s:
        study = add_study(s, received_at=now, score=0.8, flagged=True)
        stored = now + timedelta(seconds=4)
        old = StructuredReport(study_pk=study.id, model_version="cxr-demo@1", revision=1, sop_instance_uid="2.25.11",
                               series_instance_uid="2.25.12", instance_pks=[study.instances[0].id], file_name="a.dcm",
                               created_at=stored + timedelta(seconds=10))
        old.outbox = [OutboxItem(destination="PACS@pacs:104", state="sent", attempts=1, next_attempt_at=now,
                                 created_at=old.created_at, sent_at=old.created_at + timedelta(seconds=2),
                                 last_status=0)]
        new = StructuredReport(study_pk=study.id, model_version="cxr-demo@1", revision=2, sop_instance_uid="2.25.21",
                               series_instance_uid="2.25.22", instance_pks=[study.instances[0].id], file_name="b.dcm",
                               created_at=stored + timedelta(seconds=30))
        new.outbox = [
            OutboxItem(destination="PACS@pacs:104", state="sent", attempts=2, next_attempt_at=now,
                       created_at=new.created_at, sent_at=new.created_at + timedelta(milliseconds=250),
                       last_status=0),
            OutboxItem(destination="ARCHIVE@arch:11112", state="failed", attempts=5, next_attempt_at=now,
                       created_at=new.created_at, last_status=0xA700, last_error="out of resources"),
            OutboxItem(destination="VIEWER@view:4242", state="pending", attempts=0, next_attempt_at=now,
                       created_at=new.created_at),
        ]
        s.add_all([old, new])
        s.commit()
        return {"study": study.id, "instance": study.instances[0].id, "old": old.id, "new": new.id}


def test_api_durations_and_delivery_per_destination(client: Any, users: dict[str, str],
                                                    session_factory: sessionmaker[Session], clock: Any) -> None:
    ids = _seed(session_factory, clock.now)
    d = client.get(f"/api/studies/{ids['study']}", headers=auth(users["radiologist"])).json()
    [inst] = d["instances"]
    assert inst["durations_s"] == {"received_to_queued": 1.0, "queued_to_started": 1.0, "started_to_inferred": 1.0,
                                   "inferred_to_stored": 1.0, "received_to_stored": 4.0}
    assert [r["built_after_stored_s"] for r in d["reports"]] == [10.0, 30.0]
    # The newest revision's delivery, once per destination, sorted by destination.
    got = [(o["destination"], o["revision"], o["state"], o["attempts"], o["last_status"],
            o["acknowledged_after_built_s"]) for o in d["sr_delivery"]]
    assert got == [
        ("ARCHIVE@arch:11112", 2, "failed", 5, 0xA700, None),
        ("PACS@pacs:104", 2, "sent", 2, 0, 0.25),
        ("VIEWER@view:4242", 2, "pending", 0, None, None),
    ]
    assert all(o["report_id"] == ids["new"] for o in d["sr_delivery"])


def test_pending_image_has_open_durations(client: Any, users: dict[str, str],
                                          session_factory: sessionmaker[Session], clock: Any) -> None:
    with session_factory() as s:
        sid = add_study(s, received_at=clock.now, state="receiving").id  # queued + started, nothing stored yet
    d = client.get(f"/api/studies/{sid}", headers=auth(users["radiologist"])).json()
    assert d["instances"][0]["durations_s"] == {"received_to_queued": 1.0, "queued_to_started": 1.0,
                                                "started_to_inferred": None, "inferred_to_stored": None,
                                                "received_to_stored": None}
    assert d["sr_delivery"] == [] and d["reports"] == []


def _text(html: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", html))


def test_page_shows_durations_and_delivery_status(client: Any, users: dict[str, str],
                                                  session_factory: sessionmaker[Session], clock: Any) -> None:
    ids = _seed(session_factory, clock.now)
    html = client.get(f"/studies/{ids['study']}", headers=auth(users["radiologist"])).text
    timings = html[html.index('id="timings"'):html.index("</table>", html.index('id="timings"'))]
    row = _text(timings[timings.index(f'data-instance-id="{ids["instance"]}"'):])
    assert f"#{ids['instance']} 08:00:00 1.0 s 1.0 s 1.0 s 1.0 s 4.0 s" in row, row
    deliveries = html[html.index('id="deliveries"'):html.index("</table>", html.index('id="deliveries"'))]
    rows = {m.group(1): _text(m.group(2)) for m in
            re.finditer(r'<tr data-destination="([^"]+)">(.*?)</tr>', deliveries, re.S)}
    assert set(rows) == {"PACS@pacs:104", "ARCHIVE@arch:11112", "VIEWER@view:4242"}
    assert "sent (0x0000)" in rows["PACS@pacs:104"] and "+250 ms" in rows["PACS@pacs:104"]
    assert "+30.0 s after result" in rows["PACS@pacs:104"]
    assert "failed (0xA700)" in rows["ARCHIVE@arch:11112"] and "out of resources" in rows["ARCHIVE@arch:11112"]
    assert "pending" in rows["VIEWER@view:4242"] and "rev 2" in rows["VIEWER@view:4242"]
    assert "2 SR revisions" in html
