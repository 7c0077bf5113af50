"""Celery tasks: thin wrappers that take ids, look up this process's context and call the pipeline.

The one decorator below fixes for every task: a stable name, late acknowledgement, the errors that are retried
(with exponential backoff and jitter) and the ones that are not. Arguments are ids, keyword-only; never pixels
or header values.
"""

from __future__ import annotations

import functools
import threading
from datetime import timedelta
from collections.abc import Callable
from typing import Any

import redis.exceptions
import sqlalchemy.exc
from celery import Celery
from celery.exceptions import Ignore, Reject, Retry

from cxr_triage.core.errors import PermanentError, RetryableError
from cxr_triage.core.logging import get_logger
from cxr_triage.worker import pipeline
from cxr_triage.worker.celery_app import (
    ANALYZE_QUEUE,
    DELIVER_QUEUE,
    TASK_ANALYZE,
    TASK_BUILD_REPORT,
    TASK_DELIVER,
    TASK_RECONCILE,
    TASK_TICK,
)
from cxr_triage.worker.context import context_for

log = get_logger(__name__)

RETRY_ON = (RetryableError, sqlalchemy.exc.OperationalError, redis.exceptions.ConnectionError, ConnectionError)


def cxr_task(app: Celery, name: str, *, max_retries: int = 5) -> Callable[[Callable[..., Any]], Any]:
    register = app.task(
        name=name,
        bind=True,
        acks_late=True,
        autoretry_for=RETRY_ON,
        retry_backoff=2,
        retry_backoff_max=60,
        retry_jitter=True,
        max_retries=max_retries,
    )

    def decorator(fn: Callable[..., Any]) -> Any:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except RETRY_ON:
                raise  # retried with backoff by Celery
            except (Retry, Ignore, Reject):
                raise
            except Exception as exc:
                # Celery logs a failed task's exception with its message, and library messages quote header
                # values (PHI). Never retried: report the type only, drop the original (and its traceback text).
                log.error("task failed", task=name, error=type(exc).__name__)
                raise PermanentError(f"{name} failed: {type(exc).__name__}") from None

        return register(run)

    return decorator


_tick_lock = threading.Lock()


def register_tasks(app: Celery) -> None:
    def publish_analyze(instance_id: int) -> None:
        # Bounded: the listener's one publisher thread calls this after answering the C-STORE, and the reconciler
        # calls it in a loop. If the broker is down the row is committed and stays RECEIVED/QUEUED for the next
        # reconcile round, so waiting longer would only build a backlog behind one dead broker.
        app.send_task(
            TASK_ANALYZE,
            kwargs={"instance_id": instance_id},
            queue=ANALYZE_QUEUE,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1},
        )

    @cxr_task(app, TASK_ANALYZE)
    def analyze(self: Any, *, instance_id: int) -> str:
        ctx = context_for(self.app)
        outcome = pipeline.analyze_instance(instance_id, ctx.analysis_deps())
        if outcome in ("analysed", "not_analysed"):
            # Ask for the study's SR once its quiet period has passed (the per-second tick is the safety net).
            study_id = pipeline.study_of(ctx.session_factory, instance_id)
            if study_id is not None:
                app.send_task(TASK_BUILD_REPORT, kwargs={"study_id": study_id}, queue=DELIVER_QUEUE,
                              countdown=ctx.settings.study_stable_seconds + 0.05)
        return outcome

    @cxr_task(app, TASK_BUILD_REPORT)
    def build_report(self: Any, *, study_id: int) -> int:
        ctx = context_for(self.app)
        outbox_ids = pipeline.build_report(study_id, ctx.report_deps())
        deps = ctx.delivery_deps()
        for outbox_id in outbox_ids:
            pipeline.deliver(outbox_id, deps)
        return len(outbox_ids)

    @cxr_task(app, TASK_DELIVER)
    def deliver(self: Any, *, outbox_id: int) -> str:
        return pipeline.deliver(outbox_id, context_for(self.app).delivery_deps())

    @cxr_task(app, TASK_TICK, max_retries=0)
    def tick(self: Any) -> int:
        """Every second: make the SRs that are due and send what is due. Overlapping ticks skip."""
        if not _tick_lock.acquire(blocking=False):
            return 0
        try:
            ctx = context_for(self.app)
            report_deps, delivery_deps = ctx.report_deps(), ctx.delivery_deps()
            done = 0
            for study_id in pipeline.due_reports(report_deps):
                try:
                    pipeline.build_report(study_id, report_deps)
                    done += 1
                except Exception as exc:  # one bad study must not block the others
                    log.error("report failed", study=study_id, error=type(exc).__name__)
            for outbox_id in pipeline.due_deliveries(delivery_deps):
                pipeline.deliver(outbox_id, delivery_deps)
                done += 1
            return done
        finally:
            _tick_lock.release()

    @cxr_task(app, TASK_RECONCILE, max_retries=0)
    def reconcile(self: Any) -> int:
        """Re-queue anything received but unfinished: the database, not Redis, is the record of work."""
        ctx = context_for(self.app)
        grace = timedelta(seconds=max(2 * ctx.settings.reconcile_interval_s, 5.0))
        # Rows (re)queued within the grace (two intervals) are left alone: their message is most likely still in
        # the broker. The batch is bounded, oldest first, so a large backlog is worked through round by round.
        ids = pipeline.instances_to_requeue(
            ctx.session_factory, grace=grace, lease=ctx.lease, requeue_after=grace,
            limit=ctx.settings.reconcile_batch,
        )
        published = 0
        for instance_id in ids:
            try:
                publish_analyze(instance_id)
                published += 1
            except Exception as exc:  # broker down: the rows stay unfinished and come back in a later round
                log.warning("reconciler publish failed", error=type(exc).__name__, remaining=len(ids) - published)
                break
        if ids:
            log.warning("reconciler re-queued instances", count=published, batch=len(ids))
        return published

    app.cxr_publish_analyze = publish_analyze  # type: ignore[attr-defined]
