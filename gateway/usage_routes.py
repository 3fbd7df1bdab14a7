"""`GET /v1/usage` (a team's own), `GET /admin/usage` and `GET /admin/jobs` (CONTRACT §9).

Who may call is settled before routing (`middleware`): a team key on /v1, an admin key
on /admin. These reads go on the registry's client, never admission's: an operator's
report cannot hold the connections that creates and releases need.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from datetime import date

from redis.asyncio import Redis
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .admin_jobs import jobs_list, read_queued
from .auth import Team
from .config import TeamSettings
from .errors import invalid_request
from .ledger import SlotLedger
from .openapi import operation
from .scheduler import Scheduler
from .usage_report import TeamUsage, csv_text, parse_range, read_usage, team_report, today_utc

RANGE_QUERY = {
    "start": {"type": "string", "format": "date"},
    "end": {"type": "string", "format": "date"},
}
ADMIN_USAGE_QUERY = {**RANGE_QUERY, "format": {"type": "string", "enum": ["json", "csv"]}}


class UsageRoutes:
    """The usage and admin routes of one replica; `set_teams` follows a config reload."""

    def __init__(
        self,
        *,
        redis: Redis,
        ledger: SlotLedger,
        scheduler: Scheduler,
        teams: Iterable[TeamSettings],
        typical_job_s: Callable[[], float] = lambda: 30.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.redis = redis
        self.ledger = ledger
        self.scheduler = scheduler
        self.typical_job_s = typical_job_s  # as the clients' x-queue-position is estimated
        self.clock = clock
        self.set_teams(teams)

    def set_teams(self, teams: Iterable[TeamSettings]) -> None:
        self.teams = {team.name: team for team in teams}

    def routes(self) -> list[Route]:
        return [
            Route("/v1/usage", self.team_usage, methods=["GET"]),
            Route("/admin/usage", self.admin_usage, methods=["GET"]),
            Route("/admin/jobs", self.admin_jobs, methods=["GET"]),
        ]

    @operation("Your team's usage and budget, by UTC day", query=RANGE_QUERY)
    async def team_usage(self, request: Request) -> Response:
        team: Team = request.state.team
        today = today_utc(self.clock())
        first, last = parse_range(*_range(request), today)
        (usage,) = await read_usage(self.redis, [team.name], first, last, today)
        return JSONResponse(self._report(usage, first, last, today))

    @operation("Every team's usage (admin key)", query=ADMIN_USAGE_QUERY)
    async def admin_usage(self, request: Request) -> Response:
        form = request.query_params.get("format", "json")
        if form not in ("json", "csv"):
            raise invalid_request("format must be 'json' or 'csv'.", "format")
        today = today_utc(self.clock())
        first, last = parse_range(*_range(request), today)
        usages = await read_usage(self.redis, sorted(self.teams), first, last, today)
        if form == "csv":
            return Response(
                csv_text(usages),
                media_type="text/csv; charset=utf-8",
                headers={"content-disposition": f'attachment; filename="usage-{first}-{last}.csv"'},
            )
        return JSONResponse(
            {
                "object": "usage",
                "start": str(first),
                "end": str(last),
                "teams": [self._report(usage, first, last, today) for usage in usages],
            }
        )

    @operation("Every queued and running job, without prompts (admin key)")
    async def admin_jobs(self, request: Request) -> Response:
        # The queue first, then the slots: a job taken in between shows up running. One
        # position at a time: a full queue's 500 short scripts must not take the pool.
        queued = await read_queued(self.redis, self.scheduler.max_queued)
        typical = self.typical_job_s()
        positions = await self.scheduler.positions([job.id for job in queued], typical)
        snapshot = await self.ledger.snapshot()
        return JSONResponse(jobs_list(snapshot.slots, queued, positions))

    def _report(self, usage: TeamUsage, first: date, last: date, today: date) -> dict[str, object]:
        settings = self.teams.get(usage.team)
        limits = (
            (settings.budget_usd_per_day, settings.budget_usd_per_month)
            if settings is not None
            else (None, None)
        )
        return team_report(usage, first, last, limits, today)


def _range(request: Request) -> tuple[str | None, str | None]:
    query = request.query_params
    return query.get("start") or None, query.get("end") or None
