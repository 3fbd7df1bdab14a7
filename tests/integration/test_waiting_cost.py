"""The cost of one admission decision does not grow with the number of waiters.

Each waiting request re-runs the acquire script several times a second, so a script
that walks every waiter costs O(waiters) per call and O(waiters²) per second. The
ledger keeps one FIFO per team and merges their heads; here the store itself counts
the commands one decision runs (INFO commandstats counts those run inside scripts),
with 10 and with 1,000 waiters queued, and the fair-share order of CONTRACT §8.1 is
checked on the same FIFOs.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis
from redis.asyncio import Redis

from gateway.embedded_store import EmbeddedRedis
from gateway.ledger import SlotLedger
from gateway.store import BEATS, USED_SUM, used_key
from gateway.store_clients import connect

LIMIT = 2
CAPS = {"capped": 1}


@pytest.fixture
async def ledger(private_store: EmbeddedRedis) -> AsyncIterator[SlotLedger]:
    client = connect(private_store.url)
    await client.flushall()
    yield SlotLedger(client, limit=LIMIT, team_caps=CAPS, owner="r1", lease_s=60)
    await client.aclose()


def commands_run(store: EmbeddedRedis) -> int:
    """Every command the server has run, those inside scripts included."""
    with redis.Redis.from_url(store.url) as client:
        stats = client.info("commandstats")
    return sum(int(stat["calls"]) for name, stat in stats.items() if name != "cmdstat_info")


async def queue_waiters(ledger: SlotLedger, team: str, count: int) -> None:
    for n in range(count):
        admission = await ledger.try_acquire(f"slot_{team}_{n}", team, "create", {})
        assert not admission.admitted


async def decision_cost(ledger: SlotLedger, store: EmbeddedRedis, waiters: int) -> tuple[int, int]:
    """Commands run by (a waiter's re-check with every slot held, a new arrival's
    admission past a whole queue of waiters whose team is at its cap)."""
    assert (await ledger.try_acquire("slot_capped_running", "capped", "create", {})).admitted
    await queue_waiters(ledger, "capped", waiters)  # capped is at its cap: none may run
    assert (await ledger.try_acquire("slot_alpha_running", "alpha", "create", {})).admitted
    await queue_waiters(ledger, "alpha", 3)  # the limit is reached

    before = commands_run(store)
    recheck = await ledger.try_acquire("slot_alpha_1", "alpha", "create", {})
    recheck_cost = commands_run(store) - before
    assert (recheck.admitted, recheck.reason, recheck.ahead) == (False, "global_limit", 1)

    await ledger.release("slot_alpha_running")
    for n in range(3):
        await ledger.abandon(f"slot_alpha_{n}")
    before = commands_run(store)
    arrival = await ledger.try_acquire("slot_beta_new", "beta", "create", {})
    arrival_cost = commands_run(store) - before
    assert arrival.admitted, "every earlier waiter's team is at its cap"
    return recheck_cost, arrival_cost


async def test_one_decision_costs_the_same_with_10_and_1000_waiters(
    ledger: SlotLedger, private_store: EmbeddedRedis
) -> None:
    few = await decision_cost(ledger, private_store, 10)
    await ledger.redis.flushall()
    many = await decision_cost(ledger, private_store, 1000)
    assert many == few, f"commands per decision: {few} with 10 waiters, {many} with 1000"


async def store_now_ms(client: Redis) -> int:
    secs, micros = await client.time()
    return int(secs) * 1000 + int(micros) // 1000


async def seed_usage(ledger: SlotLedger, team: str, used_ms: int) -> None:
    """`team` has finished jobs worth `used_ms` of slot time within the fair window."""
    now_ms = await store_now_ms(ledger.redis)
    await ledger.redis.zadd(used_key(team), {f"seeded:{used_ms}": now_ms})
    await ledger.redis.hincrby(USED_SUM, team, used_ms)


async def test_waiters_are_served_by_fair_share_then_arrival_among_teams_under_their_cap(
    ledger: SlotLedger,
) -> None:
    await seed_usage(ledger, "capped", 60_000)
    assert (await ledger.try_acquire("c_running", "capped", "create", {})).admitted
    assert (await ledger.try_acquire("x_running", "other", "create", {})).admitted
    arrivals = [("c1", "capped"), ("a1", "alpha"), ("b1", "beta"), ("a2", "alpha")]
    for slot, team in arrivals:
        assert not (await ledger.try_acquire(slot, team, "create", {})).admitted

    waiting = await ledger.try_acquire("a2", "alpha", "create", {})
    # c1 is ahead but its team is at its cap: it does not count as ahead.
    assert (waiting.reason, waiting.ahead) == ("global_limit", 2)
    capped = await ledger.try_acquire("c1", "capped", "create", {})
    assert (capped.admitted, capped.reason) == (False, "team_limit")

    # One slot free: alpha and beta have used no slot time; a1 arrived first.
    await ledger.release("x_running")
    assert not (await ledger.try_acquire("b1", "beta", "create", {})).admitted
    assert not (await ledger.try_acquire("a2", "alpha", "create", {})).admitted
    assert (await ledger.try_acquire("a1", "alpha", "create", {})).admitted

    # c1 may run again and arrived first, but its team has used a minute of slot time
    # and beta none: b1 goes first.
    await ledger.release("c_running")
    assert not (await ledger.try_acquire("c1", "capped", "create", {})).admitted
    assert not (await ledger.try_acquire("a2", "alpha", "create", {})).admitted
    assert (await ledger.try_acquire("b1", "beta", "create", {})).admitted

    # alpha's a1 ran milliseconds, capped's a minute: a2 before c1.
    await ledger.release("a1")
    assert not (await ledger.try_acquire("c1", "capped", "create", {})).admitted
    assert (await ledger.try_acquire("a2", "alpha", "create", {})).admitted
    await ledger.release("b1")
    assert (await ledger.try_acquire("c1", "capped", "create", {})).admitted
    assert await ledger.redis.zcard(BEATS) == 0  # nobody left waiting


async def test_slot_time_weighs_by_team_weight_and_ages_out_of_the_window(
    private_store: EmbeddedRedis,
) -> None:
    client = connect(private_store.url)
    await client.flushall()
    weights = {"heavy": 4.0, "light": 1.0}
    ledger = SlotLedger(client, limit=1, team_caps={}, owner="r1", lease_s=60, team_weights=weights)
    try:
        # heavy used 3 s at weight 4 (0.75 s per unit), light 1 s at weight 1: heavy first.
        await seed_usage(ledger, "heavy", 3_000)
        await seed_usage(ledger, "light", 1_000)
        assert (await ledger.try_acquire("running", "other", "create", {})).admitted
        assert not (await ledger.try_acquire("l1", "light", "create", {})).admitted
        assert not (await ledger.try_acquire("h1", "heavy", "create", {})).admitted
        await ledger.release("running")
        assert not (await ledger.try_acquire("l1", "light", "create", {})).admitted
        assert (await ledger.try_acquire("h1", "heavy", "create", {})).admitted
        released = await ledger.release("h1")
        assert released is not None
        # With a window shorter than every span's age nothing counts, and arrival order
        # decides: l1 before h2, though heavy's weight is four times light's.
        short = SlotLedger(
            client,
            limit=1,
            team_caps={},
            owner="r1",
            lease_s=60,
            team_weights=weights,
            fair_window_s=0.005,
        )
        ended = await store_now_ms(client)
        # The store's clock passing a time: nothing can signal that, so it is polled.
        while await store_now_ms(client) <= ended + 10:  # noqa: ASYNC110
            await asyncio.sleep(0.005)
        assert not (await short.try_acquire("h2", "heavy", "create", {})).admitted
        assert (await short.try_acquire("l1", "light", "create", {})).admitted
    finally:
        await client.aclose()
