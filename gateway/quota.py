"""Admission of job-creating requests: a fair wait for a slot, then the create's outcome.

`JobSlots.hold` is the only way a request spends a slot. It waits (in arrival order,
across replicas) up to `quota.wait_s`, then yields a ticket; `Ticket.forward` sends the
create and settles the slot by its outcome, by the rules of `fate_of`: bound to the job
upstream started, released when upstream refused or never got the request, and kept
`unknown` for the tracker when the job may exist upstream (a timeout, a reset, a 5xx).
Any other way out of the block (a cancelled request) also leaves the slot `unknown`:
when in doubt, the job is running.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

from .answers import video_object
from .auth import Team
from .budgets import Spend
from .errors import (
    GatewayError,
    UpstreamError,
    client_disconnected,
    concurrency_limit_exceeded,
    team_concurrency_limit_exceeded,
    upstream_rate_limited,
)
from .ledger import Admission, Release, SlotLedger
from .logs import note
from .metrics import GatewayMetrics
from .policy import MICRO
from .scheduler import Enqueued
from .store import StoreBusy, StoreFailure, StoreUnavailable
from .store_failures import StoreFailures
from .upstream import Reply, error_from_reply
from .wakeups import Wakeups

log = logging.getLogger("gateway.quota")

T = TypeVar("T")

RECHECK_S = 0.25  # a waiter re-checks at least this often, even without a wake-up
DEFAULT_JOB_S = 30.0  # the retry estimate's guess until a job has been seen to end


class SlotFate(enum.Enum):
    """What a create's outcome means for the slot it took."""

    BIND = "bind"  # upstream started the job: the slot counts it
    RELEASE = "release"  # upstream refused it, or never got it: the slot is free at once
    KEEP = "keep"  # the job may exist upstream: `unknown`, for the tracker to settle


def fate_of(outcome: Reply | UpstreamError) -> SlotFate:
    """The slot rule for a create's outcome: an answer that leaves it unknown whether the
    job exists upstream keeps the slot (and its error says "do not retry")."""
    if isinstance(outcome, UpstreamError):
        return SlotFate.KEEP if outcome.maybe_sent else SlotFate.RELEASE
    if outcome.status < 300:
        return SlotFate.BIND
    return SlotFate.RELEASE if outcome.status < 500 else SlotFate.KEEP


def retry_after_s(ahead: int, limit: int, typical_job_s: float) -> float:
    """An honest guess of when a slot may be free for a caller with `ahead` waiters
    before it: half a typical job per round of `limit` jobs, at least a second."""
    rounds = ahead // max(1, limit) + 1
    return max(1.0, rounds * typical_job_s / 2)


@dataclass(frozen=True)
class Started:
    """A create upstream accepted: its answer, and the video object it holds."""

    reply: Reply
    video: dict[str, Any]


