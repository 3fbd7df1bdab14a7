"""One meaning for every store failure: its client error, its metric and its log line.

A store that cannot be reached (`StoreUnavailable`) and a replica with no free pooled
connection (`StoreBusy`) call for different answers: 503 `store_unavailable` (the
store is down; alert) or 503 `store_busy` (this replica is loaded; retry). Every place
that meets one (the app's handlers, a record that failed after upstream acted,
readiness, `/metrics`, admission, the tracker) maps it here, so the answer, the
counter and the log agree. In a flood every request meets the same failure, so the
warning is written at most once per `WARN_EVERY_S` with the count it stands for.
"""

from __future__ import annotations

import logging
import time

from .errors import GatewayError, store_busy, store_unavailable
from .metrics import GatewayMetrics
from .store import StoreBusy

log = logging.getLogger("gateway.store")

WARN_EVERY_S = 10.0


def is_busy(exc: BaseException) -> bool:
    """True for "this replica had no free connection", False for "the store is down"."""
    return isinstance(exc, StoreBusy)


def reason(exc: BaseException) -> str:
    """What failed, for a log line: the client's own exception (`ConnectionError`,
    `TimeoutError`) that a StoreFailure was raised from, else the exception itself."""
    return type(exc.__cause__ or exc).__name__


def error_for(
    exc: BaseException, *, message: str | None = None, no_retry: bool = False
) -> GatewayError:
    """The client's answer to a store failure; `message` replaces the generic one."""
    error = store_busy() if is_busy(exc) else store_unavailable()
    if message is not None:
        error.message = message
    error.no_retry = no_retry
    return error


class StoreFailures:
    """Counts and logs store failures; `error` also gives the client's answer."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics
        self._warned_at: dict[bool, float] = {}  # busy? -> monotonic time of the last line
        self._unlogged: dict[bool, int] = {True: 0, False: 0}

    def count(self, exc: BaseException, what: str = "a store operation") -> None:
        busy = is_busy(exc)
        (self.metrics.store_busy if busy else self.metrics.store_errors).inc()
        self._warn(busy, what, reason(exc))

    def error(
        self,
        exc: BaseException,
        what: str = "a request",
        *,
        message: str | None = None,
        no_retry: bool = False,
    ) -> GatewayError:
        self.count(exc, what)
        return error_for(exc, message=message, no_retry=no_retry)

    def _warn(self, busy: bool, what: str, name: str) -> None:
        now = time.monotonic()
        last = self._warned_at.get(busy)
        if last is not None and now - last < WARN_EVERY_S:
            self._unlogged[busy] += 1
            return
        also = self._unlogged[busy]
        self._warned_at[busy], self._unlogged[busy] = now, 0
        since = f" (and {also} more in the last {now - last:.0f}s)" if also and last else ""
        if busy:
            log.warning("no free store connection in time for %s: store_busy%s", what, since)
        else:
            log.warning("store unreachable (%s) for %s: store_unavailable%s", name, what, since)
