"""`GET /admin/jobs`: every queued and running job, across teams, without prompts.

Running jobs are the ledger's slots (`SlotLedger.snapshot`); queued ones are read here
from the scheduler's `queued` ZSET and each job's stored request (`store.job_key`),
bounded by `quota.max_queued`, with their place from `Scheduler.position`. A job's
model, size and seconds are its charge's (what it reserved), else what its request
fixed (`want`); nothing else of the request is read, so no prompt or body leaves.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from .ledger import Slot
from .store import QUEUED, job_key
from .store_clients import translated


@dataclass(frozen=True)
class JobTerms:
    """The job fields an operator sees: what it was priced on."""

    model: str | None = None
    size: str | None = None
    seconds: int | None = None


@dataclass(frozen=True)
class QueuedJob:
    id: str
    team: str
    kind: str
    accepted_ms: int
    terms: JobTerms


@translated
async def read_queued(redis: Redis, limit: int) -> list[QueuedJob]:
    """The oldest `limit` queued jobs (all of them: the queue holds at most
    `quota.max_queued`), in two round trips whatever their number."""
    ids = [_text(raw) for raw in await redis.zrange(QUEUED, 0, max(0, limit - 1))]
    if not ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in ids:
            pipe.hmget(job_key(job_id), ["team", "kind", "accepted", "charge", "want"])
        records = await pipe.execute()
    jobs = []
    for job_id, (team, kind, accepted, charge, want) in zip(ids, records, strict=True):
        if team is None:  # taken or deleted between the two reads
            continue
        terms = terms_of(_json(charge), _json(want))
        jobs.append(QueuedJob(job_id, _text(team), _text(kind or ""), _int(accepted), terms))
    return jobs


def terms_of(charge: Mapping[str, Any] | None, want: Mapping[str, Any]) -> JobTerms:
    """The charge's model, size and seconds where it has them, else the request's."""

    def pick(name: str) -> Any:
        value = charge.get(name) if charge else None
        return value if value is not None else want.get(name)

    model, size = pick("model"), pick("size")
    return JobTerms(
        str(model) if model else None, str(size) if size else None, _seconds(pick("seconds"))
    )


def slot_terms(slot: Slot) -> JobTerms:
    charge = slot.charge
    fields = (
        {"model": charge.model, "size": charge.size, "seconds": charge.seconds}
        if charge is not None
        else None
    )
    return terms_of(fields, slot.want)


def jobs_list(
    slots: Iterable[Slot], queued: Iterable[QueuedJob], positions: Mapping[str, int | None]
) -> dict[str, Any]:
    """The `/admin/jobs` object: running jobs by start, then queued ones by position. A
    job seen both queued and running (taken between the reads) is listed as running."""
    running = sorted(slots, key=lambda slot: slot.started_ms)
    started = {slot.gid for slot in running if slot.gid}
    data = [
        _entry(
            slot.gid or slot.video or slot.id,
            slot.team,
            slot.kind,
            "running",
            slot_terms(slot),
            queued_at=None,
            started_at=slot.started_ms // 1000,
            position=None,
        )
        for slot in running
    ]
    waiting = [job for job in queued if job.id not in started and positions.get(job.id) is not None]
    waiting.sort(key=lambda job: (positions[job.id] or 0, job.accepted_ms))
    data += [
        _entry(
            job.id,
            job.team,
            job.kind,
            "queued",
            job.terms,
            queued_at=job.accepted_ms // 1000,
            started_at=None,
            position=positions[job.id],
        )
        for job in waiting
    ]
    return {"object": "list", "data": data}


def _entry(
    job_id: str,
    team: str,
    kind: str,
    state: str,
    terms: JobTerms,
    *,
    queued_at: int | None,
    started_at: int | None,
    position: int | None,
) -> dict[str, Any]:
    return {
        "id": job_id,
        "team": team,
        "kind": kind,
        "state": state,
        "model": terms.model,
        "size": terms.size,
        "seconds": terms.seconds,
        "queued_at": queued_at,
        "started_at": started_at,
        "queue_position": position,
    }


def _json(raw: Any) -> dict[str, Any]:
    try:
        value = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _seconds(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    text = str(value) if value is not None else ""
    return int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else None


def _int(value: Any) -> int:
    try:
        return int(_text(value)) if value is not None else 0
    except ValueError:
        return 0


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
