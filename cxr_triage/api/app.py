"""FastAPI application factory: reading worklist, study viewer, results query/export, admin, ops endpoints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from sqlalchemy.orm import Session, sessionmaker
from starlette.middleware.sessions import SessionMiddleware

from cxr_triage.api.actions import AdminActions
from cxr_triage.api.auth import ANY_ROLE, LoginRequired, require
from cxr_triage.db.accounts import Principal
from cxr_triage.api.config import ApiSettings, load_api_settings
from cxr_triage.api.metrics import make_registry
from cxr_triage.core.settings import Settings

HERE = Path(__file__).parent


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass
class ApiContext:
    settings: Settings
    api_settings: ApiSettings
    session_factory: sessionmaker[Session]
    actions: AdminActions | None
    clock: Callable[[], datetime]
    templates: Jinja2Templates
    registry: Any
    request_counter: Any

    @property
    def render_cache_dir(self) -> Path:
        return self.settings.data_dir / "cache" / "render"


def create_app(
    settings: Settings,
    *,
    session_factory: sessionmaker[Session],
    actions: AdminActions | None = None,
    clock: Callable[[], datetime] = utcnow,
    api_settings: ApiSettings | None = None,
) -> FastAPI:
    """Build the app. Everything it needs is passed in; nothing is read from module globals."""
    from cxr_triage.api import routes_api, routes_ops, routes_pages

    api_settings = api_settings or load_api_settings()
    app = FastAPI(
        title="cxr-triage",
        version="0.1.0",
        description="Chest radiograph triage: reading worklist, results query and export, administration. "
        "Authenticate with `Authorization: Bearer <token>` (tokens from `cxr-triage users token USERNAME`).",
        docs_url=None,  # Swagger UI would load from a CDN: no network, and the CSP forbids it
        redoc_url=None,
        openapi_url=None,  # served below, behind authentication
    )
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    registry, counter = make_registry(session_factory, clock)
    app.state.ctx = ApiContext(
        settings=settings,
        api_settings=api_settings,
        session_factory=session_factory,
        actions=actions,
        clock=clock,
        templates=templates,
        registry=registry,
        request_counter=counter,
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=api_settings.session_secret,
        session_cookie="cxr_session",
        max_age=api_settings.session_max_age_s,
        same_site="strict",
        https_only=api_settings.cookie_secure,
    )

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable[..., Any]) -> Any:
        response = await call_next(request)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            "connect-src 'self'; frame-ancestors 'none'",
        )
        if not request.url.path.startswith("/static/"):
            # Pages (the worklist lists patient names), API answers, images and exports carry PHI: nothing but
            # the static assets may be kept by a browser or proxy cache.
            response.headers.setdefault("Cache-Control", "no-store")
        counter.labels(request.method, str(response.status_code)).inc()
        return response

    @app.exception_handler(LoginRequired)
    async def _login_redirect(request: Request, exc: LoginRequired) -> Any:
        from urllib.parse import quote

        return RedirectResponse(f"/login?next={quote(exc.next_path)}", status_code=303)

    @app.get("/api/openapi.json", include_in_schema=False)
    def openapi_spec(principal: Principal = Depends(require(*ANY_ROLE))) -> JSONResponse:
        return JSONResponse(app.openapi())

    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")
    app.include_router(routes_ops.router)
    app.include_router(routes_pages.router)
    app.include_router(routes_api.router)
    return app
