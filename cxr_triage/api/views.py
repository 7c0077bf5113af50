"""Building blocks shared by the JSON API and the pages: worklist rows, study detail, model cards, filters."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from cxr_triage.api.priority import PriorityPolicy, WorklistItem, rank
from cxr_triage.db import worklist
from cxr_triage.db.results import DEMO_NOTE, conclusion_text, current_analyses, not_analysed_reasons, study_record
from cxr_triage.db.tables import Study


def _iso(v: datetime | None) -> str | None:
    return v.isoformat() if v is not None else None


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


# Consecutive pipeline stages of one image, as (name, from, to): the page shows how long each step took.
STAGES = (
    ("received_to_queued", "received_at", "queued_at"),
    ("queued_to_started", "queued_at", "started_at"),
    ("started_to_inferred", "started_at", "inferred_at"),
    ("inferred_to_stored", "inferred_at", "stored_at"),
)


def worklist_rows(session: Session, *, now: datetime, policy: PriorityPolicy) -> list[dict[str, Any]]:
    studies = {s.id: s for s in worklist.unread_studies(session)}
    items = [
        WorklistItem(
            study_id=s.id,
            received_at=s.received_at,
            urgency=s.urgency,
            pneumonia_score=s.pneumonia_score,
            flagged=s.flagged,
            state=s.state,
            not_analysed_reasons=tuple(not_analysed_reasons(s)),
        )
        for s in studies.values()
    ]
    rows = []
    for position, r in enumerate(rank(items, now=now, policy=policy), start=1):
        s = studies[r.study_id]
        rows.append({
            "position": position,
            "study_id": s.id,
            "tier": int(r.tier),
            "tier_name": r.tier_name,
            "overdue": r.overdue,
            "reasons": list(r.reasons),
            "waited_min": round(r.waited_min, 1),
            "max_wait_min": r.max_wait_min,
            "wait_class": r.wait_class,
            "score": r.score,
            "flagged": s.flagged,
            "state": s.state,
            "urgency": s.urgency,
            "received_at": _iso(s.received_at),
            "model_version": s.model_version,
            "demo_model": bool(s.demo_model),
            "accession_number": s.accession_number,
            "patient_id": s.patient_id,
            "patient_name": s.patient_name,
            "study_description": s.study_description,
            "n_images": len(s.instances),
        })
    return rows


def load_model_cards(models_dir: Path) -> list[dict[str, Any]]:
    cards = []
    try:
        paths = sorted(models_dir.glob("*.card.json"))
    except OSError:
        return []
    for path in paths[:200]:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(data, dict):
            cards.append(data)
    return cards


def model_cards_for(models_dir: Path, version: str | None) -> list[dict[str, Any]]:
    """The cards behind a model version; the analyzer's versions join card refs with '+' (classifier+detector)."""
    if not version:
        return []
    whole = model_card_for(models_dir, version)
    if whole is not None:
        return [whole]
    return [c for c in (model_card_for(models_dir, part) for part in version.split("+")) if c is not None]


def model_card_for(models_dir: Path, version: str | None) -> dict[str, Any] | None:
    if not version:
        return None
    for card in load_model_cards(models_dir):
        names = {str(card.get(k)) for k in ("version", "model_version", "id") if card.get(k) is not None}
        if card.get("name") is not None and card.get("version") is not None:
            names.add(f"{card['name']}@{card['version']}")
            names.add(f"{card['name']}-{card['version']}")
            names.add(f"{card['name']}:{card['version']}")
        if version in names:
            return card
    return None


def study_detail(session: Session, study: Study, *, include_phi: bool, models_dir: Path) -> dict[str, Any]:
    record = study_record(study, include_phi=include_phi)
    if include_phi:
        record.update(study_description=study.study_description, study_date=study.study_date,
                      patient_sex=study.patient_sex, patient_birth_date=study.patient_birth_date)
    analyses = {inst.id: a for inst, a in current_analyses(study)}
    instances = []
    for inst in study.instances:
        a = analyses.get(inst.id)
        stamps = {"received_at": inst.received_at, "queued_at": inst.queued_at, "started_at": inst.started_at,
                  "inferred_at": inst.inferred_at, "stored_at": inst.stored_at}
        durations = {name: _seconds(stamps[frm], stamps[to]) for name, frm, to in STAGES}
        # A not-analysed image is stored without inference: its total is still received -> stored.
        durations["received_to_stored"] = _seconds(inst.received_at, inst.stored_at)
        instances.append({
            "id": inst.id,
            "state": inst.state,
            "reason": inst.reason,
            "view_position": inst.view_position,
            "modality": inst.modality,
            "rows": inst.rows,
            "columns": inst.columns,
            "image_url": f"/api/instances/{inst.id}/image",
            "attempts": inst.attempts,
            "timings": {name: _iso(value) for name, value in stamps.items()},
            "durations_s": durations,
            "analysis": None if a is None else {
                "id": a.id,
                "model_version": a.model_version,
                "demo_model": bool(a.demo_model),
                "model_note": DEMO_NOTE if a.demo_model else "",
                "pneumonia_probability": a.pneumonia_probability,
                "flagged": a.flagged,
                "label_probabilities": a.label_probabilities or {},
                "heatmap": a.heatmap,
                "created_at": _iso(a.created_at),
                "boxes": [{"x0": b.x0, "y0": b.y0, "x1": b.x1, "y1": b.y1, "score": b.score} for b in a.boxes],
            },
        })
    last_stored = max((i.stored_at for i in study.instances if i.stored_at is not None), default=None)
    reports = []
    for rep in worklist.study_reports(session, study_id=study.id):
        reports.append({
            "id": rep.id,
            "revision": rep.revision,
            "model_version": rep.model_version,
            "created_at": _iso(rep.created_at),
            # Study stable -> SR built: how long after the last image's result the SR was made.
            "built_after_stored_s": _seconds(last_stored, rep.created_at),
            "deliveries": [
                {"id": o.id, "destination": o.destination, "state": o.state, "attempts": o.attempts,
                 "last_status": o.last_status, "last_error": o.last_error, "created_at": _iso(o.created_at),
                 "sent_at": _iso(o.sent_at),
                 # sent_at is set when the peer acknowledged the C-STORE (0x0000 or a warning).
                 "acknowledged_after_built_s": _seconds(rep.created_at, o.sent_at)}
                for o in sorted(rep.outbox, key=lambda o: o.id)
            ],
        })
    # One line per destination: the newest SR revision's delivery there (what the PACS has now).
    by_destination: dict[str, dict[str, Any]] = {}
    for rep in reports:
        for o in rep["deliveries"]:
            by_destination[o["destination"]] = {**o, "report_id": rep["id"], "revision": rep["revision"]}
    cards = model_cards_for(models_dir, study.model_version)
    return {
        "study": record,
        "conclusion": conclusion_text(study),
        "instances": instances,
        "reports": reports,
        "sr_delivery": [by_destination[k] for k in sorted(by_destination)],
        "model_card": cards[0] if cards else None,
        "model_cards": cards,
    }


class InvalidQuery(ValueError):
    """A query parameter that parsed but can't be used (e.g. a time outside the representable range in UTC).
    Raised deliberately here; routes turn it into a 422 naming the parameter."""


def as_utc(value: datetime | None) -> datetime | None:
    """Naive means UTC; aware times are converted. 0001-01-01T00:00+14:00 is a valid ISO time whose UTC instant
    falls before year 1: Python raises OverflowError for it, which would otherwise surface as a 500."""
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:
        raise InvalidQuery("date/time out of range once converted to UTC") from None
