"""The dispatcher: every replica's background task that starts queued jobs.

Whichever replica sees a slot come free (a release on any replica, published by the
ledger) or finds one on its tick asks the scheduler for the next job; the scheduler's
script, not the replicas, makes sure each job is taken once. The taker sends the stored
request upstream and settles the outcome by the same rules as a create (`quota.fate_of`):

- started: the slot counts upstream's job, and the job's record (the client knows it by
  the gateway's id) learns upstream's id; a job its client deleted meanwhile is deleted
  upstream at once;
- refused (upstream 4xx): `failed` with upstream's code; upstream's 429: back first in
  the queue, and nothing starts until upstream's `retry-after` has passed;
- never reached upstream (the connection was refused): back first in the queue;
- lost answer (timeout, reset, 5xx): the slot stays `unknown`, holding the job's gateway
  id; the tracker finds the job (it continues, `started`) or puts it back
  (`never_started`), at most `scheduler.MAX_REQUEUES` times, then `failed`.

A replica killed between taking a job and hearing upstream's answer leaves a reserved
slot whose lease runs out; another replica's tracker adopts it and settles it the same
way. So every accepted job ends exactly once: started upstream, failed with a reason,
or deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from typing import Any

from .answers import in_client_ids, video_object
from .errors import QUEUE_TIMEOUT, GatewayError, UpstreamError
from .ledger import Slot
from .metrics import GatewayMetrics
from .parse import whole_number
from .quota import JobSlots, SlotFate, fate_of
from .registry import VideoRegistry
from .scheduler import Scheduler, TakenJob
from .sources import source_refusal
from .store import StoreFailure
from .upstream import Reply, Upstream, error_from_reply

log = logging.getLogger("gateway.dispatcher")

TICK_S = 0.5  # a free slot or an overdue job is found at least this often
# A start that could not reach upstream at all waits this long before the next try.
UNREACHABLE_PAUSE_S = 1.0
DEFAULT_RETRY_AFTER_S = 5.0  # upstream's 429 without a usable retry-after


class Dispatcher:
    def __init__(
        self,
        *,
        scheduler: Scheduler,
        slots: JobSlots,
        registry: VideoRegistry,
        upstream: Upstream,
        metrics: GatewayMetrics,
        max_queue_s: float,
        clock: Any = time.time,
    ) -> None:
        self.scheduler = scheduler
        self.slots = slots
        self.registry = registry
        self.upstream = upstream
        self.metrics = metrics
        self.max_queue_s = max_queue_s
        self.clock = clock
        self._wake = asyncio.Event()
        self._starts: set[asyncio.Task[None]] = set()
        slots.kicks.append(self._wake.set)

    async def run(self) -> None:
        """Start what may start, whenever woken (a release, a kick) or every TICK_S."""
        while True:
            self._wake.clear()  # a kick from here on wakes the wait below at once
            try:
                await self.dispatch()
                await self.expire_overdue()
            except asyncio.CancelledError:
                raise
            except StoreFailure as exc:
                self.slots.failures.count(exc, "starting queued jobs (retried)")
            except Exception:
                log.exception("dispatching queued jobs failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), TICK_S)

    async def dispatch(self) -> int:
        """Take every queued job that has a free slot now; each is sent in a task of
        its own. Returns how many were taken."""
        taken = 0
        while True:
            # In flight before it can be reserved: this replica's tracker only renews it.
            slot_id = f"slot_{uuid.uuid4().hex}"
            self.slots.in_flight.add(slot_id)
            try:
                job = await self.scheduler.take(slot_id)
            except BaseException:
                self.slots.in_flight.discard(slot_id)
                raise
            if job is None:
                self.slots.in_flight.discard(slot_id)
                return taken
            taken += 1
            task = asyncio.create_task(self._start(job), name=f"start {job.id}")
            self._starts.add(task)
            task.add_done_callback(self._starts.discard)

    async def drain(self, timeout_s: float) -> None:
        """Wait up to `timeout_s` for the starts under way (shutdown), then cancel the
        rest: each leaves its slot `unknown`, for whichever tracker settles it."""
        if not self._starts:
            return
        _, pending = await asyncio.wait(set(self._starts), timeout=timeout_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def _start(self, job: TakenJob) -> None:
        settled = False
        try:
            settled = await self._send_and_settle(job)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("starting a queued job failed", extra={"video_id": job.id})
        finally:
            self.slots.in_flight.discard(job.slot_id)
            if not settled:
                # When in doubt the job runs upstream: the tracker settles the slot.
                with contextlib.suppress(StoreFailure):
                    await asyncio.shield(self.slots.ledger.mark_unknown(job.slot_id))

    async def _send_and_settle(self, job: TakenJob) -> bool:
        """Send the job upstream and settle its slot; True when settled here."""
        refusal = await self._check_source(job)
        if refusal is not None:
            await self._refuse(job, str(refusal.code), refusal.message)
            return True
        calls = self.upstream.for_stored(job.request.headers, job.request.request_id or None)
        try:
            outcome: Reply | UpstreamError = await calls.call(
                "POST",
                job.request.path,
                content=job.request.body,
                content_type=job.request.content_type,
            )
        except UpstreamError as exc:
            outcome = exc
        fate = fate_of(outcome)
        if fate is SlotFate.KEEP:
            log.warning("a queued job's start has no answer: the tracker settles it")
            return False
        if isinstance(outcome, UpstreamError):  # nothing was sent: try again shortly
            await self.scheduler.requeue(
                job.id, job.slot_id, count_attempt=False, pause_s=UNREACHABLE_PAUSE_S
            )
            return True
        if outcome.status == 429:
            self.metrics.quota_rejected(job.team, "upstream_429")
            await self.scheduler.requeue(
                job.id, job.slot_id, count_attempt=False, pause_s=_retry_after_s(outcome)
            )
            log.warning("upstream refused a queued start with 429: the queue pauses")
            return True
        if fate is SlotFate.RELEASE:
            error = error_from_reply(outcome, outcome.scrub)
            await self._refuse(job, str(error.code or "upstream_error"), error.message)
            return True
        try:
            video = video_object(outcome)
        except GatewayError:
            return False  # a 2xx without a job id: the job may exist; the tracker looks
        await self.started(job.id, team=job.team, kind=job.kind, slot_id=job.slot_id, video=video)
        self.metrics.queue_started(job.team, job.queued_s)
        return True

    async def started(
        self,
        job_id: str,
        *,
        team: str,
        kind: str,
        slot_id: str,
        video: dict[str, Any],
    ) -> None:
        """Upstream runs the queued job as `video["id"]`: the slot counts it and the
        record learns it, in one script (by the dispatcher, or by the tracker that found
        a lost start)."""
        upstream_id = str(video["id"])
        ids = {upstream_id: job_id, **await self.registry.known_sources(video)}
        seen = in_client_ids(video, ids)
        started = await self.scheduler.started(
            job_id,
            slot_id,
            team=team,
            kind=kind,
            ids=ids,
            video=seen,
            body=json.dumps(seen).encode(),
        )
        log.info(
            "queued job started",
            extra={"team": team, "kind": kind, "video_id": job_id, "upstream_id": upstream_id},
        )
        if started.deleted or not started.recorded:
            await self._delete_upstream(upstream_id)

    async def _delete_upstream(self, upstream_id: str) -> None:
        """Its client deleted the job while it was being started: delete it upstream
        too. The slot is freed only on evidence that the job is gone; otherwise it
        stays counted until the tracker sees the job end."""
        try:
            reply = await self.upstream.for_tracker().call("DELETE", f"videos/{upstream_id}")
        except UpstreamError:
            reply = None
        if reply is not None and (reply.status < 300 or reply.status == 404):
            await self.slots.finish(video_id=upstream_id, outcome="deleted")
        else:
            log.warning("could not delete a job deleted while it started; it runs to its end")

    async def _refuse(self, job: TakenJob, code: str, message: str) -> None:
        """The job will not start: `failed` with `code`, its slot freed."""
        release = await self.scheduler.refuse(job.id, job.slot_id, code, message)
        if release is not None:
            self.metrics.job_ended(job.team, job.kind, "refused", release.held_s)
            self.slots.settled(release)
        log.info("queued job refused at its start", extra={"video_id": job.id, "code": code})

    async def never_started(self, slot: Slot) -> None:
        """A lost start that never appeared upstream (the tracker's verdict): the job
        goes back first in its queue, or fails after `MAX_REQUEUES` tries."""
        requeued = await self.scheduler.requeue(slot.gid, slot.id, count_attempt=True)
        # Counted once per job: when it is given up on, not at each try.
        if requeued.release is not None and requeued.verdict in ("failed", "gone"):
            self.metrics.job_ended(slot.team, slot.kind, "never_started", requeued.release.held_s)
            self.slots.settled(requeued.release)
        log.info(
            "a queued job's lost start never appeared upstream",
            extra={"video_id": slot.gid, "outcome": requeued.verdict},
        )

    async def expire_overdue(self) -> None:
        """Jobs queued past `quota.max_queue_s` fail with `queue_timeout`."""
        for job in await self.scheduler.overdue(self.max_queue_s):
            self.metrics.job_ended(job.team, job.kind, QUEUE_TIMEOUT, 0.0)
            log.info("queued job timed out", extra={"video_id": job.id, "team": job.team})

    async def give_up(self, slot: Slot) -> bool:
        """`quota.max_job_s` passed and the start of the queued job on `slot` was never
        settled (upstream's listing never answered): free the slot, the job `failed`.
        True for the one call that freed it."""
        release = await self.scheduler.refuse(
            slot.gid,
            slot.id,
            "upstream_error",
            "The job's start was never confirmed upstream.",
            outcome="lease_expired",
        )
        if release is not None:
            self.metrics.job_ended(slot.team, slot.kind, "lease_expired", release.held_s)
            self.slots.settled(release)
        return release is not None

    async def _check_source(self, job: TakenJob) -> GatewayError | None:
        """A remix/edit/extension source may have expired or gone while the job waited."""
        if not job.request.source:
            return None
        record = await self.registry.owned(job.team, job.request.source)
        param = "video_id" if job.kind == "remix" else "video.id"
        return source_refusal(record, param, now=self.clock())


def _retry_after_s(reply: Reply) -> float:
    ms = whole_number(reply.headers.get("retry-after-ms", ""))
    if ms is not None:
        return ms / 1000
    seconds = whole_number(reply.headers.get("retry-after", ""))
    return float(seconds) if seconds is not None else DEFAULT_RETRY_AFTER_S
