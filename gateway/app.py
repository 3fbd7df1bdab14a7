"""`create_app(settings)`: the Starlette application with its routes, middleware and lifespan.

The process-wide resources (the store clients, one upstream HTTP client) are created in
the lifespan and closed with it; handlers receive them through their owner objects,
never through module globals.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from . import __version__
from .auth import TeamDirectory, bearer_matches
from .background import start as start_background
from .config import Settings, TeamSettings
from .downloads import DownloadBudget
from .errors import GatewayError
from .ledger import SlotLedger, Usage, read_usage
from .metrics import GatewayMetrics, QuotaGauges
from .middleware import GatewayMiddleware
from .observe import RequestRecorder
from .openapi import openapi_document, operation
from .quota import JobSlots
from .readiness import Readiness
from .registry import StoreProbe, VideoRegistry
from .reload import TeamsReloader
from .shared_read import SharedRead
from .store import StoreFailure
from .store_clients import StoreClients
from .store_failures import StoreFailures
from .tracker import Tracker
from .upstream import Upstream
from .videos import VideoRoutes

log = logging.getLogger("gateway")


def create_app(
    settings: Settings, *, redis_url: str | None = None, config_path: str | None = None
) -> ASGIApp:
    """Build the gateway.

    `redis_url` overrides the config (the embedded store's address); with `config_path`
    the teams are reloaded when that file changes or the process gets SIGHUP.
    """
    url = redis_url or settings.store.redis_url
    sentinel = settings.store.sentinel
    if url is None and sentinel is None:
        raise ValueError("no store: set store.redis_url or store.sentinel, or start one")

    stores = StoreClients.open(url, sentinel)
    metrics = GatewayMetrics(team.name for team in settings.teams)
    upstream = Upstream(
        settings.upstream,
        metrics,
        max_downloads=settings.limits.max_downloads,
        max_team_calls=settings.limits.max_team_upstream_calls,
    )
    registry = VideoRegistry(stores.registry)
    ledger = SlotLedger(
        stores.ledger,
        limit=settings.quota.max_in_flight,
        team_caps=_caps(settings.teams),
        owner=replica_id(),
        lease_s=settings.tracker.lease_s,
    )
    failures = StoreFailures(metrics)
    slots = JobSlots(ledger, metrics, wait_s=settings.quota.wait_s, failures=failures)
    tracker = Tracker(
        ledger=ledger.on(stores.tracker),
        slots=slots,
        registry=registry,
        upstream=upstream,
        poll_interval_s=settings.tracker.poll_interval_s,
        lease_s=settings.tracker.lease_s,
        max_job_s=settings.quota.max_job_s,
        # A lost create's job is listed upstream by the time its request would have
        # timed out; two more polls give a slow listing the benefit of the doubt.
        settle_after_s=settings.upstream.timeout_s + 2 * settings.tracker.poll_interval_s,
    )
    videos = VideoRoutes(
        registry=registry,
        upstream=upstream,
        slots=slots,
        downloads=DownloadBudget(settings.limits.max_downloads, settings.limits.max_team_downloads),
        max_body_bytes=settings.limits.max_body_bytes,
        body_timeout_s=settings.limits.body_timeout_s,
        client_idle_timeout_s=settings.limits.client_idle_timeout_s,
        remix_route=settings.upstream.remix_route,
    )

    # The operational routes read the store only on `stores.ops`, never on admission's
    # connections: readiness from the background check, the quota one read per scrape.
    probe = StoreProbe(stores.ops)
    readiness = Readiness(probe, failures)

    async def read_quota_once() -> Usage:
        return await read_usage(stores.ops)

    read_quota = SharedRead(read_quota_once)

    @operation("The process is alive")
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @operation("Prometheus metrics", answer="text/plain")
    async def metrics_page(request: Request) -> Response:
        expected = settings.metrics.bearer_token
        if expected is not None and not bearer_matches(request.headers, expected):
            return GatewayError(
                401, "invalid_api_key", "This page needs its bearer token."
            ).response()
        try:
            usage = await read_quota()
        except StoreFailure as exc:
            failures.count(exc, "the metrics page's quota read")
            gauges = None
        else:
            gauges = QuotaGauges(usage.in_use, ledger.limit, usage.waiting)
        return Response(metrics.exposition(gauges), media_type=CONTENT_TYPE_LATEST)

    async def store_error(request: Request, exc: Exception) -> Response:
        return failures.error(exc).response()

    @operation("Ready: config loaded, the store answering, the tracker's calls not starved")
    async def readyz(request: Request) -> Response:
        # Only what no client can cause: slow or many clients (a full api pool) would
        # fail every replica at once. That is logged, counted and alerted instead.
        if upstream.tracker_starved:
            return GatewayError(
                503, "upstream_starved", "The tracker's upstream calls are waiting for connections."
            ).response()
        if not readiness.ready():
            return readiness.error().response()
        return JSONResponse({"status": "ready"})

    teams = TeamDirectory(settings.teams)

    def apply_teams(fresh: tuple[TeamSettings, ...]) -> None:
        teams.update(fresh)
        ledger.set_caps(_caps(fresh))
        metrics.set_teams(team.name for team in fresh)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await readiness.check()
        background = [
            start_background(tracker.run(), "tracker"),
            start_background(slots.listen(ledger.releases(stores.pubsub)), "release-listener"),
            start_background(readiness.run(), "readiness"),
        ]
        await probe.warn_if_volatile()
        if config_path is not None:
            reloader = TeamsReloader(config_path, settings, apply_teams)
            background.append(start_background(reloader.watch(), "config-reloader"))
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await upstream.aclose()
            await stores.aclose()

    routes = [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
        *videos.routes(),
    ]
    document = openapi_document(routes, __version__)

    async def openapi_json(request: Request) -> Response:
        return JSONResponse(document)

    app = Starlette(
        routes=[*routes, Route("/openapi.json", openapi_json, methods=["GET"])],
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            StoreFailure: store_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    # Starlette would answer a trailing slash with a redirect built from the client's
    # own Host header; here an unknown path is simply a 404 in the envelope.
    app.router.redirect_slashes = False
    return GatewayMiddleware(app, teams, RequestRecorder(metrics))


def _caps(teams: tuple[TeamSettings, ...]) -> dict[str, int]:
    return {team.name: team.max_in_flight for team in teams if team.max_in_flight}


def replica_id() -> str:
    """Names this process in the ledger: the owner of the slots it admits and tracks."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 405:
        error = GatewayError(405, "method_not_allowed", f"{request.method} is not allowed here.")
        error.headers.update(exc.headers or {})
    elif exc.status_code == 404:
        error = GatewayError(404, "not_found", f"No route {request.url.path}.")
    else:
        error = GatewayError(exc.status_code, None, str(exc.detail))
    return error.response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return GatewayError(500, "internal_error", "The gateway failed unexpectedly.").response()
