"""The Redis connection (a URL, or the primary Sentinel names), and the key space.

Every key shares the `{sgw}` hash tag, so each script touches one cluster slot. The
strings are the stored format: an existing store must keep working, so they never
change.

The slot ledger (`ledger.py`):
- `holders`  ZSET slot id -> lease deadline (ms). Its size is the count; nothing else is.
- `slots`    HASH slot id -> JSON {team, state, video, owner, started, kind, want}; state is
  `reserved` (create sent or about to be), `bound` (a job id is known) or `unknown`
  (the create's answer was lost: the job may exist upstream; the tracker settles it).
- `jobs`     HASH video id -> slot id: one job is counted by one slot.
- `queue:<team>` ZSET waiting slot id -> arrival number: one FIFO per team, so an
  admission decision merges the heads of the teams' FIFOs (at most `free slots` steps)
  instead of walking every waiter. `queued_teams` SET: the teams whose FIFO is not
  empty. `beats` ZSET waiter -> heartbeat deadline (a waiter whose replica died drops
  out); `waiter_team` HASH waiter -> team (which FIFO it is in); `queue_seq` the
  arrival counter shared by all FIFOs.
- `released` the pub/sub channel each release publishes its slot id on: every
  replica's waiters wake at once instead of at their next re-check.

The registry (`registry.py`):
- `video:<id>` HASH team, kind, status, expires_at, body (the last upstream JSON, served
  as-is) and member (its entry in the team's index); it expires a day past the video's
  own expiry, or a week after its last update while that is unknown.
- `team:<team>:videos` ZSET, every score 0, members `created_at:sequence:id`: a
  lexicographic range lists the team's videos newest first, ties in recording order.
- `seq` the counter that gives each index entry its sequence number.
- `character:<id>` STRING the team that owns the character (30 days).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import redis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .config import SentinelSettings

log = logging.getLogger("gateway.store")

PREFIX = "{sgw}:"

# The slot ledger.
HOLDERS = PREFIX + "holders"
SLOTS = PREFIX + "slots"
JOBS = PREFIX + "jobs"
QUEUED_TEAMS = PREFIX + "queued_teams"
BEATS = PREFIX + "beats"
WAITER_TEAM = PREFIX + "waiter_team"
QUEUE_SEQ = PREFIX + "queue_seq"
# A team's FIFO is this prefix + its name (`queue_key`); the scripts receive the prefix.
QUEUE_PREFIX = PREFIX + "queue:"
RELEASED_CHANNEL = PREFIX + "released"

# The registry.
VIDEO_SEQ = PREFIX + "seq"


def queue_key(team: str) -> str:
    """The FIFO of `team`'s waiters."""
    return QUEUE_PREFIX + team


def video_key(video_id: str) -> str:
    return f"{PREFIX}video:{video_id}"


def team_index_key(team: str) -> str:
    """`team`'s videos, in list order."""
    return f"{PREFIX}team:{team}:videos"


def character_key(character_id: str) -> str:
    return f"{PREFIX}character:{character_id}"


# What a dead or unreachable store raises: every such failure means 503, never a guess.
STORE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# How long a command waits for a free pooled connection before StoreBusy.
POOL_WAIT_S = 2.0
DEFAULT_POOL_SIZE = 32


# A dead store must mean a quick 503, not a hang.
_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 2.0,
    "socket_connect_timeout": 2.0,
    "health_check_interval": 10,
    "retry_on_timeout": False,
}


class StoreBusy(redis.exceptions.RedisError):
    """Every pooled connection stayed in use for `POOL_WAIT_S`: this process is busy, the
    store is not down. Not a STORE_ERRORS member, so it is never counted or answered as
    an unreachable store; the caller answers 503 `store_busy` with a retry hint."""


# Every way a store command can fail to happen, for callers that must act on "it may
# not have been written" (a created job not recorded) whatever the reason.
STORE_FAILURES = (*STORE_ERRORS, StoreBusy)


class WaitingPool(BlockingConnectionPool):
    """A bounded pool whose full state makes a command wait briefly for a connection
    (redis-py's default pool raises at once), and then raise StoreBusy rather than the
    ConnectionError that would read as the store being unreachable."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        try:
            # Unannotated in redis-py; `untyped_calls_exclude` cannot name a super() call.
            return await super().get_connection()  # type: ignore[no-untyped-call]
        except redis.exceptions.ConnectionError as exc:
            # BlockingConnectionPool raises its wait's TimeoutError as the cause; a
            # failure to connect has no such cause and stays a store error.
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise StoreBusy(f"no free store connection within {self.timeout}s") from None
            raise


class SentinelWaitingPool(SentinelConnectionPool, WaitingPool):
    """The same waiting pool, for connections to the primary that Sentinel names."""


def _options(retry_once: bool) -> dict[str, Any]:
    """With `retry_once`, a command that fails on a broken connection is sent once more
    on a fresh one: after a store restart, the first command on a pooled connection the
    restart killed fails. Only for a client whose every command is safe to repeat
    (reads, idempotent writes): a repeated slot acquire could take two slots. A timeout
    is never retried, so a hung store is not waited on twice."""
    if not retry_once:
        return _CLIENT_OPTIONS
    return {
        **_CLIENT_OPTIONS,
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        "retry_on_error": [redis.exceptions.ConnectionError],
    }


def connect(
    url: str, *, max_connections: int = DEFAULT_POOL_SIZE, retry_once: bool = False
) -> Redis:
    """An asyncio client for one Redis at `url`, with its own pool of `max_connections`."""
    pool = WaitingPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_S, **_options(retry_once)
    )
    return Redis.from_pool(pool)


def connect_sentinel(
    settings: SentinelSettings,
    *,
    max_connections: int = DEFAULT_POOL_SIZE,
    retry_once: bool = False,
) -> Redis:
    """A client for the current primary; after a failover it finds the new one itself."""
    sentinel = Sentinel(
        list(settings.hosts),
        sentinel_kwargs={
            "password": settings.sentinel_password,
            "socket_timeout": 1.0,
            "socket_connect_timeout": 1.0,
        },
    )
    return sentinel.master_for(
        settings.master_name,
        connection_pool_class=SentinelWaitingPool,
        password=settings.password,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        **_options(retry_once),
    )


async def warn_if_volatile(store: Redis) -> None:
    """Say loudly when the store keeps nothing on disk: a restart would then forget
    every slot held, and the gateway would admit past the upstream's limit."""
    try:
        appendonly = await store.config_get("appendonly")
        save = await store.config_get("save")
    except redis.RedisError:
        return  # CONFIG is often disabled on managed Redis; nothing to learn then
    if _value(appendonly, "appendonly") == "no" and not _value(save, "save"):
        log.warning(
            "the store persists nothing (appendonly no, no save points): a store restart "
            "forgets the slots held and the shared limit can be exceeded; enable AOF"
        )


def _value(reply: dict[Any, Any], key: str) -> str:
    value = reply.get(key, reply.get(key.encode(), ""))
    return value.decode() if isinstance(value, bytes) else str(value)
