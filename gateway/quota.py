"""Admission of job-creating requests: a fair wait for a slot, then the create's outcome.

`JobSlots.hold` is the only way a request spends a slot. It waits (in arrival order,
across replicas) up to `quota.wait_s`, then yields a ticket; the handler binds the
ticket to the job id upstream returned, or releases it when upstream refused the job.
Any other way out of the block (a timeout, a 5xx, a cancelled request) leaves the slot
counted as `unknown` for the tracker to settle: when in doubt, the job is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from typing import TypeVar

from .auth import Team
from .errors import GatewayError
from .ledger import SlotLedger
from .logs import note
from .metrics import GatewayMetrics
from .store import StoreBusy, StoreFailure, StoreUnavailable
from .store_failures import StoreFailures
from .upstream import UpstreamError
from .wakeups import Wakeups

log = logging.getLogger("gateway.quota")

T = TypeVar("T")

RECHECK_S = 0.25  # a waiter re-checks at least this often, even without a wake-up
DEFAULT_JOB_S = 30.0  # the retry estimate's guess until a job has been seen to end


class Ticket:
    """One admitted slot, as seen by the request that asked for it."""

    def __init__(self, slots: JobSlots, slot_id: str, team: Team, kind: str) -> None:
        self._slots = slots
        self.slot_id = slot_id
        self.team = team
        self.kind = kind
        self.settled = False

    async def bind(self, video_id: str) -> None:
        await _shielded(
            self._slots.ledger.bind(self.slot_id, video_id, team=self.team.name, kind=self.kind)
        )
        self.settled = True
        log.info(
            "job started",
            extra={"team": self.team.name, "kind": self.kind, "video_id": video_id},
        )

    async def release(self) -> None:
        """Upstream refused the job: nothing runs, the slot is free at once."""
        await _shielded(self._slots.ledger.release(self.slot_id))
        self.settled = True


class JobSlots:
    def __init__(
        self,
        ledger: SlotLedger,
        metrics: GatewayMetrics,
        *,
        wait_s: float,
        failures: StoreFailures | None = None,
    ) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.failures = failures or StoreFailures(metrics)
        self.wait_s = wait_s
        self.in_flight: set[str] = set()  # slots whose create is still running here
        self.typical_job_s = DEFAULT_JOB_S
        self._wakeups = Wakeups()

    @contextlib.asynccontextmanager
    async def hold(
        self,
        team: Team,
        kind: str,
        want: Mapping[str, str],
        disconnected: Callable[[], Awaitable[bool]],
    ) -> AsyncIterator[Ticket]:
        """A slot for one job; `want` (see `matching.wanted`) lets the tracker recognise
        the job if the create's answer is lost."""
        slot_id = f"slot_{uuid.uuid4().hex}"
        # In flight before it can be admitted: a tracker tick that reads the ledger just
        # after the admission must not take the slot for one whose request has ended.
        self.in_flight.add(slot_id)
        try:
            await self._acquire(slot_id, team, kind, want, disconnected)
        except BaseException:
            self.in_flight.discard(slot_id)
            raise
        ticket = Ticket(self, slot_id, team, kind)
        try:
            yield ticket
        except UpstreamError as exc:
            if not ticket.settled and not exc.maybe_sent:
                await ticket.release()  # nothing reached upstream
            raise
        finally:
            self.in_flight.discard(slot_id)
            if not ticket.settled:
                try:
                    await _shielded(self.ledger.mark_unknown(slot_id))
                except StoreFailure as exc:
                    # Still `reserved` in the store: the tracker treats a reserved slot
                    # with no request behind it as unknown, so nothing is lost.
                    self.failures.count(exc, "marking a slot unknown (the tracker will)")

    async def _acquire(
        self,
        slot_id: str,
        team: Team,
        kind: str,
        want: Mapping[str, str],
        disconnected: Callable[[], Awaitable[bool]],
    ) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.wait_s
        wake = self._wakeups.join(team.name, slot_id)
        arrival: int | None = None  # its place in the queue, once it has one
        try:
            while True:
                wake.clear()  # a release from here on wakes the wait below at once
                try:
                    admission = await self.ledger.try_acquire(
                        slot_id, team.name, kind, want, arrival
                    )
                except StoreUnavailable:
                    self.metrics.quota_rejections.labels(team.name, "store_unavailable").inc()
                    raise
                except StoreBusy:
                    # No connection was free, so nothing reached the store: this is one
                    # more wait, and only a wait that runs out answers store_busy.
                    if loop.time() >= deadline:
                        raise
                    continue
                arrival = admission.arrival
                if admission.admitted:
                    waited = loop.time() - started
                    self.metrics.slot_wait.labels(team.name).observe(waited)
                    note(wait_ms=round(waited * 1000, 2))
                    return
                remaining = deadline - loop.time()
                if remaining <= 0:
                    reason = admission.reason or "global_limit"
                    self.metrics.quota_rejections.labels(team.name, reason).inc()
                    raise self._full(reason, admission.ahead)
                if await disconnected():
                    # Nobody will read this answer; it only ends the request quietly.
                    raise GatewayError(499, "client_disconnected", "The client went away.")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), min(remaining, RECHECK_S))
        except BaseException:
            try:
                await _shielded(self.ledger.abandon(slot_id))
            except StoreFailure as exc:
                # The real outcome (a 429, a disconnect, a store error) stands: a waiter
                # left in the queue drops out when its heartbeat runs out.
                self.failures.count(exc, "leaving the queue (its heartbeat will)")
            raise
        finally:
            self._wakeups.leave(team.name, slot_id)

    def _full(self, reason: str, ahead: int) -> GatewayError:
        """429 with an honest guess of when a slot may be free for this caller."""
        rounds = ahead // max(1, self.ledger.limit) + 1
        retry_s = max(1.0, rounds * self.typical_job_s / 2)
        headers = {
            "retry-after": str(math.ceil(retry_s)),
            "retry-after-ms": str(int(retry_s * 1000)),
        }
        if reason == "team_limit":
            return GatewayError(
                429,
                "team_concurrency_limit_exceeded",
                "Your team already runs as many video jobs as it may; try again later.",
                headers=headers,
            )
        return GatewayError(
            429,
            "concurrency_limit_exceeded",
            "All shared video job slots are busy; try again later.",
            headers=headers,
        )

    async def finish(
        self,
        *,
        slot_id: str = "",
        video_id: str = "",
        outcome: str,
        ledger: SlotLedger | None = None,
    ) -> bool:
        """A job was seen to end: free its slot. True for the one caller that freed it.

        Every replica's tracker and every client's retrieve may see the same end; the
        ledger lets exactly one of them through, and only that one counts the job.
        The tracker passes its own `ledger` (its own store client).
        """
        ledger = ledger or self.ledger
        released = await _shielded_result(ledger.release(slot_id, video_id=video_id))
        if released is None:
            return False
        log.info(
            "job ended",
            extra={
                "team": released.team,
                "kind": released.kind,
                "video_id": released.video or None,
                "outcome": outcome,
                "held_s": round(released.held_s, 3),
            },
        )
        self.metrics.job_ended(released.team, released.kind, outcome, released.held_s)
        if outcome in ("completed", "failed", "cancelled"):
            self.notice_job_duration(released.held_s)
        return True

    def notice_release(self) -> None:
        """A slot somewhere was freed: wake the local waiters that could take it."""
        self._wakeups.wake(self.ledger.limit)

    def notice_job_duration(self, seconds: float) -> None:
        self.typical_job_s = 0.8 * self.typical_job_s + 0.2 * max(1.0, seconds)

    async def listen(self, releases: AsyncIterable[None]) -> None:
        """Turn every replica's releases (`SlotLedger.releases`) into local wake-ups."""
        async for _ in releases:
            self.notice_release()


async def _shielded(work: Awaitable[object]) -> None:
    """Run a ledger change to completion even if the request awaiting it is cancelled."""
    await asyncio.shield(asyncio.ensure_future(work))


async def _shielded_result(work: Awaitable[T]) -> T:
    return await asyncio.shield(asyncio.ensure_future(work))
