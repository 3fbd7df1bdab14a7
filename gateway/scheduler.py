"""The scheduler: the durable queue of jobs that could not start at once (CONTRACT §8).

The ledger decides whether a job may run; the scheduler decides which queued job runs
next. A queued job is stored whole in Redis (the request the gateway would send, and
what it fixed), so any replica can start it, and a replica that dies loses nothing:

- `enqueue` is the create's one decision: start now (the fair-share order gives it a
  free slot: the caller sends it as it came) or store it, with its video record, and
  answer `queued`; or refuse it when the queue is full;
- `take` gives a free slot to the next queued job, by the same order, and reserves the
  slot for the taking replica in the same script: a replica that dies holding it
  leaves a `reserved` slot whose lease runs out, and the tracker settles it as any
  lost create, putting the job back (`requeue`) when it never reached upstream;
- `done` closes a job that started upstream or was refused there; `cancel` is a
  client's delete; `overdue` takes out jobs queued past `quota.max_queue_s`.

Every script is atomic and uses Redis time; all keys are in `store`.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis
from redis.typing import EncodableT

from .budgets import Charge, Limits, Over, over_of
from .ledger import MAX_WANT_BYTES, Release, SlotLedger, release_of
from .registry import RECORD_LUA, STARTED_LUA, record_args, started_args
from .store import RELEASED_CHANNEL, VIDEO_SEQ, alias_key, team_index_key, video_key
from .store_clients import OnClient, translated
from .store_lua import KEYS, PRELUDE

# A lost create that never appeared upstream goes back to the head of the queue at most
# this often; then it fails with `upstream_error` (CONTRACT §8.4).
MAX_REQUEUES = 2
# Jobs past `max_queue_s` taken out per call, so one call stays short.
OVERDUE_BATCH = 50
NEVER_STARTED_MESSAGE = "Upstream never started this job after several tries."

# A queued job's position (1 = the next to start), or nil when it is not queued: an
# estimate of how many jobs the fair-share order starts before it. Its team starts its
# earlier `rank` jobs first; each start adds about `typical` ms to a team's slot time,
# so another team starts jobs while its share (slot time per weight, as `plan` reads
# it) stays below this team's share at this job's turn, up to what it has queued.
POSITION_LUA = """
local function position_of(id, team, weights, typical, window)
  local rank = redis.call('ZRANK', queue_of(team), id)
  if not rank then return nil end
  local state = holdings(now_ms())
  local function share(t)
    return (used_ms(t, state.now, window) + (state.running[t] or 0)) / weight(weights, t)
  end
  local mine = share(team) + rank * typical / weight(weights, team)
  local position = rank + 1
  for _, t in ipairs(redis.call('SMEMBERS', queued_teams)) do
    if t ~= team then
      local ahead = math.ceil((mine - share(t)) * weight(weights, t) / typical)
      if ahead > 0 then
        position = position + math.min(redis.call('ZCARD', queue_of(t)), ahead)
      end
    end
  end
  return position
end
"""

# Start now or queue. KEYS: `store_lua.KEYS`, then the job's video hash, its team's
# index and the registry's sequence. ARGV: 1 job id, 2 slot id, 3 team, 4 kind, 5 want
# (JSON), 6 limit, 7 lease ms, 8 owner, 9 caps (JSON), 10 weights (JSON), 11 fair window
# ms, 12 meta (JSON: path, content type, headers, source), 13 body, 14 max queued,
# 15 the team's max queued ('' none), 16-19 the registry record's arguments
# (`record_args`), 20 a typical job's slot time in ms (for the position estimate),
# 21 the job's charge (`budgets.Charge` JSON, or ''), 22 the team's budgets
# (`budgets.Limits` JSON, or ''): reserved whether the job starts or queues.
# Returns {1, 'admitted', kick}: the slot is reserved, send it now; {0, 'queued',
# position, kick}; or {0, 'queue_full' | 'team_queue_full', 0, kick}; or
# {0, 'budget_exceeded', 0, 0, period, limit, spent, reserved} (nothing stored).
ENQUEUE_SCRIPT = (
    PRELUDE
    + POSITION_LUA
    + RECORD_LUA
    + """
