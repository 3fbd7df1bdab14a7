"""The Redis connection: one Redis at a URL, or the primary that Sentinel names.

The gateway's own server, for when there is no URL, is in `embedded_store`.
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
