"""The Celery application: stable task names, two queues, late acknowledgement, bounded retries.

Queues:
  analyze  - inference; a threads-pool worker whose concurrency equals the micro-batch size, so that many
             tasks are in flight at once and the batcher can group them (prefetch suited to batching).
  deliver  - SR building and C-STORE to PACS, plus the periodic tick and reconciler (beat).
"""

from __future__ import annotations

from datetime import timedelta

from celery import Celery
from kombu import Exchange, Queue

from cxr_triage.core.settings import Settings

ANALYZE_QUEUE = "analyze"
DELIVER_QUEUE = "deliver"

TASK_ANALYZE = "cxr.analyze"
TASK_BUILD_REPORT = "cxr.build_report"
TASK_DELIVER = "cxr.deliver"
TASK_TICK = "cxr.tick"
TASK_RECONCILE = "cxr.reconcile"


def make_celery(settings: Settings) -> Celery:
    app = Celery("cxr_triage", broker=settings.effective_redis_url)
    hard_limit = settings.task_time_limit_s
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_default_queue=DELIVER_QUEUE,
        # Each queue on its own direct exchange and key: left implicit, Celery binds every queue to the default
        # queue's exchange and key, so anything published there would reach both queues.
        task_queues=[Queue(q, Exchange(q, type="direct"), routing_key=q) for q in (ANALYZE_QUEUE, DELIVER_QUEUE)],
        task_routes={TASK_ANALYZE: {"queue": ANALYZE_QUEUE}},
        # Nothing is acknowledged before it is done; a worker that dies gives its messages back.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_time_limit=hard_limit,
        task_soft_time_limit=max(hard_limit - 10, 5),
        worker_prefetch_multiplier=1,
        # Redis redelivers an unacknowledged message after the visibility timeout: keep it above the hard
        # time limit, or a slow task would run twice while still alive.
        broker_transport_options={"visibility_timeout": hard_limit * 2 + 60},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        worker_send_task_events=False,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        beat_schedule={
            "tick": {"task": TASK_TICK, "schedule": timedelta(seconds=1), "options": {"expires": 2}},
            "reconcile": {
                "task": TASK_RECONCILE,
                "schedule": timedelta(seconds=settings.reconcile_interval_s),
                "options": {"expires": settings.reconcile_interval_s},
            },
        },
        beat_schedule_filename=str(settings.data_dir / "celerybeat-schedule"),
    )
    app.cxr_settings = settings  # type: ignore[attr-defined]
    from cxr_triage.worker.tasks import register_tasks

    register_tasks(app)
    return app