local id, slot, team, limit = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[6])
local now = now_ms()
drop_dead_waiters(now)
local charge = ARGV[21] ~= '' and cjson.decode(ARGV[21]) or nil
local over = over_budget(team, charge, ARGV[22] ~= '' and cjson.decode(ARGV[22]) or nil)
if over then return {0, 'budget_exceeded', 0, 0, over[1], over[2], over[3], over[4]} end
local arrival = redis.call('INCR', queue_seq)
redis.call('ZADD', queue_of(team), arrival, id)
redis.call('SADD', queued_teams, team)
local caps, weights = cjson.decode(ARGV[9]), cjson.decode(ARGV[10])
local state = holdings(now)
local admitted, kick = decide(id, state, limit, caps, weights, tonumber(ARGV[11]))
if admitted then
  leave_fifo(team, id)
  reserve(slot, team, ARGV[4], cjson.decode(ARGV[5]), ARGV[8], tonumber(ARGV[7]), now, '', charge)
  reserve_charge(team, charge)
  return {1, 'admitted', kick}
end
local refusal
if redis.call('ZCARD', queued) >= tonumber(ARGV[14]) then
  refusal = 'queue_full'
elseif ARGV[15] ~= ''
    and tonumber(redis.call('HGET', queued_by_team, team) or '0') >= tonumber(ARGV[15]) then
  refusal = 'team_queue_full'
end
if refusal then
  leave_fifo(team, id)
  return {0, refusal, 0, kick}
end
redis.call('HSET', job_of(id), 'team', team, 'kind', ARGV[4], 'want', ARGV[5],
           'meta', ARGV[12], 'body', ARGV[13], 'arrival', arrival, 'accepted', now,
           'attempts', 0)
if charge then redis.call('HSET', job_of(id), 'charge', ARGV[21]) end
reserve_charge(team, charge)
redis.call('ZADD', queued, now, id)
redis.call('HINCRBY', queued_by_team, team, 1)
record_video(KEYS[18], KEYS[19], KEYS[20], ARGV[1], team, ARGV[4], 'queued',
             ARGV[16], ARGV[17], ARGV[18], ARGV[19])
redis.call('HSET', KEYS[18], 'upstream', '')  -- upstream does not know it yet
return {0, 'queued', position_of(id, team, weights, tonumber(ARGV[20]), tonumber(ARGV[11])),
        kick}
"""
)

# Give the next free slot to a queued job. ARGV: owner, limit, lease ms, caps, weights,
# fair window ms, the slot id to reserve (the caller's: it marks it in flight first, so
# its own tracker never takes the slot for an orphan). The first queued job among the
# fair-share picks is taken out of the queue and the slot reserved for it (owner: the
# caller); a live waiter among the picks keeps its slot for its own next try. Returns
# {} or {id, slot, team, kind, want, meta, body, accepted ms, now ms}.
TAKE_SCRIPT = (
    PRELUDE
    + """
local owner, limit = ARGV[1], tonumber(ARGV[2])
local now = now_ms()
drop_dead_waiters(now)
local state = holdings(now)
for _, p in ipairs(plan(state, limit, cjson.decode(ARGV[4]), cjson.decode(ARGV[5]),
                        tonumber(ARGV[6]))) do
  local id, team = p[1], p[2]
  local job = job_of(id)
  if redis.call('EXISTS', job) == 1 then
    unqueue(team, id)
    local f = redis.call('HMGET', job, 'kind', 'want', 'meta', 'body', 'accepted', 'charge')
    local slot = ARGV[7]
    local charge = f[6] and cjson.decode(f[6]) or nil  -- reserved when it was queued
    reserve(slot, team, f[1], cjson.decode(f[2]), owner, tonumber(ARGV[3]), now, id, charge)
    redis.call('HSET', job, 'slot', slot)
    return {id, slot, team, f[1], f[2], f[3], f[4], f[5], tostring(now)}
  elseif not redis.call('ZSCORE', beats, id) then
    leave_fifo(team, id)  -- neither a live waiter nor a stored job: nothing to start
  end
