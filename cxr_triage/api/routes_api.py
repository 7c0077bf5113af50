"""JSON API under /api/ (documented in the OpenAPI spec at /api/openapi.json)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import datetime
from enum import Enum
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from cxr_triage.api import views
from cxr_triage.api.auth import ADMIN, ANY_ROLE, CLINICAL, client_ip, ctx, db_session, may_see_phi, require
from cxr_triage.api.render import RenderError, rendered_png
from cxr_triage.core.states import StudyState
from cxr_triage.db import accounts, worklist
from cxr_triage.db.accounts import Principal
from cxr_triage.db.repo import ResultFilter, count_studies, query_studies
from cxr_triage.db.results import records_to_csv, records_to_json, study_record, to_fhir_bundle
from cxr_triage.db.tables import Instance, StructuredReport, Study

router = APIRouter(prefix="/api")

DbId = Annotated[int, Path(ge=1, le=2**31 - 1)]
NO_NUL = r"^[^\x00]*$"
Text64 = Annotated[str | None, Query(max_length=64, pattern=NO_NUL)]


class ExportFormat(str, Enum):
    csv = "csv"
    json = "json"
    fhir = "fhir"


class Detail(BaseModel):
    detail: str


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Detail, "description": "not authenticated"},
    403: {"model": Detail, "description": "role not allowed (or CSRF token missing)"},
}


# ------------------------------------------------------------------------------------------------ worklist
@router.get("/worklist", tags=["worklist"], responses=ERRORS, summary="Unread studies in reading order")
def get_worklist(request: Request, principal: Principal = Depends(require(*CLINICAL)),
                 session: Session = Depends(db_session)) -> dict[str, Any]:
    c = ctx(request)
    now = c.clock()
    rows = views.worklist_rows(session, now=now, policy=c.api_settings.policy)
    return {"generated_at": now.isoformat(), "items": rows}


@router.get("/worklist/events", tags=["worklist"], include_in_schema=False)
async def worklist_events(request: Request, principal: Principal = Depends(require(*CLINICAL))) -> StreamingResponse:
    """Server-sent events: `changed` whenever the worklist's data changes (DB polled every CXR_SSE_POLL_S)."""
    c = ctx(request)

    def marker() -> tuple[Any, ...]:
        with c.session_factory() as session:
            return worklist.change_marker(session)

    async def stream() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        started = loop.time()
        last = await run_in_threadpool(marker)
        yield "retry: 2000\n\n"
        yield f"event: hello\ndata: {json.dumps({'ok': True})}\n\n"
        beat = loop.time()
        while loop.time() - started < c.api_settings.sse_max_s:
            await asyncio.sleep(c.api_settings.sse_poll_s)
            if await request.is_disconnected():
                return
            current = await run_in_threadpool(marker)
            if current != last:
                last = current
                yield f"event: changed\ndata: {json.dumps({'at': c.clock().isoformat()})}\n\n"
            elif loop.time() - beat > 15:
                yield ": keep-alive\n\n"
                beat = loop.time()

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


# ------------------------------------------------------------------------------------------------ studies
@router.get("/studies/{study_id}", tags=["studies"], responses={**ERRORS, 404: {"model": Detail}},
            summary="One study: images, analyses, boxes, heatmaps, timings, SR deliveries, model card")
def get_study(request: Request, study_id: DbId, principal: Principal = Depends(require(*CLINICAL)),
              session: Session = Depends(db_session)) -> dict[str, Any]:
    c = ctx(request)
    study = worklist.load_study(session, study_id=study_id)
    if study is None:
        raise HTTPException(404, "no such study")
    detail = views.study_detail(session, study, include_phi=may_see_phi(request, principal),
                                models_dir=c.settings.models_path)
    accounts.audit(session, event=accounts.EVENT_INSTANCES_ACCESSED, action="R", now=c.clock(),
                   principal=principal, study_id=study_id, source_ip=client_ip(request),
                   detail={"instances": [i["id"] for i in detail["instances"]]})
    return detail


@router.get("/instances/{instance_id}/image", tags=["studies"], response_class=FileResponse,
            responses={**ERRORS, 404: {"model": Detail}, 422: {"model": Detail},
                       200: {"content": {"image/png": {}}, "description": "windowed greyscale PNG, <= 1024 px"}},
            summary="The instance's image, windowed and downsampled (PNG, cached)")
