"""Redis has one owner: the ledger and the registry, which raise only the store's own
errors, and the registry's Lua receives every key it touches.

Raw redis exceptions used to be caught in five modules; a method that let one through
unconverted would now be answered 500 instead of 503. So every public method is run
against a stopped server, and against a full pool, and must raise the store's error
with redis's as its cause.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import redis.exceptions
from redis.asyncio import Redis

from gateway import store_clients
from gateway.embedded_store import EmbeddedRedis
from gateway.ledger import SlotLedger, read_usage
from gateway.registry import StoreProbe, VideoRegistry
from gateway.scheduler import Scheduler, StoredRequest
from gateway.store import (
    RELEASED_CHANNEL,
    StoreBusy,
    StoreFailure,
    StoreUnavailable,
    team_index_key,
    video_key,
)
from gateway.store_clients import connect
from gateway.store_failures import is_busy

VIDEO = {"id": "video_b1", "status": "queued", "created_at": 1}


@dataclass
class Owners:
    """The two owners of the store, on clients configured as in production."""

    ledger: SlotLedger
    registry: VideoRegistry
    probe: StoreProbe
    clients: list[Redis]
    scheduler: Scheduler


@pytest.fixture
async def owners() -> AsyncIterator[tuple[EmbeddedRedis, Owners]]:
    server = EmbeddedRedis(persistent=False).start()
    ledger_client = connect(server.url)
    registry_client = connect(server.url, retry_once=True)  # as StoreClients.registry
    ops_client = connect(server.url, retry_once=True)
    ledger = SlotLedger(ledger_client, limit=2, team_caps={}, owner="r1", lease_s=60)
    registry = VideoRegistry(registry_client)
    # Something to find, so every method reaches the store rather than return early.
    assert (await ledger.try_acquire("slot_1", "alpha", "create", {})).admitted
    await ledger.bind("slot_1", VIDEO["id"], team="alpha", kind="create")
    await registry.record("alpha", "create", VIDEO, b"{}")
    try:
        yield (
            server,
            Owners(
                ledger,
                registry,
                StoreProbe(ops_client),
                [ledger_client, registry_client, ops_client],
                Scheduler(ledger_client, ledger, max_queued=10, team_max_queued={}),
            ),
        )
    finally:
        for client in (ledger_client, registry_client, ops_client):
            await client.aclose()
        server.cleanup()


VIDEO_ID = str(VIDEO["id"])
STORED = StoredRequest("videos", "application/json", {}, b'{"prompt": "p"}')

# Every public method of the ledger and the registry that sends a command, and the
# probe's ping. (`SlotLedger.releases` never raises: it is tested on its own below.)
CALLS: dict[str, Callable[[Owners], Awaitable[Any]]] = {
    "ledger.try_acquire": lambda o: o.ledger.try_acquire("slot_2", "alpha", "create", {}),
    "ledger.abandon": lambda o: o.ledger.abandon("slot_2"),
    "ledger.bind": lambda o: o.ledger.bind("slot_1", VIDEO_ID, team="alpha", kind="create"),
    "ledger.mark_unknown": lambda o: o.ledger.mark_unknown("slot_1"),
    "ledger.renew": lambda o: o.ledger.renew("slot_1"),
    "ledger.adopt": lambda o: o.ledger.adopt("slot_1"),
    "ledger.release": lambda o: o.ledger.release("slot_1"),
    "ledger.snapshot": lambda o: o.ledger.snapshot(),
    "ledger.read_usage": lambda o: read_usage(o.ledger.redis),
    "registry.record": lambda o: o.registry.record("alpha", "create", VIDEO, b"{}"),
    "registry.update": lambda o: o.registry.update(VIDEO_ID, VIDEO, b"{}"),
    "registry.get": lambda o: o.registry.get(VIDEO_ID),
    "registry.known_sources": lambda o: o.registry.known_sources(
        {"remixed_from_video_id": VIDEO_ID}
    ),
    "registry.owned": lambda o: o.registry.owned("alpha", VIDEO_ID),
    "registry.known": lambda o: o.registry.known([VIDEO_ID]),
    "registry.forget": lambda o: o.registry.forget(VIDEO_ID, "alpha"),
    "registry.page": lambda o: o.registry.page("alpha", after=None, limit=10, descending=True),
    "registry.page_after": lambda o: o.registry.page(
        "alpha", after=VIDEO_ID, limit=10, descending=False
    ),
    "registry.ping": lambda o: o.registry.ping(),
    "registry.record_character": lambda o: o.registry.record_character("alpha", "char_1"),
    "registry.character_owner": lambda o: o.registry.character_owner("char_1"),
    "probe.ping": lambda o: o.probe.ping(1.0),
    "scheduler.enqueue": lambda o: o.scheduler.enqueue(
        "video_q1", "slot_q1", team="alpha", kind="create", want={}, request=STORED, video=VIDEO
    ),
    "scheduler.take": lambda o: o.scheduler.take("slot_q2"),
    "scheduler.requeue": lambda o: o.scheduler.requeue("video_q1", "slot_q1", count_attempt=True),
    "scheduler.started": lambda o: o.scheduler.started(
        "video_q1",
        "slot_q1",
        team="alpha",
        kind="create",
        ids={"video_up": "video_q1"},
        video=VIDEO,
        body=b"{}",
    ),
    "scheduler.refuse": lambda o: o.scheduler.refuse("video_q1", "slot_q1", "code", "message"),
    "scheduler.cancel": lambda o: o.scheduler.cancel("video_q1", "alpha"),
    "scheduler.overdue": lambda o: o.scheduler.overdue(60),
    "scheduler.position": lambda o: o.scheduler.position("video_q1"),
    "scheduler.positions": lambda o: o.scheduler.positions(["video_q1", "video_q2"]),
}


def public_methods(cls: type, prefix: str) -> set[str]:
    return {
        f"{prefix}.{name}"
        for name, member in vars(cls).items()
        if not name.startswith("_") and inspect.iscoroutinefunction(member)
    }


def test_the_calls_below_cover_every_public_method() -> None:
    """A method added to the ledger or the registry is added here too."""
    covered = {name.removesuffix("_after") for name in CALLS}
    public = (
        public_methods(SlotLedger, "ledger")
        | public_methods(VideoRegistry, "registry")
        | public_methods(StoreProbe, "probe")
        | public_methods(Scheduler, "scheduler")
        | {"ledger.read_usage"}
    )
    # Never raises: CONFIG is often disabled, and then there is nothing to warn about.
    assert covered == public - {"probe.warn_if_volatile"}


async def outcomes(owners: Owners) -> dict[str, tuple[type[BaseException] | None, str]]:
    """Each call's exception (None if it returned) and the type of that exception's cause."""
    seen: dict[str, tuple[type[BaseException] | None, str]] = {}
    for name, call in CALLS.items():
        try:
            await call(owners)
        except Exception as exc:
            seen[name] = (type(exc), type(exc.__cause__).__name__)
        else:
            seen[name] = (None, "")
    return seen


async def test_with_the_store_stopped_every_method_raises_store_unavailable(
    owners: tuple[EmbeddedRedis, Owners],
) -> None:
    server, both = owners
    server.stop()  # pooled connections die, and new ones are refused

    seen = await outcomes(both)

    assert {name: raised for name, (raised, _) in seen.items()} == dict.fromkeys(
        CALLS, StoreUnavailable
    )
    # Raised from what the client raised (named in logs): a connection error, and for
    # the probe whatever the socket said.
    assert {cause for _, cause in seen.values()} <= {"ConnectionError", "TimeoutError"}
    assert not issubclass(StoreUnavailable, redis.exceptions.RedisError)


async def test_with_no_free_connection_every_method_raises_store_busy(
    owners: tuple[EmbeddedRedis, Owners], monkeypatch: pytest.MonkeyPatch
) -> None:
    server, both = owners
    monkeypatch.setattr(store_clients, "POOL_WAIT_S", 0.05)
    # One-connection clients, that one taken: the pool waits POOL_WAIT_S, then gives up.
    taken = []
    for _ in both.clients:
        narrow = connect(server.url, max_connections=1)
        taken.append((narrow, await narrow.connection_pool.get_connection()))
    ledger_client, registry_client, ops_client = (narrow for narrow, _ in taken)
    full = Owners(
        both.ledger.on(ledger_client),
        VideoRegistry(registry_client),
        StoreProbe(ops_client),
        [ledger_client, registry_client, ops_client],
        both.scheduler.on(ledger_client),
    )
    try:
        seen = await outcomes(full)
    finally:
        for narrow, connection in taken:
            await narrow.connection_pool.release(connection)
            await narrow.aclose()

    assert seen == dict.fromkeys(CALLS, (StoreBusy, "NoFreeConnection"))
    assert is_busy(StoreBusy())
    assert not is_busy(StoreUnavailable())


async def test_a_script_error_is_a_bug_not_a_store_failure(
    owners: tuple[EmbeddedRedis, Owners],
) -> None:
    """Only an unreachable store becomes StoreUnavailable: a wrong reply stays itself."""
    _, both = owners
    await both.ledger.redis.set(team_index_key("alpha"), "not a sorted set")

    with pytest.raises(redis.exceptions.ResponseError) as failed:
        await both.registry.page("alpha", after=None, limit=10, descending=True)

    assert not isinstance(failed.value, StoreFailure)


async def test_forget_removes_the_record_and_its_team_index_entry(
    owners: tuple[EmbeddedRedis, Owners],
) -> None:
    _, both = owners
    raw = both.ledger.redis
    other = {"id": "video_b2", "status": "queued", "created_at": 2}
    await both.registry.record("alpha", "create", other, b"{}")
    assert await raw.zcard(team_index_key("alpha")) == 2

    await both.registry.forget(str(VIDEO["id"]), "alpha")

    assert await raw.exists(video_key(str(VIDEO["id"]))) == 0
    [left] = await raw.zrange(team_index_key("alpha"), 0, -1)
    assert left.endswith(b":video_b2")  # the other video's entry is untouched
    page = await both.registry.page("alpha", after=None, limit=10, descending=True)
    assert (page.first_id, page.last_id) == ("video_b2", "video_b2")


async def test_forget_touches_no_index_but_the_videos_own_teams(
    owners: tuple[EmbeddedRedis, Owners],
) -> None:
    """The index key comes from the caller; the script checks it against the record."""
    _, both = owners
    raw = both.ledger.redis
    member = await raw.hget(video_key(str(VIDEO["id"])), "member")
    assert member is not None
    await raw.zadd(team_index_key("beta"), {member: 0})  # a copy the script must not trust

    await both.registry.forget(str(VIDEO["id"]), "beta")

    assert await raw.zrange(team_index_key("beta"), 0, -1) == [member]


async def numsub(client: Redis) -> int:
    [(_, count)] = await client.pubsub_numsub(RELEASED_CHANNEL)
    return int(count)


async def subscribed(client: Redis, timeout_s: float) -> None:
    """Polls until the listener is subscribed (a release before that would be missed)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            if await numsub(client) == 1:
                return
        except redis.exceptions.ConnectionError:
            pass  # the server is still starting
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not subscribed within {timeout_s}s")
        await asyncio.sleep(0.02)


