"""Commands asked for in the same pass of the event loop leave as one pipeline.

Against a real server: every caller gets its own reply or its own error, a cancelled
caller costs the others nothing, and a dead store fails every caller with the store's
own error (which the app turns into a 503).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest
import redis.exceptions
from redis.asyncio import Redis

from gateway.batching import CommandBatcher
from gateway.embedded_store import EmbeddedRedis, free_port
from gateway.registry import VideoRegistry
from gateway.store import StoreUnavailable
from gateway.store_clients import connect

# A database of its own on the session's server: the session's gateway uses db 0.
DB = 7


@pytest.fixture
async def client(store_server: EmbeddedRedis) -> AsyncIterator[Redis]:
    name = f"batching-{uuid.uuid4().hex[:8]}"
    client = Redis.from_url(f"{store_server.url}/{DB}", client_name=name)
    await client.flushdb()
    yield client
    await client.flushdb()
    await client.aclose()


async def connections_named(client: Redis) -> int:
    name = client.connection_pool.connection_kwargs["client_name"]
    return sum(1 for entry in await client.client_list() if entry.get("name") == name)


async def test_concurrent_reads_each_get_their_own_reply_over_one_connection(client):
    for n in range(50):
        await client.hset(f"video:{n}", mapping={"team": f"team-{n}", "body": f"{{{n}}}"})
    await client.connection_pool.disconnect()
    reads = CommandBatcher(client)

    replies = await asyncio.gather(
        *(reads.execute("HMGET", f"video:{n}", "team", "body") for n in range(50))
    )

    assert replies == [[f"team-{n}".encode(), f"{{{n}}}".encode()] for n in range(50)]
    # Sent one by one, 50 concurrent reads would have opened up to 50 connections.
    assert await connections_named(client) == 1


async def test_a_failing_read_fails_only_its_own_caller(client):
    await client.set("plain-string", "x")
    await client.hset("video:1", "team", "alpha")
    reads = CommandBatcher(client)

    good, bad, missing = await asyncio.gather(
        reads.execute("HMGET", "video:1", "team"),
        reads.execute("HMGET", "plain-string", "team"),
        reads.execute("HMGET", "video:absent", "team"),
        return_exceptions=True,
    )

    assert good == [b"alpha"]
    assert isinstance(bad, redis.exceptions.ResponseError)
    assert "WRONGTYPE" in str(bad)
    assert missing == [None]


async def test_a_lone_read_is_answered(client):
    await client.hset("video:lone", "team", "beta")
    assert await CommandBatcher(client).execute("HMGET", "video:lone", "team") == [b"beta"]


async def test_a_cancelled_caller_leaves_the_others_their_replies(client):
    for n in range(5):
        await client.hset(f"video:{n}", "team", str(n))
    reads = CommandBatcher(client)
    calls = [asyncio.ensure_future(reads.execute("HMGET", f"video:{n}", "team")) for n in range(5)]
    await asyncio.sleep(0)  # all five have joined the batch
    calls[2].cancel()

    results = await asyncio.gather(*calls, return_exceptions=True)

    assert isinstance(results[2], asyncio.CancelledError)
    assert [r for i, r in enumerate(results) if i != 2] == [[b"0"], [b"1"], [b"3"], [b"4"]]


async def test_a_dead_store_fails_every_caller_with_its_own_store_error(tmp_path):
    server = EmbeddedRedis(tmp_path / "store", persistent=False).start()
    client = connect(server.url)
    reads = CommandBatcher(client)
    await reads.execute("HMGET", "warm", "x")  # a pooled connection, then the store dies
    server.stop()
    try:
        errors = await asyncio.gather(
            *(reads.execute("HMGET", f"video:{n}", "team") for n in range(3)),
            return_exceptions=True,
        )
    finally:
        await client.aclose()

    assert all(isinstance(e, redis.exceptions.ConnectionError) for e in errors), errors
    assert len({id(e) for e in errors}) == 3  # one exception object per caller


async def test_a_registry_update_survives_a_store_that_forgot_its_scripts(client):
    """Updates go out as EVALSHA in a batch; a store that restarted or flushed its
    scripts answers NOSCRIPT, and the update is sent again with the script."""
    registry = VideoRegistry(client)
    video = {"id": "video_batch1", "status": "queued", "created_at": 1}
    await registry.record("alpha", "create", video, b'{"status":"queued"}')
    await client.script_flush()

    running = {**video, "status": "in_progress"}
    assert await registry.update(running["id"], running, b'{"status":"in_progress"}') is True

    record = await registry.get("video_batch1")
    assert record is not None
    assert (record.status, record.body) == ("in_progress", '{"status":"in_progress"}')
    assert await registry.update("video_unknown", {"id": "video_unknown"}, b"{}") is False


async def test_concurrent_updates_after_the_scripts_were_flushed_all_land(client):
    """NOSCRIPT inside a pipeline comes back as each update's own reply; each is resent."""
    registry = VideoRegistry(client)
    ids = [f"video_flush{n}" for n in range(3)]
    for video_id in ids:
        await registry.record("alpha", "create", {"id": video_id, "created_at": 1}, b"{}")
    await client.script_flush()

    done = await asyncio.gather(
        *(registry.update(v, {"id": v, "status": "completed"}, b'{"done":1}') for v in ids),
        registry.get(ids[0]),
    )

    assert done[:3] == [True, True, True]
    for video_id in ids:
        record = await registry.get(video_id)
        assert record is not None
        assert record.status == "completed"


async def test_the_registry_reads_through_the_batcher(client):
    """Many retrieves' ownership reads at once share one connection."""
    registry = VideoRegistry(client)
    for n in range(40):
        await registry.record("alpha", "create", {"id": f"video_own{n}", "created_at": 1}, b"{}")
    await client.connection_pool.disconnect()

    records = await asyncio.gather(*(registry.owned("alpha", f"video_own{n}") for n in range(40)))

    assert [r.id for r in records if r is not None] == [f"video_own{n}" for n in range(40)]
    assert await connections_named(client) == 1


@pytest.mark.parametrize("retry_once", [True, False])
async def test_after_a_store_restart_only_the_registry_client_reads_at_once(tmp_path, retry_once):
    """The first command on a pooled connection a restart killed fails. The registry's
    client (every command safe to repeat) sends it again; the ledger's does not, since
    a slot acquire sent twice could take two slots."""
    server = EmbeddedRedis(tmp_path / "store", port=free_port(), persistent=False).start()
    client = connect(server.url, retry_once=retry_once)
    registry = VideoRegistry(client)
    try:
        await asyncio.gather(*(client.ping() for _ in range(3)))  # pooled connections
        server.stop()
        server.start()
        if retry_once:
            assert await registry.get("video_after_restart") is None
        else:
            with pytest.raises(StoreUnavailable) as failed:
                await registry.get("video_after_restart")
            assert isinstance(failed.value.__cause__, redis.exceptions.ConnectionError)
    finally:
        await client.aclose()
        server.stop()
