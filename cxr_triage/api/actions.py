"""Admin actions the API asks the worker layer to perform (injected; the API never imports the worker)."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class AdminActions(Protocol):
    def requeue_instances(self, instance_ids: list[int]) -> None:
        """Publish analysis tasks for these instances (the API has already reset quarantined ones)."""

    def resend_report(self, report_id: int) -> None:
        """Publish delivery of this SR (the API has already reset its outbox rows to pending)."""
