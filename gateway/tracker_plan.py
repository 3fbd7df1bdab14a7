"""The tracker's decisions, as pure functions of what it read: fast to test, no I/O.

The tracker (tracker.py) reads the ledger once per tick, asks `plan_slot` what to do
with each slot it looks after, does it, and after a poll asks `next_poll_in_ms` when to
look again. Everything here is a function of its arguments (times in store ms), so each
rule is tested in microseconds (tests/unit/test_tracker_plan.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .ledger import Slot

END_MARGIN_MS = 5  # poll just after the predicted end, not just before it


class Step(enum.Enum):
    """What one tick does with one slot of this replica."""

    NOTHING = "nothing"
    RENEW = "renew"  # alive, and half its lease is gone: extend it
    POLL = "poll"  # a bound job is due: ask upstream how it stands
    MARK_UNKNOWN = "mark_unknown"  # reserved, but its request has ended without settling it
    SETTLE = "settle"  # a lost create: look for its job among upstream's recent ones
    EXPIRE = "expire"  # never seen to end after quota.max_job_s: release it anyway


@dataclass(frozen=True)
class Limits:
    """The tracker's settings, in the store's milliseconds."""

    lease_ms: int
    max_job_ms: int


def plan_slot(slot: Slot, *, now_ms: int, in_flight: bool, due_ms: int, limits: Limits) -> Step:
    """The step for a slot this replica owns.

    `in_flight`: its create is still running in this process (its request settles it,
    the tracker only keeps its lease alive). `due_ms`: when its job should next be
    polled (0 when never polled).
    """
    lease_half_gone = slot.deadline_ms - now_ms < limits.lease_ms / 2
    if not in_flight and now_ms - slot.started_ms > limits.max_job_ms:
        return Step.EXPIRE
    if slot.state == "reserved":
        if not in_flight:
            return Step.MARK_UNKNOWN
        return Step.RENEW if lease_half_gone else Step.NOTHING
    if slot.state == "bound":
        if due_ms <= now_ms:
            return Step.POLL
        return Step.RENEW if lease_half_gone else Step.NOTHING
    if slot.state == "unknown" and not in_flight:
        return Step.SETTLE
    return Step.NOTHING


def needs_adopting(slot: Slot, *, owner: str, now_ms: int) -> bool | None:
    """True: another replica's slot whose lease ran out (adopt it); False: this
    replica's own; None: a live slot of another replica (leave it alone)."""
    if slot.owner == owner:
        return False
    return True if slot.deadline_ms <= now_ms else None


def predicted_end_s(
    previous: tuple[float, float] | None, now_s: float, progress: float
) -> float | None:
    """Seconds until a job should end, from how fast its progress (%) moved since the
    `previous` (time, progress) sample; None when that says nothing."""
    if previous is None or progress <= previous[1] or now_s <= previous[0]:
        return None
    rate = (progress - previous[1]) / (now_s - previous[0])
    return max(0.0, (100 - progress) / rate)


def next_poll_in_ms(
    interval_ms: float, predicted_s: float | None, poll_after_ms: int | None
) -> int:
    """When to poll a running job again: at its predicted end if sooner than one
    interval; upstream's `openai-poll-after-ms` is honoured up to one interval, since
    the contract promises a slot free within two intervals of its job's end."""
    due_ms = interval_ms
    if predicted_s is not None:
        due_ms = min(due_ms, predicted_s * 1000 + END_MARGIN_MS)
    if poll_after_ms is not None:
        due_ms = max(due_ms, min(poll_after_ms, interval_ms))
    return int(due_ms)
