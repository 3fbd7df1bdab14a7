"""The slot ledger: the shared count of video jobs running upstream, kept in Redis.

A slot is held for the whole life of a job upstream (minutes), not for one HTTP
request, and it is freed only on evidence that the job ended. Every change is one Lua
script, atomic and idempotent on ids the caller makes, with time taken from Redis
`TIME` so replicas with skewed clocks agree. All keys share the `{sgw}` hash tag.

The keys and what each holds are listed in `store`.

A lease is a liveness promise of the replica that owns the slot: the owner renews it
while the job runs; when it runs out, another replica adopts the slot and keeps the job
counted. Expiry never frees a slot by itself.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.typing import EncodableT

from .budgets import Charge, Limits, Over, over_of
from .store import BEATS, HOLDERS, JOBS, QUEUED_BY_TEAM, RELEASED_CHANNEL, SLOTS
from .store_clients import OnClient, translated
from .store_lua import KEYS, PRELUDE

log = logging.getLogger("gateway.ledger")

# Every acquire decodes the record of every holder, and every retry sends its `want`:
# records must stay small whatever a client sent (`matching` bounds each value).
MAX_WANT_BYTES = 2048
# A lost subscription is retried this often; meanwhile waiters fall back to polling.
RESUBSCRIBE_S = 1.0

_PRELUDE = PRELUDE

# Admit a waiter if the shared limit and its team's cap allow and the fair-share order
# (`store_lua.plan`) gives it one of the free slots; otherwise (re)queue it and refresh
# its heartbeat. Dead waiters are found by their expired heartbeats (each is dropped
# once). `ahead` is one ZCOUNT per team under its cap: earlier arrivals that could run.
# ARGV: slot id, team, limit, lease ms, heartbeat ms, owner replica, kind,
#       want (JSON object: what the request fixed, see `matching`), caps (JSON object
#       team -> cap; absent teams have no cap), the arrival number an earlier call
#       returned or '' (a live waiter whose heartbeat ran out while it could not reach
#       the store, say waiting for a pooled connection, rejoins at its own place),
#       weights (JSON object team -> weight; absent: 1), fair window ms, the job's
#       charge (`budgets.Charge` JSON, or ''), the team's budgets (`budgets.Limits`
#       JSON, or ''): checked and reserved when the waiter joins, held while it waits,
#       moved to the slot on admission, given back if it leaves (`leave_queue`).
# Returns {1, 'admitted', kick} or {0, 'global_limit' | 'team_limit', waiters ahead,
#          holders, arrival number, kick}; kick is 1 when a queued job was given a free
#          slot too (the caller wakes its dispatcher); or {0, 'budget_exceeded', period,
#          limit, spent, reserved} (it never joined the queue).
ACQUIRE_SCRIPT = (
    _PRELUDE
    + """
local slot, team, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()
if redis.call('ZSCORE', holders, slot) then return {1, 'admitted', 0} end
drop_dead_waiters(now)
local charge = ARGV[13] ~= '' and cjson.decode(ARGV[13]) or nil
local mine = queue_of(team)
local arrival = redis.call('ZSCORE', mine, slot)
if not arrival then
  -- Joining (or rejoining): the cost is checked now and reserved for as long as it
  -- waits, so a job that cannot fit is refused at once, never after a wait.
  local over = over_budget(team, charge, ARGV[14] ~= '' and cjson.decode(ARGV[14]) or nil)
  if over then return {0, 'budget_exceeded', over[1], over[2], over[3], over[4]} end
  if charge and charge.cost ~= 0 then
    reserve_charge(team, charge)
    redis.call('HSET', waiter_charge, slot, ARGV[13])
  end
  arrival = tonumber(ARGV[10]) or redis.call('INCR', queue_seq)
  redis.call('ZADD', mine, arrival, slot)
  redis.call('SADD', queued_teams, team)
  redis.call('HSET', waiter_team, slot, team)
end
arrival = tonumber(arrival)
redis.call('ZADD', beats, now + tonumber(ARGV[5]), slot)
local caps, weights = cjson.decode(ARGV[9]), cjson.decode(ARGV[11])
local state = holdings(now)
local admitted, kick = decide(slot, state, limit, caps, weights, tonumber(ARGV[12]))
if admitted then
  redis.call('HDEL', waiter_charge, slot)  -- its reservation moves to the slot
  reserve(slot, team, ARGV[7], cjson.decode(ARGV[8]), ARGV[6], tonumber(ARGV[4]), now, '', charge)
  leave_queue(slot)
  return {1, 'admitted', kick}
