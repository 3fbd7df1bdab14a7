"""Claims on an upstream connection pool, taken before aiohttp is asked for a connection.

aiohttp queues a request that finds its pool full without saying so, and watching that
queue took a TraceConfig on every request (a few signal sends and objects per call) to
catch a rare wait. Here each pool admits at most as many calls as its connector has
connections, so aiohttp itself never queues: the gateway knows exactly who waits, and
since when, at no cost to a call that finds a free connection. Calls that name a team
are also counted per team, so one team's slow calls cannot take every connection the
other teams' retrieves need.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Protocol

from .errors import too_many_requests

log = logging.getLogger("gateway.upstream")

# Connections of the pool the JSON routes share (retrieves, deletes, creates, characters).
API_CONNECTIONS = 128
# A call that has waited this long for a pooled connection means the pool is starved.
STARVED_AFTER_S = 1.0
# A starved pool logs at most one line per this long (the metric counts every call).
LOG_EVERY_S = 10.0
RETRY_AFTER_S = 1


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class PoolGate:
    """At most `limit` calls on one pool at once, and `per_team` of them per team.

    Waiters are served first come, first served; a team over its share is refused at
    once (429 `too_many_requests`), since waiting would hold the others' place too.
    """

    def __init__(
        self,
        name: str,
        limit: int,
        *,
        starved: _Counter,
        per_team: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.limit = limit
        self.per_team = limit if per_team is None else per_team
        self._starved = starved
        self._clock = clock
        self._free = limit
        # Each waiter's future and when it began to wait, oldest first.
        self._waiters: OrderedDict[asyncio.Future[None], float] = OrderedDict()
        self._by_team: Counter[str] = Counter()
        self._logged_at = -LOG_EVERY_S
        self._unlogged = 0

    @property
    def in_use(self) -> int:
        return self.limit - self._free

    def oldest_wait_s(self) -> float:
        """How long the longest-waiting call has waited so far (0 when none waits); O(1)."""
        for since in self._waiters.values():
            return self._clock() - since
        return 0.0

    @property
    def starved(self) -> bool:
        """Whether a call has been waiting for a connection over STARVED_AFTER_S."""
        return self.oldest_wait_s() > STARVED_AFTER_S

    async def claim(self, team: str | None = None) -> PoolClaim:
        """One connection's worth of this pool; waits while every one is in use."""
        if team is not None:
            if self._by_team[team] >= self.per_team:
                raise too_many_requests(RETRY_AFTER_S)
            self._by_team[team] += 1
        try:
            if self._free and not self._waiters:
                self._free -= 1
            else:
                await self._wait()
        except BaseException:
            self._forget(team)
            raise
        return PoolClaim(self, team)

    async def _wait(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        since = self._clock()
        self._waiters[waiter] = since
        try:
            await waiter
        except BaseException:
            # Handed a connection just as it was cancelled: pass it on to the next.
            if self._waiters.pop(waiter, None) is None and not waiter.cancelled():
                self._hand_on()
            raise
        waited = self._clock() - since
        if waited > STARVED_AFTER_S:
            self._long_wait(waited)

    def _long_wait(self, waited: float) -> None:
        self._starved.inc()
        self._unlogged += 1
        now = self._clock()
        if now - self._logged_at >= LOG_EVERY_S:
            log.warning(
                "upstream calls waited for a pooled connection: the pool is exhausted",
                extra={
                    "pool": self.name,
                    "waited_ms": round(waited * 1000),
                    "calls": self._unlogged,
                },
            )
            self._logged_at, self._unlogged = now, 0

    def _hand_on(self) -> None:
        """A connection's worth is free: the oldest waiter gets it, else the pool does."""
        while self._waiters:
            waiter, _ = self._waiters.popitem(last=False)
            if not waiter.done():
                waiter.set_result(None)
                return
        self._free += 1

    def _forget(self, team: str | None) -> None:
        if team is None:
            return
        self._by_team[team] -= 1
        if not self._by_team[team]:
            del self._by_team[team]


class PoolClaim:
    """A claimed connection; `release` may be called any number of times, it counts once."""

    def __init__(self, gate: PoolGate, team: str | None) -> None:
        self._gate: PoolGate | None = gate
        self._team = team

    def release(self) -> None:
        gate, self._gate = self._gate, None
        if gate is not None:
            gate._forget(self._team)
            gate._hand_on()
