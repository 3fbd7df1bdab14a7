"""What a team spent: CONTRACT §9's usage object and CSV, from the usage hashes.

The ledger's scripts keep one hash per team and UTC day (`store.usage_day_key`) and one
per month. A job is counted on the day its cost was reserved (the day it started or was
queued), not the day it ended: its reservation and its settlement land in one hash, so a
day's `reserved` falls back to 0 once its jobs are settled, even across midnight.

Choices the contract leaves open:
- every date of the range is reported, with `jobs: {}` and zeros where nothing was
  settled: a client plotting days gets no gaps, and "no usage" reads the same whether
  the day's hash expired, was never written or lies in the future;
- a day's `cost_usd` is its settled `spent` (what budgets count); the CSV's per-model
  rows are the `<model>|cost` fields, whose sum is that `spent`;
- amounts are integer µUSD in the store; USD in the answers is µUSD / 1e6 rounded to 6
  places (JSON), or written exactly with 6 decimals (CSV), so nothing drifts.

Everything here is pure but `read_usage`, the one store read (one pipeline).
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from .errors import invalid_request
from .policy import MICRO
from .store import usage_day_key, usage_month_key
from .store_clients import translated

MAX_RANGE_DAYS = 366
CSV_HEADER = ("date", "team", "model", "jobs", "video_seconds", "cost_usd")
# Strictly YYYY-MM-DD: `date.fromisoformat` also takes `20250101` and week dates.
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$")


@dataclass(frozen=True)
class ModelUsage:
    """One model's settled jobs on one day."""

    jobs: Mapping[str, int] = field(default_factory=dict)  # outcome -> jobs
    seconds: int = 0
    cost_micro: int = 0

    @property
    def job_count(self) -> int:
        return sum(self.jobs.values())

    @property
    def used(self) -> bool:
        return bool(self.job_count or self.seconds or self.cost_micro)


@dataclass(frozen=True)
class DayUsage:
    """One team's day hash, parsed."""

    date: str
    spent_micro: int = 0
    reserved_micro: int = 0
    models: Mapping[str, ModelUsage] = field(default_factory=dict)

    @property
    def jobs(self) -> dict[str, int]:
        """Settled jobs by outcome, over every model."""
        totals: dict[str, int] = {}
        for usage in self.models.values():
            for outcome, count in usage.jobs.items():
                totals[outcome] = totals.get(outcome, 0) + count
        return {outcome: n for outcome, n in sorted(totals.items()) if n}

    @property
    def video_seconds(self) -> int:
        return sum(usage.seconds for usage in self.models.values())


@dataclass(frozen=True)
class Current:
    """A team's spent and reserved µUSD in the current UTC day and month."""

    day_spent: int = 0
    day_reserved: int = 0
    month_spent: int = 0
    month_reserved: int = 0


@dataclass(frozen=True)
class TeamUsage:
    team: str
    days: list[DayUsage]
    current: Current


def parse_day(day: str, fields: Mapping[Any, Any]) -> DayUsage:
    """A day hash's fields (`spent`, `reserved`, `<model>|seconds`, `<model>|cost`,
    `<model>|jobs|<outcome>`); a field of another form is ignored. Model names never
    hold `|` (`params.MODEL_SYNTAX`), so the split is unambiguous."""
    spent = reserved = 0
    jobs: dict[str, dict[str, int]] = {}
    seconds: dict[str, int] = {}
    costs: dict[str, int] = {}
    for raw_name, raw_value in fields.items():
        name, value = _text(raw_name), _amount(raw_value)
        parts = name.split("|")
        if parts == ["spent"]:
            spent = value
        elif parts == ["reserved"]:
            reserved = value
        elif len(parts) == 2 and parts[1] == "seconds":
            seconds[parts[0]] = value
        elif len(parts) == 2 and parts[1] == "cost":
            costs[parts[0]] = value
        elif len(parts) == 3 and parts[1] == "jobs":
            jobs.setdefault(parts[0], {})[parts[2]] = value
    models = {
        model: ModelUsage(jobs.get(model, {}), seconds.get(model, 0), costs.get(model, 0))
        for model in sorted({*jobs, *seconds, *costs})
    }
    return DayUsage(day, spent, reserved, models)


# -- the range ------------------------------------------------------------------------------


def today_utc(now: float) -> date:
    return datetime.fromtimestamp(now, UTC).date()


def parse_range(start: str | None, end: str | None, today: date) -> tuple[date, date]:
    """The report's dates, UTC, inclusive. Defaults: `end` today; `start` the first of
    `end`'s month (so no parameter at all is the current month so far). A malformed
    date, `start` after `end`, or more than MAX_RANGE_DAYS days: 400 naming the param."""
    last = _date(end, "end") if end else today
    first = _date(start, "start") if start else last.replace(day=1)
    # Without `start` the range is within one month: only a given `start` can be wrong.
    if first > last:
        raise invalid_request(f"start ({first}) is after end ({last}).", "start")
    if (last - first).days + 1 > MAX_RANGE_DAYS:
        raise invalid_request(
            f"The range {first} to {last} spans more than {MAX_RANGE_DAYS} days.", "start"
        )
    return first, last


