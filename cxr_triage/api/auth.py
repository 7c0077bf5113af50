"""Authentication (bearer API tokens, password sessions), role checks and CSRF protection.

* API clients send ``Authorization: Bearer <token>``; tokens are stored as SHA-256 hashes.
* Browsers log in with username/password (argon2id); the signed session cookie carries the user id and a CSRF
  token. Every unsafe request authenticated by the cookie must echo that token (header ``X-CSRF-Token`` or form
  field ``csrf_token``); token-authenticated requests carry no ambient credentials and need none.
* Anonymous requests get 401 (JSON API) or a redirect to /login (pages); a wrong role gets 403.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import Depends, HTTPException, Request
from starlette.concurrency import run_in_threadpool
from sqlalchemy.orm import Session

from cxr_triage.db import accounts
from cxr_triage.db.accounts import Principal

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CLINICAL = ("radiologist", "admin")
ANY_ROLE = ("radiologist", "admin", "service")
ADMIN = ("admin",)


class LoginRequired(Exception):
    """Raised for anonymous page requests; the app turns it into a redirect to /login."""

    def __init__(self, next_path: str) -> None:
        self.next_path = next_path


def ctx(request: Request) -> Any:
    return request.app.state.ctx


def db_session(request: Request) -> Iterator[Session]:
    with ctx(request).session_factory() as session:
        yield session


def csrf_token(request: Request) -> str:
    token = request.session.get("csrf")
    if not token:
        token = secrets.token_urlsafe(24)
        request.session["csrf"] = token
    return token


async def check_csrf(request: Request) -> None:
    expected = request.session.get("csrf")
    sent = request.headers.get("x-csrf-token")
    if sent is None:
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("application/x-www-form-urlencoded") or ctype.startswith("multipart/form-data"):
            form = await request.form()
            value = form.get("csrf_token")
            sent = value if isinstance(value, str) else None
    if not expected or not sent or not secrets.compare_digest(str(expected), sent):
        raise HTTPException(status_code=403, detail="CSRF token missing or invalid")


def identify(request: Request, session: Session) -> tuple[Principal | None, str | None]:
    header = request.headers.get("authorization", "")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None, None
        return accounts.authenticate_token(session, token=token.strip()), "token"
    uid = request.session.get("uid")
    if isinstance(uid, int):
        return accounts.load_principal(session, user_id=uid), "session"
    return None, None


def _identify_and_release(request: Request, session: Session) -> tuple[Principal | None, str | None]:
    try:
        return identify(request, session)
    finally:
        # End the read transaction now: on SQLite every transaction holds the write lock (BEGIN IMMEDIATE), and a
        # long response (the event stream) must not keep it.
        session.rollback()


def require(*roles: str, page: bool = False) -> Callable[..., Any]:
    """Dependency: the authenticated principal, refused unless its role is in `roles`."""

    async def dependency(request: Request, session: Session = Depends(db_session)) -> Principal:
        principal, via = await run_in_threadpool(_identify_and_release, request, session)
        if principal is None:
            if page and via is None:
                raise LoginRequired(request.url.path)
            raise HTTPException(status_code=401, detail="authentication required",
                                headers={"WWW-Authenticate": "Bearer"})
        if principal.role not in roles:
            raise HTTPException(status_code=403, detail="not allowed for this role")
        if via == "session" and request.method not in SAFE_METHODS:
            await check_csrf(request)
        request.state.principal = principal
        return principal

    return dependency


def may_see_phi(request: Request, principal: Principal) -> bool:
    if principal.role in CLINICAL:
        return True
    return principal.role == "service" and bool(ctx(request).api_settings.service_sees_phi)


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None
