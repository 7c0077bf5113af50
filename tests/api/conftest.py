"""Fixtures for API tests: a migrated database on SQLite and on real PostgreSQL, seeded studies, users, a
controllable clock and fake admin actions."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.core.settings import Settings
from cxr_triage.db import accounts, migrate
from cxr_triage.db.session import make_engine, make_session_factory
from cxr_triage.db.tables import Analysis, Finding, Instance, OutboxItem, StructuredReport, Study
from cxr_triage.db.tables_auth import ApiToken, AuditEvent, User

PG_ADMIN_URL = os.environ.get("CXR_TEST_PG_ADMIN", "postgresql://postgres@127.0.0.1:5432/postgres")
T0 = datetime(2026, 1, 5, 8, 0, tzinfo=timezone.utc)


class Clock:
    def __init__(self, now: datetime = T0) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **kw: float) -> None:
        self.now += timedelta(**kw)


@dataclass
class FakeActions:
    requeued: list[list[int]] = field(default_factory=list)
    resent: list[int] = field(default_factory=list)

    def requeue_instances(self, instance_ids: list[int]) -> None:
        self.requeued.append(list(instance_ids))

    def resend_report(self, report_id: int) -> None:
        self.resent.append(report_id)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    import psycopg
    name = f"cxr_api_{secrets.token_hex(6)}"
    try:
        admin = psycopg.connect(PG_ADMIN_URL.replace("postgresql://", "postgresql://", 1), autocommit=True,
                                connect_timeout=3)
    except Exception as exc:  # noqa: BLE001
        pytest.fail(f"PostgreSQL not reachable: {type(exc).__name__}")
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = PG_ADMIN_URL.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with psycopg.connect(PG_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


_MIGRATED: dict[str, Any] = {}


@pytest.fixture(scope="session", params=["sqlite", "postgresql"])
def backend_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('db') / 'api.sqlite3'}"
    else:
        url = request.getfixturevalue("pg_url")
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="session")
def _engines() -> Iterator[dict[str, Any]]:
    engines: dict[str, Any] = {}
    yield engines
    for e in engines.values():
        e.dispose()


@pytest.fixture
def session_factory(backend_url: str, _engines: dict[str, Any]) -> sessionmaker[Session]:
    engine = _engines.get(backend_url)
    if engine is None:
        engine = _engines[backend_url] = make_engine(backend_url)
    factory = make_session_factory(engine)
    with factory() as s:  # clean slate per test
        for table in (AuditEvent, ApiToken, User, OutboxItem, StructuredReport, Finding, Analysis, Instance, Study):
            s.execute(delete(table))
        s.commit()
    return factory


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def actions() -> FakeActions:
    return FakeActions()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    (tmp_path / "spool").mkdir()
    return Settings(data_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]


def _api_settings(**kw: Any) -> Any:
    from cxr_triage.api.config import ApiSettings

    return ApiSettings(_env_file=None, session_secret="test-secret-0123456789", **kw)  # type: ignore[call-arg]


@pytest.fixture
def api_settings() -> Any:
    return _api_settings()


@pytest.fixture
def app(settings: Settings, session_factory: sessionmaker[Session], actions: FakeActions, clock: Clock,
        api_settings: Any) -> Any:
    from cxr_triage.api.app import create_app

    return create_app(settings, session_factory=session_factory, actions=actions, clock=clock,
                      api_settings=api_settings)


@pytest.fixture
def users(session_factory: sessionmaker[Session]) -> dict[str, str]:
    """Tokens by role name; passwords are '<role>-password'. Hashing with argon2 is slowish: 3 users only."""
    tokens = {}
    with session_factory() as s:
        for role in ("radiologist", "admin", "service"):
            accounts.create_user(s, username=f"{role}1", password=f"{role}-password", role=role)
            tokens[role] = accounts.create_token(s, username=f"{role}1", name="test")
    return tokens


@pytest.fixture
def client(app: Any) -> Iterator[Any]:
    from fastapi.testclient import TestClient

    with TestClient(app) as c:
        yield c


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def add_study(
    s: Session,
    *,
    received_at: datetime,
    urgency: str | None = None,
    score: float | None = None,
    flagged: bool | None = None,
    state: str = "analysed",
    reasons: Sequence[str] = (),
    boxes: Sequence[tuple[float, float, float, float, float]] = (),
    heatmap: list[list[float]] | None = None,
    spool_name: str = "missing.dcm",
    demo: bool = False,
    model_version: str = "cxr-demo@1",
    patient_id: str = "PAT1",
    accession: str = "ACC1",
    rows: int = 2048,
    columns: int = 2048,
    read_at: datetime | None = None,
) -> Study:
    uid = "1.2.826.0.1." + secrets.token_hex(4)
    st = Study(
        study_instance_uid=uid, patient_id=patient_id, patient_name="Doe^Jane", accession_number=accession,
        study_description="CHEST PA", urgency=urgency, received_at=received_at, last_received_at=received_at,
        state=state, pneumonia_score=score, flagged=flagged, model_version=model_version if score is not None else None,
        demo_model=demo, read_at=read_at, read_by="x" if read_at else None,
    )
    s.add(st)
    inst_state = {"analysed": "analysed", "not_analysed": "not_analysed", "failed": "failed"}.get(state, "queued")
    instances = [Instance(
        study=st, sop_instance_uid=uid + ".1", sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1", series_instance_uid=uid + ".9",
        transfer_syntax_uid="1.2.840.10008.1.2.1", modality="DX", view_position="PA", rows=rows, columns=columns,
        file_sha256=secrets.token_hex(32), file_size=1, spool_name=spool_name, state=inst_state,
        reason=reasons[0] if reasons else None, attempts=1, received_at=received_at,
        queued_at=received_at + timedelta(seconds=1), started_at=received_at + timedelta(seconds=2),
        inferred_at=received_at + timedelta(seconds=3) if score is not None else None,
        stored_at=received_at + timedelta(seconds=4) if inst_state != "queued" else None,
    )]
    s.add_all(instances)
    if score is not None:
        a = Analysis(instance=instances[0], model_version=model_version, demo_model=demo, pneumonia_probability=score,
                     flagged=bool(flagged), threshold=0.5, label_probabilities={"pneumonia": score}, heatmap=heatmap,
                     created_at=received_at + timedelta(seconds=4),
                     boxes=[Finding(x0=b[0], y0=b[1], x1=b[2], y1=b[3], score=b[4]) for b in boxes])
        s.add(a)
    s.commit()
    return st