class Ticket:
    """One admitted slot, as seen by the request that asked for it."""

    def __init__(
        self,
        slots: JobSlots,
        slot_id: str,
        team: Team,
        kind: str,
        ids: Mapping[str, str] | None = None,
    ) -> None:
        self._slots = slots
        self.slot_id = slot_id
        self.team = team
        self.kind = kind
        self.ids = ids  # the source's ids its client knows by others (see `bind`)
        self.settled = False

    async def bind(self, video_id: str) -> None:
        bind = self._slots.ledger.bind(
            self.slot_id, video_id, team=self.team.name, kind=self.kind, ids=self.ids
        )
        await _shielded(bind)
        self.settled = True
        log.info(
            "job started",
            extra={"team": self.team.name, "kind": self.kind, "video_id": video_id},
        )

    async def release(self) -> None:
        """Upstream refused the job (or never got it): nothing runs, the slot is free at
        once, and its reservation is settled as `refused` (charged nothing)."""
        released = await _shielded_result(
            self._slots.ledger.release(self.slot_id, outcome="refused")
        )
        self.settled = True
        if released is not None:
            self._slots.settled(released)

    async def forward(self, create: Awaitable[Reply]) -> Started:
        """Send the create (`create` is its call upstream) and settle the slot by its outcome."""
        try:
            outcome: Reply | UpstreamError = await create
        except UpstreamError as exc:
            outcome = exc
        return await self.settle(outcome)

    async def settle(self, outcome: Reply | UpstreamError) -> Started:
        """Apply `fate_of` to the slot; the started job, or raise the client's error.

        An error after which the job may exist upstream is marked `no_retry`: the SDKs
        would otherwise retry the create blindly and pay for a duplicate job.
        """
        fate = fate_of(outcome)
        rate_limited = isinstance(outcome, Reply) and outcome.status == 429
        if rate_limited:
            # Upstream's own limit: our count is wrong somewhere. Worth an alert, counted
            # even if the release below fails.
            self._slots.metrics.quota_rejected(self.team.name, "upstream_429")
        if fate is SlotFate.RELEASE:
            await self.release()
        if isinstance(outcome, UpstreamError):
            outcome.no_retry = fate is SlotFate.KEEP
            raise outcome
        if rate_limited:
            raise upstream_rate_limited(outcome.headers)
        if fate is not SlotFate.BIND:
            error = error_from_reply(outcome, outcome.scrub)
            error.no_retry = fate is SlotFate.KEEP
            raise error
        try:
            video = video_object(outcome)
        except GatewayError as exc:
            exc.no_retry = True  # a 2xx: the job may well exist upstream
            raise
        note(video_id=video["id"])
        try:
            await self.bind(video["id"])
        except StoreFailure as exc:
            raise self._slots.not_recorded(exc, video["id"]) from None
        return Started(outcome, video)


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
        # Called when a queued job may start (a release, or a decision that gave one a
        # slot): the dispatcher's wake-up.
        self.kicks: list[Callable[[], None]] = []

    @contextlib.asynccontextmanager
    async def hold(
        self,
        team: Team,
        kind: str,
        want: Mapping[str, str],
        disconnected: Callable[[], Awaitable[bool]],
        ids: Mapping[str, str] | None = None,
        spend: Spend | None = None,
    ) -> AsyncIterator[Ticket]:
        """A slot for one job; `want` (see `matching.wanted`) lets the tracker recognise
        the job if the create's answer is lost; `ids` (upstream id -> gateway id of the
        job's source, when it started from the queue) go with the slot to the tracker;
        `spend` is checked against the team's budgets on every try, reserved on
        admission (429 `budget_exceeded` at once, never after a wait)."""
        slot_id = f"slot_{uuid.uuid4().hex}"
        # In flight before it can be admitted: a tracker tick that reads the ledger just
        # after the admission must not take the slot for one whose request has ended.
        self.in_flight.add(slot_id)
        try:
            await self._acquire(slot_id, team, kind, want, disconnected, spend)
        except BaseException:
            self.in_flight.discard(slot_id)
            raise
        async with self._ticket(slot_id, team, kind, ids) as ticket:
            yield ticket

    @contextlib.asynccontextmanager
    async def start_or_queue(
        self,
        team: Team,
        kind: str,
        enqueue: Callable[[str], Awaitable[Enqueued]],
        ids: Mapping[str, str] | None = None,
    ) -> AsyncIterator[Ticket | Enqueued]:
        """`when_full: queue`: one decision, no wait. `enqueue` (the scheduler's, given
        the slot id to reserve) starts the job now, and this yields its ticket, or it
        stored the job (or refused it: the queue is full), and this yields that."""
        slot_id = f"slot_{uuid.uuid4().hex}"
        self.in_flight.add(slot_id)  # as in `hold`: before the slot can be reserved
        try:
            decision = await enqueue(slot_id)
        except BaseException:
            self.in_flight.discard(slot_id)
            raise
        if decision.kick:
            self.notice_kick()
        if decision.outcome != "admitted":
            self.in_flight.discard(slot_id)
            yield decision
            return
        async with self._ticket(slot_id, team, kind, ids) as ticket:
            yield ticket

    @contextlib.asynccontextmanager
    async def _ticket(
        self, slot_id: str, team: Team, kind: str, ids: Mapping[str, str] | None
    ) -> AsyncIterator[Ticket]:
        """The admitted slot's ticket; a way out that did not settle it leaves it
        `unknown` (the job may exist upstream)."""
        ticket = Ticket(self, slot_id, team, kind, ids)
        try:
            yield ticket
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
        spend: Spend | None,
    ) -> None:
        """Wait in the queue until admitted; any other way out leaves the queue."""
        wake = self._wakeups.join(team.name, slot_id)
        attempt = partial(
            self.ledger.try_acquire,
            slot_id,
            team.name,
            kind,
            want,
            charge=spend.charge if spend else None,
            limits=spend.limits if spend else None,
        )
        try:
            await self._wait_for_admission(team, attempt, disconnected, wake, spend)
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

    async def _wait_for_admission(
        self,
        team: Team,
        attempt: Callable[[int | None], Awaitable[Admission]],
        disconnected: Callable[[], Awaitable[bool]],
        wake: asyncio.Event,
        spend: Spend | None = None,
    ) -> None:
        """`attempt` (one acquire, given the place the last one returned), and between
        attempts wait for a release (`wake`) or RECHECK_S, until admitted or `wait_s`
        has passed (then 429)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + self.wait_s
        arrival: int | None = None  # its place in the queue, once it has one
        while True:
            wake.clear()  # a release from here on wakes the wait below at once
            try:
                admission = await attempt(arrival)
            except StoreUnavailable:
                self.metrics.quota_rejected(team.name, "store_unavailable")
                raise
            except StoreBusy:
                # No connection was free, so nothing reached the store: this is one
                # more wait, and only a wait that runs out answers store_busy.
                if loop.time() >= deadline:
                    raise
                continue
            if admission.over is not None and spend is not None:
                self.metrics.policy_rejected(team.name, "budget_exceeded")
                raise spend.refusal(team.name, admission.over)
            arrival = admission.arrival
            if admission.kick:
                self.notice_kick()
            if admission.admitted:
                waited = loop.time() - started
                self.metrics.slot_waited(team.name, waited)
                note(wait_ms=round(waited * 1000, 2))
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                reason = admission.reason or "global_limit"
                self.metrics.quota_rejected(team.name, reason)
                raise self._full(reason, admission.ahead)
            if await disconnected():
                raise client_disconnected()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), min(remaining, RECHECK_S))

    def _full(self, reason: str, ahead: int) -> GatewayError:
        """429 with an honest guess of when a slot may be free for this caller."""
        retry_s = retry_after_s(ahead, self.ledger.limit, self.typical_job_s)
        if reason == "team_limit":
            return team_concurrency_limit_exceeded(retry_s)
        return concurrency_limit_exceeded(retry_s)

    def not_recorded(self, exc: BaseException, video_id: str) -> GatewayError:
        """The answer when a started job could not be written down: it runs upstream,
        and the tracker finds and records it once the store is back, so the client must
        not create it a second time."""
        log.error("could not record a created job", extra={"video_id": video_id})
        return self.failures.error(
            exc,
            "recording a created job",
            message=f"Job {video_id} was started but not yet recorded; do not retry it.",
            no_retry=True,
        )

    async def finish(
        self,
        *,
        slot_id: str = "",
        video_id: str = "",
        outcome: str,
        ledger: SlotLedger | None = None,
        seconds: int | None = None,
    ) -> bool:
        """A job was seen to end: free its slot and settle its charge (`seconds`: the
        result's, for a completed job). True for the one caller that freed it.

        Every replica's tracker and every client's retrieve may see the same end; the
        ledger lets exactly one of them through, and only that one counts the job and
        its cost. The tracker passes its own `ledger` (its own store client).
        """
        ledger = ledger or self.ledger
        release = ledger.release(slot_id, video_id=video_id, outcome=outcome, seconds=seconds)
        released = await _shielded_result(release)
        if released is None:
            return False
        self.settled(released)
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

    def settled(self, released: Release) -> None:
        """Count what a release charged (`video_seconds_total`, `cost_usd_total`)."""
        if released.model:
            self.metrics.settled(
                released.team, released.model, released.charged_s, released.charged_micro / MICRO
            )

    def notice_release(self) -> None:
        """A slot somewhere was freed: wake the local waiters that could take it, and
        the dispatcher (a queued job may be next)."""
        self._wakeups.wake(self.ledger.limit)
        self.notice_kick()

    def notice_kick(self) -> None:
        """A queued job may start now: wake this replica's dispatcher."""
        for kick in self.kicks:
            kick()

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
