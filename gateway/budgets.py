"""Budgets: what a job reserves when it starts or is queued, and what it is charged once
its end is first seen (CONTRACT §9).

The reservation is made in the very script that admits or queues the job (the ledger's
acquire, the scheduler's enqueue), so two replicas admitting at once can never pass a
budget together; the charge is settled in the script that frees the job's slot (or
takes a queued job out), so whichever caller wins that release settles, exactly once.
A replica killed between two steps leaves nothing half-counted: there is no second
step.

Money is kept in integer micro-dollars (µUSD), so sums never drift. Usage is kept per
team and UTC day (the day the job was checked: its reservation and its charge both
count there), by model, with job counts by outcome, and per month; the keys are in
`store`.
"""

from __future__ import annotations

import calendar
import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from .errors import GatewayError, budget_exceeded
from .policy import MICRO, budget_message
from .store import usage_day_key, usage_month_key
from .store_clients import translated

# How an outcome is charged: the result's seconds (completed), nothing (the job never
# ran, or ran and failed), or what was reserved (upstream may have billed it).
CHARGED_AS_RESERVED = frozenset({"deleted", "vanished", "lease_expired"})

# Lua shared by the ledger's and the scheduler's scripts (after `store_lua.PRELUDE`).
# A charge is the JSON of `Charge` (its `cost`, `day`, `month` and `keep` included).
BUDGET_LUA = """
local function usage_of(team, period) return KEYS[16] .. team .. ':' .. period end

-- {period, limit, spent, reserved} of the first budget the charge would pass, or nil.
local function over_budget(team, charge, limits)
  if charge == nil or limits == nil then return nil end
  for _, p in ipairs({{'day', charge.day, limits.day}, {'month', charge.month, limits.month}}) do
    local limit = tonumber(p[3])
    if limit then
      local t = redis.call('HMGET', usage_of(team, p[2]), 'spent', 'reserved')
      local spent, reserved = tonumber(t[1] or '0'), tonumber(t[2] or '0')
      if spent + reserved + charge.cost > limit then
        return {p[1], limit, spent, reserved}
      end
    end
  end
  return nil
end

local function keep(key, seconds)
  redis.call('EXPIRE', key, seconds)
end

-- Reserve the charge's cost in its day and its month.
local function reserve_charge(team, charge)
  if charge == nil or charge.cost == 0 then return end
  local day, month = usage_of(team, charge.day), usage_of(team, charge.month)
  redis.call('HINCRBY', day, 'reserved', charge.cost)
  redis.call('HINCRBY', month, 'reserved', charge.cost)
  keep(day, charge.keep)
  keep(month, charge.keep + 2678400)
end

-- Give a reservation back, nothing charged and no job counted (a waiter that left).
local function unreserve_charge(team, charge)
  if charge == nil or charge.cost == 0 then return end
  redis.call('HINCRBY', usage_of(team, charge.day), 'reserved', -charge.cost)
  redis.call('HINCRBY', usage_of(team, charge.month), 'reserved', -charge.cost)
end

-- Settle a reservation: the cost leaves `reserved`, what is charged joins `spent`, and
-- the job is counted by its model and outcome. `seconds` is the result's (completed),
-- or nil. Returns the µUSD and the seconds charged.
local function settle_charge(team, kind, charge, outcome, seconds)
  if charge == nil then return 0, 0 end
  local charged_s = 0
  local label = outcome
  if outcome == 'deleted_queued' then
    label = 'deleted'  -- deleted while queued: never ran, charged nothing
  elseif outcome == 'completed' then
    charged_s = tonumber(seconds) or charge.seconds
    if kind == 'extension' then charged_s = charge.seconds end  -- the seconds it asked for
  elseif outcome == 'deleted' or outcome == 'vanished' or outcome == 'lease_expired' then
    charged_s = charge.seconds
  end
  local charged = charged_s * charge.price
  local day, month = usage_of(team, charge.day), usage_of(team, charge.month)
  local model = charge.model or 'unknown'
  if charge.cost ~= 0 then
    redis.call('HINCRBY', day, 'reserved', -charge.cost)
    redis.call('HINCRBY', month, 'reserved', -charge.cost)
  end
  redis.call('HINCRBY', day, 'spent', charged)
  redis.call('HINCRBY', month, 'spent', charged)
  redis.call('HINCRBY', day, model .. '|cost', charged)
  redis.call('HINCRBY', day, model .. '|seconds', charged_s)
  redis.call('HINCRBY', day, model .. '|jobs|' .. label, 1)
  keep(day, charge.keep)
  keep(month, charge.keep + 2678400)
  return charged, charged_s
end
"""


