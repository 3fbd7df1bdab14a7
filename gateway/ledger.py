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
import copy
import json
import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis

from .store import (
    BEATS,
    HOLDERS,
    JOBS,
    QUEUE_PREFIX,
    QUEUE_SEQ,
    QUEUED_TEAMS,
    RELEASED_CHANNEL,
    SLOTS,
    WAITER_TEAM,
)
from .store_clients import translated

log = logging.getLogger("gateway.ledger")

# Every acquire decodes the record of every holder, and every retry sends its `want`:
# records must stay small whatever a client sent (`matching` bounds each value).
MAX_WANT_BYTES = 2048
# A lost subscription is retried this often; meanwhile waiters fall back to polling.
RESUBSCRIBE_S = 1.0
# Every script receives the same KEYS, in this order (the prelude names them). The last
# is not a key but the prefix of the per-team FIFOs (`queue_of(team)`, `store.queue_key`
# in Python): every FIFO shares the `{sgw}` hash tag, so the scripts still touch one
# cluster slot.
KEYS = [HOLDERS, SLOTS, JOBS, QUEUED_TEAMS, BEATS, WAITER_TEAM, QUEUE_SEQ, QUEUE_PREFIX]

# Shared by every script: the key names above and Redis time in milliseconds.
_PRELUDE = """
local holders, slots, jobs = KEYS[1], KEYS[2], KEYS[3]
local queued_teams, beats, waiter_team, queue_seq = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local function queue_of(team) return KEYS[8] .. team end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function leave_queue(w)
  local t = redis.call('HGET', waiter_team, w)
  if t then
    redis.call('ZREM', queue_of(t), w)
    if redis.call('ZCARD', queue_of(t)) == 0 then redis.call('SREM', queued_teams, t) end
  end
  redis.call('ZREM', beats, w)
  redis.call('HDEL', waiter_team, w)
end
"""

