"""Administrator actions requested from the web UI, carried out by publishing worker tasks."""

from __future__ import annotations

from datetime import datetime, timezone

from celery import Celery
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.core.states import InstanceState, OutboxState
from cxr_triage.db.tables import Instance, OutboxItem
from cxr_triage.worker.celery_app import TASK_DELIVER


class CeleryAdminActions:
    def __init__(self, celery: Celery, session_factory: sessionmaker[Session]) -> None:
        self._celery = celery
        self._sessions = session_factory

    def requeue_instances(self, instance_ids: list[int]) -> None:
        """Analyse again from scratch: attempts reset, state back to received, task published."""
        now = datetime.now(timezone.utc)
        with self._sessions() as session:
            session.execute(
                update(Instance)
                .where(Instance.id.in_(instance_ids), Instance.state != InstanceState.DUPLICATE)
                .values(state=InstanceState.QUEUED, attempts=0, reason=None, queued_at=now, started_at=None)
            )
            session.commit()
        for instance_id in instance_ids:
            self._celery.cxr_publish_analyze(instance_id)  # type: ignore[attr-defined]

    def resend_report(self, report_id: int) -> None:
        """Send an SR again to every destination (same SR UID, so PACS sees the same object)."""
        now = datetime.now(timezone.utc)
        with self._sessions() as session:
            ids = list(
                session.scalars(
                    update(OutboxItem)
                    .where(OutboxItem.report_pk == report_id)
                    .values(state=OutboxState.PENDING, next_attempt_at=now)
                    .returning(OutboxItem.id)
                )
            )
            session.commit()
        for outbox_id in ids:
            self._celery.send_task(TASK_DELIVER, kwargs={"outbox_id": outbox_id})