def get_image(request: Request, instance_id: DbId, principal: Principal = Depends(require(*CLINICAL)),
              session: Session = Depends(db_session)) -> Response:
    c = ctx(request)
    inst = session.get(Instance, instance_id)
    if inst is None:
        raise HTTPException(404, "no such instance")
    spool_name = inst.spool_name
    session.close()
    try:
        path = rendered_png(spool_dir=c.settings.spool_dir, cache_dir=c.render_cache_dir, instance_id=instance_id,
                            spool_name=spool_name, max_bytes=c.settings.max_image_bytes)
    except RenderError as exc:
        return JSONResponse({"detail": str(exc)}, status_code=422)
    # A radiograph is PHI: no browser or proxy cache keeps it (the server's render cache makes re-fetching cheap).
    return FileResponse(path, media_type="image/png", headers={"Cache-Control": "no-store"})


class ReadMark(BaseModel):
    read: bool = True


@router.post("/studies/{study_id}/read", tags=["studies"], responses={**ERRORS, 404: {"model": Detail}},
             summary="Mark a study read (body {\"read\": false} marks it unread again)")
def post_read(request: Request, study_id: DbId, body: ReadMark | None = None,
              principal: Principal = Depends(require(*CLINICAL)),
              session: Session = Depends(db_session)) -> dict[str, Any]:
    c = ctx(request)
    read = True if body is None else body.read
    study = worklist.mark_read(session, study_id=study_id, by=principal.username, now=c.clock(), read=read)
    if study is None:
        raise HTTPException(404, "no such study")
    return {"study_id": study.id, "read_at": views._iso(study.read_at), "read_by": study.read_by}


# ------------------------------------------------------------------------------------------------ results
def result_filter(
    request: Request,
    principal: Principal,
    since: datetime | None,
    until: datetime | None,
    min_score: float | None,
    max_score: float | None,
    flagged: bool | None,
    state: StudyState | None,
    model_version: str | None,
    accession_number: str | None,
    patient_id: str | None,
) -> tuple[ResultFilter, bool]:
    phi = may_see_phi(request, principal)
    if not phi and (accession_number is not None or patient_id is not None):
        raise HTTPException(403, "this role may not filter by patient ID or accession number")
    try:
        since_utc, until_utc = views.as_utc(since), views.as_utc(until)
    except views.InvalidQuery as exc:
        raise HTTPException(422, f"since/until: {exc}") from None
    return ResultFilter(
        since=since_utc, until=until_utc, min_score=min_score, max_score=max_score,
        flagged=flagged, status=state.value if state else None, model_version=model_version,
        accession_number=accession_number, patient_id=patient_id,
    ), phi


class Filters:
    """Query parameters shared by /api/results and /api/results/export."""

    def __init__(
        self,
        since: Annotated[datetime | None, Query(description="received at or after (ISO 8601)")] = None,
        until: Annotated[datetime | None, Query(description="received before (ISO 8601)")] = None,
        min_score: Annotated[float | None, Query(ge=0, le=1)] = None,
        max_score: Annotated[float | None, Query(ge=0, le=1)] = None,
        flagged: bool | None = None,
        state: StudyState | None = None,
        model_version: Annotated[str | None, Query(max_length=128, pattern=NO_NUL)] = None,
        accession_number: Annotated[str | None, Query(max_length=64, pattern=NO_NUL,
                                                      description="radiologist/admin (service if allowed)")] = None,
        patient_id: Annotated[str | None, Query(max_length=64, pattern=NO_NUL,
                                                description="radiologist/admin (service if allowed)")] = None,
    ) -> None:
        self.values = dict(since=since, until=until, min_score=min_score, max_score=max_score, flagged=flagged,
                           state=state, model_version=model_version, accession_number=accession_number,
                           patient_id=patient_id)

    def audit_detail(self) -> dict[str, Any]:
        return filters_audit_detail(self.values)


def filters_audit_detail(values: dict[str, Any]) -> dict[str, Any]:
    # Names of the filters used, never their values (they may be PHI).
    return {"filters": sorted(k for k, v in values.items() if v is not None)}


@router.get("/results", tags=["results"], responses=ERRORS,
            summary="Query study results (newest first); PHI columns only for roles allowed to see them")
def get_results(
    request: Request,
    filters: Filters = Depends(),
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    principal: Principal = Depends(require(*ANY_ROLE)),
    session: Session = Depends(db_session),
) -> dict[str, Any]:
    c = ctx(request)
    flt, phi = result_filter(request, principal, **filters.values)
    studies = query_studies(session, filters=flt, limit=limit, offset=offset)
    items = [study_record(s, include_phi=phi) for s in studies]
    accounts.audit(session, event=accounts.EVENT_QUERY, action="E", now=c.clock(), principal=principal,
                   source_ip=client_ip(request),
                   detail={**filters.audit_detail(), "studies": [s.id for s in studies], "count": len(items),
                           "phi": phi})
    # total: every match across pages, so a client knows when to stop paging (count: this page).
    return {"limit": limit, "offset": offset, "count": len(items), "total": count_studies(session, filters=flt),
            "items": items}


