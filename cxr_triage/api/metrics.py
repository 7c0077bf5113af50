"""Prometheus metrics, computed from the database on each scrape (one registry per app, no globals).

The per-stage latencies are **gauge histograms** (`cxr_stage_latency_seconds`) over the instances that finished
in the last `window` seconds (default 1 h), recomputed on every scrape from the per-stage timestamps the pipeline
records (Instance.received_at / queued_at / started_at / inferred_at / stored_at, OutboxItem.created_at / sent_at).
They are distributions of recent work, not ever-growing counters: use them directly (e.g. histogram_quantile over
the gauge buckets), not with rate(). Totals that only grow are exported as counters from DB counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, GaugeHistogramMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.core.states import InstanceState, OutboxState
from cxr_triage.db import worklist
from cxr_triage.db.tables import Analysis, Instance, OutboxItem

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
STAGES = {
    # stage name: (from index, to index) into (received, queued, started, inferred, stored)
    "queue": (0, 2),  # received -> a worker started it
    "inference": (2, 3),  # started -> model output
    "store": (3, 4),  # model output -> stored in DB
    "total": (0, 4),  # received -> stored
}


def _histogram(values: list[float]) -> tuple[list[tuple[str, float]], float]:
    buckets = []
    for bound in BUCKETS:
        buckets.append((str(float(bound)), float(sum(1 for v in values if v <= bound))))
    buckets.append(("+Inf", float(len(values))))
    return buckets, float(sum(values))


class DatabaseCollector(Collector):
    def __init__(self, session_factory: sessionmaker[Session], clock: Callable[[], datetime], window_s: float = 3600):
        self._factory = session_factory
        self._clock = clock
        self._window = timedelta(seconds=window_s)

    def describe(self) -> list[Any]:  # no describe-time DB access
        return []

    def collect(self) -> Iterator[Any]:
        now = self._clock()
        with self._factory() as session:
            by_state = dict(session.execute(select(Instance.state, func.count()).group_by(Instance.state)).all())
            outbox = dict(session.execute(select(OutboxItem.state, func.count()).group_by(OutboxItem.state)).all())
            analyses = session.scalar(select(func.count(Analysis.id))) or 0
            oldest = session.scalar(
                select(func.min(OutboxItem.created_at)).where(OutboxItem.state == OutboxState.PENDING)
            )
            timings = worklist.recent_instance_timings(session, since=now - self._window)
            deliveries = worklist.recent_delivery_timings(session, since=now - self._window)
        g = GaugeMetricFamily("cxr_instances", "Instances by state", labels=["state"])
        for state in InstanceState:
            g.add_metric([state.value], float(by_state.get(state.value, 0)))
        yield g
        o = GaugeMetricFamily("cxr_outbox_items", "SR deliveries by state", labels=["state"])
        for state in OutboxState:
            o.add_metric([state.value], float(outbox.get(state.value, 0)))
        yield o
        yield CounterMetricFamily("cxr_analyses", "Analyses stored (all time)", value=float(analyses))
        age = (now - oldest).total_seconds() if oldest is not None else 0.0
        yield GaugeMetricFamily("cxr_oldest_pending_sr_age_seconds", "Age of the oldest unsent SR (0: none)",
                                value=max(0.0, age))
        h = GaugeHistogramMetricFamily(
            "cxr_stage_latency_seconds",
            "Per-stage latency of instances finished in the last window (recomputed from DB timestamps per scrape)",
            labels=["stage"],
        )
        for stage, (a, b) in STAGES.items():
            values = [
                (row[b] - row[a]).total_seconds() for row in timings if row[a] is not None and row[b] is not None
            ]
            buckets, total = _histogram([max(0.0, v) for v in values])
            h.add_metric([stage], buckets, total)
        sr_values = [max(0.0, (sent - created).total_seconds()) for created, sent in deliveries if sent and created]
        buckets, total = _histogram(sr_values)
        h.add_metric(["sr_delivery"], buckets, total)
        yield h


def make_registry(session_factory: sessionmaker[Session], clock: Callable[[], datetime]) -> tuple[CollectorRegistry, Counter]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(DatabaseCollector(session_factory, clock))
    requests = Counter("cxr_api_requests", "API requests", ["method", "status"], registry=registry)
    return registry, requests
