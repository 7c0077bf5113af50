"""Accounts, API tokens and the audit trail (same declarative `Base` as the clinical tables).

Passwords are stored as argon2id hashes; API tokens as the SHA-256 of a 256-bit random secret (the secret is shown
once, at creation). Audit events follow the DICOM PS3.15 A.5 event vocabulary (event type codes from DCM).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Boolean, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from cxr_triage.db.tables import UTC_DATETIME, Base


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(128), unique=True)
    password_hash: Mapped[str | None] = mapped_column(String(256))  # None: token-only (service) account
    role: Mapped[str] = mapped_column(String(16))  # radiologist | admin | service
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    last_login_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)

    tokens: Mapped[list[ApiToken]] = relationship(back_populates="user")


class ApiToken(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    user_pk: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    last_used_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)
    revoked_at: Mapped[datetime | None] = mapped_column(UTC_DATETIME)

    user: Mapped[User] = relationship(back_populates="tokens")


class AuditEvent(Base):
    """Who did what to which study. `event_code` is the DCM code of PS3.15 A.5 (e.g. 110103)."""

    __tablename__ = "audit_events"
    __table_args__ = (Index("ix_audit_events_at", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(UTC_DATETIME)
    event_code: Mapped[str] = mapped_column(String(16))
    event_name: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(1))  # C R U D E (PS3.15 EventActionCode)
    outcome: Mapped[int] = mapped_column(Integer, default=0)  # 0 success, 4 minor failure, 8 serious failure
    username: Mapped[str | None] = mapped_column(String(128))
    role: Mapped[str | None] = mapped_column(String(16))
    source_ip: Mapped[str | None] = mapped_column(String(64))
    study_pk: Mapped[int | None] = mapped_column(Integer, index=True)  # no FK: the trail outlives deletions
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # never PHI: ids, counts, formats
