"""Liveness, readiness and metrics."""

from __future__ import annotations

import shutil
from typing import Any

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.orm import Session

from cxr_triage.api.auth import ctx, db_session, identify

router = APIRouter()


@router.get("/healthz", tags=["ops"], summary="Liveness (no authentication)")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


def _redis_url(settings: Any) -> str | None:
    if settings.redis_url:
        return settings.redis_url
    sock = settings.bundled_redis_socket
    return f"unix://{sock}" if sock.exists() else None


def broker_ping(settings: Any, timeout: float = 1.0) -> bool | None:
    url = _redis_url(settings)
    if url is None:
        return None
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except Exception:  # noqa: BLE001 -- any failure means "not ready"
        return False
    finally:
        client.close()


@router.get("/readyz", tags=["ops"], summary="Readiness: database, broker, disk (no authentication)")
def readyz(request: Request) -> JSONResponse:
    c = ctx(request)
    checks: dict[str, Any] = {}
    try:
        with c.session_factory() as session:
            session.execute(text("SELECT 1"))
        checks["database"] = True
    except Exception:  # noqa: BLE001
        checks["database"] = False
    broker = broker_ping(c.settings)
    checks["broker"] = "not configured" if broker is None else broker
    try:
        path = c.settings.data_dir if c.settings.data_dir.exists() else c.settings.data_dir.parent
        free_mb = shutil.disk_usage(path).free / 2**20
        checks["disk"] = free_mb >= c.settings.disk_reserve_mb
    except OSError:
        checks["disk"] = False
    ok = all(v is True or v == "not configured" for v in checks.values())
    return JSONResponse({"status": "ok" if ok else "unavailable", "checks": checks}, status_code=200 if ok else 503)


@router.get("/metrics", tags=["ops"], summary="Prometheus metrics (service or admin token unless CXR_METRICS_PUBLIC)")
def metrics(request: Request, session: Session = Depends(db_session)) -> Response:
    c = ctx(request)
    if not c.api_settings.metrics_public:
        principal, _ = identify(request, session)
        if principal is None:
            raise HTTPException(401, "authentication required", headers={"WWW-Authenticate": "Bearer"})
        if principal.role not in ("service", "admin"):
            raise HTTPException(403, "not allowed for this role")
    session.close()
    return Response(generate_latest(c.registry), media_type=CONTENT_TYPE_LATEST)
