"""Queue layout on a real (bundled) Redis: analysis and delivery messages land in their own queue only."""

from __future__ import annotations

import json
from pathlib import Path

import redis

from cxr_triage.bundled_redis import BundledRedis
from cxr_triage.core.settings import Settings
from cxr_triage.worker.celery_app import (
    ANALYZE_QUEUE,
    DELIVER_QUEUE,
    TASK_BUILD_REPORT,
    TASK_TICK,
    make_celery,
)


def _messages(client: redis.Redis, queue: str) -> list[str]:
    return [json.loads(m)["headers"]["task"] for m in client.lrange(queue, 0, -1)]


def test_each_message_reaches_exactly_its_queue(tmp_path: Path) -> None:
    with BundledRedis(tmp_path / "redis") as server:
        settings = Settings(data_dir=tmp_path, redis_url=server.url, _env_file=None)  # type: ignore[call-arg]
        app = make_celery(settings)
        with app.connection_for_write() as conn:  # declare and bind the queues as a worker does
            for queue in app.amqp.queues.values():
                queue.bind(conn.default_channel).declare()
        app.cxr_publish_analyze(7)  # type: ignore[attr-defined]
        app.send_task(TASK_BUILD_REPORT, kwargs={"study_id": 1}, queue=DELIVER_QUEUE)
        app.send_task(TASK_TICK)  # default queue
        # Published through the queue's own exchange too (what another AMQP-minded client might do).
        with app.producer_or_acquire() as producer:
            for queue in (ANALYZE_QUEUE, DELIVER_QUEUE):
                producer.publish({}, exchange=queue, routing_key=queue, headers={"task": f"probe-{queue}"})
        client = redis.Redis(unix_socket_path=str(server.socket_path))
        assert sorted(_messages(client, ANALYZE_QUEUE)) == ["cxr.analyze", "probe-analyze"]
        assert sorted(_messages(client, DELIVER_QUEUE)) == sorted([TASK_BUILD_REPORT, TASK_TICK, "probe-deliver"])
        app.close()
