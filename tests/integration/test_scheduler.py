"""The scheduler's scripts against a real server: start or queue, take in fair-share
order, put back, cancel, time out, and a decision whose cost does not grow with the
queue (CONTRACT §8)."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import redis
from redis.asyncio import Redis

from gateway.embedded_store import EmbeddedRedis
from gateway.ledger import SlotLedger
from gateway.registry import VideoRegistry
from gateway.scheduler import MAX_REQUEUES, Scheduler, StoredRequest, TakenJob, mint_job_id
from gateway.store import PAUSED_UNTIL, QUEUED, USED_SUM, job_key, used_key
from gateway.store_clients import connect

LIMIT = 2


@dataclass
class Parts:
    ledger: SlotLedger
    scheduler: Scheduler
    registry: VideoRegistry
    client: Redis


@pytest.fixture
async def parts(private_store: EmbeddedRedis) -> AsyncIterator[Parts]:
    client = connect(private_store.url)
    await client.flushall()
    ledger = SlotLedger(
        client,
        limit=LIMIT,
        team_caps={"capped": 1},
        owner="r1",
        lease_s=60,
        team_weights={"heavy": 2.0},
    )
    scheduler = Scheduler(client, ledger, max_queued=6, team_max_queued={"small": 1})
    yield Parts(ledger, scheduler, VideoRegistry(client), client)
    await client.aclose()


def request(prompt: str = "a cat") -> StoredRequest:
    return StoredRequest("videos", "application/json", {"user-agent": "t"}, prompt.encode())


async def enqueue(parts: Parts, team: str, job_id: str | None = None) -> tuple[str, str]:
    """A create of `team`: its id and its decision."""
    job_id = job_id or mint_job_id()
    video = {"id": job_id, "object": "video", "status": "queued", "created_at": 1}
    decision = await parts.scheduler.enqueue(
        job_id,
        f"slot_{job_id}",
        team=team,
        kind="create",
        want={"prompt": "fp"},
        request=request(job_id),
        video=video,
    )
    return job_id, decision.outcome


async def take(parts: Parts) -> TakenJob | None:
    return await parts.scheduler.take(f"slot_{uuid.uuid4().hex}")


async def fill_slots(parts: Parts, team: str = "other") -> list[str]:
    started = []
    for _ in range(LIMIT):
        job_id, outcome = await enqueue(parts, team)
        assert outcome == "admitted"
        started.append(f"slot_{job_id}")
    return started


async def test_a_create_starts_at_once_while_a_slot_is_free_and_queues_after(
    parts: Parts,
) -> None:
    running = await fill_slots(parts)
    job_id, outcome = await enqueue(parts, "alpha")
    assert outcome == "queued"
    record = await parts.registry.get(job_id)
    assert record is not None
    assert record.queued
    assert record.team == "alpha"
    assert await parts.scheduler.position(job_id) == 1
    assert await take(parts) is None  # no slot is free

    await parts.ledger.release(running[0])
    taken = await take(parts)
    assert taken is not None
    assert (taken.id, taken.team, taken.kind, taken.want) == (
        job_id,
        "alpha",
        "create",
        {"prompt": "fp"},
    )
    assert taken.request == request(job_id)
    assert await parts.scheduler.position(job_id) is None  # no longer queued
    snapshot = await parts.ledger.snapshot()
    slot = next(s for s in snapshot.slots if s.id == taken.slot_id)
    # The slot is the taker's, reserved, and knows the job: a taker that dies leaves it
    # for the tracker, which can put the job back.
    assert (slot.state, slot.owner, slot.gid, slot.team) == ("reserved", "r1", job_id, "alpha")
    assert await take(parts) is None  # each job is taken once


async def test_a_team_arriving_behind_a_long_queue_starts_first_at_the_next_free_slot(
    parts: Parts,
) -> None:
    # busy has used slot time (seeded: a job released at once may have run 0 ms).
    await seed_usage(parts, "busy", 1000)
    running = await fill_slots(parts, "busy")
    for _ in range(5):
        assert (await enqueue(parts, "busy"))[1] == "queued"
    newcomer, outcome = await enqueue(parts, "alpha")
    assert outcome == "queued"
    await parts.ledger.release(running[0])  # busy has used slot time, alpha none
    taken = await take(parts)
    assert taken is not None
    assert taken.id == newcomer


async def test_queue_limits_refuse_and_store_nothing(parts: Parts) -> None:
    await fill_slots(parts)
    assert (await enqueue(parts, "small"))[1] == "queued"
    refused, outcome = await enqueue(parts, "small")
    assert outcome == "team_queue_full"
    assert await parts.registry.get(refused) is None
    for _ in range(5):
        assert (await enqueue(parts, "alpha"))[1] == "queued"
    refused, outcome = await enqueue(parts, "beta")
    assert outcome == "queue_full"
    assert await parts.registry.get(refused) is None
    assert not await parts.client.exists(job_key(refused))
    assert await parts.client.zcard(QUEUED) == 6


async def test_a_cancelled_job_is_never_taken(parts: Parts) -> None:
    running = await fill_slots(parts)
    first, _ = await enqueue(parts, "alpha")
    second, _ = await enqueue(parts, "alpha")
    assert await parts.scheduler.cancel(first, "beta") == 0  # not beta's
    assert await parts.scheduler.cancel(first, "alpha") == 1
    await parts.ledger.release(running[0])
    taken = await take(parts)
    assert taken is not None
    assert taken.id == second
    # Being started: the starter learns of the delete when it settles the start.
    assert await parts.scheduler.cancel(second, "alpha") == 2
    started = await parts.scheduler.started(
        second,
        taken.slot_id,
        team="alpha",
        kind="create",
        ids={"up_second": second},
        video={"id": second, "status": "queued"},
        body=b"{}",
    )
    assert started.deleted
    assert not await parts.client.exists(job_key(second))


async def test_a_start_put_back_goes_first_then_fails_after_too_many_tries(
    parts: Parts,
) -> None:
    running = await fill_slots(parts)
    first, _ = await enqueue(parts, "alpha")
    later, _ = await enqueue(parts, "alpha")
    await parts.ledger.release(running[0])
    for attempt in range(MAX_REQUEUES + 1):
        taken = await take(parts)
        assert taken is not None, f"attempt {attempt}"
        assert taken.id == first
        requeued = await parts.scheduler.requeue(first, taken.slot_id, count_attempt=True)
        assert requeued.release is not None
        assert requeued.release.gid == first
        expected = "requeued" if attempt < MAX_REQUEUES else "failed"
        assert requeued.verdict == expected
        # Settled once: a second requeue of the same slot (another tracker's) does nothing.
        again = await parts.scheduler.requeue(first, taken.slot_id, count_attempt=True)
        assert (again.release, again.verdict) == (None, "stale")
    taken = await take(parts)
    assert taken is not None
    assert taken.id == later


async def test_upstreams_retry_after_pauses_every_start(parts: Parts) -> None:
    running = await fill_slots(parts)
    job_id, _ = await enqueue(parts, "alpha")
    await parts.ledger.release(running[0])
    taken = await take(parts)
    assert taken is not None
    requeued = await parts.scheduler.requeue(job_id, taken.slot_id, count_attempt=False, pause_s=30)
    assert requeued.verdict == "requeued"
    assert await take(parts) is None  # paused, though a slot is free
    # Nothing starts at once either. (The same team: its requeued job goes first by its
    # own arrival; another team, with no slot time, would go first by fair share.)
    assert (await enqueue(parts, "alpha"))[1] == "queued"
    await parts.client.delete(PAUSED_UNTIL)  # as when retry-after has passed
    taken = await take(parts)
    assert taken is not None
    assert taken.id == job_id


async def test_jobs_queued_too_long_are_taken_out(parts: Parts) -> None:
    await fill_slots(parts)
    old, _ = await enqueue(parts, "alpha")
    assert await parts.scheduler.overdue(3600) == []
    deadline = asyncio.get_running_loop().time() + 5
    overdue = []
    while not overdue and asyncio.get_running_loop().time() < deadline:
        overdue = await parts.scheduler.overdue(0.001)
    assert [(job.id, job.team, job.kind) for job in overdue] == [(old, "alpha", "create")]
    record = await parts.registry.get(old)
    assert record is not None
    assert json.loads(record.body)["error"]["code"] == "queue_timeout"
    assert await parts.scheduler.position(old) is None
    assert not await parts.client.exists(job_key(old))


async def seed_usage(parts: Parts, team: str, used_ms: int) -> None:
    """`team` has finished jobs worth `used_ms` of slot time within the fair window."""
    now_s, _ = await parts.client.time()
    await parts.client.zadd(used_key(team), {f"seed:{used_ms}": int(now_s) * 1000})
    await parts.client.hincrby(USED_SUM, team, used_ms)


async def test_weights_share_slot_time(parts: Parts) -> None:
    """heavy (weight 2) has used 3 s, light 2 s: per unit of weight heavy is behind."""
    for team, used in (("heavy", 3000), ("light", 2000)):
        await seed_usage(parts, team, used)
    running = await fill_slots(parts)
    _light, _ = await enqueue(parts, "light")
    heavy, _ = await enqueue(parts, "heavy")
    await parts.ledger.release(running[0])
    taken = await take(parts)
    assert taken is not None
    assert taken.id == heavy


def commands_run(store: EmbeddedRedis) -> int:
    with redis.Redis.from_url(store.url) as client:
        stats = client.info("commandstats")
    return sum(int(stat["calls"]) for name, stat in stats.items() if name != "cmdstat_info")


async def decision_cost(parts: Parts, store: EmbeddedRedis, depth: int) -> int:
    """Commands one take runs with `depth` jobs queued over three teams."""
    await parts.client.flushall()
    running = await fill_slots(parts)
    for n in range(depth):
        await enqueue(parts, ("alpha", "beta", "gamma")[n % 3])
    await parts.ledger.release(running[0])
    before = commands_run(store)
    taken = await take(parts)
    cost = commands_run(store) - before
    assert taken is not None
    return cost


async def test_one_decision_costs_the_same_with_10_and_3000_jobs_queued(
    parts: Parts, private_store: EmbeddedRedis
) -> None:
    parts.scheduler.max_queued = 10_000
    few = await decision_cost(parts, private_store, 10)
    many = await decision_cost(parts, private_store, 3000)
    assert many == few, f"commands per decision: {few} with 10 queued, {many} with 3000"


async def test_a_queued_record_is_the_video_object_the_client_was_given(parts: Parts) -> None:
    await fill_slots(parts)
    job_id, _ = await enqueue(parts, "alpha")
    record = await parts.registry.get(job_id)
    assert record is not None
    assert json.loads(record.body)["id"] == job_id
    page = await parts.registry.page("alpha", after=None, limit=5, descending=True)
    assert page is not None
    assert page.first_id == job_id


async def test_a_start_binds_the_slot_and_records_upstreams_id_in_one_step(parts: Parts) -> None:
    running = await fill_slots(parts)
    job_id, _ = await enqueue(parts, "alpha")
    await parts.ledger.release(running[0])
    taken = await take(parts)
    assert taken is not None
    seen = {"id": job_id, "status": "in_progress", "object": "video"}
    started = await parts.scheduler.started(
        job_id,
        taken.slot_id,
        team="alpha",
        kind="create",
        ids={"video_up": job_id},
        video=seen,
        body=json.dumps(seen).encode(),
    )
    assert (started.recorded, started.deleted) == (True, False)
    record = await parts.registry.get(job_id)
    assert record is not None
    assert (record.upstream_id, record.ids, record.status) == (
        "video_up",
        {"video_up": job_id},
        "in_progress",
    )
    assert await parts.registry.known(["video_up"]) == {"video_up"}  # by its alias
    slot = next(s for s in (await parts.ledger.snapshot()).slots if s.id == taken.slot_id)
    assert (slot.state, slot.video, slot.gid) == ("bound", "video_up", job_id)
    assert not await parts.client.exists(job_key(job_id))


async def test_a_job_that_will_not_start_reads_failed_with_its_slot_freed(parts: Parts) -> None:
    running = await fill_slots(parts)
    job_id, _ = await enqueue(parts, "alpha")
    await parts.ledger.release(running[0])
    taken = await take(parts)
    assert taken is not None
    release = await parts.scheduler.refuse(job_id, taken.slot_id, "content_policy_violation", "no")
    assert release is not None
    assert await parts.scheduler.refuse(job_id, taken.slot_id, "x", "y") is None  # once
    record = await parts.registry.get(job_id)
    assert record is not None
    assert record.status == "failed"
    assert json.loads(record.body)["error"] == {"code": "content_policy_violation", "message": "no"}
    assert not await parts.client.exists(job_key(job_id))


async def test_positions_of_many_jobs_come_in_one_call_and_match_each_ones(parts: Parts) -> None:
    await fill_slots(parts)
    ids = [(await enqueue(parts, team))[0] for team in ("alpha", "beta", "alpha", "gamma")]
    each = {job_id: await parts.scheduler.position(job_id) for job_id in ids}
    assert await parts.scheduler.positions([*ids, "video_unknown"]) == {
        **each,
        "video_unknown": None,
    }
    assert None not in each.values()