end
return {}
"""
)

# The job's create never reached upstream (a lost answer that never appeared, or
# upstream's 429): free its slot and put it back at the head of its team's FIFO (its
# own arrival number). ARGV: job id, slot id, channel, count the attempt (1/0), the
# most attempts, pause ms (upstream's retry-after; 0 none), the failure's message (its
# record reads `failed`, `upstream_error`, once the attempts are used up). Returns the
# slot's release (`store_lua.free_slot`) followed by 'requeued' | 'failed' (too many attempts) |
# 'gone' (deleted meanwhile) | 'stale' (the slot was freed already: nothing done).
REQUEUE_SCRIPT = (
    PRELUDE
    + """
local id = ARGV[1]
local job = job_of(id)
local f = redis.call('HMGET', job, 'team', 'arrival', 'accepted', 'attempts', 'deleted')
local attempts = tonumber(f[4] or '0') + tonumber(ARGV[4])
local verdict = 'requeued'
if not f[1] or f[5] == '1' then
  verdict = 'gone'
elseif attempts > tonumber(ARGV[5]) then
  verdict = 'failed'
end
-- Put back, the job keeps its reservation; given up on, it is settled (charged 0).
local freed, rec = free_slot(ARGV[2], ARGV[3], verdict == 'requeued' and '' or 'never_started', '')
if freed[1] == 0 then
  verdict = 'stale'  -- whoever freed the slot first settled the job
elseif verdict == 'gone' then
  redis.call('DEL', job)
elseif verdict == 'failed' then
  redis.call('DEL', job)
  fail_record(id, 'upstream_error', ARGV[7])
else
  redis.call('HSET', job, 'attempts', attempts)
  redis.call('HDEL', job, 'slot')
  if rec.charge then redis.call('HSET', job, 'charge', cjson.encode(rec.charge)) end
  requeue(f[1], id, tonumber(f[2]), tonumber(f[3]))
  local pause = tonumber(ARGV[6])
  if pause > 0 then
    redis.call('SET', paused_until, now_ms() + pause, 'PX', pause)
  end
end
while #freed < 10 do freed[#freed + 1] = '' end
freed[11] = verdict
return freed
"""
)


# Upstream started the queued job: in one script, the slot counts upstream's job, the
# job's record learns upstream's id (and its alias), and the stored request goes.
# KEYS: `store_lua.KEYS`, then the alias key of upstream's id (KEYS[18]). ARGV: job id,
# slot id,
# upstream id, lease ms, owner, team, kind, ids (JSON), then `registry.started_args`'
# status, expires_at, body and ttl. Returns {recorded, deleted}: recorded 0 when the
# record is gone, deleted 1 when its client deleted it while it was being started
# (either way the caller deletes it upstream).
STARTED_SCRIPT = (
    PRELUDE
    + STARTED_LUA
    + """
local id = ARGV[1]
bind_slot(ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6], ARGV[7], ARGV[8], id)
local deleted = redis.call('HGET', job_of(id), 'deleted') == '1' and 1 or 0
redis.call('DEL', job_of(id))
local recorded = start_record(video_of(id), KEYS[18], ARGV[3], ARGV[8], ARGV[9], ARGV[10],
                              ARGV[11], ARGV[12], id)
return {recorded, deleted}
"""
)

# The job will not start (upstream refused it, its source expired, or its start was
# never settled before `quota.max_job_s`): free its slot, its record reads `failed`
# with the code, and the stored request goes, in one script. ARGV: job id, slot id,
# channel, code, message, the outcome its charge is settled as (`refused`: charged 0;
# `lease_expired`: as reserved). Returns the slot's release (`store_lua.free_slot`).
REFUSE_SCRIPT = (
    PRELUDE
    + """
local freed = free_slot(ARGV[2], ARGV[3], ARGV[6], '')
if freed[1] == 1 then  -- else another settled the job first: nothing to do
  fail_record(ARGV[1], ARGV[4], ARGV[5])
  redis.call('DEL', job_of(ARGV[1]))
