"""The claim each upstream call takes on its pool: FIFO, per-team share, exact wait."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client import CollectorRegistry, Counter

from gateway.errors import GatewayError
from gateway.pools import STARVED_AFTER_S, PoolGate


class Clock:
    """A clock the test moves by hand: waits measured without sleeping."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def gate(limit: int, per_team: int | None = None) -> tuple[PoolGate, Counter, Clock]:
    starved = Counter("starved", "calls that waited", registry=CollectorRegistry())
    clock = Clock()
    return PoolGate("api", limit, starved=starved, per_team=per_team, clock=clock), starved, clock


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_waiters_are_served_in_order_and_the_oldest_wait_is_exact() -> None:
    pool, starved, clock = gate(2)
    held = [await pool.claim(), await pool.claim()]
    served: list[int] = []

    async def call(n: int) -> None:
        claim = await pool.claim()
        served.append(n)
        claim.release()

    first = asyncio.create_task(call(1))
    await settle()
    clock.now += 0.8
    second = asyncio.create_task(call(2))
    await settle()
    assert pool.oldest_wait_s() == pytest.approx(0.8)
    assert not pool.starved
    clock.now += STARVED_AFTER_S  # the first waiter is now past the bound, the second not
    assert pool.starved
    assert pool.oldest_wait_s() == pytest.approx(1.8)
    held[0].release()
    held[0].release()  # counted once
    await asyncio.gather(first, second)
    assert served == [1, 2]
    assert starved._value.get() == 1  # the first waited 1.8 s, the second 1.0 s
    assert pool.oldest_wait_s() == 0
    assert pool.in_use == 1
    held[1].release()
    assert pool.in_use == 0


async def test_a_cancelled_waiter_loses_its_place_and_leaks_nothing() -> None:
    pool, _, _ = gate(1, per_team=2)
    held = await pool.claim("alpha")
    waiter = asyncio.create_task(pool.claim("alpha"))
    await settle()
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pool.oldest_wait_s() == 0
    held.release()
    assert pool.in_use == 0
    (await pool.claim("alpha")).release()


async def test_a_team_past_its_share_is_refused_at_once_and_others_go_on() -> None:
    pool, _, _ = gate(4, per_team=2)
    alpha = [await pool.claim("alpha"), await pool.claim("alpha")]
    with pytest.raises(GatewayError) as refused:
        await pool.claim("alpha")
    assert refused.value.status == 429
    assert refused.value.code == "too_many_requests"
    assert refused.value.headers["retry-after"].isdigit()
    beta = await pool.claim("beta")  # the pool's rest is the others'
    alpha[0].release()
    (await pool.claim("alpha")).release()
    for claim in (alpha[1], beta):
        claim.release()
    assert pool.in_use == 0
