"""Server-rendered pages (Jinja2) with small plain-JS enhancements in /static."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Annotated, Any
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Form, HTTPException, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, model_validator
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from cxr_triage.api import views
from cxr_triage.api.auth import ADMIN, CLINICAL, check_csrf, client_ip, csrf_token, ctx, db_session, require
from cxr_triage.api.routes_api import NO_NUL, ExportFormat, export_response
from cxr_triage.core.states import StudyState
from cxr_triage.db import accounts, worklist
from cxr_triage.db.accounts import Principal

router = APIRouter(include_in_schema=False)
DbId = Annotated[int, Path(ge=1, le=2**31 - 1)]


def _render(request: Request, name: str, principal: Principal | None, status: int = 200, **context: Any) -> Response:
    c = ctx(request)
    return c.templates.TemplateResponse(
        request, name, {"principal": principal, "csrf": csrf_token(request), **context}, status_code=status,
    )


def _safe_next(value: str | None) -> str:
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    parts = urlsplit(value)
    return parts.path if not parts.netloc and not parts.scheme else "/"


@router.get("/login")
def login_form(request: Request, next: str | None = None) -> Response:
    return _render(request, "login.html", None, next=_safe_next(next), error=None)


@router.post("/login")
async def login(
    request: Request,
    username: Annotated[str, Form(max_length=128)],
    password: Annotated[str, Form(max_length=1024)],
    next: Annotated[str, Form(max_length=2048)] = "/",
) -> Response:
    await check_csrf(request)
    c = ctx(request)

    source_ip = client_ip(request)
    limits = c.api_settings

    def attempt() -> Principal | None | bool:
        """The principal, None for a wrong password, False when sign-in is throttled for this user/address."""
        with c.session_factory() as session:
            now = c.clock()
            since = now - timedelta(seconds=limits.login_failure_window_s)
            by_user, by_ip = accounts.recent_login_failures(session, username=username, source_ip=source_ip,
                                                            since=since)
            if by_user >= limits.login_max_failures or by_ip >= limits.login_max_failures_per_ip:
                accounts.audit(session, event=accounts.EVENT_USER_AUTHENTICATION, action="E", now=now,
                               username=username, outcome=8, source_ip=source_ip,
                               detail={"event_type": list(accounts.TYPE_LOGIN), "method": "password",
                                       "throttled": True})
                return False
            principal = accounts.authenticate_password(session, username=username, password=password, now=now)
            session.commit()
            accounts.audit(session, event=accounts.EVENT_USER_AUTHENTICATION, action="E", now=now,
                           principal=principal, username=username, outcome=0 if principal else 4,
                           source_ip=source_ip, detail={"event_type": list(accounts.TYPE_LOGIN), "method": "password"})
            return principal

    principal = await run_in_threadpool(attempt)
    if principal is False:
        minutes = max(1, round(limits.login_failure_window_s / 60))
        return _render(request, "login.html", None, status=429, next=_safe_next(next),
                       error=f"Too many failed sign-ins. Try again in {minutes} minutes or ask an administrator.")
    if principal is None:
        return _render(request, "login.html", None, status=401, next=_safe_next(next),
                       error="Unknown user or wrong password.")
    request.session.clear()
    request.session["uid"] = principal.user_id
    csrf_token(request)  # fresh CSRF token for the new session
    return RedirectResponse(_safe_next(next), status_code=303)


@router.post("/logout")
async def logout(request: Request) -> Response:
    await check_csrf(request)
    c = ctx(request)
    uid = request.session.get("uid")
    request.session.clear()

    def record() -> None:
        with c.session_factory() as session:
            principal = accounts.load_principal(session, user_id=uid) if isinstance(uid, int) else None
            if principal is None:  # nobody was signed in (or the account is gone): nothing to log out
                return
            accounts.audit(session, event=accounts.EVENT_USER_AUTHENTICATION, action="E", now=c.clock(),
                           principal=principal, source_ip=client_ip(request),
                           detail={"event_type": list(accounts.TYPE_LOGOUT), "method": "session"})

    await run_in_threadpool(record)
    return RedirectResponse("/login", status_code=303)


@router.get("/", response_class=HTMLResponse)
def worklist_page(request: Request, principal: Principal = Depends(require(*CLINICAL, page=True)),
                  session: Session = Depends(db_session)) -> Response:
    c = ctx(request)
    rows = views.worklist_rows(session, now=c.clock(), policy=c.api_settings.policy)
    return _render(request, "worklist.html", principal, rows=rows, policy=c.api_settings.policy)


@router.get("/worklist/rows", response_class=HTMLResponse)
def worklist_fragment(request: Request, principal: Principal = Depends(require(*CLINICAL, page=True)),
                      session: Session = Depends(db_session)) -> Response:
    c = ctx(request)
    rows = views.worklist_rows(session, now=c.clock(), policy=c.api_settings.policy)
    return _render(request, "_worklist_rows.html", principal, rows=rows)


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study_page(request: Request, study_id: DbId, principal: Principal = Depends(require(*CLINICAL, page=True)),
               session: Session = Depends(db_session)) -> Response:
    c = ctx(request)
    study = worklist.load_study(session, study_id=study_id)
    if study is None:
        raise HTTPException(404, "no such study")
    detail = views.study_detail(session, study, include_phi=True, models_dir=c.settings.models_path)
    accounts.audit(session, event=accounts.EVENT_INSTANCES_ACCESSED, action="R", now=c.clock(),
                   principal=principal, study_id=study_id, source_ip=client_ip(request),
                   detail={"instances": [i["id"] for i in detail["instances"]], "via": "page"})
    return _render(request, "study.html", principal, d=detail, s=detail["study"])


@router.get("/admin", response_class=HTMLResponse)
def admin_page(request: Request, principal: Principal = Depends(require(*ADMIN, page=True)),
               session: Session = Depends(db_session)) -> Response:
    from cxr_triage.api.routes_api import broker_queue_length

    c = ctx(request)
    now = c.clock()
    overview = worklist.admin_overview(session, now=now)
    reports = worklist.recent_reports(session, limit=20)
    audit = accounts.list_audit(session, limit=30)
    return _render(request, "admin.html", principal, o=overview, reports=reports, audit=audit, now=now,
                   broker=broker_queue_length(c), actions=c.actions is not None)


@router.get("/query", response_class=HTMLResponse)
def query_page(request: Request, principal: Principal = Depends(require(*CLINICAL, page=True))) -> Response:
    return _render(request, "query.html", principal)


class ExportForm(BaseModel):
    """The query page's form: the same filters and limits as GET /api/results/export, sent as a POST body so
    that patient IDs and accession numbers never land in URLs (history, proxy and server logs, Referer)."""

    format: ExportFormat = ExportFormat.csv
    since: datetime | None = None
    until: datetime | None = None
    min_score: float | None = Field(None, ge=0, le=1)
    max_score: float | None = Field(None, ge=0, le=1)
    flagged: bool | None = None
    state: StudyState | None = None
    model_version: str | None = Field(None, max_length=128, pattern=NO_NUL)
    accession_number: str | None = Field(None, max_length=64, pattern=NO_NUL)
    patient_id: str | None = Field(None, max_length=64, pattern=NO_NUL)
    limit: int = Field(1000, ge=1, le=10000)

    @model_validator(mode="before")
    @classmethod
    def _blank_is_absent(cls, data: Any) -> Any:
        # An empty form field means "no filter" (the page's script drops them; without script they arrive "").
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v != ""}
        return data


@router.post("/query/export")
def query_export(request: Request, form: Annotated[ExportForm, Form()],
                 principal: Principal = Depends(require(*CLINICAL)),
                 session: Session = Depends(db_session)) -> Response:
    values = form.model_dump(exclude={"format", "limit"})
    return export_response(request, principal, session, format=form.format, values=values, limit=form.limit,
                           offset=0, via="page")
