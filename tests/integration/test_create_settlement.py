"""`Ticket.settle` against a real ledger: what each create outcome leaves in the store,
and what the client is told.

The rule itself is `quota.fate_of` (tests/unit/test_create_outcome.py); here it is
applied: a refused create frees its slot at once, a started one is bound to its job,
and one that may exist upstream stays counted as `unknown` with a no-retry answer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from gateway.auth import Team
from gateway.embedded_store import EmbeddedRedis
from gateway.errors import GatewayError, UpstreamError
from gateway.ledger import SlotLedger
from gateway.metrics import GatewayMetrics
from gateway.quota import JobSlots, Started
from gateway.store_clients import connect
from gateway.upstream import Reply

NO_RETRY = ("x-should-retry", "false")


@pytest.fixture
async def slots(private_store: EmbeddedRedis) -> AsyncIterator[JobSlots]:
    client = connect(private_store.url)
    await client.flushall()
    ledger = SlotLedger(client, limit=2, team_caps={}, owner="r1", lease_s=60)
    yield JobSlots(ledger, GatewayMetrics(["alpha"]), wait_s=0)
    await client.aclose()


async def settle(slots: JobSlots, outcome: Reply | UpstreamError) -> Started | GatewayError:
    """Hold a slot, settle it with `outcome`, leave the block as the handler would."""
    try:
        async with slots.hold(Team("alpha"), "create", {}, _connected) as ticket:
            return await ticket.settle(outcome)
    except GatewayError as exc:
        return exc


async def _connected() -> bool:
    return False


async def states(slots: JobSlots) -> list[tuple[str, str]]:
    return [(s.state, s.video) for s in (await slots.ledger.snapshot()).slots]


def answer(status: int, body: object, **headers: str) -> Reply:
    return Reply(status, headers, json.dumps(body).encode())


async def test_a_started_job_binds_its_slot(slots: JobSlots) -> None:
    started = await settle(slots, answer(200, {"id": "video_7", "status": "queued"}))
    assert isinstance(started, Started)
    assert started.video["id"] == "video_7"
    assert await states(slots) == [("bound", "video_7")]


@pytest.mark.parametrize("status", [400, 404, 422])
async def test_a_refused_create_frees_its_slot_and_passes_upstreams_refusal_on(
    slots: JobSlots, status: int
) -> None:
    error = await settle(slots, answer(status, {"error": {"code": "bad_size", "message": "no"}}))
    assert isinstance(error, GatewayError)
    assert (error.status, error.code, error.no_retry) == (status, "bad_size", False)
    assert await states(slots) == []


async def test_upstreams_own_limit_frees_the_slot_and_is_counted(slots: JobSlots) -> None:
    error = await settle(slots, answer(429, {}, **{"retry-after": "7"}))
    assert isinstance(error, GatewayError)
    assert (error.status, error.code, error.headers["retry-after"]) == (
        429,
        "upstream_rate_limited",
        "7",
    )
    assert await states(slots) == []
    rejected = slots.metrics.registry.get_sample_value(
        "sora_gateway_quota_rejections_total", {"team": "alpha", "reason": "upstream_429"}
    )
    assert rejected == 1.0


@pytest.mark.parametrize(
    "outcome",
    [
        answer(500, {}),
        answer(200, {"status": "queued"}),  # a 2xx without a job id
        UpstreamError(504, "upstream_timeout", "no answer", maybe_sent=True),
    ],
    ids=["5xx", "2xx-without-id", "timeout-after-sending"],
)
async def test_a_create_that_may_exist_upstream_keeps_its_slot_and_says_do_not_retry(
    slots: JobSlots, outcome: Reply | UpstreamError
) -> None:
    error = await settle(slots, outcome)
    assert isinstance(error, GatewayError)
    assert error.status in (502, 504)
    assert NO_RETRY in error.headers.items()
    assert await states(slots) == [("unknown", "")]


async def test_a_create_that_never_reached_upstream_frees_its_slot_and_may_be_retried(
    slots: JobSlots,
) -> None:
    refused = UpstreamError(502, "upstream_unavailable", "refused", maybe_sent=False)
    error = await settle(slots, refused)
    assert error is refused
    assert NO_RETRY not in error.headers.items()
    assert await states(slots) == []
