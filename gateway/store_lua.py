"""The Lua that the ledger's and the scheduler's scripts share: key names, store time,
the fair-share order, and how a slot is taken and freed.

The ledger (`ledger.py`) decides whether a job may run; the scheduler (`scheduler.py`)
decides which queued job runs next. Both decide with the same `plan`, inside their own
scripts, so a live waiter of `when_full: wait` and a queued job are served in one order,
atomically, with Redis time, for every replica at once.

Every script receives `KEYS` (below, in this order) and may append keys of its own.
The prefixes among them are not keys but the start of per-team and per-job keys; all
share the `{sgw}` hash tag, so every script still touches one cluster slot.

The cost of one `plan` does not grow with the number of queued jobs: it reads the head
of each team's FIFO, each team's small usage record, and the slots held (about the
limit), then takes at most `free slots` steps. What grows is only the number of teams.
"""

from __future__ import annotations

from .budgets import BUDGET_LUA
from .store import (
    BEATS,
    HOLDERS,
    JOB_PREFIX,
    JOBS,
    PAUSED_UNTIL,
    QUEUE_PREFIX,
    QUEUE_SEQ,
    QUEUED,
    QUEUED_BY_TEAM,
    QUEUED_TEAMS,
    SLOTS,
    USAGE_PREFIX,
    USED_PREFIX,
    USED_SUM,
    VIDEO_PREFIX,
    WAITER_CHARGE,
    WAITER_TEAM,
)

KEYS = [
    HOLDERS,
    SLOTS,
    JOBS,
    QUEUED_TEAMS,
    BEATS,
    WAITER_TEAM,
    QUEUE_SEQ,
    QUEUE_PREFIX,
    QUEUED,
    QUEUED_BY_TEAM,
    USED_SUM,
    USED_PREFIX,
    PAUSED_UNTIL,
    JOB_PREFIX,
    VIDEO_PREFIX,
    USAGE_PREFIX,
    WAITER_CHARGE,
]

_PRELUDE = """
local holders, slots, jobs = KEYS[1], KEYS[2], KEYS[3]
local queued_teams, beats, waiter_team, queue_seq = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local queued, queued_by_team, used_sum, paused_until = KEYS[9], KEYS[10], KEYS[11], KEYS[13]
local function queue_of(team) return KEYS[8] .. team end
local function used_of(team) return KEYS[12] .. team end
local waiter_charge = KEYS[17]
local function job_of(id) return KEYS[14] .. id end
local function video_of(id) return KEYS[15] .. id end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

"""