end
return freed
"""
)

# A client deletes a job it owns. ARGV: job id, team. Returns 1: it was queued and is
# gone; 2: it is being started (the starter deletes it upstream once it has an id);
# 0: the scheduler holds no such job of this team.
CANCEL_SCRIPT = (
    PRELUDE
    + """
local id, team = ARGV[1], ARGV[2]
local job = job_of(id)
if redis.call('HGET', job, 'team') ~= team then return 0 end
if redis.call('ZSCORE', queue_of(team), id) then
  unqueue(team, id)
  local f = redis.call('HMGET', job, 'kind', 'charge')
  settle_charge(team, f[1] or '', f[2] and cjson.decode(f[2]) or nil, 'deleted_queued', '')
  redis.call('DEL', job)
  return 1
end
redis.call('HSET', job, 'deleted', '1')
return 2
"""
)

# Jobs queued longer than ARGV[1] ms: taken out of the queue, their records `failed`
# with `queue_timeout` (message ARGV[3]), at most ARGV[2] of them. Returns {id, team,
# kind, ...}.
OVERDUE_SCRIPT = (
    PRELUDE
    + """
local cutoff = now_ms() - tonumber(ARGV[1])
local out = {}
local due = redis.call('ZRANGEBYSCORE', queued, '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(due) do
  local f = redis.call('HMGET', job_of(id), 'team', 'kind', 'charge')
  if f[1] then
    unqueue(f[1], id)
    settle_charge(f[1], f[2] or '', f[3] and cjson.decode(f[3]) or nil, 'queue_timeout', '')
  else
    redis.call('ZREM', queued, id)
  end
  redis.call('DEL', job_of(id))
  fail_record(id, 'queue_timeout', ARGV[3])
  out[#out + 1] = id
  out[#out + 1] = f[1] or ''
  out[#out + 1] = f[2] or ''
end
return out
"""
)

# Where queued jobs stand, in one round trip whatever their number (the admin job list
# asks for every queued job). ARGV: weights (JSON), a typical job's slot time ms, fair
# window ms, then the job ids. Returns one position per id, 0 for one not queued.
POSITION_SCRIPT = (
    PRELUDE
    + POSITION_LUA
    + """
local weights = cjson.decode(ARGV[1])
local out = {}
for i = 4, #ARGV do
  local team = redis.call('HGET', job_of(ARGV[i]), 'team')
  out[#out + 1] = team and position_of(ARGV[i], team, weights, tonumber(ARGV[2]),
                                       tonumber(ARGV[3])) or 0
end
return out
"""
)


@dataclass(frozen=True)
class StoredRequest:
    """What the gateway would send upstream for a job, kept until the job starts."""

    path: str
    content_type: str
    headers: dict[str, str]  # the client's headers the gateway forwards (allow-listed)
    body: bytes
    source: str = ""  # the gateway's id of the remix/edit/extension source, if any
    request_id: str = ""  # the client's request's: upstream sees it on the start too

    def meta(self) -> str:
        return json.dumps(
            {
                "path": self.path,
                "content_type": self.content_type,
                "headers": self.headers,
                "source": self.source,
                "request_id": self.request_id,
            },
            separators=(",", ":"),
        )


@dataclass(frozen=True)
class Enqueued:
    """The one decision of `enqueue`."""

    outcome: str  # 'admitted' | 'queued' | 'queue_full' | 'team_queue_full' | 'budget_exceeded'
    position: int = 0
    kick: bool = False  # a queued job was given a free slot too: wake the dispatcher
    over: Over | None = None  # the budget it would pass ('budget_exceeded')


@dataclass(frozen=True)
class TakenJob:
    """A queued job given a slot: the taker sends it."""

    id: str
    slot_id: str
    team: str
    kind: str
    want: dict[str, str]
    request: StoredRequest
    queued_s: float  # accept -> taken, by the store's clock


@dataclass(frozen=True)
class Requeued:
    release: Release | None  # the slot's release, for the one call that freed it
    verdict: str  # 'requeued' | 'failed' | 'gone' | 'stale'


@dataclass(frozen=True)
class Started:
    recorded: bool  # False: the job's record is gone (deleted while it started)
    deleted: bool  # its client deleted it while it was being started


@dataclass(frozen=True)
class Overdue:
    id: str
    team: str
    kind: str


class Scheduler(OnClient):
    """The scripts above, registered once, with typed arguments and results. A store
    failure is raised as a `store.StoreFailure`, never as a redis exception."""

    def __init__(
        self,
        redis: Redis,
        ledger: SlotLedger,
        *,
        max_queued: int,
        team_max_queued: Mapping[str, int],
    ) -> None:
        self.redis = redis
        self.ledger = ledger  # its limit, caps, weights, lease and owner apply here too
        self.max_queued = max_queued
        self.team_max_queued = dict(team_max_queued)
        self._register(redis)

    def _register(self, redis: Redis) -> None:
        self._enqueue = redis.register_script(ENQUEUE_SCRIPT)
        self._take = redis.register_script(TAKE_SCRIPT)
        self._requeue = redis.register_script(REQUEUE_SCRIPT)
        self._started = redis.register_script(STARTED_SCRIPT)
        self._refuse = redis.register_script(REFUSE_SCRIPT)
        self._cancel = redis.register_script(CANCEL_SCRIPT)
        self._overdue = redis.register_script(OVERDUE_SCRIPT)
        self._position = redis.register_script(POSITION_SCRIPT)

    def set_team_limits(self, team_max_queued: Mapping[str, int]) -> None:
        self.team_max_queued = dict(team_max_queued)

    @translated
    async def enqueue(
        self,
        job_id: str,
        slot_id: str,
        *,
        team: str,
        kind: str,
        want: Mapping[str, str],
        request: StoredRequest,
        video: dict[str, Any],
        typical_job_s: float = 30.0,
        charge: Charge | None = None,
        limits: Limits | None = None,
    ) -> Enqueued:
        """Start now, or store the job (and `video`, its queued object) for later;
        `typical_job_s` (jobs seen to end lately) goes into its position estimate."""
        encoded_want = json.dumps(dict(want), separators=(",", ":")) if want else "{}"
        if len(encoded_want) > MAX_WANT_BYTES:
            raise ValueError(f"a slot's want must stay under {MAX_WANT_BYTES} bytes")
        ledger = self.ledger
        team_cap = self.team_max_queued.get(team)
        result = await self._enqueue(
            keys=[*KEYS, video_key(job_id), team_index_key(team), VIDEO_SEQ],
            args=[
                job_id,
                slot_id,
                team,
                kind,
                encoded_want,
                ledger.limit,
                ledger.lease_ms,
                ledger.owner,
                ledger.caps,
                ledger.weights,
                ledger.fair_window_ms,
                request.meta(),
                request.body,
                self.max_queued,
                "" if team_cap is None else team_cap,
                *record_args(video, json.dumps(video).encode()),
                _typical_ms(typical_job_s),
                charge.encoded() if charge else "",
                limits.encoded() if limits else "",
            ],
        )
        if int(result[0]) == 1:
            return Enqueued("admitted", kick=bool(int(result[2])))
        outcome = _text(result[1])
        if outcome == "budget_exceeded":
            return Enqueued(outcome, over=over_of(result[4:8]))
        return Enqueued(outcome, int(result[2]), bool(int(result[3])))

    @translated
    async def take(self, slot_id: str) -> TakenJob | None:
        """The next queued job the fair-share order gives a free slot, with `slot_id`
        reserved for it by this replica; None when no slot is free or no queued job's
        turn has come."""
        ledger = self.ledger
        result = await self._take(
            keys=KEYS,
            args=[
                ledger.owner,
                ledger.limit,
                ledger.lease_ms,
                ledger.caps,
                ledger.weights,
                ledger.fair_window_ms,
                slot_id,
            ],
        )
        if not result:
            return None
        job_id, slot_id, team, kind, want, meta = (_text(v) for v in result[:6])
        body, accepted, now = result[6], _text(result[7]), _text(result[8])
        fields = json.loads(meta)
        request = StoredRequest(
            path=str(fields["path"]),
            content_type=str(fields["content_type"]),
            headers={str(k): str(v) for k, v in fields.get("headers", {}).items()},
            body=body if isinstance(body, bytes) else str(body).encode(),
            source=str(fields.get("source", "")),
            request_id=str(fields.get("request_id", "")),
        )
        return TakenJob(
            job_id,
            slot_id,
            team,
            kind,
            {str(k): str(v) for k, v in json.loads(want or "{}").items()},
            request,
            (int(now) - int(accepted)) / 1000,
        )

    @translated
    async def requeue(
        self, job_id: str, slot_id: str, *, count_attempt: bool, pause_s: float = 0.0
    ) -> Requeued:
        """Free the job's slot and put it back first in its team's queue."""
        result = await self._requeue(
            keys=KEYS,
            args=[
                job_id,
                slot_id,
                RELEASED_CHANNEL,
                1 if count_attempt else 0,
                MAX_REQUEUES,
                int(pause_s * 1000),
                NEVER_STARTED_MESSAGE,
            ],
        )
        return Requeued(release_of(result), _text(result[-1]))

    @translated
    async def started(
        self,
        job_id: str,
        slot_id: str,
        *,
        team: str,
        kind: str,
        ids: dict[str, str],
        video: dict[str, Any],
        body: bytes,
    ) -> Started:
        """Upstream runs the job as `video` (already in the client's `ids`, upstream's
        id among them): the slot counts it, the record learns it, the request goes."""
        upstream_id = next(up for up, gid in ids.items() if gid == job_id)
        ledger = self.ledger
        result = await self._started(
            keys=[*KEYS, alias_key(upstream_id)],
            args=[
                job_id,
                slot_id,
                upstream_id,
                ledger.lease_ms,
                ledger.owner,
                team,
                kind,
                json.dumps(ids),
                *started_args(ids, video, body)[1:],
            ],
        )
        return Started(recorded=bool(int(result[0])), deleted=bool(int(result[1])))

    @translated
    async def refuse(
        self, job_id: str, slot_id: str, code: str, message: str, outcome: str = "refused"
    ) -> Release | None:
        """The job will not start: its slot is freed, its charge settled as `outcome`,
        its record reads `failed` with `code`. The release, for the one call that freed it."""
        result = await self._refuse(
            keys=KEYS, args=[job_id, slot_id, RELEASED_CHANNEL, code, message, outcome]
        )
        return release_of(result)

    @translated
    async def cancel(self, job_id: str, team: str) -> int:
        """1: a queued job deleted; 2: being started (deleted upstream once started);
        0: not one the scheduler holds for `team`."""
        return int(await self._cancel(keys=KEYS, args=[job_id, team]))

    @translated
    async def overdue(self, max_queue_s: float) -> list[Overdue]:
        """Jobs queued past `max_queue_s`, taken out of the queue."""
        message = f"The job waited in the queue longer than {max_queue_s:g} s."
        args: list[EncodableT] = [int(max_queue_s * 1000), OVERDUE_BATCH, message]
        result = await self._overdue(keys=KEYS, args=args)
        values = [_text(v) for v in result]
        return [Overdue(*values[i : i + 3]) for i in range(0, len(values), 3)]

    async def position(self, job_id: str, typical_job_s: float = 30.0) -> int | None:
        """Where a queued job stands (1 = next), or None when it is not queued."""
        return (await self.positions([job_id], typical_job_s))[job_id]

    @translated
    async def positions(
        self, job_ids: list[str], typical_job_s: float = 30.0
    ) -> dict[str, int | None]:
        """`position` of each job, in one script call."""
        if not job_ids:
            return {}
        args: list[EncodableT] = [
            self.ledger.weights,
            _typical_ms(typical_job_s),
            self.ledger.fair_window_ms,
            *job_ids,
        ]
        result = await self._position(keys=KEYS, args=args)
        return {job_id: int(n) or None for job_id, n in zip(job_ids, result, strict=True)}


def mint_job_id() -> str:
    """A gateway id in the form upstream's ids have: `video_` and 32 lowercase hex."""
    return f"video_{uuid.uuid4().hex}"


def _typical_ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
