"""The tracker: every replica's background task that follows running jobs upstream.

Slots come free because the gateway itself watches the jobs, not because a client
happens to poll. Each tick the tracker reads the ledger once and, for the slots it owns
(and any whose owner stopped renewing: it adopts those), it

- renews slots whose create is still in flight in this process;
- polls bound jobs upstream, in parallel with a bound: running -> renew, ended or
  gone -> release (and the registry learns the new state). A job whose progress
  moves is polled again when it should end, not a whole interval later: a slot
  idles only milliseconds between one job and the next;
- settles `unknown` slots (a create whose answer was lost) by finding the job among
  upstream's recent ones, or releasing the slot once it can no longer appear;
- releases, as a last resort, any job older than `quota.max_job_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

from .answers import in_client_ids, json_object, video_object
from .budgets import result_seconds
from .dispatcher import Dispatcher
from .errors import GatewayError, UpstreamError
from .ledger import Slot, SlotLedger, Snapshot
from .matching import pick
from .parse import whole_number
from .quota import JobSlots
from .registry import TERMINAL_STATUSES, VideoRegistry
from .store import StoreFailure
from .tracker_plan import Limits, Step, needs_adopting, next_poll_in_ms, plan_slot, predicted_end_s
from .upstream import Upstream

log = logging.getLogger("gateway.tracker")

MAX_PARALLEL_POLLS = 8
MIN_TICK_S = 0.005


class Tracker:
    def __init__(
        self,
        *,
        ledger: SlotLedger,
        slots: JobSlots,
        registry: VideoRegistry,
        upstream: Upstream,
        poll_interval_s: float,
        lease_s: float,
        max_job_s: float,
        settle_after_s: float,
        queue: Dispatcher | None = None,
    ) -> None:
        self.ledger = ledger
        self.queue = queue  # settles the lost starts of queued jobs
        self.slots = slots
        self.registry = registry
        self.upstream = upstream
        self.calls = upstream.for_tracker()
        self.poll_interval_s = poll_interval_s
        self.limits = Limits(lease_ms=int(lease_s * 1000), max_job_ms=int(max_job_s * 1000))
        # One slow upstream answer must not hold a tick past the leases it should renew.
        self.call_timeout_s = lease_s / 3
        self.settle_after_ms = int(settle_after_s * 1000)
        self._next_poll_ms: dict[str, int] = {}  # slot -> when to poll its job (store ms)
        self._progress: dict[str, tuple[float, float]] = {}  # slot -> (monotonic s, %)
        self._next_settle = 0.0
        self._polls = asyncio.Semaphore(MAX_PARALLEL_POLLS)

    async def run(self) -> None:
        """Tick forever; a failed tick (store or upstream down) is logged and retried."""
        while True:
            delay = self.poll_interval_s
            try:
                delay = await self.tick()
            except asyncio.CancelledError:
                raise
            except StoreFailure as exc:
                self.slots.failures.count(exc, "a tracker tick (deferred)")
            except Exception:
                log.exception("tracker tick failed")
            await asyncio.sleep(delay)

    async def tick(self) -> float:
        """One pass over the ledger; returns how long to wait before the next one."""
        snapshot = await self.ledger.snapshot()
        polls: list[Slot] = []
        unknown: list[Slot] = []
        for slot in snapshot.slots:
            mine = await self._claim(slot, snapshot.now_ms)
            if mine is None:
                continue
            step = plan_slot(
                mine,
                now_ms=snapshot.now_ms,
                in_flight=mine.id in self.slots.in_flight,
                due_ms=self._next_poll_ms.get(mine.id, 0),
                limits=self.limits,
            )
            if step is Step.POLL:
                polls.append(mine)  # in parallel, below
            elif step is Step.SETTLE:
                unknown.append(mine)  # with one listing, below
            else:
                await self._carry_out(step, mine)
        live = {slot.id for slot in snapshot.slots}
        for gone in self._next_poll_ms.keys() - live:
            del self._next_poll_ms[gone]
        for gone in self._progress.keys() - live:
            del self._progress[gone]
        await asyncio.gather(*(self._poll(slot, snapshot.now_ms) for slot in polls))
        loop_now = asyncio.get_running_loop().time()
        if unknown and loop_now >= self._next_settle:
            self._next_settle = loop_now + self.poll_interval_s
            await self._settle(unknown, snapshot)
        return self._next_tick_s(snapshot.now_ms)

    async def _carry_out(self, step: Step, slot: Slot) -> None:
        """A step that touches only the ledger."""
        if step is Step.EXPIRE:
            await self._expire(slot)
        elif step is Step.MARK_UNKNOWN:
            await self.ledger.mark_unknown(slot.id)
        elif step is Step.RENEW:
            await self.ledger.renew(slot.id)

    def _next_tick_s(self, now_ms: int) -> float:
        """At the earliest due poll, and at most one interval away (with jitter, so
        replicas do not poll upstream in lockstep)."""
        interval = self.poll_interval_s * random.uniform(0.8, 1.0)
        if not self._next_poll_ms:
            return interval
        soonest = (min(self._next_poll_ms.values()) - now_ms) / 1000
        return max(MIN_TICK_S, min(interval, soonest))

    async def _claim(self, slot: Slot, now_ms: int) -> Slot | None:
        """The slot if this replica should look after it, adopting it from a dead owner."""
        adopt = needs_adopting(slot, owner=self.ledger.owner, now_ms=now_ms)
        if adopt is False:
            return slot
        if adopt is None or not await self.ledger.adopt(slot.id):
            return None
        log.info("adopted a slot whose replica stopped renewing", extra={"team": slot.team})
        state = "unknown" if slot.state == "reserved" else slot.state
        return replace(slot, owner=self.ledger.owner, state=state)

    async def _expire(self, slot: Slot) -> None:
        if slot.gid and slot.state != "bound" and self.queue is not None:
            # A queued job whose start was never settled: it fails, rather than be left
            # reading `queued` with nothing behind it.
            freed = await self.queue.give_up(slot)
        else:
            freed = await self.slots.finish(
                slot_id=slot.id, outcome="lease_expired", ledger=self.ledger
            )
        if freed:
            log.warning(
                "released a job never seen to end after quota.max_job_s",
                extra={"team": slot.team, "video_id": slot.video},
            )

    async def _poll(self, slot: Slot, now_ms: int) -> None:
        async with self._polls:
            try:
                reply = await asyncio.wait_for(
                    self.calls.call("GET", f"videos/{slot.video}"), self.call_timeout_s
                )
            except (UpstreamError, TimeoutError):
                await self.ledger.renew(slot.id)  # upstream is unwell, the job is not over
                return
        record_id = slot.gid or slot.video  # the id the client knows the job by
        if reply.status == 404:
            await self.registry.forget(record_id, slot.team)
            await self.slots.finish(slot_id=slot.id, outcome="vanished", ledger=self.ledger)
            return
        try:
            video = video_object(reply, asked=slot.video) if reply.status < 300 else None
        except GatewayError as exc:
            log.warning("upstream answered a poll wrongly: %s", exc.message)
            video = None
        if video is None:
            await self.ledger.renew(slot.id)  # nothing learnt: the job is not over
            return
        seen = in_client_ids(video, slot.ids)
        body = reply.body if seen is video else json.dumps(seen).encode()
        if not await self.registry.update(record_id, seen, body) and not slot.gid:
            # Counted but never recorded (the store failed between the two writes):
            # the job is the slot's team's, so record it now rather than lose it. (A
            # queued job's record is written before it starts; gone means deleted.)
            await self.registry.record(slot.team, slot.kind, video, reply.body)
        if await self._finish_if_ended(slot, video):
            return
        if not await self.ledger.renew(slot.id):
            return  # another replica adopted it while we were stalled
        after_ms = whole_number(reply.headers.get("openai-poll-after-ms", ""))
        predicted_s = self._predict_end_s(slot.id, video.get("progress"))
        due_in_ms = next_poll_in_ms(self.poll_interval_s * 1000, predicted_s, after_ms)
        self._next_poll_ms[slot.id] = now_ms + due_in_ms

    def _predict_end_s(self, slot_id: str, progress: Any) -> float | None:
        """Seconds until the job should end, from how fast its progress moved lately."""
        if not isinstance(progress, int | float) or isinstance(progress, bool):
            return None
        now = asyncio.get_running_loop().time()
        previous = self._progress.get(slot_id)
        self._progress[slot_id] = (now, float(progress))
        return predicted_end_s(previous, now, float(progress))

    async def _settle(self, unknown: list[Slot], snapshot: Snapshot) -> None:
        """Find each lost create's job among upstream's recent jobs, or give up on it."""
        try:
            reply = await asyncio.wait_for(
                self.calls.call("GET", "videos", params={"limit": "100", "order": "desc"}),
                self.call_timeout_s,
            )
        except (UpstreamError, TimeoutError):
            reply = None
        listing = None
        if reply is not None and reply.status < 300:
            with contextlib.suppress(GatewayError):  # not a JSON object: nothing learnt
                listing = json_object(reply)
        if listing is None:
            for slot in unknown:
                await self.ledger.renew(slot.id)
            return
        candidates = await self._unclaimed(listing.get("data") or [], snapshot)
        for slot in sorted(unknown, key=lambda s: s.started_ms):
            # Other teams' requests whose job is not known yet: a job that could be
            # theirs is not evidence enough for this slot without its prompt.
            rivals = [s.want for s in snapshot.slots if s.team != slot.team and not s.video]
            match = pick(slot.want, slot.started_ms, candidates, rivals)
            if match is not None:
                candidates.remove(match)
                await self._adopt_job(slot, match)
            elif snapshot.now_ms - slot.started_ms > self.settle_after_ms:
                await self._never_started(slot)
            else:
                await self.ledger.renew(slot.id)

    async def _unclaimed(self, jobs: Iterable[Any], snapshot: Snapshot) -> list[dict[str, Any]]:
        """Upstream jobs that no slot counts and the gateway never recorded."""
        jobs = [
            job
            for job in jobs
            if isinstance(job, dict)
            and isinstance(job.get("id"), str)
            and job["id"] not in snapshot.claimed_videos
        ]
        known = await self.registry.known([job["id"] for job in jobs])
        return [job for job in jobs if job["id"] not in known]

    async def _never_started(self, slot: Slot) -> None:
        """A lost create that can no longer appear: free its slot (a queued job's goes
        back to the queue instead)."""
        if slot.gid and self.queue is not None:
            await self.queue.never_started(slot)
            return
        log.info("released a lost create that never appeared upstream")
        await self.slots.finish(slot_id=slot.id, outcome="never_started", ledger=self.ledger)

    async def _adopt_job(self, slot: Slot, job: dict[str, Any]) -> None:
        """The lost create's job was found: count it, and give it to the team that asked."""
        if slot.gid and self.queue is not None:
            await self.queue.started(
                slot.gid, team=slot.team, kind=slot.kind, slot_id=slot.id, video=job
            )
            await self._finish_if_ended(slot, job)
            return
        ids = await self.registry.known_sources(job)
        await self.ledger.bind(slot.id, job["id"], team=slot.team, kind=slot.kind, ids=ids)
        seen = in_client_ids(job, ids)
        await self.registry.record(slot.team, slot.kind, seen, json.dumps(seen).encode(), ids)
        log.info("found the job of a create whose answer was lost", extra={"video_id": job["id"]})
        await self._finish_if_ended(slot, job)

    async def _finish_if_ended(self, slot: Slot, video: dict[str, Any]) -> bool:
        """Free the slot of a job upstream shows ended, settling its charge by the
        result (its `seconds`, for a completed job); True if it had ended."""
        if video.get("status") not in TERMINAL_STATUSES:
            return False
        await self.slots.finish(
            slot_id=slot.id,
            outcome=str(video["status"]),
            ledger=self.ledger,
            seconds=result_seconds(video),
        )
        return True
