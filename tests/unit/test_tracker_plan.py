"""The tracker's per-slot decisions, as pure functions: every rule in microseconds."""

from __future__ import annotations

import pytest

from gateway.ledger import Slot
from gateway.tracker_plan import (
    END_MARGIN_MS,
    Limits,
    Step,
    needs_adopting,
    next_poll_in_ms,
    plan_slot,
    predicted_end_s,
)

LIMITS = Limits(lease_ms=30_000, max_job_ms=3_600_000)
NOW = 10_000_000


def slot(state: str, *, started_ago_ms: int = 1_000, lease_left_ms: int = 25_000) -> Slot:
    return Slot(
        id="slot_1",
        team="alpha",
        state=state,
        video="video_1" if state == "bound" else "",
        owner="r1",
        started_ms=NOW - started_ago_ms,
        kind="create",
        want={},
        deadline_ms=NOW + lease_left_ms,
    )


def plan(s: Slot, *, in_flight: bool = False, due_ms: int = 0) -> Step:
    return plan_slot(s, now_ms=NOW, in_flight=in_flight, due_ms=due_ms, limits=LIMITS)


def test_a_bound_job_that_is_due_is_polled_and_one_not_due_only_keeps_its_lease():
    assert plan(slot("bound"), due_ms=NOW) is Step.POLL
    assert plan(slot("bound"), due_ms=NOW + 1) is Step.NOTHING
    assert plan(slot("bound", lease_left_ms=14_999), due_ms=NOW + 1) is Step.RENEW


def test_a_reserved_slot_whose_request_ended_becomes_unknown_and_a_live_one_is_renewed():
    assert plan(slot("reserved")) is Step.MARK_UNKNOWN
    assert plan(slot("reserved"), in_flight=True) is Step.NOTHING
    assert plan(slot("reserved", lease_left_ms=1_000), in_flight=True) is Step.RENEW


def test_a_lost_create_is_settled_only_once_its_request_has_ended():
    assert plan(slot("unknown")) is Step.SETTLE
    assert plan(slot("unknown"), in_flight=True) is Step.NOTHING


def test_a_job_never_seen_to_end_is_expired_unless_its_create_is_still_running_here():
    old = LIMITS.max_job_ms + 1
    for state in ("bound", "reserved", "unknown"):
        assert plan(slot(state, started_ago_ms=old)) is Step.EXPIRE, state
    assert plan(slot("reserved", started_ago_ms=old), in_flight=True) is Step.NOTHING
    assert plan(slot("bound", started_ago_ms=LIMITS.max_job_ms)) is Step.POLL


def test_only_a_foreign_slot_whose_lease_ran_out_is_adopted():
    own, foreign = slot("bound"), slot("bound", lease_left_ms=0)
    assert needs_adopting(own, owner="r1", now_ms=NOW) is False
    assert needs_adopting(foreign, owner="r2", now_ms=NOW) is True
    assert needs_adopting(slot("bound", lease_left_ms=1), owner="r2", now_ms=NOW) is None


def test_the_end_is_predicted_from_the_progress_rate_and_nothing_is_guessed_from_no_motion():
    assert predicted_end_s((0.0, 20.0), 2.0, 60.0) == pytest.approx(2.0)  # 20 %/s, 40 % left
    assert predicted_end_s(None, 2.0, 60.0) is None
    assert predicted_end_s((0.0, 60.0), 2.0, 60.0) is None  # no progress
    assert predicted_end_s((2.0, 20.0), 2.0, 60.0) is None  # no time passed
    assert predicted_end_s((0.0, 20.0), 1.0, 100.0) == 0.0


def test_the_next_poll_is_at_the_predicted_end_and_upstreams_hint_is_honoured_up_to_one_interval():
    assert next_poll_in_ms(5_000, None, None) == 5_000
    assert next_poll_in_ms(5_000, 1.0, None) == 1_000 + END_MARGIN_MS
    assert next_poll_in_ms(5_000, 60.0, None) == 5_000
    assert next_poll_in_ms(5_000, 1.0, 2_500) == 2_500
    assert next_poll_in_ms(5_000, 1.0, 60_000) == 5_000  # never past one interval