# After BUDGET_LUA: a waiter that leaves the queue gives its reservation back.
_QUEUES = """
-- Take a member out of its team's FIFO (the set of teams with one stays exact).
local function leave_fifo(team, member)
  redis.call('ZREM', queue_of(team), member)
  if redis.call('ZCARD', queue_of(team)) == 0 then redis.call('SREM', queued_teams, team) end
end

-- A live waiter (`when_full: wait`) leaves the queue: admitted, gone, or dead.
local function leave_queue(w)
  local t = redis.call('HGET', waiter_team, w)
  if t then leave_fifo(t, w) end
  local held = redis.call('HGET', waiter_charge, w)
  if held then  -- reserved while it waited; gone without a slot: given back
    redis.call('HDEL', waiter_charge, w)
    if t then unreserve_charge(t, cjson.decode(held)) end
  end
  redis.call('ZREM', beats, w)
  redis.call('HDEL', waiter_team, w)
end

-- Waiters whose heartbeat ran out (their replica died) drop out, each once.
local function drop_dead_waiters(now)
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', beats, '-inf', now)) do leave_queue(w) end
end

-- A queued job leaves the queue (taken, deleted, timed out).
local function unqueue(team, id)
  leave_fifo(team, id)
  redis.call('ZREM', queued, id)
  if redis.call('HINCRBY', queued_by_team, team, -1) <= 0 then
    redis.call('HDEL', queued_by_team, team)
  end
end

-- A queued job goes (back) into its team's FIFO at its own arrival number.
local function requeue(team, id, arrival, accepted)
  redis.call('ZADD', queue_of(team), arrival, id)
  redis.call('SADD', queued_teams, team)
  redis.call('ZADD', queued, accepted, id)
  redis.call('HINCRBY', queued_by_team, team, 1)
end

-- A team's finished slot time within the window, trimming spans that left it (each
-- span is trimmed once, so this is cheap however long the team has been busy).
local function used_ms(team, now, window)
  local key = used_of(team)
  local cutoff = now - window
  local sum = tonumber(redis.call('HGET', used_sum, team) or '0')
  local old = redis.call('ZRANGEBYSCORE', key, '-inf', cutoff)
  if #old > 0 then
    for _, m in ipairs(old) do sum = sum - (tonumber(string.match(m, ':(%d+)$')) or 0) end
    redis.call('ZREMRANGEBYSCORE', key, '-inf', cutoff)
    if sum <= 0 or redis.call('ZCARD', key) == 0 then
      redis.call('HDEL', used_sum, team)
      sum = 0
    else
      redis.call('HSET', used_sum, team, sum)
    end
  end
  return sum
end

-- The slots held now: count per team, running time per team, and the total.
local function holdings(now)
  local held, running, total = {}, {}, 0
  for _, h in ipairs(redis.call('ZRANGE', holders, 0, -1)) do
    local raw = redis.call('HGET', slots, h)
    local rec = raw and cjson.decode(raw) or {}
    local t = rec.team or ''
    held[t] = (held[t] or 0) + 1
    running[t] = (running[t] or 0) + math.max(0, now - (tonumber(rec.started) or now))
    total = total + 1
  end
  return {held = held, running = running, total = total, now = now}
end

-- How many more slots `team` may take: the shared limit, or its own cap.
local function room(state, caps, limit, team)
  local cap = caps[team]
  if cap == nil then return limit end
  return cap - (state.held[team] or 0)
end

local function weight(weights, team)
  local w = tonumber(weights[team])
  if w == nil or w <= 0 then return 1 end
  return w
end

-- The fair-share order (CONTRACT 8.1): who the `free` slots go to, in order, as
-- {member, team} pairs. Among the teams with something waiting and room under their
-- cap, the least slot time per unit of weight within the window (running jobs count
-- what they have run so far) goes first, ties by the older head; within a team,
-- arrival order. While upstream's retry-after runs (`paused_until`), nothing starts.
local function plan(state, limit, caps, weights, window)
  local picks = {}
  local free = limit - state.total
  if free <= 0 then return picks end
  if tonumber(redis.call('GET', paused_until) or '0') > state.now then return picks end
  local cands = {}
  for _, t in ipairs(redis.call('SMEMBERS', queued_teams)) do
    local r = room(state, caps, limit, t)
    if r > 0 then
      local h = redis.call('ZRANGE', queue_of(t), 0, 0, 'WITHSCORES')
      if h[1] then
        local share = (used_ms(t, state.now, window) + (state.running[t] or 0)) / weight(weights, t)
        cands[t] = {member = h[1], arrival = tonumber(h[2]), taken = 0, room = r, share = share}
      end
    end
  end
  for _ = 1, free do
    local best
    for t, c in pairs(cands) do
      local b = best and cands[best]
      if b == nil or c.share < b.share or (c.share == b.share and c.arrival < b.arrival) then
        best = t
      end
    end
    if best == nil then break end
    local c = cands[best]
    picks[#picks + 1] = {c.member, best}
    c.taken = c.taken + 1
    local nxt = {}
    if c.taken < c.room then
      nxt = redis.call('ZRANGE', queue_of(best), c.taken, c.taken, 'WITHSCORES')
    end
    if nxt[1] then
      c.member, c.arrival = nxt[1], tonumber(nxt[2])
    else
      cands[best] = nil
    end
  end
  return picks
end

-- Does the fair-share order give `member` one of the free slots now? Also whether it
-- gives one to a queued job (then the caller wakes its dispatcher to take it): kick 1.
local function decide(member, state, limit, caps, weights, window)
  local admitted, kick = false, 0
  for _, p in ipairs(plan(state, limit, caps, weights, window)) do
    if p[1] == member then
      admitted = true
    elseif redis.call('EXISTS', job_of(p[1])) == 1 then
      kick = 1
    end
  end
  return admitted, kick
end

"""