@router.get("/results/export", tags=["results"],
            responses={**ERRORS, 200: {"content": {"text/csv": {}, "application/json": {},
                                                   "application/fhir+json": {}}}},
            summary="Export query results as CSV, JSON or a FHIR R4 Bundle of DiagnosticReports")
def export_results(
    request: Request,
    format: ExportFormat = ExportFormat.csv,
    filters: Filters = Depends(),
    limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    principal: Principal = Depends(require(*ANY_ROLE)),
    session: Session = Depends(db_session),
) -> Response:
    return export_response(request, principal, session, format=format, values=filters.values, limit=limit,
                           offset=offset)


def export_response(request: Request, principal: Principal, session: Session, *, format: ExportFormat,
                    values: dict[str, Any], limit: int, offset: int, via: str = "api") -> Response:
    """The export, shared by GET /api/results/export and the query page's POST form (which keeps PHI filters
    out of the URL); audited with every exported study id -- limit caps them at 10000."""
    c = ctx(request)
    flt, phi = result_filter(request, principal, **values)
    studies = query_studies(session, filters=flt, limit=limit, offset=offset)
    if format is ExportFormat.fhir:
        body = json.dumps(to_fhir_bundle(studies, include_phi=phi), indent=2)
        media, ext = "application/fhir+json", "json"
    else:
        records = [study_record(s, include_phi=phi) for s in studies]
        if format is ExportFormat.csv:
            body, media, ext = records_to_csv(records), "text/csv; charset=utf-8", "csv"
        else:
            body, media, ext = records_to_json(records), "application/json", "json"
    ids = [s.id for s in studies]
    accounts.audit(session, event=accounts.EVENT_EXPORT, action="R", now=c.clock(), principal=principal,
                   source_ip=client_ip(request),
                   detail={**filters_audit_detail(values), "format": format.value, "studies": ids,
                           "count": len(ids), "phi": phi, "via": via})
    name = f"cxr-results.{'fhir.' if format is ExportFormat.fhir else ''}{ext}"
    return Response(body, media_type=media, headers={"Content-Disposition": f'attachment; filename="{name}"',
                                                     "Cache-Control": "no-store"})


# ------------------------------------------------------------------------------------------------ admin
@router.get("/admin/status", tags=["admin"], responses=ERRORS,
            summary="Queue depth, throughput, errors, oldest unsent SR, not-analysed studies")
def admin_status(request: Request, principal: Principal = Depends(require(*ADMIN)),
                 session: Session = Depends(db_session)) -> dict[str, Any]:
    c = ctx(request)
    now = c.clock()
    o = worklist.admin_overview(session, now=now)
    session.close()
    return {
        "now": now.isoformat(),
        "queue": o.queue,
        "broker_queue_length": broker_queue_length(c),
        "instances_by_state": o.instances_by_state,
        "throughput": {"analysed_last_5_min": o.analysed_last_5_min, "analysed_last_60_min": o.analysed_last_60_min},
        "errors": {"failed_total": o.failed_total, "failed_last_60_min": o.failed_last_60_min,
                   "sr_failed": o.outbox_by_state.get("failed", 0)},
        "outbox_by_state": o.outbox_by_state,
        "oldest_unsent_sr": None if o.oldest_pending_sr_id is None else {
            "outbox_id": o.oldest_pending_sr_id,
            "created_at": o.oldest_pending_sr_created_at.isoformat() if o.oldest_pending_sr_created_at else None,
            "age_s": (now - o.oldest_pending_sr_created_at).total_seconds() if o.oldest_pending_sr_created_at else None,
        },
        "not_analysed": o.not_analysed,
        "actions_available": c.actions is not None,
    }


def broker_queue_length(c: Any) -> dict[str, int] | None:
    from cxr_triage.api.routes_ops import _redis_url

    url = _redis_url(c.settings)
    if url is None:
        return None
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=0.5, socket_timeout=0.5)
    try:
        names = [n.strip() for n in c.api_settings.broker_queues.split(",") if n.strip()]
        return {n: int(client.llen(n)) for n in names}
    except Exception:  # noqa: BLE001 -- broker down: report unknown, the page still works
        return None
    finally:
        client.close()


def _actions(request: Request) -> Any:
    actions = ctx(request).actions
    if actions is None:
        raise HTTPException(503, "admin actions are not configured in this process")
    return actions