# Admit a waiter if the shared limit and its team's cap allow and no earlier waiter
# that could run is ahead of it; otherwise (re)queue it and refresh its heartbeat.
# The cost does not grow with the number of waiters: dead waiters are found by their
# expired heartbeats (each is dropped once), the decision merges the heads of the
# FIFOs of the teams under their cap in arrival order, at most `free slots` steps, and
# `ahead` is one ZCOUNT per such team. What grows is only the number of teams waiting
# and of slots held (at most about the limit).
# ARGV: slot id, team, limit, lease ms, heartbeat ms, owner replica, kind,
#       want (JSON object: what the request fixed, see `matching`), caps (JSON object
#       team -> cap; absent teams have no cap), the arrival number an earlier call
#       returned or '' (a live waiter whose heartbeat ran out while it could not reach
#       the store, say waiting for a pooled connection, rejoins at its own place).
# Returns {1, 'admitted'} or {0, 'global_limit' | 'team_limit', waiters ahead, holders,
#          arrival number}.
ACQUIRE_SCRIPT = (
    _PRELUDE
    + """
local slot, team, limit = ARGV[1], ARGV[2], tonumber(ARGV[3])
local now = now_ms()
if redis.call('ZSCORE', holders, slot) then return {1, 'admitted'} end
for _, w in ipairs(redis.call('ZRANGEBYSCORE', beats, '-inf', now)) do leave_queue(w) end
local mine = queue_of(team)
local arrival = redis.call('ZSCORE', mine, slot)
if not arrival then
  arrival = tonumber(ARGV[10]) or redis.call('INCR', queue_seq)
  redis.call('ZADD', mine, arrival, slot)
  redis.call('SADD', queued_teams, team)
  redis.call('HSET', waiter_team, slot, team)
end
arrival = tonumber(arrival)
redis.call('ZADD', beats, now + tonumber(ARGV[5]), slot)
local caps = cjson.decode(ARGV[9])
local held = {}
local total = 0
for _, h in ipairs(redis.call('ZRANGE', holders, 0, -1)) do
  local raw = redis.call('HGET', slots, h)
  local t = raw and cjson.decode(raw).team or ''
  held[t] = (held[t] or 0) + 1
  total = total + 1
end
local function room(t)
  if caps[t] == nil then return limit end
  return caps[t] - (held[t] or 0)
end
local teams = redis.call('SMEMBERS', queued_teams)
if room(team) > 0 and total < limit then
  -- Merge the eligible teams' FIFOs by arrival number; each step gives a free slot to
  -- the earliest head, and a team stops taking slots when its cap is reached.
  local heads, taken = {}, {}
  for _, t in ipairs(teams) do
    if room(t) > 0 then
      local h = redis.call('ZRANGE', queue_of(t), 0, 0, 'WITHSCORES')
      if h[1] then heads[t] = {h[1], tonumber(h[2])} end
      taken[t] = 0
    end
  end
  for _ = 1, limit - total do
    local best
    for t, h in pairs(heads) do
      if best == nil or h[2] < heads[best][2] then best = t end
    end
    if best == nil then break end
    if heads[best][1] == slot then
      redis.call('ZADD', holders, now + tonumber(ARGV[4]), slot)
      redis.call('HSET', slots, slot, cjson.encode({
        team = team, state = 'reserved', video = '', owner = ARGV[6],
        started = now, kind = ARGV[7], want = cjson.decode(ARGV[8])}))
      leave_queue(slot)
      return {1, 'admitted'}
    end
    taken[best] = taken[best] + 1
    heads[best] = nil
    if taken[best] < room(best) then
      local h = redis.call('ZRANGE', queue_of(best), taken[best], taken[best], 'WITHSCORES')
      if h[1] then heads[best] = {h[1], tonumber(h[2])} end
    end
  end
end
local ahead = 0
for _, t in ipairs(teams) do
  if room(t) > 0 then
    ahead = ahead + redis.call('ZCOUNT', queue_of(t), '-inf', '(' .. arrival)
  end
end
return {0, room(team) > 0 and 'global_limit' or 'team_limit', ahead, total, arrival}
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
# ARGV: slot id, video id, lease ms, owner, team, kind.
BIND_SCRIPT = (
    _PRELUDE
    + """
local slot, video = ARGV[1], ARGV[2]
local now = now_ms()
local raw = redis.call('HGET', slots, slot)
local rec
if raw then
  rec = cjson.decode(raw)
else
  rec = {team = ARGV[5], kind = ARGV[6], owner = ARGV[4], started = now}
end
local prev = redis.call('HGET', jobs, video)
if prev and prev ~= slot then
  local praw = redis.call('HGET', slots, prev)
  if praw then
    local p = cjson.decode(praw)
    p.state = 'unknown'
    p.video = ''
    redis.call('HSET', slots, prev, cjson.encode(p))
  end
end
if rec.video and rec.video ~= '' and rec.video ~= video
   and redis.call('HGET', jobs, rec.video) == slot then
  redis.call('HDEL', jobs, rec.video)
end
rec.state = 'bound'
rec.video = video
redis.call('HSET', slots, slot, cjson.encode(rec))
redis.call('HSET', jobs, video, slot)
local deadline = now + tonumber(ARGV[3])
local current = redis.call('ZSCORE', holders, slot)
if current and tonumber(current) > deadline then deadline = tonumber(current) end
redis.call('ZADD', holders, deadline, slot)
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

# The job ended (or never existed): free its slot, by slot id or by video id.
# Idempotent: only the call that actually freed it gets {1, team, kind, started ms,
# now ms, video}, so whoever gets that counts the job's end exactly once; others get {0}.
# ARGV: slot id or '', video id or '', channel to publish the release on.
RELEASE_SCRIPT = (
    _PRELUDE
    + """
local slot = ARGV[1]
if slot == '' then
  if ARGV[2] == '' then return {0} end
  slot = redis.call('HGET', jobs, ARGV[2])
  if not slot then return {0} end
end
local raw = redis.call('HGET', slots, slot)
local rec = raw and cjson.decode(raw) or {}
if rec.video and rec.video ~= '' and redis.call('HGET', jobs, rec.video) == slot then
  redis.call('HDEL', jobs, rec.video)
end
redis.call('HDEL', slots, slot)
if redis.call('ZREM', holders, slot) == 0 then return {0} end
redis.call('PUBLISH', ARGV[3], slot)
return {1, rec.team or '', rec.kind or '', tostring(rec.started or 0), tostring(now_ms()),
        rec.video or ''}
"""
)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str | None = None  # 'global_limit' | 'team_limit' when not admitted
    ahead: int = 0  # earlier waiters whose team may run
    holders: int = 0
    arrival: int | None = None  # the waiter's place, to pass back on its next try


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


@dataclass(frozen=True)
class Snapshot:
    now_ms: int
    slots: list[Slot]
    claimed_videos: frozenset[str]
    waiting: int


class SlotLedger:
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
    ) -> None:
        self.redis = redis
        self.limit = limit
        self.owner = owner
        self.lease_ms = int(lease_s * 1000)
        self.heartbeat_ms = int(heartbeat_s * 1000)
        self.set_caps(team_caps)
        self._register(redis)

    def on(self, redis: Redis) -> SlotLedger:
        """The same ledger with its scripts sent on another client: the tracker's, so
        that waiting creates can never take the connections that renew, adopt and
        release need (a slot freed late is a slot nobody can use)."""
        other = copy.copy(self)
        other.redis = redis
        other._register(redis)
        return other

    def _register(self, redis: Redis) -> None:
        self._acquire = redis.register_script(ACQUIRE_SCRIPT)
        self._abandon = redis.register_script(ABANDON_SCRIPT)
        self._bind = redis.register_script(BIND_SCRIPT)
        self._unknown = redis.register_script(MARK_UNKNOWN_SCRIPT)
        self._renew = redis.register_script(RENEW_SCRIPT)
        self._adopt = redis.register_script(ADOPT_SCRIPT)
        self._release = redis.register_script(RELEASE_SCRIPT)

    def set_caps(self, team_caps: dict[str, int]) -> None:
        """The teams' own caps, as the acquire script reads them (changed on reload)."""
        self._caps = json.dumps(team_caps) if team_caps else "{}"

    @translated
    async def try_acquire(
        self,
        slot_id: str,
        team: str,
        kind: str,
        want: Mapping[str, str],
        arrival: int | None = None,
    ) -> Admission:
        """Admit or queue a waiter; `want` (what the request fixed) goes into its record.
        `arrival` is the place the previous try returned, kept if the waiter dropped out."""
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
                self._caps,
                "" if arrival is None else arrival,
            ],
        )
        if int(result[0]) == 1:
            return Admission(True)
        return Admission(False, _text(result[1]), int(result[2]), int(result[3]), int(result[4]))

    @translated
    async def abandon(self, slot_id: str) -> None:
        await self._abandon(keys=KEYS, args=[slot_id])

    @translated
    async def bind(self, slot_id: str, video_id: str, *, team: str, kind: str) -> None:
        await self._bind(keys=KEYS, args=[slot_id, video_id, self.lease_ms, self.owner, team, kind])

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
    async def release(self, slot_id: str = "", *, video_id: str = "") -> Release | None:
        """Free a slot; what was freed, for the one call that freed it, else None."""
        result = await self._release(keys=KEYS, args=[slot_id, video_id, RELEASED_CHANNEL])
        if int(result[0]) != 1:
            return None
        team, kind, started, now, video = (_text(v) for v in result[1:6])
        return Release(team, kind, video, (int(now) - int(float(started))) / 1000)

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
                )
            )
        return Snapshot(
            now_ms=int(secs) * 1000 + int(micros) // 1000,
            slots=slots,
            claimed_videos=frozenset(_text(v) for v in claimed),
            waiting=int(waiting),
        )


def _want(rec: dict[str, Any]) -> dict[str, str]:
    """The record's `want`; a record written before it existed had only the prompt's `fp`."""
    want = rec.get("want")
    if isinstance(want, dict):
        return {str(k): str(v) for k, v in want.items()}
    return {"prompt": str(rec["fp"])} if rec.get("fp") else {}


@translated
async def read_usage(redis: Redis) -> Usage:
    """Slots held and requests waiting, in one round trip: a pure read, so any client
    (the operational one for `/metrics`) may send it, and send it twice."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.zcard(HOLDERS)
        pipe.zcard(BEATS)
        in_use, waiting = await pipe.execute()
    return Usage(int(in_use), int(waiting))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
