from __future__ import annotations

from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from cxr_triage.db.migrate import current_revision, downgrade, head_revision, upgrade
from cxr_triage.db.session import make_engine
from cxr_triage.db.tables import Base
from tests.databases import database


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_upgrade_downgrade_upgrade(kind: str, tmp_path: Path) -> None:
    with database(kind, tmp_path) as url:
        upgrade(url)
        head = head_revision(url)
        assert current_revision(url) == head
        downgrade(url, "-1")
        assert current_revision(url) != head
        upgrade(url)
        assert current_revision(url) == head
        engine = make_engine(url)
        try:
            with engine.connect() as conn:
                # The migrations build exactly the schema the code declares.
                assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
            assert {"studies", "instances", "analyses", "findings", "structured_reports", "outbox"} <= set(
                inspect(engine).get_table_names()
            )
        finally:
            engine.dispose()
        downgrade(url, "base")
        assert current_revision(url) is None


def test_sqlite_runs_in_wal_mode_with_full_sync(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'x.sqlite3'}"
    upgrade(url)
    engine = make_engine(url)
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL
    engine.dispose()