def dates(first: date, last: date) -> list[str]:
    return [str(first + timedelta(days=n)) for n in range((last - first).days + 1)]


def _date(text: str, param: str) -> date:
    try:
        if _DATE.fullmatch(text):
            return date.fromisoformat(text)
    except ValueError:
        pass
    raise invalid_request(f"{param} must be a date YYYY-MM-DD (UTC), e.g. 2026-01-31.", param)


# -- the reports ----------------------------------------------------------------------------


def usd(micro: int) -> float:
    return round(micro / MICRO, 6)


def usd_text(micro: int) -> str:
    """µUSD as an exact decimal with 6 places (a float would print 1e-06)."""
    sign = "-" if micro < 0 else ""
    whole, fraction = divmod(abs(micro), MICRO)
    return f"{sign}{whole}.{fraction:06d}"


def day_report(day: DayUsage) -> dict[str, Any]:
    return {
        "date": day.date,
        "jobs": day.jobs,
        "video_seconds": day.video_seconds,
        "cost_usd": usd(day.spent_micro),
    }


def team_report(
    usage: TeamUsage,
    first: date,
    last: date,
    limits: tuple[float | None, float | None],
    today: date,
) -> dict[str, Any]:
    """CONTRACT §9's usage object; `limits` the team's (daily, monthly) budget in USD."""
    return {
        "object": "usage",
        "team": usage.team,
        "start": str(first),
        "end": str(last),
        "days": [day_report(day) for day in usage.days],
        "total": {
            "jobs": sum(sum(day.jobs.values()) for day in usage.days),
            "video_seconds": sum(day.video_seconds for day in usage.days),
            "cost_usd": usd(sum(day.spent_micro for day in usage.days)),
        },
        "budget": budget_report(limits, usage.current, today),
    }


def budget_report(
    limits: tuple[float | None, float | None], current: Current, today: date
) -> dict[str, Any] | None:
    """The tighter of the team's budgets (the smaller remaining; the day on a tie), or
    None when it has none. `resets_at`: the next UTC midnight, or the first of next month."""
    day_usd, month_usd = limits
    candidates = []
    if day_usd is not None:
        tomorrow = today + timedelta(days=1)
        candidates.append(("day", day_usd, current.day_spent, current.day_reserved, tomorrow))
    if month_usd is not None:
        next_month = (today.replace(day=1) + timedelta(days=32)).replace(day=1)
        candidates.append(
            ("month", month_usd, current.month_spent, current.month_reserved, next_month)
        )
    if not candidates:
        return None
    period, limit_usd, spent, reserved, resets = min(
        candidates, key=lambda c: round(c[1] * MICRO) - c[2] - c[3]
    )
    return {
        "period": period,
        "limit_usd": usd(round(limit_usd * MICRO)),
        "spent_usd": usd(spent),
        "reserved_usd": usd(reserved),
        "resets_at": int(datetime(resets.year, resets.month, resets.day, tzinfo=UTC).timestamp()),
    }


def csv_rows(usages: Iterable[TeamUsage]) -> Iterator[tuple[str, str, str, int, int, str]]:
    """One row per date, team and model with usage, by date, then team, then model."""
    rows = [
        (day.date, usage.team, model, used.job_count, used.seconds, usd_text(used.cost_micro))
        for usage in usages
        for day in usage.days
        for model, used in day.models.items()
        if used.used
    ]
    yield from sorted(rows, key=lambda row: row[:3])


def csv_text(usages: Iterable[TeamUsage]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    writer.writerows(csv_rows(usages))
    return out.getvalue()


# -- the store read -------------------------------------------------------------------------


@translated
async def read_usage(
    redis: Redis, teams: Sequence[str], first: date, last: date, today: date
) -> list[TeamUsage]:
    """Each team's day hashes over the range and its current day and month totals, in one
    pipeline (a pure read: any client may send it, and twice)."""
    days = dates(first, last)
    day, month = str(today), today.strftime("%Y-%m")
    async with redis.pipeline(transaction=False) as pipe:
        for team in teams:
            for when in days:
                pipe.hgetall(usage_day_key(team, when))
            pipe.hmget(usage_day_key(team, day), ["spent", "reserved"])
            pipe.hmget(usage_month_key(team, month), ["spent", "reserved"])
        replies = await pipe.execute()
    usages = []
    per_team = len(days) + 2
    for i, team in enumerate(teams):
        *hashes, today_fields, month_fields = replies[i * per_team : (i + 1) * per_team]
        current = Current(*map(_amount, [*today_fields, *month_fields]))
        usages.append(
            TeamUsage(team, [parse_day(d, h) for d, h in zip(days, hashes, strict=True)], current)
        )
    return usages


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _amount(value: Any) -> int:
    """A stored count or µUSD amount; absent is 0. Integers in the store (HINCRBY), but a
    float's text (HINCRBYFLOAT) is read too, rather than failing the whole report."""
    if value is None:
        return 0
    text = _text(value)
    try:
        return int(text)
    except ValueError:
        try:
            return round(float(text))
        except (ValueError, OverflowError):
            return 0
