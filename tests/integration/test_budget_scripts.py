"""Reservation and settlement in the ledger's and the scheduler's own scripts (CONTRACT §9)."""

from __future__ import annotations

from redis.asyncio import Redis

from gateway.budgets import Charge, Limits, Totals, read_totals
from gateway.ledger import SlotLedger
from gateway.scheduler import Scheduler, StoredRequest
from gateway.store import usage_day_key

DAY, MONTH = "2026-12-01", "2026-12"
PRICE = 100_000  # $0.10 per second, in µUSD
TWO_DOLLARS = Limits(day_micro=2_000_000, month_micro=None)


def charge(seconds: int = 4, model: str = "sora-2") -> Charge:
    return Charge(model, "1280x720", seconds, PRICE, DAY, MONTH, keep_s=86400)


async def test_jobs_reserve_until_the_budget_and_the_next_is_refused_at_once(client: Redis) -> None:
    ledger = SlotLedger(client, limit=10, team_caps={}, owner="r1", lease_s=60)
    for n in range(5):  # 5 x $0.40 = $2.00
        admission = await ledger.try_acquire(
            f"s{n}", "mkt", "create", {}, charge=charge(), limits=TWO_DOLLARS
        )
        assert admission.admitted
    refused = await ledger.try_acquire(
        "s5", "mkt", "create", {}, charge=charge(), limits=TWO_DOLLARS
    )
    assert (refused.admitted, refused.reason) == (False, "budget_exceeded")
    assert refused.over is not None
    assert (refused.over.period, refused.over.limit_micro, refused.over.reserved_micro) == (
        "day",
        2_000_000,
        2_000_000,
    )
    assert await read_totals(client, "mkt", DAY, MONTH) == Totals(0, 2_000_000, 0, 2_000_000)


async def test_each_job_is_settled_once_by_its_outcome(client: Redis) -> None:
    ledger = SlotLedger(client, limit=10, team_caps={}, owner="r1", lease_s=60)
    for slot in ("done", "failed", "gone"):
        assert (await ledger.try_acquire(slot, "mkt", "create", {}, charge=charge())).admitted
    completed = await ledger.release("done", outcome="completed", seconds=8)  # upstream made 8 s
    assert completed is not None
    assert (completed.charged_micro, completed.charged_s, completed.model) == (800_000, 8, "sora-2")
    assert await ledger.release("done", outcome="completed", seconds=8) is None  # once
    failed = await ledger.release("failed", outcome="failed")
    assert failed is not None
    assert failed.charged_micro == 0
    vanished = await ledger.release("gone", outcome="vanished")
    assert vanished is not None
    assert vanished.charged_micro == 400_000  # as reserved
    assert await read_totals(client, "mkt", DAY, MONTH) == Totals(1_200_000, 0, 1_200_000, 0)
    usage = await client.hgetall(usage_day_key("mkt", DAY))
    assert {k.decode(): int(v) for k, v in usage.items()} == {
        "spent": 1_200_000,
        "reserved": 0,
        "sora-2|cost": 1_200_000,
        "sora-2|seconds": 12,
        "sora-2|jobs|completed": 1,
        "sora-2|jobs|failed": 1,
        "sora-2|jobs|vanished": 1,
    }


async def test_a_queued_job_reserves_and_a_delete_while_queued_is_charged_nothing(
    client: Redis,
) -> None:
    ledger = SlotLedger(client, limit=1, team_caps={}, owner="r1", lease_s=60)
    scheduler = Scheduler(client, ledger, max_queued=10, team_max_queued={})
    assert (await ledger.try_acquire("running", "other", "create", {})).admitted
    request = StoredRequest("videos", "application/json", {}, b"{}")
    queued = await scheduler.enqueue(
        "video_q",
        "slot_q",
        team="mkt",
        kind="create",
        want={},
        request=request,
        video={"id": "video_q", "status": "queued"},
        charge=charge(),
        limits=TWO_DOLLARS,
    )
    assert queued.outcome == "queued"
    assert await read_totals(client, "mkt", DAY, MONTH) == Totals(0, 400_000, 0, 400_000)
    assert await scheduler.cancel("video_q", "mkt") == 1
    assert await read_totals(client, "mkt", DAY, MONTH) == Totals(0, 0, 0, 0)
    assert await client.hget(usage_day_key("mkt", DAY), "sora-2|jobs|deleted") == b"1"


async def test_a_waiter_reserves_when_it_joins_so_one_that_cannot_fit_never_waits(
    client: Redis,
) -> None:
    ledger = SlotLedger(client, limit=2, team_caps={}, owner="r1", lease_s=60)
    for n in range(2):  # both slots: $0.80 reserved
        assert (
            await ledger.try_acquire(
                f"run{n}", "mkt", "create", {}, charge=charge(), limits=TWO_DOLLARS
            )
        ).admitted
    for n in range(3):  # three waiters: $1.20 more, held while they wait
        waiting = await ledger.try_acquire(
            f"w{n}", "mkt", "create", {}, charge=charge(), limits=TWO_DOLLARS
        )
        assert (waiting.admitted, waiting.reason) == (False, "global_limit")
    assert await read_totals(client, "mkt", DAY, MONTH) == Totals(0, 2_000_000, 0, 2_000_000)
    sixth = await ledger.try_acquire("w3", "mkt", "create", {}, charge=charge(), limits=TWO_DOLLARS)
    assert sixth.reason == "budget_exceeded"  # at once: the waiters' cost counts
    again = await ledger.try_acquire("w0", "mkt", "create", {}, charge=charge(), limits=TWO_DOLLARS)
    assert again.reason == "global_limit"  # a waiter's own retry is not charged twice
    await ledger.abandon("w2")  # gone without a slot: its reservation is given back
    assert await read_totals(client, "mkt", DAY, MONTH) == Totals(0, 1_600_000, 0, 1_600_000)
    await ledger.release("run0", outcome="completed", seconds=4)
    admitted = await ledger.try_acquire(
        "w0", "mkt", "create", {}, charge=charge(), limits=TWO_DOLLARS
    )
    assert admitted.admitted  # its reservation moved to the slot: nothing more reserved
    assert await read_totals(client, "mkt", DAY, MONTH) == Totals(
        400_000, 1_200_000, 400_000, 1_200_000
    )
