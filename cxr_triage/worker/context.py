"""Per-process worker resources, built once on first use and handed to the pipeline as arguments.

A Celery task can't take constructor arguments, so each worker process builds one WorkerContext from its
settings: database sessions, the analyzer and its micro-batcher (analyze queue only), SR clients.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.core.settings import Settings
from cxr_triage.db.session import make_engine, make_session_factory
from cxr_triage.worker.batcher import MicroBatcher
from cxr_triage.worker.leases import LeaseKeeper
from cxr_triage.worker.pipeline import AnalysisDeps, DeliveryDeps, ReportDeps, utcnow


@dataclass
class WorkerContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _analysis: AnalysisDeps | None = None
    _clients: dict[str, Any] = field(default_factory=dict)

    @property
    def lease(self) -> timedelta:
        """An analysis claim's lease: short, because a live worker renews it (:mod:`cxr_triage.worker.leases`)."""
        return timedelta(seconds=self.settings.analysis_lease_s)

    def analysis_deps(self) -> AnalysisDeps:
        with self._lock:
            if self._analysis is None:
                from cxr_triage.models.analyzer import NotAnalysable, build_analyzer

                analyzer = build_analyzer(
                    models_dir=self.settings.models_path,
                    demo=self.settings.demo_models,
                    engine=self.settings.engine,
                    max_bytes=self.settings.max_image_bytes,
                )
                batcher = MicroBatcher(
                    analyzer.infer, max_batch=self.settings.batch_size, max_wait_ms=self.settings.batch_wait_ms
                )
                threshold = _operating_threshold(analyzer)
                self._analysis = AnalysisDeps(
                    session_factory=self.session_factory,
                    analyzer=analyzer,
                    batcher=batcher,
                    spool_dir=self.settings.spool_dir,
                    lease=self.lease,
                    max_attempts=self.settings.max_attempts,
                    threshold=threshold,
                    not_analysable=NotAnalysable,
                    leases=LeaseKeeper(
                        self.session_factory,
                        lease=self.lease,
                        max_hold=timedelta(seconds=self.settings.task_time_limit_s),
                        clock=utcnow,
                    ),
                )
            return self._analysis

    def report_deps(self) -> ReportDeps:
        return ReportDeps(
            session_factory=self.session_factory,
            spool_dir=self.settings.spool_dir,
            sr_dir=self.settings.sr_dir,
            destinations=self.settings.pacs,
            stable=timedelta(seconds=self.settings.study_stable_seconds),
        )

    def delivery_deps(self) -> DeliveryDeps:
        return DeliveryDeps(
            session_factory=self.session_factory,
            sr_dir=self.settings.sr_dir,
            client_for=self._client_for,
            retry_max_s=self.settings.sr_retry_max_s,
        )

    def _client_for(self, destination: str) -> Any:
        # One persistent association per destination per process (SR send: 48 ms -> 4.6 ms per object).
        from cxr_triage.core.settings import Destination
        from cxr_triage.dicom_node.sender import StoreClient

        with self._lock:
            client = self._clients.get(destination)
            if client is None:
                client = StoreClient(Destination.parse(destination), calling_ae=self.settings.ae_title)
                self._clients[destination] = client
            return client


def _operating_threshold(analyzer: Any) -> float:
    for card in getattr(analyzer, "cards", ()):
        thresholds = getattr(card, "thresholds", None) or getattr(card, "operating_thresholds", None) or {}
        if "Pneumonia" in thresholds:
            return float(thresholds["Pneumonia"])
    return 0.5


_contexts: dict[int, WorkerContext] = {}
_contexts_lock = threading.Lock()


def context_for(app: Any) -> WorkerContext:
    """The context of this process for this Celery app (keyed by the app object)."""
    with _contexts_lock:
        ctx = _contexts.get(id(app))
        if ctx is None:
            settings: Settings = app.cxr_settings
            engine = make_engine(settings.effective_database_url)
            ctx = WorkerContext(settings=settings, session_factory=make_session_factory(engine))
            _contexts[id(app)] = ctx
        return ctx
