"""Reading-worklist order: a pure function of the studies, the clock and a policy.

Policy (documented in README/API docs, tested in tests/api/test_priority.py):

Every unread study gets a *wait class* and a *maximum wait* (minutes, configurable):

=============  =================================================  ======================  =========
class          which studies                                      env var                 default
=============  =================================================  ======================  =========
stat           urgency STAT (e.g. emergency department)           CXR_MAX_WAIT_STAT       15
flagged        suspected pneumonia (model flag)                   CXR_MAX_WAIT_FLAGGED    30
high           urgency HIGH                                       CXR_MAX_WAIT_HIGH       60
not_analysed   no automated result (out of scope, failed)         CXR_MAX_WAIT_NOT_ANALYSED 60
routine        urgency ROUTINE / MEDIUM / absent                  CXR_MAX_WAIT_ROUTINE    240
low            urgency LOW                                        CXR_MAX_WAIT_LOW        480
=============  =================================================  ======================  =========

A study belonging to several classes (a flagged routine study) takes the *shortest* maximum wait among them.
Tiers, best first:

0. ``overdue``     waited longer than its maximum wait -- no study waits unbounded. Overdue STAT studies first
                   (the requester said minutes matter), then the others by how far past their cap they are as a
                   fraction of it: 15 min past a 30 min cap (50 %) before 60 min past a 240 min cap (25 %).
                   Absolute minutes would let a routine study's long cap outweigh a short, urgent one.
1. ``stat``        STAT urgency. Longest wait first.
2. ``flagged``     suspected pneumonia. Highest score first, then longest wait.
3. ``high``        HIGH urgency. Longest wait first.
4. ``needs_eyes``  could not be analysed or analysis failed: needs a human read, never shown as negative.
                   Longest wait first.
5. ``other``       everything else (including "analysis pending"). Highest score first (pending last), then
                   longest wait.

Ties are broken by study id, so the order is total and stable.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from enum import IntEnum

from cxr_triage.core.states import StudyState


class Tier(IntEnum):
    OVERDUE = 0
    STAT = 1
    FLAGGED = 2
    HIGH = 3
    NEEDS_EYES = 4
    OTHER = 5


TIER_LABELS = {
    Tier.OVERDUE: "overdue",
    Tier.STAT: "STAT",
    Tier.FLAGGED: "suspected pneumonia",
    Tier.HIGH: "high urgency",
    Tier.NEEDS_EYES: "not analysed",
    Tier.OTHER: "routine",
}


@dataclass(frozen=True)
class PriorityPolicy:
    """Maximum wait per class, in minutes."""

    max_wait_stat: float = 15
    max_wait_flagged: float = 30
    max_wait_high: float = 60
    max_wait_not_analysed: float = 60
    max_wait_routine: float = 240
    max_wait_low: float = 480


@dataclass(frozen=True)
class WorklistItem:
    """What ranking needs to know about one unread study (no PHI)."""

    study_id: int
    received_at: datetime
    urgency: str | None = None  # STAT | HIGH | ROUTINE | MEDIUM | LOW | None
    pneumonia_score: float | None = None
    flagged: bool | None = None
    state: str = StudyState.ANALYSED
    not_analysed_reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ranked:
    study_id: int
    tier: Tier
    score: float | None
    reasons: tuple[str, ...]
    waited_min: float
    max_wait_min: float
    wait_class: str
    overdue: bool = False
    sort_key: tuple[float, ...] = field(default=(), compare=False, repr=False)

    @property
    def tier_name(self) -> str:
        return TIER_LABELS[self.tier]


def _norm_urgency(urgency: str | None) -> str:
    u = (urgency or "").strip().upper()
    if u in ("STAT", "HIGH", "LOW"):
        return u
    return "ROUTINE"  # ROUTINE, MEDIUM, absent or unknown


def _has_result(item: WorklistItem) -> bool:
    return item.pneumonia_score is not None


def _needs_eyes(item: WorklistItem) -> bool:
    return not _has_result(item) and item.state in (StudyState.NOT_ANALYSED, StudyState.FAILED)


def classify(item: WorklistItem, policy: PriorityPolicy) -> tuple[str, float]:
    """The wait class and its maximum wait in minutes (the shortest cap among the classes that apply)."""
    urgency = _norm_urgency(item.urgency)
    candidates: list[tuple[float, str]] = []
    if urgency == "STAT":
        candidates.append((policy.max_wait_stat, "stat"))
    elif urgency == "HIGH":
        candidates.append((policy.max_wait_high, "high"))
    elif urgency == "LOW":
        candidates.append((policy.max_wait_low, "low"))
    else:
        candidates.append((policy.max_wait_routine, "routine"))
    if item.flagged and _has_result(item):
        candidates.append((policy.max_wait_flagged, "flagged"))
    if _needs_eyes(item):
        candidates.append((policy.max_wait_not_analysed, "not analysed"))
    cap, name = min(candidates, key=lambda c: c[0])
    return name, float(cap)


def _fmt_min(minutes: float) -> str:
    if minutes >= 120:
        return f"{minutes / 60:.1f} h"
    return f"{int(minutes)} min"


def rank_one(item: WorklistItem, *, now: datetime, policy: PriorityPolicy) -> Ranked:
    waited = max(0.0, (now - item.received_at).total_seconds() / 60.0)
    wait_class, cap = classify(item, policy)
    urgency = _norm_urgency(item.urgency)
    score = item.pneumonia_score
    reasons: list[str] = []
    overdue = waited > cap
    if overdue:
        reasons.append(f"waited {_fmt_min(waited)} > {_fmt_min(cap)} cap for {wait_class}")
    if urgency == "STAT":
        reasons.append("STAT")
    elif urgency == "HIGH":
        reasons.append("high urgency")
    if _has_result(item):
        if item.flagged:
            reasons.append(f"suspected pneumonia {score:.2f}")
        else:
            reasons.append(f"pneumonia score {score:.2f} (below threshold)")
        if item.not_analysed_reasons:
            reasons.append("some images not analysed: " + ", ".join(item.not_analysed_reasons))
    elif _needs_eyes(item):
        label = "analysis failed" if item.state == StudyState.FAILED else "not analysed"
        why = ", ".join(item.not_analysed_reasons) or item.state
        reasons.append(f"{label} ({why}): needs a human read")
    else:
        reasons.append("analysis pending")
    if not overdue:
        reasons.append(f"waited {_fmt_min(waited)} of {_fmt_min(cap)} ({wait_class})")

    score_key = -(score if score is not None else -1.0)
    if overdue:
        tier, key = Tier.OVERDUE, (0.0 if urgency == "STAT" else 1.0, -(waited - cap) / cap, -waited)
    elif urgency == "STAT":
        tier, key = Tier.STAT, (-waited, 0.0)
    elif item.flagged and _has_result(item):
        tier, key = Tier.FLAGGED, (score_key, -waited)
    elif urgency == "HIGH":
        tier, key = Tier.HIGH, (-waited, 0.0)
    elif _needs_eyes(item):
        tier, key = Tier.NEEDS_EYES, (-waited, 0.0)
    else:
        tier, key = Tier.OTHER, (score_key, -waited)
    return Ranked(
        study_id=item.study_id,
        tier=tier,
        score=score,
        reasons=tuple(reasons),
        waited_min=waited,
        max_wait_min=cap,
        wait_class=wait_class,
        overdue=overdue,
        sort_key=(float(tier), *key, float(item.study_id)),
    )


def rank(items: Iterable[WorklistItem], *, now: datetime, policy: PriorityPolicy) -> list[Ranked]:
    """Order unread studies for reading (see the module docstring for the policy)."""
    ranked = [rank_one(item, now=now, policy=policy) for item in items]
    ranked.sort(key=lambda r: r.sort_key)
    return ranked
