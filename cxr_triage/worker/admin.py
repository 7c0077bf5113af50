"""Administrator actions requested from the web UI, carried out by publishing worker tasks.

The API has already reset the database rows (db.worklist.prepare_requeue / reset_outbox_for_resend); this side
only hands the ids to the workers. Both are safe to repeat: claims and outbox sends are idempotent.
"""

from __future__ import annotations

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.db.tables import OutboxItem
from cxr_triage.worker.celery_app import TASK_DELIVER


class CeleryAdminActions:
    def __init__(self, celery: Celery, session_factory: sessionmaker[Session]) -> None:
        self._celery = celery
        self._sessions = session_factory

    def requeue_instances(self, instance_ids: list[int]) -> None:
        for instance_id in instance_ids:
            self._celery.cxr_publish_analyze(instance_id)  # type: ignore[attr-defined]

    def resend_report(self, report_id: int) -> None:
        with self._sessions() as session:
            ids = list(session.scalars(select(OutboxItem.id).where(OutboxItem.report_pk == report_id)))
        for outbox_id in ids:
            self._celery.send_task(TASK_DELIVER, kwargs={"outbox_id": outbox_id})