end
local ahead = 0
for _, t in ipairs(redis.call('SMEMBERS', queued_teams)) do
  if room(state, caps, limit, t) > 0 then
    ahead = ahead + redis.call('ZCOUNT', queue_of(t), '-inf', '(' .. arrival)
  end
end
local reason = room(state, caps, limit, team) > 0 and 'global_limit' or 'team_limit'
return {0, reason, ahead, state.total, arrival, kick}
"""
)

# Leave the queue (the client gave up or went away). ARGV: slot id.
ABANDON_SCRIPT = (
    _PRELUDE
    + """
leave_queue(ARGV[1])
return 1
"""
)

# The create answered with a job id: the slot now counts that job. The slot is
# (re)counted even if it was released meanwhile, because the job runs upstream either
# way. If another slot had claimed this job (the tracker's guess for a lost answer),
# that slot goes back to `unknown` to be settled again.
# ARGV: slot id, video id, lease ms, owner, team, kind, ids (JSON object upstream id ->
# gateway id, rewritten in every answer about the job; '' for none), gateway id ('' for
# a job that started at once: its id is upstream's).
BIND_SCRIPT = (
    _PRELUDE
    + """
bind_slot(ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8])
return 1
"""
)

# The create's outcome is unknown (timeout, reset, 5xx, cancelled): keep the slot,
# marked for the tracker to settle. ARGV: slot id.
MARK_UNKNOWN_SCRIPT = (
    _PRELUDE
    + """
local raw = redis.call('HGET', slots, ARGV[1])
if not raw then return 0 end
local rec = cjson.decode(raw)
if rec.state == 'bound' then return 0 end
rec.state = 'unknown'
redis.call('HSET', slots, ARGV[1], cjson.encode(rec))
return 1
"""
)

# The owner saw its job still running: extend the lease. A slot adopted by another
# replica is not renewed by its old owner (returns 0: stop tracking it).
# ARGV: slot id, owner, lease ms.
RENEW_SCRIPT = (
    _PRELUDE
    + """
local raw = redis.call('HGET', slots, ARGV[1])
if not raw or not redis.call('ZSCORE', holders, ARGV[1]) then return 0 end
if cjson.decode(raw).owner ~= ARGV[2] then return 0 end
redis.call('ZADD', holders, 'XX', now_ms() + tonumber(ARGV[3]), ARGV[1])
return 1
"""
)

# Take over a slot whose lease ran out (its replica died or stalled). The job stays
# counted; a slot still `reserved` lost its request with its replica, so it becomes
# `unknown`. ARGV: slot id, new owner, lease ms. Returns 1 if adopted.
ADOPT_SCRIPT = (
    _PRELUDE
    + """
local now = now_ms()
local deadline = redis.call('ZSCORE', holders, ARGV[1])
local raw = redis.call('HGET', slots, ARGV[1])
if not deadline or not raw or tonumber(deadline) > now then return 0 end
local rec = cjson.decode(raw)
rec.owner = ARGV[2]
if rec.state == 'reserved' then rec.state = 'unknown' end
redis.call('HSET', slots, ARGV[1], cjson.encode(rec))
redis.call('ZADD', holders, now + tonumber(ARGV[3]), ARGV[1])
return 1
"""
)

# The job ended (or never existed): free its slot, by slot id or by video id, and
# settle its charge. Idempotent: only the call that actually freed it gets
# `store_lua.free_slot`'s {1, ...}, so whoever gets that counts the job's end and its
# cost exactly once; others get {0}. ARGV: slot id or '', video id or '', channel to
# publish the release on, the outcome, the result's seconds ('' when not known).
RELEASE_SCRIPT = (
    _PRELUDE
    + """
local slot = ARGV[1]
if slot == '' then
  if ARGV[2] == '' then return {0} end
  slot = redis.call('HGET', jobs, ARGV[2])
  if not slot then return {0} end
end
return (free_slot(slot, ARGV[3], ARGV[4], ARGV[5]))
"""
)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str | None = None  # 'global_limit' | 'team_limit' when not admitted
    ahead: int = 0  # earlier waiters whose team may run
    holders: int = 0
    arrival: int | None = None  # the waiter's place, to pass back on its next try
    kick: bool = False  # a queued job was given a free slot too: wake the dispatcher
    over: Over | None = None  # the budget it would pass ('budget_exceeded')


@dataclass(frozen=True)
class Usage:
    in_use: int
    waiting: int
    queued: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Release:
    team: str
    kind: str
    video: str
    held_s: float  # from admission to release, by the store's clock
    gid: str = ""  # the gateway's id of a job that was queued first; "" otherwise
    charged_micro: int = 0  # what its settlement charged (µUSD)
    charged_s: int = 0  # and for how many seconds of video
    model: str = ""  # its charge's model ("" without a charge)


def release_of(result: Any) -> Release | None:
    """`store_lua.free_slot`'s answer: what was freed, or None when nothing was."""
    if int(result[0]) != 1:
        return None
    team, kind, started, now, video, gid = (_text(v) for v in result[1:7])
    charged, charged_s, model = int(result[7]), int(result[8]), _text(result[9])
    held_s = (int(now) - int(float(started))) / 1000
    return Release(team, kind, video, held_s, gid, charged, charged_s, model)


