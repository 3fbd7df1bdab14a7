"""What a create's outcome does to its slot, the retry estimate and the source check:
the admission rules as pure functions."""

from __future__ import annotations

import pytest

from gateway.errors import UpstreamError
from gateway.quota import SlotFate, fate_of, retry_after_s
from gateway.registry import VideoRecord
from gateway.sources import source_refusal
from gateway.upstream import Reply


def reply(status: int) -> Reply:
    return Reply(status, {}, b"{}")


@pytest.mark.parametrize(
    ("status", "fate"),
    [
        (200, SlotFate.BIND),
        (201, SlotFate.BIND),
        (302, SlotFate.RELEASE),
        (400, SlotFate.RELEASE),
        (404, SlotFate.RELEASE),
        (429, SlotFate.RELEASE),
        (500, SlotFate.KEEP),
        (503, SlotFate.KEEP),
    ],
)
def test_an_answer_binds_frees_or_keeps_the_slot_by_its_status(status: int, fate: SlotFate):
    assert fate_of(reply(status)) is fate


def test_a_transport_failure_keeps_the_slot_only_if_the_request_may_have_reached_upstream():
    never_sent = UpstreamError(502, "upstream_unavailable", "refused", maybe_sent=False)
    maybe_sent = UpstreamError(504, "upstream_timeout", "no answer", maybe_sent=True)
    assert fate_of(never_sent) is SlotFate.RELEASE
    assert fate_of(maybe_sent) is SlotFate.KEEP


def test_the_retry_estimate_grows_by_half_a_job_per_round_of_slots_ahead():
    assert retry_after_s(0, 2, 30.0) == 15.0
    assert retry_after_s(1, 2, 30.0) == 15.0
    assert retry_after_s(2, 2, 30.0) == 30.0
    assert retry_after_s(5, 2, 30.0) == 45.0
    assert retry_after_s(0, 2, 0.5) == 1.0  # never under a second
    assert retry_after_s(3, 0, 10.0) == 20.0  # a zero limit is not a division by zero


def record(status: str, expires_at: int | None = None) -> VideoRecord:
    return VideoRecord("video_1", "alpha", "create", status, expires_at, "{}")


def test_a_source_must_be_known_completed_and_unexpired():
    assert source_refusal(record("completed", 2_000), "video_id", now=1_999) is None
    assert source_refusal(record("completed"), "video_id", now=1e12) is None  # no expiry yet
    cases = [
        (None, "invalid_video_id"),
        (record("in_progress"), "video_not_completed"),
        (record("failed"), "video_not_completed"),
        (record("completed", 2_000), "video_expired"),
    ]
    for source, code in cases:
        refusal = source_refusal(source, "video.id", now=2_000)
        assert refusal is not None
        assert (refusal.status, refusal.code, refusal.param) == (400, code, "video.id")
