"""Waiting creates can neither starve the tracker nor make a release cost a store call
per waiter, and a waiter that cannot reach the store keeps its place.

- Admission and the tracker shared one pool: a flood of waiting creates held every
  connection, the tracker's ticks failed with StoreBusy and slots were freed late. The
  tracker now sends its scripts on a client of its own; here every admission
  connection is taken while 100 creates wait, and the tracker still frees an ended job.
- A release woke every local waiter and each ran the acquire script; now only each
  team's first `limit` waiters are woken (the periodic re-check covers the rest).
- A waiter whose heartbeat ran out while it waited for a pooled connection was
  queued again at the back; it now rejoins at its own place.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.asyncio.connection import AbstractConnection

from gateway import quota
from gateway.auth import Team
from gateway.config import UpstreamSettings
from gateway.embedded_store import EmbeddedRedis
from gateway.errors import GatewayError
from gateway.ledger import SlotLedger
from gateway.metrics import GatewayMetrics
from gateway.quota import JobSlots
from gateway.registry import VideoRegistry
from gateway.store import BEATS, HOLDERS
from gateway.store_clients import LEDGER_POOL, StoreClients
from gateway.tracker import Tracker
from gateway.upstream import Upstream
from support.processes import wait_until_async

LIMIT = 1


@pytest.fixture
async def stores(private_store: EmbeddedRedis) -> AsyncIterator[StoreClients]:
    clients = StoreClients.open(private_store.url, None)
    await clients.ops.flushall()
    yield clients
    await clients.aclose()


class Waiters:
    """Real `hold` calls, each parked until admitted, counting its re-checks."""

    def __init__(self, slots: JobSlots) -> None:
        self.slots = slots
        self.checks: dict[str, int] = {}
        self.admitted: list[str] = []
        self.tasks: list[asyncio.Task[None]] = []

    def start(self, team: str, name: str) -> None:
        self.checks[name] = 0

        async def checked() -> bool:  # called after each check that did not admit
            self.checks[name] += 1
            return False

        async def wait() -> None:
            with contextlib.suppress(GatewayError):
                async with self.slots.hold(Team(team), "create", {}, checked):
                    self.admitted.append(name)
                    await asyncio.Event().wait()  # holds its slot until cancelled

        self.tasks.append(asyncio.create_task(wait()))

    def total(self) -> int:
        return sum(self.checks.values())

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def store_ms(time: tuple[int, int]) -> int:
    return int(time[0]) * 1000 + int(time[1]) // 1000


async def round_trips(ledger: SlotLedger, count: int) -> None:
    """Give every woken waiter the loop and the store long enough to re-check."""
    for _ in range(count):
        await ledger.redis.ping()
        await asyncio.sleep(0)


async def test_a_release_wakes_only_the_waiters_that_could_take_the_slot(
    stores: StoreClients, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(quota, "RECHECK_S", 60.0)  # only wake-ups make a waiter re-check
    ledger = SlotLedger(stores.ledger, limit=LIMIT, team_caps={}, owner="r1", lease_s=60)
    slots = JobSlots(ledger, GatewayMetrics(["alpha", "beta"]), wait_s=60)
    # The running job is a third team's: alpha and beta have used the same slot time
    # (none), so arrival decides between them.
    assert (await ledger.try_acquire("slot_running", "gamma", "create", {})).admitted
    waiters = Waiters(slots)
    for n in range(20):
        waiters.start("alpha", f"alpha_{n}")
        waiters.start("beta", f"beta_{n}")
    try:
        await wait_until_async(lambda: waiters.total() == 40, 20, "every waiter queued")
        assert await ledger.release("slot_running") is not None
        slots.notice_release()  # what the release listener does for each release
        await wait_until_async(lambda: waiters.admitted, 20, "the earliest waiter admitted")
        await round_trips(ledger, 20)
        assert waiters.admitted == ["alpha_0"]
        woken = {name for name, checks in waiters.checks.items() if checks > 1}
        # alpha_0 took the slot; beta's first waiter was the only other one that could.
        assert woken == {"beta_0"}, f"{len(woken)} waiters re-checked for one free slot"
    finally:
        await waiters.stop()


async def test_the_tracker_frees_slots_while_waiting_creates_hold_every_admission_connection(
    stores: StoreClients,
) -> None:
    metrics = GatewayMetrics(["alpha", "beta"])
    ledger = SlotLedger(stores.ledger, limit=LIMIT, team_caps={}, owner="r1", lease_s=60)
    slots = JobSlots(ledger, metrics, wait_s=60)
    upstream = Upstream(
        UpstreamSettings(base_url="http://127.0.0.1:9/v1", token="unused"),
        metrics,
        max_downloads=1,
    )
    tracker = Tracker(
        ledger=ledger.on(stores.tracker),
        slots=slots,
        registry=VideoRegistry(stores.registry),
        upstream=upstream,
        poll_interval_s=0.5,
        lease_s=60,
        max_job_s=0.001,  # the running job is past its last resort: the tick frees it
        settle_after_s=1,
    )
    # The running job is a third team's: alpha and beta have used the same slot time
    # (none), so arrival decides between them.
    assert (await ledger.try_acquire("slot_running", "gamma", "create", {})).admitted
    waiters = Waiters(slots)
    for n in range(100):
        waiters.start("beta", f"beta_{n}")
    taken: list[AbstractConnection] = []
    pool: Any = stores.ledger.connection_pool
    try:
        await wait_until_async(lambda: waiters.total() >= 100, 20, "every waiter queued")
        # The state a flood of waiting creates makes: every admission connection in use.
        for _ in range(LEDGER_POOL):
            taken.append(await pool.get_connection())
        await tracker.tick()
        assert await stores.tracker.zscore(HOLDERS, "slot_running") is None
        assert metrics.registry.get_sample_value("sora_gateway_store_busy_total") == 0.0
    finally:
        for connection in taken:
            await pool.release(connection)
        await waiters.stop()
        await upstream.aclose()


async def test_a_waiter_whose_heartbeat_ran_out_rejoins_at_its_own_place(
    stores: StoreClients,
) -> None:
    ledger = SlotLedger(
        stores.ledger, limit=LIMIT, team_caps={}, owner="r1", lease_s=60, heartbeat_s=0.05
    )
    assert (await ledger.try_acquire("slot_running", "gamma", "create", {})).admitted
    first = await ledger.try_acquire("slot_first", "alpha", "create", {})
    second = await ledger.try_acquire("slot_second", "beta", "create", {})
    assert (first.ahead, second.ahead) == (0, 1)
    # slot_first could not reach the store (its pool wait) past its heartbeat; slot_second
    # went on checking, and its check dropped slot_first from the queue.
    beat_ends = float(await stores.ops.zscore(BEATS, "slot_first") or 0)
    # The store's clock passing a time: nothing can signal that, so it is polled.
    while store_ms(await stores.ops.time()) <= beat_ends:  # noqa: ASYNC110
        await asyncio.sleep(0.01)
    again = await ledger.try_acquire("slot_second", "beta", "create", {}, second.arrival)
    assert again.ahead == 0  # slot_first is out
    back = await ledger.try_acquire("slot_first", "alpha", "create", {}, first.arrival)
    assert back.ahead == 0, "it rejoined behind a waiter that arrived after it"
    await ledger.release("slot_running")
    assert (await ledger.try_acquire("slot_first", "alpha", "create", {}, back.arrival)).admitted