@dataclass(frozen=True)
class Slot:
    id: str
    team: str
    state: str
    video: str
    owner: str
    started_ms: int
    kind: str
    want: dict[str, str]  # what its request fixed (see `matching`); {} when unknown
    deadline_ms: int
    gid: str = ""  # a queued job's gateway id (the client's); "" for one started at once
    ids: dict[str, str] = field(default_factory=dict)  # upstream id -> gateway id
    charge: Charge | None = None  # what its job reserved


@dataclass(frozen=True)
class Snapshot:
    now_ms: int
    slots: list[Slot]
    claimed_videos: frozenset[str]
    waiting: int


class SlotLedger(OnClient):
    """The scripts above, registered once, with typed arguments and results. A store
    failure is raised as a `store.StoreFailure`, never as a redis exception."""

    def __init__(
        self,
        redis: Redis,
        *,
        limit: int,
        team_caps: dict[str, int],
        owner: str,
        lease_s: float,
        heartbeat_s: float = 5.0,
        team_weights: dict[str, float] | None = None,
        fair_window_s: float = 3600.0,
    ) -> None:
        self.redis = redis
        self.limit = limit
        self.owner = owner
        self.lease_ms = int(lease_s * 1000)
        self.heartbeat_ms = int(heartbeat_s * 1000)
        self.fair_window_ms = int(fair_window_s * 1000)
        self.set_caps(team_caps, team_weights or {})
        self._register(redis)

    def _register(self, redis: Redis) -> None:
        self._acquire = redis.register_script(ACQUIRE_SCRIPT)
        self._abandon = redis.register_script(ABANDON_SCRIPT)
        self._bind = redis.register_script(BIND_SCRIPT)
        self._unknown = redis.register_script(MARK_UNKNOWN_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._adopt = redis.register_script(ADOPT_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)

    def set_caps(self, team_caps: dict[str, int], team_weights: dict[str, float]) -> None:
        """The teams' own caps and weights, as the scripts read them (changed on reload)."""
        self.caps = json.dumps(team_caps) if team_caps else "{}"
        self.weights = json.dumps(team_weights) if team_weights else "{}"

    @translated
    async def try_acquire(
        self,
        slot_id: str,
        team: str,
        kind: str,
        want: Mapping[str, str],
        arrival: int | None = None,
        charge: Charge | None = None,
        limits: Limits | None = None,
    ) -> Admission:
        """Admit or queue a waiter; `want` (what the request fixed) goes into its record.
        `arrival` is the place the previous try returned, kept if the waiter dropped out.
        `charge` is reserved on admission, unless it would pass one of `limits`."""
        encoded = json.dumps(want, separators=(",", ":")) if want else "{}"
        if len(encoded) > MAX_WANT_BYTES:
            raise ValueError(f"a slot's want must stay under {MAX_WANT_BYTES} bytes")
        result = await self._acquire(
            keys=KEYS,
            args=[
                slot_id,
                team,
                self.limit,
                self.lease_ms,
                self.heartbeat_ms,
                self.owner,
                kind,
                encoded,
                self.caps,
                "" if arrival is None else arrival,
                self.weights,
                self.fair_window_ms,
                charge.encoded() if charge else "",
                limits.encoded() if limits else "",
            ],
        )
        if int(result[0]) == 1:
            return Admission(True, kick=bool(int(result[2])))
        if _text(result[1]) == "budget_exceeded":
            return Admission(False, "budget_exceeded", over=over_of(result[2:6]))
        return Admission(
            False,
            _text(result[1]),
            int(result[2]),
            int(result[3]),
            int(result[4]),
            kick=bool(int(result[5])),
        )

    @translated
    async def abandon(self, slot_id: str) -> None:
        await self._abandon(keys=KEYS, args=[slot_id])

    @translated
    async def bind(
        self,
        slot_id: str,
        video_id: str,
        *,
        team: str,
        kind: str,
        ids: Mapping[str, str] | None = None,
        gid: str = "",
    ) -> None:
        """The slot now counts upstream's job `video_id`; `ids` and `gid` (a queued job's
        gateway id) travel with it so the tracker answers in the client's ids."""
        encoded = json.dumps(dict(ids)) if ids else ""
        await self._bind(
            keys=KEYS,
            args=[slot_id, video_id, self.lease_ms, self.owner, team, kind, encoded, gid],
        )

    @translated
    async def mark_unknown(self, slot_id: str) -> bool:
        return bool(await self._unknown(keys=KEYS, args=[slot_id]))

    @translated
    async def renew(self, slot_id: str) -> bool:
        return bool(await self._renew(keys=KEYS, args=[slot_id, self.owner, self.lease_ms]))

    @translated
    async def adopt(self, slot_id: str) -> bool:
        return bool(await self._adopt(keys=KEYS, args=[slot_id, self.owner, self.lease_ms]))

    @translated
    async def release(
        self,
        slot_id: str = "",
        *,
        video_id: str = "",
        outcome: str = "failed",
        seconds: int | None = None,
    ) -> Release | None:
        """Free a slot and settle its job's charge as `outcome` (`seconds`: the result's,
        for a completed job); what was freed, for the one call that freed it, else None."""
        args: list[EncodableT] = [
            slot_id,
            video_id,
            RELEASED_CHANNEL,
            outcome,
            "" if seconds is None else seconds,
        ]
        return release_of(await self._release(keys=KEYS, args=args))

    async def releases(self, pubsub: Redis) -> AsyncIterator[None]:
        """Yields once per slot released by any replica, for ever, on `pubsub` (a client
        of its own: a subscribed connection can send nothing else). After a failure it
        subscribes again, `RESUBSCRIBE_S` apart, so it never raises; a release missed
        meanwhile only waits for the waiters' own re-check."""
        while True:
            try:
                async with pubsub.pubsub() as channel:
                    await channel.subscribe(RELEASED_CHANNEL)
                    async for message in channel.listen():
                        if message.get("type") == "message":
                            yield
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: waiters fall back to polling
                log.debug("release listener reconnecting: %s", type(exc).__name__)
                await asyncio.sleep(RESUBSCRIBE_S)

    @translated
    async def snapshot(self) -> Snapshot:
        """Every slot with its lease, read in one round trip (for the tracker and metrics)."""
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.time()
            pipe.zrange(HOLDERS, 0, -1, withscores=True)
            pipe.hgetall(SLOTS)
            pipe.hkeys(JOBS)
            pipe.zcard(BEATS)
            (secs, micros), holders, records, claimed, waiting = await pipe.execute()
        slots = []
        for raw_id, deadline in holders:
            slot_id = _text(raw_id)
            raw = records.get(raw_id) or records.get(slot_id)
            if raw is None:
                continue
            rec: dict[str, Any] = json.loads(raw)
            slots.append(
                Slot(
                    id=slot_id,
                    team=str(rec.get("team", "")),
                    state=str(rec.get("state", "")),
                    video=str(rec.get("video", "")),
                    owner=str(rec.get("owner", "")),
                    started_ms=int(rec.get("started", 0)),
                    kind=str(rec.get("kind", "")),
                    want=_want(rec),
                    deadline_ms=int(deadline),
                    gid=str(rec.get("gid", "")),
                    ids=_ids(rec),
                    charge=Charge.decoded(rec.get("charge")),
                )
            )
        return Snapshot(
            now_ms=int(secs) * 1000 + int(micros) // 1000,
            slots=slots,
            claimed_videos=frozenset(_text(v) for v in claimed),
            waiting=int(waiting),
        )


def _ids(rec: dict[str, Any]) -> dict[str, str]:
    ids = rec.get("ids")
    return {str(k): str(v) for k, v in ids.items()} if isinstance(ids, dict) else {}


def _want(rec: dict[str, Any]) -> dict[str, str]:
    """The record's `want`; a record written before it existed had only the prompt's `fp`."""
    want = rec.get("want")
    if isinstance(want, dict):
        return {str(k): str(v) for k, v in want.items()}
    return {"prompt": str(rec["fp"])} if rec.get("fp") else {}


@translated
async def read_usage(redis: Redis) -> Usage:
    """Slots held, requests waiting and jobs queued by team, in one round trip: a pure
    read, so any client (the operational one for `/metrics`) may send it, and twice."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(HOLDERS)
        pipe.zcard(BEATS)
        pipe.hgetall(QUEUED_BY_TEAM)
        in_use, waiting, queued = await pipe.execute()
    depth = {_text(team): int(n) for team, n in queued.items() if int(n) > 0}
    return Usage(int(in_use), int(waiting), depth)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