@dataclass(frozen=True)
class Charge:
    """What one job reserves; it travels in the job's slot (or queued) record."""

    model: str | None
    size: str | None
    seconds: int  # what the request fixed (or upstream's default): what is reserved
    price_micro: int  # µUSD per second of video at this model and size
    day: str  # "YYYY-MM-DD", UTC: the day the job was checked, where it counts
    month: str  # "YYYY-MM"
    keep_s: int = 400 * 86400  # how long its day's usage is kept (`usage.retention_days`)

    @property
    def cost_micro(self) -> int:
        return self.seconds * self.price_micro

    def encoded(self) -> str:
        """The JSON the scripts read (`BUDGET_LUA`)."""
        value = {
            "model": self.model,
            "size": self.size,
            "seconds": self.seconds,
            "price": self.price_micro,
            "cost": self.cost_micro,
            "day": self.day,
            "month": self.month,
            "keep": self.keep_s,
        }
        return json.dumps({k: v for k, v in value.items() if v is not None})

    @classmethod
    def decoded(cls, value: Any) -> Charge | None:
        """A charge as a script stored it (a JSON object), or None."""
        if isinstance(value, str | bytes):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        if not isinstance(value, dict) or "day" not in value:
            return None
        return cls(
            model=value.get("model"),
            size=value.get("size"),
            seconds=int(value.get("seconds", 0)),
            price_micro=int(value.get("price", 0)),
            day=str(value["day"]),
            month=str(value.get("month", "")),
            keep_s=int(value.get("keep", 0)),
        )


@dataclass(frozen=True)
class Limits:
    """A team's budgets in µUSD; None: no budget of that period."""

    day_micro: int | None
    month_micro: int | None

    @classmethod
    def of(cls, per_day_usd: float | None, per_month_usd: float | None) -> Limits | None:
        if per_day_usd is None and per_month_usd is None:
            return None
        return cls(_micro(per_day_usd), _micro(per_month_usd))

    def encoded(self) -> str:
        return json.dumps(
            {
                k: v
                for k, v in (("day", self.day_micro), ("month", self.month_micro))
                if v is not None
            }
        )


@dataclass(frozen=True)
class Over:
    """The budget a job would pass: the 429's message says all of it."""

    period: str  # "day" | "month"
    limit_micro: int
    spent_micro: int
    reserved_micro: int


@dataclass(frozen=True)
class Spend:
    """A job's charge and its team's budgets: checked, and reserved, together."""

    charge: Charge
    limits: Limits | None

    def refusal(self, team: str, over: Over) -> GatewayError:
        """429 `budget_exceeded`, saying the budget, what is spent and reserved, what
        this job costs, and when the budget resets (CONTRACT §9)."""
        message = budget_message(
            over.period,
            over.limit_micro / MICRO,
            over.spent_micro / MICRO,
            over.reserved_micro / MICRO,
            self.charge.cost_micro / MICRO,
            resets_at(over.period, self.charge),
            team=team,
        )
        return budget_exceeded(message)


@dataclass(frozen=True)
class Totals:
    day_spent: int
    day_reserved: int
    month_spent: int
    month_reserved: int


def resets_at(period: str, charge: Charge) -> int:
    """When the charge's `period` (`day` | `month`) ends: Unix seconds, UTC."""
    if period == "day":
        start = calendar.timegm(time.strptime(charge.day, "%Y-%m-%d"))
        return start + 86400
    year, month = (int(part) for part in charge.month.split("-"))
    year, month = (year + 1, 1) if month == 12 else (year, month + 1)
    return calendar.timegm((year, month, 1, 0, 0, 0, 0, 0, 0))


def periods(now: float) -> tuple[str, str]:
    """The UTC day and month of `now` (Unix seconds)."""
    day = time.strftime("%Y-%m-%d", time.gmtime(now))
    return day, day[:7]


def over_of(result: Any) -> Over:
    """A script's `over_budget` answer."""
    period, limit, spent, reserved = result
    text = period.decode() if isinstance(period, bytes) else str(period)
    return Over(text, int(limit), int(spent), int(reserved))


@translated
async def read_ratios(
    redis: Redis, limits: Mapping[str, Limits], day: str, month: str
) -> dict[str, float]:
    """(spent + reserved) ÷ limit of each budgeted team's tighter period (the one
    nearer its limit), in one round trip: `budget_used_ratio`, read at scrape."""
    teams = sorted(limits)
    async with redis.pipeline(transaction=False) as pipe:
        for team in teams:
            pipe.hmget(usage_day_key(team, day), ["spent", "reserved"])
            pipe.hmget(usage_month_key(team, month), ["spent", "reserved"])
        replies = await pipe.execute()
    ratios = {}
    for n, team in enumerate(teams):
        used_day = sum(int(v or 0) for v in replies[2 * n])
        used_month = sum(int(v or 0) for v in replies[2 * n + 1])
        budget = limits[team]
        shares = [
            used / limit
            for used, limit in ((used_day, budget.day_micro), (used_month, budget.month_micro))
            if limit
        ]
        if shares:
            ratios[team] = max(shares)
    return ratios


@translated
async def read_totals(redis: Redis, team: str, day: str, month: str) -> Totals:
    """A team's spent and reserved µUSD in a day and a month, in one round trip."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.hmget(usage_day_key(team, day), ["spent", "reserved"])
        pipe.hmget(usage_month_key(team, month), ["spent", "reserved"])
        (day_spent, day_reserved), (month_spent, month_reserved) = await pipe.execute()
    return Totals(
        int(day_spent or 0), int(day_reserved or 0), int(month_spent or 0), int(month_reserved or 0)
    )


def result_seconds(video: Any) -> int | None:
    """The seconds of video a job's result says it has (what a completed job is
    charged for); None when it says nothing usable."""
    value = video.get("seconds") if isinstance(video, dict) else None
    if isinstance(value, str) and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _micro(usd: float | None) -> int | None:
    return None if usd is None else round(usd * MICRO)
