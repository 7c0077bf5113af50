"""Per-process worker resources, built once on first use and handed to the pipeline as arguments.

A Celery task can't take constructor arguments, so each worker process builds one WorkerContext from its
settings: database sessions, the analyzer and its micro-batcher (analyze queue only), SR clients.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from cxr_triage.core.settings import Settings
from cxr_triage.db.session import make_engine, make_session_factory
from cxr_triage.worker.batcher import MicroBatcher
from cxr_triage.worker.leases import LeaseKeeper
from cxr_triage.worker.pipeline import (
    AlgorithmLabel,
    AnalysisDeps,
    DeliveryDeps,
    ReportDeps,
    fallback_algorithm_label,
    utcnow,
)


@dataclass
class WorkerContext:
    settings: Settings
    session_factory: sessionmaker[Session]
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _analysis: AnalysisDeps | None = None
    _clients: dict[str, Any] = field(default_factory=dict)
    _labels: dict[str, AlgorithmLabel] = field(default_factory=dict)

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
            algorithm=self.algorithm_label,
        )

    def algorithm_label(self, model_version: str, demo: bool) -> AlgorithmLabel:
        """The SR's algorithm name and version for results of `model_version`, as the analyzer names them.

        This process's analyzer when it produced that version (``work`` on both queues); else an analyzer built
        from the model cards of that version without engines (the deliver worker loads no models); else the
        analyzer's formula. Cached per version.
        """
        with self._lock:
            cached = self._labels.get(model_version)
            analysis = self._analysis
        if cached is not None:
            return cached
        label: AlgorithmLabel | None = None
        if analysis is not None and getattr(analysis.analyzer, "model_version", None) == model_version:
            label = _label_of(analysis.analyzer)
        if label is None:
            label = _label_from_cards(self.settings.models_path, model_version)
        if label is None:
            label = fallback_algorithm_label(model_version, demo)
        with self._lock:
            self._labels[model_version] = label
        return label

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


def _label_of(analyzer: Any) -> AlgorithmLabel | None:
    name, version = getattr(analyzer, "algorithm_name", None), getattr(analyzer, "algorithm_version", None)
    if isinstance(name, str) and name and isinstance(version, str) and version:
        return AlgorithmLabel(name=name, version=version)
    return None


def _label_from_cards(models_dir: Path, model_version: str) -> AlgorithmLabel | None:
    """An Analyzer over the cards that made `model_version` (no engines, nothing runs), for its name and version."""
    try:
        from cxr_triage.models.analyzer import Analyzer
        from cxr_triage.models.registry import list_cards

        by_ref = {card.ref: card for card in list_cards(models_dir)}
        cards = [by_ref[ref] for ref in model_version.split("+")]
        classifiers = [c for c in cards if c.task == "classification"]
        detectors = [c for c in cards if c.task == "detection"]
        if len(classifiers) != 1 or len(classifiers) + len(detectors) != len(cards):
            return None
        analyzer = Analyzer(
            classifier_card=classifiers[0],
            classifier_engine=None,
            detector_card=detectors[0] if detectors else None,
            detector_engine=None,
            ensemble_members=[(card, None) for card in detectors[1:]],
        )
    except Exception:  # cards removed or unreadable: the caller falls back to the analyzer's formula
        return None
    if analyzer.model_version != model_version:
        return None
    return _label_of(analyzer)


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