# How a slot is taken, bound and freed, and a queued job failed (after BUDGET_LUA: a
# freed slot settles its job's charge).
_SLOTS = """
-- Count a slot for a job about to be sent: leased to its owner for `lease` ms. `charge`
-- (a decoded `budgets.Charge`, or nil) is its reservation, settled when it is freed.
local function reserve(slot, team, kind, want, owner, lease, now, gid, charge)
  redis.call('ZADD', holders, now + lease, slot)
  local rec = {team = team, state = 'reserved', video = '', owner = owner, started = now,
               kind = kind, want = want, charge = charge}
  if gid ~= nil and gid ~= '' then rec.gid = gid end
  redis.call('HSET', slots, slot, cjson.encode(rec))
end

-- The slot now counts upstream's job `video` (the create answered, or the tracker found
-- it). It is (re)counted even if it was released meanwhile, because the job runs
-- upstream either way. If another slot had claimed this job (the tracker's guess for a
-- lost answer), that slot goes back to `unknown` to be settled again. `ids` (JSON
-- upstream id -> gateway id, or '') and `gid` (a queued job's gateway id, or '') travel
-- with the slot, so the tracker answers in the client's ids.
local function bind_slot(slot, video, lease, owner, team, kind, ids, gid)
  local now = now_ms()
  local raw = redis.call('HGET', slots, slot)
  local rec
  if raw then
    rec = cjson.decode(raw)
  else
    rec = {team = team, kind = kind, owner = owner, started = now}
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
  if ids ~= '' then rec.ids = cjson.decode(ids) end
  if gid ~= '' then rec.gid = gid end
  redis.call('HSET', slots, slot, cjson.encode(rec))
  redis.call('HSET', jobs, video, slot)
  local deadline = now + lease
  local current = redis.call('ZSCORE', holders, slot)
  if current and tonumber(current) > deadline then deadline = tonumber(current) end
  redis.call('ZADD', holders, deadline, slot)
end

-- A queued job that will never start reads `failed` with `code` in its record (the
-- video object the client polls), in the same script that takes it out: no job is
-- left reading `queued` with nothing behind it. Returns 0 when the record is gone.
local function fail_record(id, code, message)
  local key = video_of(id)
  local body = redis.call('HGET', key, 'body')
  if not body then return 0 end
  local ok, video = pcall(cjson.decode, body)
  if not ok or type(video) ~= 'table' then video = {id = id, object = 'video'} end
  video.status = 'failed'
  video.error = {code = code, message = message}
  redis.call('HSET', key, 'status', 'failed', 'body', cjson.encode(video))
  return 1
end

-- Free a slot (idempotent): only the call that freed it gets {1, team, kind, started
-- ms, now ms, video, gateway id, µUSD charged, seconds charged, model}; its slot time
-- joins the team's usage record, and its job's reservation is settled as `outcome`
-- (the result's `seconds` for a completed job), in this same step: whoever frees the
-- slot settles, once. With `outcome` '' nothing is settled (the job goes back to the
-- queue, its reservation with it); the slot's record is the second value returned.
local function free_slot(slot, channel, outcome, seconds)
  local raw = redis.call('HGET', slots, slot)
  local rec = raw and cjson.decode(raw) or {}
  if rec.video and rec.video ~= '' and redis.call('HGET', jobs, rec.video) == slot then
    redis.call('HDEL', jobs, rec.video)
  end
  redis.call('HDEL', slots, slot)
  if redis.call('ZREM', holders, slot) == 0 then return {0}, rec end
  local now = now_ms()
  local started = tonumber(rec.started) or now
  if rec.team and rec.team ~= '' and now > started then
    redis.call('ZADD', used_of(rec.team), now, slot .. ':' .. (now - started))
    redis.call('HINCRBY', used_sum, rec.team, now - started)
  end
  local charged, charged_s = 0, 0
  if outcome ~= '' then
    charged, charged_s = settle_charge(rec.team or '', rec.kind or '', rec.charge, outcome, seconds)
  end
  redis.call('PUBLISH', channel, slot)
  local model = rec.charge and rec.charge.model or ''
  return {1, rec.team or '', rec.kind or '', tostring(started), tostring(now), rec.video or '',
          rec.gid or '', charged, charged_s, model}, rec
end
"""

PRELUDE = _PRELUDE + BUDGET_LUA + _QUEUES + _SLOTS
