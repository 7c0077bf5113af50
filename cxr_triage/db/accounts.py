"""Users, API tokens and the audit trail. Keyword-only functions taking a Session; they commit only where the
name or docstring says so (create_user, create_token, audit)."""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from cxr_triage.db.tables_auth import ApiToken, AuditEvent, User

ROLES = ("radiologist", "admin", "service")
_HASHER = PasswordHasher()
# Verified against when the user does not exist, so a login takes the same time either way.
_DUMMY_HASH = _HASHER.hash("not-a-real-password")

# DICOM PS3.15 A.5 audit event IDs (DCM codes) and, in comments, the EventActionCode each message uses here.
EVENT_INSTANCES_ACCESSED = ("110103", "DICOM Instances Accessed")  # R: viewed; U: admin re-queue
EVENT_BEGIN_TRANSFER = ("110102", "Begin Transferring DICOM Instances")  # E: admin re-send of an SR
EVENT_EXPORT = ("110106", "Export")  # R
EVENT_QUERY = ("110112", "Query")  # E
EVENT_USER_AUTHENTICATION = ("110114", "User Authentication")  # E, with an EventTypeCode below
EVENT_APPLICATION_ACTIVITY = ("110100", "Application Activity")  # E: application start/stop only (A.5.3.1)
# EventTypeCodes of User Authentication (A.5.3.12), stored in the event's detail as "event_type".
TYPE_LOGIN = ("110122", "Login")
TYPE_LOGOUT = ("110123", "Logout")


@dataclass(frozen=True)
class Principal:
    user_id: int
    username: str
    role: str


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def create_user(session: Session, *, username: str, password: str | None, role: str) -> int:
    """Create (or, if it exists, update the password and role of) a user; commits. Returns the user id.

    `password` None makes a token-only account (typical for role "service")."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    username = username.strip()
    if not username or len(username) > 128:
        raise ValueError("username must be 1-128 characters")
    if password is not None and len(password) < 8:
        raise ValueError("password must be at least 8 characters")
    user = session.scalar(select(User).where(User.username == username))
    pw_hash = _HASHER.hash(password) if password is not None else None
    if user is None:
        user = User(username=username, password_hash=pw_hash, role=role, active=True, created_at=_utcnow())
        session.add(user)
    else:
        user.role = role
        user.password_hash = pw_hash
        user.active = True
    session.commit()
    return user.id


def create_token(session: Session, *, username: str, name: str) -> str:
    """Issue an API token for an existing user; commits. The secret is returned once and stored only hashed."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise LookupError(f"no such user: {username}")
    token = "cxr_" + secrets.token_urlsafe(32)
    session.add(ApiToken(user=user, name=name[:128], token_sha256=hash_token(token), created_at=_utcnow()))
    session.commit()
    return token


def revoke_token(session: Session, *, username: str, name: str) -> int:
    """Revoke a user's tokens with this name; commits. Returns how many were revoked."""
    rows = session.scalars(
        select(ApiToken).join(User).where(User.username == username, ApiToken.name == name,
                                          ApiToken.revoked_at.is_(None))
    ).all()
    for row in rows:
        row.revoked_at = _utcnow()
    session.commit()
    return len(rows)


def authenticate_password(session: Session, *, username: str, password: str, now: datetime) -> Principal | None:
    """Check a password (argon2); records last login and rehashes if parameters changed. No commit."""
    user = session.scalar(select(User).where(User.username == username))
    if user is None or not user.active or user.password_hash is None:
        try:
            _HASHER.verify(_DUMMY_HASH, password)
        except VerificationError:
            pass
        return None
    try:
        _HASHER.verify(user.password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return None
    if _HASHER.check_needs_rehash(user.password_hash):
        user.password_hash = _HASHER.hash(password)
    user.last_login_at = now
    return Principal(user.id, user.username, user.role)


def authenticate_token(session: Session, *, token: str) -> Principal | None:
    row = session.scalar(
        select(ApiToken).where(ApiToken.token_sha256 == hash_token(token), ApiToken.revoked_at.is_(None))
    )
    if row is None or not row.user.active:
        return None
    return Principal(row.user.id, row.user.username, row.user.role)


def load_principal(session: Session, *, user_id: int) -> Principal | None:
    user = session.get(User, user_id)
    if user is None or not user.active:
        return None
    return Principal(user.id, user.username, user.role)


def audit(
    session: Session,
    *,
    event: tuple[str, str],
    action: str,
    now: datetime,
    principal: Principal | None = None,
    username: str | None = None,
    study_id: int | None = None,
    outcome: int = 0,
    source_ip: str | None = None,
    detail: dict[str, Any] | None = None,
) -> None:
    """Append one audit event; commits. `detail` must carry no PHI (ids, counts, formats only)."""
    code, name = event
    session.add(
        AuditEvent(
            at=now,
            event_code=code,
            event_name=name,
            action=action,
            outcome=outcome,
            username=principal.username if principal else (username[:128] if username else None),
            role=principal.role if principal else None,
            source_ip=(source_ip or None) and source_ip[:64],
            study_pk=study_id,
            detail=detail or {},
        )
    )
    session.commit()


def recent_login_failures(session: Session, *, username: str, source_ip: str | None, since: datetime) -> tuple[int, int]:
    """Failed password sign-ins since ``since``: (for this user name, from this address). Read from the audit
    trail, so every API process sees the same counts. Refused-while-throttled attempts (outcome 8) don't count,
    so a lock ends as soon as fewer than the limit of real guesses remain inside the sliding window."""
    base = (
        select(func.count())
        .select_from(AuditEvent)
        .where(AuditEvent.event_code == EVENT_USER_AUTHENTICATION[0], AuditEvent.outcome == 4, AuditEvent.at >= since)
    )
    by_user = session.scalar(base.where(AuditEvent.username == username[:128])) or 0
    by_ip = (session.scalar(base.where(AuditEvent.source_ip == source_ip[:64])) or 0) if source_ip else 0
    return int(by_user), int(by_ip)


def list_audit(
    session: Session, *, limit: int = 100, offset: int = 0, study_id: int | None = None,
    username: str | None = None,
) -> list[AuditEvent]:
    stmt = select(AuditEvent)
    if study_id is not None:
        stmt = stmt.where(AuditEvent.study_pk == study_id)
    if username is not None:
        stmt = stmt.where(AuditEvent.username == username)
    stmt = stmt.order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit).offset(offset)
    return list(session.scalars(stmt))
