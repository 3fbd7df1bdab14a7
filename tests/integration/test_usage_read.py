"""The usage report and the admin job list read what the ledger's and scheduler's own
scripts wrote, in a real Redis: the stored format is theirs, never a test's copy."""

from __future__ import annotations

from datetime import date

import pytest
from redis.asyncio import Redis

from gateway.admin_jobs import jobs_list, read_queued
from gateway.budgets import Charge
from gateway.ledger import SlotLedger
from gateway.scheduler import Scheduler, StoredRequest
from gateway.store import StoreUnavailable
from gateway.store_clients import connect
from gateway.usage_report import csv_rows, read_usage, team_report

PRICE = 100_000  # $0.10 per second, in µUSD
TODAY = date(2026, 12, 3)


def charge(day: str, seconds: int = 4, model: str | None = "sora-2") -> Charge:
    return Charge(model, "1280x720", seconds, PRICE, day, day[:7], keep_s=86400)


@pytest.fixture
def ledger(client: Redis) -> SlotLedger:
    return SlotLedger(client, limit=20, team_caps={}, owner="r1", lease_s=60)


async def run(ledger: SlotLedger, slot: str, team: str, job: Charge, outcome: str, **kw) -> int:
    """One job admitted with `job` and settled as `outcome`: what it was charged."""
    admission = await ledger.try_acquire(slot, team, "create", {}, charge=job)
    assert admission.admitted
    released = await ledger.release(slot, outcome=outcome, **kw)
    assert released is not None
    return released.charged_micro


async def test_the_report_is_the_sum_of_the_settled_jobs_day_by_day(
    client: Redis, ledger: SlotLedger
) -> None:
    charged = [
        await run(ledger, "a", "mkt", charge("2026-12-01"), "completed", seconds=8),
        await run(ledger, "b", "mkt", charge("2026-12-01"), "failed"),
        await run(ledger, "c", "mkt", charge("2026-12-03", model=None), "vanished"),
        await run(ledger, "d", "mkt", charge("2026-11-30"), "completed"),  # before the range
        await run(ledger, "e", "rnd", charge("2026-12-01", 12), "completed"),  # another team
    ]
    # Reserved today and not settled yet: in the budget, in no day's jobs.
    pending = await ledger.try_acquire("f", "mkt", "create", {}, charge=charge("2026-12-03"))
    assert pending.admitted

    mkt, rnd = await read_usage(client, ["mkt", "rnd"], date(2026, 12, 1), TODAY, TODAY)
    report = team_report(mkt, date(2026, 12, 1), TODAY, (2.0, None), TODAY)
    assert report["days"] == [
        {
            "date": "2026-12-01",
            "jobs": {"completed": 1, "failed": 1},
            "video_seconds": 8,
            "cost_usd": 0.8,
        },
        {"date": "2026-12-02", "jobs": {}, "video_seconds": 0, "cost_usd": 0.0},
        {"date": "2026-12-03", "jobs": {"vanished": 1}, "video_seconds": 4, "cost_usd": 0.4},
    ]
    assert report["total"] == {
        "jobs": 3,
        "video_seconds": 12,
        "cost_usd": round(sum(charged[:3]) / 1e6, 6),
    }
    budget = report["budget"]
    assert (budget["period"], budget["spent_usd"], budget["reserved_usd"]) == ("day", 0.4, 0.4)
    # The month is December's: November's job is in neither the range nor the month.
    assert (mkt.current.month_spent, mkt.current.month_reserved) == (1_200_000, 400_000)
    # A job with no model is counted under `unknown`; every row is one team's.
    assert [(row[0], row[1], row[2]) for row in csv_rows([mkt, rnd])] == [
        ("2026-12-01", "mkt", "sora-2"),
        ("2026-12-01", "rnd", "sora-2"),
        ("2026-12-03", "mkt", "unknown"),
    ]
    assert rnd.days[0].spent_micro == 1_200_000
    assert rnd.current.day_spent == 0


async def test_a_year_of_days_for_several_teams_is_one_read(client: Redis) -> None:
    usages = await read_usage(client, ["a", "b", "c"], date(2025, 12, 3), TODAY, TODAY)
    assert [len(usage.days) for usage in usages] == [366, 366, 366]
    assert all(day.spent_micro == 0 for usage in usages for day in usage.days)


async def test_queued_and_running_jobs_are_listed_without_their_requests(
    client: Redis, ledger: SlotLedger
) -> None:
    small = SlotLedger(client, limit=1, team_caps={}, owner="r1", lease_s=60)
    scheduler = Scheduler(client, small, max_queued=10, team_max_queued={})
    busy = await small.try_acquire("busy", "rnd", "edit", {}, charge=charge("2026-12-03"))
    assert busy.admitted
    for n, team in enumerate(["mkt", "mkt", "rnd"]):
        enqueued = await scheduler.enqueue(
            f"video_q{n}",
            f"slot_q{n}",
            team=team,
            kind="create",
            want={"prompt": "fingerprint", "size": "720x1280"},
            request=StoredRequest("videos", "application/json", {}, b'{"prompt": "secret words"}'),
            video={"id": f"video_q{n}", "status": "queued"},
            charge=charge("2026-12-03", seconds=8, model="sora-2-pro") if n == 0 else None,
        )
        assert enqueued.outcome == "queued"

    queued = await read_queued(client, scheduler.max_queued)
    assert [job.id for job in queued] == ["video_q0", "video_q1", "video_q2"]
    assert len(await read_queued(client, 2)) == 2  # bounded
    positions = {job.id: await scheduler.position(job.id) for job in queued}
    listed = jobs_list((await small.snapshot()).slots, queued, positions)
    assert "secret words" not in str(listed)
    assert "fingerprint" not in str(listed)
    running, *waiting = listed["data"]
    assert (running["id"], running["state"], running["kind"], running["seconds"]) == (
        "busy",
        "running",
        "edit",
        4,
    )
    assert sorted(job["queue_position"] for job in waiting) == [1, 2, 3]
    first = next(job for job in waiting if job["id"] == "video_q0")
    assert (first["team"], first["model"], first["size"], first["seconds"]) == (
        "mkt",
        "sora-2-pro",
        "1280x720",
        8,
    )
    no_charge = next(job for job in waiting if job["id"] == "video_q1")
    assert (no_charge["model"], no_charge["size"]) == (None, "720x1280")  # what it fixed
    assert isinstance(first["queued_at"], int)
    assert first["started_at"] is None


async def test_an_unreachable_store_is_a_store_failure() -> None:
    dead = connect("redis://127.0.0.1:1/0")
    try:
        with pytest.raises(StoreUnavailable):
            await read_usage(dead, ["a"], TODAY, TODAY, TODAY)
        with pytest.raises(StoreUnavailable):
            await read_queued(dead, 10)
    finally:
        await dead.aclose()