@router.post("/admin/studies/{study_id}/requeue", tags=["admin"],
             responses={**ERRORS, 404: {"model": Detail}, 409: {"model": Detail}, 503: {"model": Detail}},
             summary="Re-queue a study's images for analysis (quarantined ones are reset first)")
def requeue_study(request: Request, study_id: DbId, principal: Principal = Depends(require(*ADMIN)),
                  session: Session = Depends(db_session)) -> dict[str, Any]:
    c = ctx(request)
    # 404 before 503: a wrong id is the caller's mistake whatever this process can do.
    if session.get(Study, study_id) is None:
        raise HTTPException(404, "no such study")
    actions = _actions(request)
    ids = worklist.prepare_requeue(session, study_id=study_id)
    if ids is None:
        raise HTTPException(404, "no such study")
    if not ids:
        # Out-of-scope or already analysed images: re-queuing would do nothing, so don't say it did.
        raise HTTPException(409, "nothing to re-queue: every image of this study is analysed or out of scope")
    actions.requeue_instances(ids)
    # PS3.15 A.5.3.3 DICOM Instances Accessed, U: the admin changed these instances' processing state.
    accounts.audit(session, event=accounts.EVENT_INSTANCES_ACCESSED, action="U", now=c.clock(),
                   principal=principal, study_id=study_id, source_ip=client_ip(request),
                   detail={"action": "requeue", "instances": ids})
    return {"study_id": study_id, "instance_ids": ids}


@router.post("/admin/reports/{report_id}/resend", tags=["admin"],
             responses={**ERRORS, 404: {"model": Detail}, 503: {"model": Detail}},
             summary="Re-send an SR to every destination (outbox rows reset to pending)")
def resend_report(request: Request, report_id: DbId, principal: Principal = Depends(require(*ADMIN)),
                  session: Session = Depends(db_session)) -> dict[str, Any]:
    c = ctx(request)
    report = session.get(StructuredReport, report_id)
    if report is None:
        raise HTTPException(404, "no such report")
    study_id = report.study_pk
    actions = _actions(request)  # checked before the outbox is reset: a 503 must leave no half-done change
    ids = worklist.reset_outbox_for_resend(session, report_id=report_id, now=c.clock())
    if ids is None:
        raise HTTPException(404, "no such report")
    actions.resend_report(report_id)
    # PS3.15 A.5.3.2 Begin Transferring DICOM Instances, E: the SR is sent (again) to its destinations.
    accounts.audit(session, event=accounts.EVENT_BEGIN_TRANSFER, action="E", now=c.clock(),
                   principal=principal, study_id=study_id, source_ip=client_ip(request),
                   detail={"action": "resend", "report": report_id, "outbox": ids})
    return {"report_id": report_id, "outbox_ids": ids}


@router.get("/admin/reports", tags=["admin"], responses=ERRORS, summary="Recent SRs and their delivery state")
def admin_reports(principal: Principal = Depends(require(*ADMIN)), session: Session = Depends(db_session),
                  limit: Annotated[int, Query(ge=1, le=500)] = 50) -> dict[str, Any]:
    reports = worklist.recent_reports(session, limit=limit)
    return {"items": [
        {"id": r.id, "study_id": r.study_pk, "revision": r.revision, "model_version": r.model_version,
         "created_at": r.created_at.isoformat(),
         "deliveries": [{"id": o.id, "destination": o.destination, "state": o.state, "attempts": o.attempts,
                         "last_status": o.last_status, "last_error": o.last_error,
                         "sent_at": o.sent_at.isoformat() if o.sent_at else None} for o in r.outbox]}
        for r in reports
    ]}


@router.get("/admin/audit", tags=["admin"], responses=ERRORS, summary="Audit trail (PS3.15 A.5 event types)")
def get_audit(
    principal: Principal = Depends(require(*ADMIN)),
    session: Session = Depends(db_session),
    study_id: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    username: Annotated[str | None, Query(max_length=128, pattern=NO_NUL)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
) -> dict[str, Any]:
    events = accounts.list_audit(session, limit=limit, offset=offset, study_id=study_id, username=username)
    return {"items": [
        {"id": e.id, "at": e.at.isoformat(), "event_code": e.event_code, "event_name": e.event_name,
         "action": e.action, "outcome": e.outcome, "username": e.username, "role": e.role,
         "source_ip": e.source_ip, "study_id": e.study_pk, "detail": e.detail}
        for e in events
    ]}


@router.get("/me", tags=["auth"], responses=ERRORS, summary="Who am I")
def me(principal: Principal = Depends(require(*ANY_ROLE))) -> dict[str, Any]:
    return {"username": principal.username, "role": principal.role}
