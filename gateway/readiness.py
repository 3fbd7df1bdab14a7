"""Readiness answered from the last background check, so `/readyz` costs no store trip.

A probe that pinged the store per request let a flood of unauthenticated `/readyz`
calls take every store connection. Here one task checks the store every
`CHECK_EVERY_S` on the operational connection and `/readyz` reads the result: a store
that goes away turns the answer to 503 within about a second, and back to 200 as soon
as a check succeeds again.
"""

from __future__ import annotations

import asyncio
import logging

from .errors import GatewayError, store_unavailable
from .registry import StoreProbe
from .store import StoreFailure
from .store_failures import StoreFailures, error_for, reason

log = logging.getLogger("gateway.readiness")

CHECK_EVERY_S = 1.0
CHECK_TIMEOUT_S = 1.0  # a hung store fails the check rather than hold the last answer
STALE_AFTER_S = 3 * CHECK_EVERY_S  # no check for this long (a stuck task): not ready


class Readiness:
    def __init__(self, probe: StoreProbe, failures: StoreFailures | None = None) -> None:
        self._probe = probe
        self._failures = failures
        self._ok = False
        self._failure: StoreFailure | None = None  # why the last check failed
        self._checked_at = 0.0  # event loop time of the last finished check

    def ready(self) -> bool:
        """The last check's answer, if it is recent."""
        fresh = asyncio.get_running_loop().time() - self._checked_at <= STALE_AFTER_S
        return self._ok and fresh

    def error(self) -> GatewayError:
        """The answer while not ready: the last failure's (`store_busy` when this
        replica had no free connection, else `store_unavailable`)."""
        if self._failure is None:  # stale, or a check that failed unexpectedly
            return store_unavailable()
        return error_for(self._failure)

    async def check(self) -> bool:
        """Ping the store once and remember the answer."""
        self._failure = None
        try:
            await self._probe.ping(CHECK_TIMEOUT_S)
            ok = True
        except StoreFailure as exc:
            ok = False
            self._failure = exc
            if self._failures is not None:
                self._failures.count(exc, "the readiness check")
            if self._ok:
                log.warning("not ready: the store does not answer (%s)", reason(exc))
        except Exception:
            # Not a store failure but a bug: not ready, said loudly, and checked again.
            ok = False
            log.exception("readiness check failed unexpectedly; checking again")
        if ok and not self._ok and self._checked_at:
            log.info("ready again: the store answers")
        self._ok = ok
        self._checked_at = asyncio.get_running_loop().time()
        return ok

    async def run(self) -> None:
        """Check forever, one check at a time; an unexpected failure is logged and the
        next check runs as usual (a dead task would leave `/readyz` stale for good)."""
        while True:
            await asyncio.sleep(CHECK_EVERY_S)
            try:
                await self.check()
            except Exception:  # `check` catches everything; this only keeps the loop
                log.exception("readiness check failed unexpectedly; checking again")
