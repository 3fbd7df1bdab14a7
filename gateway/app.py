"""`create_app(settings)`: one replica's parts, wired, as an ASGI application.

`Gateway` owns the process-wide resources (the store clients, the upstream client, the
tracker and the other background tasks) and their life: they are made with it, started
in the lifespan and closed with it. Handlers receive them through their owner objects
(`VideoRoutes`, `OpsRoutes`), never through module globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator
from functools import partial

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp

from .auth import AdminKeys, TeamDirectory
from .background import start as start_background
from .budgets import Limits, periods, read_ratios
from .config import Settings, TeamSettings
from .costs import JobCosts
from .dispatcher import Dispatcher
from .downloads import DownloadBudget
from .errors import (
    GatewayError,
    http_error,
    internal_error,
    method_not_allowed,
    route_not_found,
)
from .ledger import SlotLedger, read_usage
from .metrics import GatewayMetrics
from .middleware import GatewayMiddleware
from .observe import RequestRecorder
from .ops import OpsRoutes
from .quota import JobSlots
from .readiness import Readiness
from .registry import StoreProbe, VideoRegistry
from .reload import TeamsReloader
from .scheduler import Scheduler
from .store import StoreFailure
from .store_clients import StoreClients
from .store_failures import StoreFailures
from .tracker import Tracker
from .upstream import Upstream
from .usage_routes import UsageRoutes
from .videos import QueueMode, VideoRoutes

log = logging.getLogger("gateway")


def create_app(
    settings: Settings, *, redis_url: str | None = None, config_path: str | None = None
) -> ASGIApp:
    """Build the gateway.

    `redis_url` overrides the config (the embedded store's address); with `config_path`
    the teams are reloaded when that file changes or the process gets SIGHUP.
    """
    return Gateway(settings, redis_url=redis_url, config_path=config_path).asgi()


class Gateway:
    """One replica: its store clients, upstream client, slots, tracker and routes."""

    def __init__(
        self, settings: Settings, *, redis_url: str | None = None, config_path: str | None = None
    ) -> None:
        url = redis_url or settings.store.redis_url
        if url is None and settings.store.sentinel is None:
            raise ValueError("no store: set store.redis_url or store.sentinel, or start one")
        self.settings = settings
        self.config_path = config_path
        self.stores = StoreClients.open(url, settings.store.sentinel)
        self.metrics = GatewayMetrics(team.name for team in settings.teams)
        self.failures = StoreFailures(self.metrics)
        self.teams = TeamDirectory(settings.teams)
        limits = settings.limits
        self.upstream = Upstream(
            settings.upstream,
            self.metrics,
            max_downloads=limits.max_downloads,
            max_team_calls=limits.max_team_upstream_calls,
        )
        self.registry = VideoRegistry(self.stores.registry)
        quota = settings.quota
        self.ledger = SlotLedger(
            self.stores.ledger,
            limit=quota.max_in_flight,
            team_caps=_caps(settings.teams),
            owner=replica_id(),
            lease_s=settings.tracker.lease_s,
            team_weights=_weights(settings.teams),
            fair_window_s=quota.fair_window_s,
        )
        self.slots = JobSlots(
            self.ledger, self.metrics, wait_s=quota.wait_s, failures=self.failures
        )
        self.scheduler = Scheduler(
            self.stores.ledger,
            self.ledger,
            max_queued=quota.max_queued,
            team_max_queued=_queue_caps(settings.teams),
        )
        # Every replica runs a dispatcher, whatever its mode: queued jobs (from another
        # replica, or from before a reload to `wait`) are started all the same.
        self.dispatcher = Dispatcher(
            scheduler=self.scheduler.on(self.stores.tracker),
            slots=self.slots,
            registry=self.registry,
            upstream=self.upstream,
            metrics=self.metrics,
            max_queue_s=quota.max_queue_s,
        )
        self.tracker = self._tracker()
        # The operational routes read the store only on `stores.ops`, never on
        # admission's connections.
        self.probe = StoreProbe(self.stores.ops)
        self.readiness = Readiness(self.probe, self.failures)
        self.admins = AdminKeys(settings.admin.key_sha256)
        self.videos = self._video_routes()
        self.ops = OpsRoutes(
            metrics=self.metrics,
            failures=self.failures,
            readiness=self.readiness,
            upstream=self.upstream,
            read_usage=partial(read_usage, self.stores.ops),
            slot_limit=self.ledger.limit,
            bearer_token=settings.metrics.bearer_token,
            read_budgets=self._read_budgets,
        )
        self.metrics.set_models(_models(settings))
        # Usage reports and the admin job list read on the registry's client: an
        # operator's report never holds the connections admission needs.
        self.usage = UsageRoutes(
            redis=self.stores.registry,
            ledger=self.ledger.on(self.stores.registry),
            scheduler=self.scheduler.on(self.stores.registry),
            teams=settings.teams,
            typical_job_s=lambda: self.slots.typical_job_s,
        )

    def _video_routes(self) -> VideoRoutes:
        limits = self.settings.limits
        return VideoRoutes(
            registry=self.registry,
            upstream=self.upstream,
            slots=self.slots,
            downloads=DownloadBudget(limits.max_downloads, limits.max_team_downloads),
            metrics=self.metrics,
            failures=self.failures,
            max_body_bytes=limits.max_body_bytes,
            body_timeout_s=limits.body_timeout_s,
            client_idle_timeout_s=limits.client_idle_timeout_s,
            remix_route=self.settings.upstream.remix_route,
            costs=JobCosts(
                pricing=self.settings.pricing,
                defaults=self.settings.upstream.defaults,
                retention_days=self.settings.usage.retention_days,
                metrics=self.metrics,
            ),
            queue=self._queue_mode(),
        )

    def _queue_mode(self) -> QueueMode | None:
        quota = self.settings.quota
        if quota.when_full != "queue":
            return None
        defaults = self.settings.upstream.defaults
        return QueueMode(
            scheduler=self.scheduler,
            max_body_bytes=quota.max_queued_body_bytes,
            defaults={"model": defaults.model, "size": defaults.size, "seconds": defaults.seconds},
        )

    def _tracker(self) -> Tracker:
        tracker = self.settings.tracker
        return Tracker(
            ledger=self.ledger.on(self.stores.tracker),
            slots=self.slots,
            registry=self.registry,
            upstream=self.upstream,
            poll_interval_s=tracker.poll_interval_s,
            lease_s=tracker.lease_s,
            max_job_s=self.settings.quota.max_job_s,
            # A lost create's job is listed upstream by the time its request would have
            # timed out; two more polls give a slow listing the benefit of the doubt.
            settle_after_s=self.settings.upstream.timeout_s + 2 * tracker.poll_interval_s,
            queue=self.dispatcher,
        )

    def asgi(self) -> ASGIApp:
        """The Starlette app with every route, behind the gateway's middleware."""
        routes = [*self.ops.routes(), *self.videos.routes(), *self.usage.routes()]
        store_error = self._store_error
        app = Starlette(
            routes=[*routes, self.ops.describe(routes)],
            exception_handlers={
                GatewayError: _gateway_error,
                HTTPException: _http_error,
                StoreFailure: store_error,
                Exception: _internal_error,
            },
            lifespan=self.lifespan,
        )
        # Starlette would answer a trailing slash with a redirect built from the client's
        # own Host header; here an unknown path is simply a 404 in the envelope.
        app.router.redirect_slashes = False
        return GatewayMiddleware(app, self.teams, RequestRecorder(self.metrics), self.admins)

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        """Start the background tasks once the first readiness check has run; on the
        way out stop them, then close the clients they use."""
        await self.readiness.check()
        background = [
            start_background(self.tracker.run(), "tracker"),
            start_background(
                self.slots.listen(self.ledger.releases(self.stores.pubsub)), "release-listener"
            ),
            start_background(self.readiness.run(), "readiness"),
        ]
        dispatching = start_background(self.dispatcher.run(), "dispatcher")
        await self.probe.warn_if_volatile()
        if self.config_path is not None:
            reloader = TeamsReloader(
                self.config_path, self.settings, self.apply_teams, self.apply_policy
            )
            background.append(start_background(reloader.watch(), "config-reloader"))
        try:
            yield
        finally:
            # No new starts; the queued jobs this replica is sending get upstream's
            # answer while the tracker still renews their slots (a start cut off here,
            # or one whose lease ran out, would be settled elsewhere as a lost start).
            dispatching.cancel()
            await asyncio.gather(dispatching, return_exceptions=True)
            await self.dispatcher.drain(self.settings.upstream.timeout_s)
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.upstream.aclose()
            await self.stores.aclose()

    def apply_teams(self, fresh: tuple[TeamSettings, ...]) -> None:
        """A reloaded config's teams: their keys, caps and metric labels, at once."""
        self.teams.update(fresh)
        self.ledger.set_caps(_caps(fresh), _weights(fresh))
        self.scheduler.set_team_limits(_queue_caps(fresh))
        self.metrics.set_teams(team.name for team in fresh)
        self.usage.set_teams(fresh)

    def apply_policy(self, fresh: Settings) -> None:
        """A reloaded config's prices, admin keys and upstream defaults, at once."""
        self.settings = fresh
        self.videos.costs.reprice(fresh.pricing, fresh.upstream.defaults)
        self.admins.update(fresh.admin.key_sha256)
        self.metrics.set_models(_models(fresh))

    async def _read_budgets(self) -> dict[str, float]:
        """Each budgeted team's `budget_used_ratio`, read from the store at scrape."""
        limits = {}
        for team in self.teams.settings():
            budget = Limits.of(team.budget_usd_per_day, team.budget_usd_per_month)
            if budget is not None:
                limits[team.name] = budget
        if not limits:
            return {}
        day, month = periods(time.time())
        return await read_ratios(self.stores.ops, limits, day, month)

    async def _store_error(self, request: Request, exc: Exception) -> Response:
        return self.failures.error(exc).response()


def _models(settings: Settings) -> list[str]:
    """The model label values the spend metrics may take (others are `other`)."""
    models = list(settings.pricing)
    if settings.upstream.defaults.model:
        models.append(settings.upstream.defaults.model)
    return models


def _caps(teams: tuple[TeamSettings, ...]) -> dict[str, int]:
    return {team.name: team.max_in_flight for team in teams if team.max_in_flight}


def _weights(teams: tuple[TeamSettings, ...]) -> dict[str, float]:
    return {team.name: team.weight for team in teams if team.weight != 1.0}


def _queue_caps(teams: tuple[TeamSettings, ...]) -> dict[str, int]:
    return {team.name: team.max_queued for team in teams if team.max_queued is not None}


def replica_id() -> str:
    """Names this process in the ledger: the owner of the slots it admits and tracks."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        error = method_not_allowed(request.method, exc.headers)
    elif exc.status_code == 404:
        error = route_not_found(f"No route {request.url.path}.")
    else:
        error = http_error(exc.status_code, str(exc.detail))
    return error.response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return internal_error().response()
