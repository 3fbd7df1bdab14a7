"""The store clients of one replica: one per kind of work, each with its own bounded pool.

Sharing one pool let any route starve the others: ~300 keep-alive clients on `/readyz`
held every connection and every create failed. Here admission never shares a
connection with what an unauthenticated caller can trigger:

- `ledger`: admission's slot scripts (acquire, bind, a refused create's release);
- `tracker`: the tracker's slot scripts (renew, adopt, bind, release): however many
  creates wait, the slots their waiting is for are still freed on time;
- `registry`: video and character records (every command safe to send twice);
- `ops`: the readiness check and `/metrics`' quota read, both at most one at a time;
- `pubsub`: the one connection the release listener keeps subscribed.

Every pool waits briefly for a free connection (`POOL_WAIT_S`) before StoreBusy. Each
client talks to one Redis at a URL, or to the primary that Sentinel names.

This is also where redis-py's exceptions end: `translate_errors` turns them into the
`store` error tree, and only the ledger and the registry (the modules that send
commands) use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, ParamSpec, Self, TypeVar

import redis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .config import SentinelSettings
from .store import StoreBusy, StoreFailure, StoreUnavailable

P = ParamSpec("P")
T = TypeVar("T")

# How long a command waits for a free pooled connection before StoreBusy.
POOL_WAIT_S = 2.0
DEFAULT_POOL_SIZE = 32
# Admission runs short scripts; each team's first waiters re-check at one release.
LEDGER_POOL = 64
# One tick at a time, its parallel polls bounded (tracker.MAX_PARALLEL_POLLS) and each
# followed by a renew or a release.
TRACKER_POOL = 16
# Retrieves and lists batch their reads (batching.py), so fewer connections carry them.
REGISTRY_POOL = 64
# One readiness check and one shared metrics read, never more.
OPS_POOL = 2

# A dead store must mean a quick 503, not a hang.
_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 2.0,
    "socket_connect_timeout": 2.0,
    "health_check_interval": 10,
    "retry_on_timeout": False,
}

# What a dead or unreachable store raises: every such failure means 503, never a guess.
# Any other redis error (a script's own error, a wrong reply) is a bug and stays one.
UNREACHABLE: tuple[type[Exception], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
)
# For a health check, every failure of the client or its socket means "not answering".
ANY_FAILURE: tuple[type[Exception], ...] = (redis.exceptions.RedisError, OSError)


class NoFreeConnection(redis.exceptions.RedisError):
    """Raised inside redis-py by a full pool; `translate_errors` makes it StoreBusy.

    It stays a RedisError (as StoreBusy was before the error tree), so redis-py's own
    handling around `get_connection` sees the kind of exception it was written for; and
    not a ConnectionError, so it is never retried or read as an unreachable store."""


class WaitingPool(BlockingConnectionPool):
    """A bounded pool whose full state makes a command wait briefly for a connection
    (redis-py's default pool raises at once), and then raise NoFreeConnection rather
    than the ConnectionError that would read as the store being unreachable."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        try:
            # Unannotated in redis-py; `untyped_calls_exclude` cannot name a super() call.
            return await super().get_connection()  # type: ignore[no-untyped-call]
        except redis.exceptions.ConnectionError as exc:
            # BlockingConnectionPool raises its wait's TimeoutError as the cause; a
            # failure to connect has no such cause and stays a store error.
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise NoFreeConnection(f"no free store connection within {self.timeout}s") from None
            raise


class SentinelWaitingPool(SentinelConnectionPool, WaitingPool):
    """The same waiting pool, for connections to the primary that Sentinel names."""


def translation(exc: Exception) -> StoreFailure:
    """The one boundary between redis-py and the gateway (as httpx's
    `map_httpcore_exceptions`): a full pool is StoreBusy, an unreachable store
    StoreUnavailable; the caller raises it from the original, keeping its traceback."""
    if isinstance(exc, NoFreeConnection):
        return StoreBusy(str(exc))
    return StoreUnavailable(str(exc) or type(exc).__name__)


@contextlib.contextmanager
def translate_errors(unreachable: tuple[type[Exception], ...] = UNREACHABLE) -> Iterator[None]:
    """`translation` for a block; `unreachable` widens what counts as the store being
    unreachable (readiness' ping counts any redis or socket error)."""
    caught: tuple[type[Exception], ...] = (NoFreeConnection, *unreachable)
    try:
        yield
    except caught as exc:
        raise translation(exc) from exc


def translated(call: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
    """`call` with its store errors translated: for the ledger's and registry's methods.

    A plain try (free in CPython 3.11 when nothing is raised), not the context manager:
    that cost about 1.7 us a call, 1.7 % of a create's CPU under load (py-spy)."""
    translated_errors: tuple[type[Exception], ...] = (NoFreeConnection, *UNREACHABLE)

    @functools.wraps(call)
    async def translating(*args: P.args, **kwargs: P.kwargs) -> T:
        try:
            return await call(*args, **kwargs)
        except translated_errors as exc:
            raise translation(exc) from exc

    return translating


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


class OnClient:
    """An owner of Lua scripts, registered once per client (as redis-py's `Lock`)."""

    redis: Redis

    def _register(self, redis: Redis) -> None:
        raise NotImplementedError

    def on(self, redis: Redis) -> Self:
        """The same owner with its scripts sent on another client: the tracker's and the
        dispatcher's, so that waiting creates can never take the connections that
        renew, adopt, release and start need (a slot freed late is a slot nobody uses)."""
        other = copy.copy(self)
        other.redis = redis
        other._register(redis)
        return other


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


@dataclass(frozen=True)
class StoreClients:
    ledger: Redis
    tracker: Redis
    registry: Redis
    ops: Redis
    pubsub: Redis

    @classmethod
    def open(cls, url: str | None, sentinel: SentinelSettings | None) -> StoreClients:
        """Clients for `url`, or for the primary that `sentinel` names."""

        def client(size: int, *, retry_once: bool = False) -> Redis:
            if url is not None:
                return connect(url, max_connections=size, retry_once=retry_once)
            assert sentinel is not None
            return connect_sentinel(sentinel, max_connections=size, retry_once=retry_once)

        return cls(
            # A repeated slot acquire could take two slots: never retried.
            ledger=client(LEDGER_POOL),
            tracker=client(TRACKER_POOL),
            # Every registry command is a read or an idempotent write: it may be sent twice.
            registry=client(REGISTRY_POOL, retry_once=True),
            # PING and reads: a restart's first failed command is simply sent again.
            ops=client(OPS_POOL, retry_once=True),
            pubsub=client(1),
        )

    async def aclose(self) -> None:
        await asyncio.gather(
            self.ledger.aclose(),
            self.tracker.aclose(),
            self.registry.aclose(),
            self.ops.aclose(),
            self.pubsub.aclose(),
        )