async def test_releases_yields_once_per_release_and_resubscribes_after_a_restart(
    owners: tuple[EmbeddedRedis, Owners],
) -> None:
    server, both = owners
    pubsub = connect(server.url, max_connections=1)
    releases = both.ledger.releases(pubsub)
    watcher = connect(server.url, retry_once=True)
    waiting: list[asyncio.Future[None]] = []

    def next_release() -> asyncio.Future[None]:
        waiting.append(asyncio.ensure_future(anext(releases)))
        return waiting[-1]

    try:
        first = next_release()
        await subscribed(watcher, 10)
        assert (await both.ledger.try_acquire("slot_2", "alpha", "create", {})).admitted
        assert await both.ledger.release("slot_1") is not None
        assert await both.ledger.release("slot_2") is not None
        await asyncio.wait_for(first, 10)
        await asyncio.wait_for(next_release(), 10)  # the second release: a second yield

        server.stop()
        server.start()  # same port, empty: the listener must subscribe again itself
        await both.ledger.redis.connection_pool.disconnect()  # the restart killed them
        after_restart = next_release()
        # A release published while it resubscribes is missed (waiters then poll), and
        # redis-py may count a subscription that is about to fail: release until seen.
        deadline = asyncio.get_running_loop().time() + 10
        for n in itertools.count():
            assert asyncio.get_running_loop().time() < deadline, "no release after a restart"
            await subscribed(watcher, 10)
            assert (await both.ledger.try_acquire(f"slot_r{n}", "alpha", "create", {})).admitted
            assert await both.ledger.release(f"slot_r{n}") is not None
            done, _ = await asyncio.wait([after_restart], timeout=0.25)
            if done:
                break
        await after_restart  # a yield, not the iterator's end or an error
    finally:
        for future in waiting:
            future.cancel()
        await asyncio.gather(*waiting, return_exceptions=True)
        await releases.aclose()
        await pubsub.aclose()
        await watcher.aclose()
