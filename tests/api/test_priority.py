"""The worklist ordering policy (pure function, controllable clock)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from cxr_triage.api.priority import PriorityPolicy, Tier, WorklistItem, rank

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=timezone.utc)
POLICY = PriorityPolicy(max_wait_stat=15, max_wait_flagged=30, max_wait_high=60, max_wait_not_analysed=60,
                        max_wait_routine=240, max_wait_low=480)


def item(i, minutes, **kw):
    return WorklistItem(study_id=i, received_at=NOW - timedelta(minutes=minutes), **kw)


def ids(ranked):
    return [r.study_id for r in ranked]


def test_score_orders_within_tiers():
    items = [item(1, 5, pneumonia_score=0.2, flagged=False), item(2, 5, pneumonia_score=0.95, flagged=True),
             item(3, 5, pneumonia_score=0.6, flagged=True), item(4, 5, pneumonia_score=0.4, flagged=False)]
    r = rank(items, now=NOW, policy=POLICY)
    assert ids(r) == [2, 3, 4, 1]
    assert r[0].tier is Tier.FLAGGED and "suspected pneumonia 0.95" in r[0].reasons


def test_urgency_and_not_analysed():
    items = [item(1, 1, pneumonia_score=0.9, flagged=True), item(2, 1, urgency="STAT", pneumonia_score=0.1, flagged=False),
             item(3, 1, urgency="HIGH", pneumonia_score=0.1, flagged=False),
             item(4, 1, state="not_analysed", not_analysed_reasons=("not-chest",)),
             item(5, 1, state="failed", not_analysed_reasons=("decode-failed",)),
             item(6, 1, state="receiving"), item(7, 1, urgency="LOW", pneumonia_score=0.3, flagged=False),
             item(8, 1, urgency="MEDIUM", pneumonia_score=0.5, flagged=False)]
    r = rank(items, now=NOW, policy=POLICY)
    # 4 (not analysed) and 5 (failed) share the needs-a-read tier and the same wait: the study id breaks the tie.
    assert ids(r) == [2, 1, 3, 4, 5, 8, 7, 6]
    by = {x.study_id: x for x in r}
    assert by[4].tier is Tier.NEEDS_EYES and "needs a human read" in by[4].reasons[0]
    assert by[5].reasons[0].startswith("analysis failed")
    assert by[6].tier is Tier.OTHER and "analysis pending" in by[6].reasons
    assert by[2].reasons[0] == "STAT"


def test_ageing_promotes_and_no_study_waits_unbounded():
    routine_old = item(1, 241, pneumonia_score=0.01, flagged=False)
    flagged_new = item(2, 1, pneumonia_score=0.99, flagged=True)
    stat_new = item(3, 1, urgency="STAT")
    r = rank([flagged_new, stat_new, routine_old], now=NOW, policy=POLICY)
    assert ids(r) == [1, 3, 2]
    assert r[0].overdue and r[0].reasons[0] == "waited 4.0 h > 4.0 h cap for routine"
    # not yet overdue one minute earlier
    r = rank([flagged_new, stat_new, routine_old], now=NOW - timedelta(minutes=2), policy=POLICY)
    assert ids(r)[-1] == 1
    # a flagged study's cap is the shorter flagged cap
    r = rank([item(4, 31, pneumonia_score=0.7, flagged=True)], now=NOW, policy=POLICY)
    assert r[0].overdue and "cap for flagged" in r[0].reasons[0]
    # configurable caps
    r = rank([item(5, 20, pneumonia_score=0.1, flagged=False)], now=NOW,
             policy=PriorityPolicy(max_wait_routine=10))
    assert r[0].overdue and "waited 20 min > 10 min cap for routine" == r[0].reasons[0]


def test_overdue_stat_first_then_by_fraction_of_cap_and_stable():
    a = item(1, 300, pneumonia_score=0.1, flagged=False)  # 60 min past the 240 min routine cap: 25 %
    b = item(2, 40, urgency="STAT")  # 25 min past the 15 min STAT cap
    c = item(3, 300, pneumonia_score=0.1, flagged=False)
    r = rank([b, c, a], now=NOW, policy=POLICY)
    assert ids(r) == [2, 1, 3]
    assert all(x.tier is Tier.OVERDUE for x in r)
    assert ids(rank([a, b, c], now=NOW, policy=POLICY)) == ids(r)


def test_overdue_order_follows_the_clock():
    """Worked example from the audit, on a controllable clock: a STAT study one minute past its 15 min cap is read
    before a routine one an hour past its 240 min cap; a flagged study 15 min past its 30 min cap (50 %) comes
    before that routine one (25 %) although it is fewer minutes late."""
    t0 = NOW - timedelta(hours=6)
    routine = WorklistItem(study_id=1, received_at=t0, pneumonia_score=0.1, flagged=False)
    flagged = WorklistItem(study_id=2, received_at=t0 + timedelta(minutes=255), pneumonia_score=0.8, flagged=True)
    stat = WorklistItem(study_id=3, received_at=t0 + timedelta(minutes=284), urgency="STAT")
    items = [routine, flagged, stat]

    now = t0 + timedelta(minutes=299)  # routine 59 min over, flagged 14 over, STAT 0 over (not yet overdue)
    r = rank(items, now=now, policy=POLICY)
    assert [(x.study_id, x.overdue) for x in r] == [(2, True), (1, True), (3, False)]

    now = t0 + timedelta(minutes=300)  # routine 60 over (25 %), flagged 15 over (50 %), STAT 1 over
    r = rank(items, now=now, policy=POLICY)
    assert ids(r) == [3, 2, 1] and all(x.overdue for x in r)
    assert r[0].reasons[0] == "waited 16 min > 15 min cap for stat"

    # A second overdue STAT study: among STAT ones, the further past the cap goes first.
    stat_older = WorklistItem(study_id=4, received_at=t0 + timedelta(minutes=270), urgency="STAT")
    assert ids(rank([*items, stat_older], now=now, policy=POLICY)) == [4, 3, 2, 1]
