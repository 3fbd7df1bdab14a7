"""A waiter's real outcome survives a store that fails as it leaves the queue.

When a waiter gave up (a 429, its client gone), the queue entry was abandoned inside
the `except` that carried the outcome; a store failure there replaced a 499 or a 429
with a store error. The heartbeat expiry removes a left-behind entry anyway, so the
outcome stands and the failure is only counted.
"""

from __future__ import annotations

import pytest

from gateway.auth import Team
from gateway.embedded_store import EmbeddedRedis
from gateway.errors import GatewayError
from gateway.ledger import SlotLedger
from gateway.metrics import GatewayMetrics
from gateway.quota import JobSlots
from gateway.store_clients import connect


async def test_a_store_failing_as_a_waiter_leaves_does_not_replace_its_outcome() -> None:
    with EmbeddedRedis(persistent=False) as server:
        client = connect(server.url)
        metrics = GatewayMetrics(["alpha"])
        ledger = SlotLedger(client, limit=1, team_caps={}, owner="r1", lease_s=60)
        slots = JobSlots(ledger, metrics, wait_s=30)
        assert (await ledger.try_acquire("slot_running", "alpha", "create", {})).admitted

        async def gone_with_the_store() -> bool:
            server.stop()  # the store goes away just as the client does
            return True

        with pytest.raises(GatewayError) as refused:
            async with slots.hold(Team("alpha"), "create", {}, gone_with_the_store):
                pytest.fail("admitted past the limit")
        assert (refused.value.status, refused.value.code) == (499, "client_disconnected")
        assert metrics.registry.get_sample_value("sora_gateway_store_errors_total") == 1.0
        await client.aclose()
