"""The operational routes: `/healthz`, `/readyz`, `/metrics` and `/openapi.json`.

None of them may be starved by clients, nor starve admission: they read the store only
on the ops client (`store_clients.OPS_POOL`), readiness from the background check and
the quota once per scrape however many scrapers ask at once.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route

from . import __version__
from .auth import bearer_matches
from .errors import invalid_api_key, upstream_starved
from .ledger import Usage
from .metrics import GatewayMetrics, QuotaGauges
from .openapi import openapi_document, operation
from .readiness import Readiness
from .shared_read import SharedRead
from .store import StoreFailure
from .store_failures import StoreFailures
from .upstream import Upstream


class OpsRoutes:
    """Health, readiness, metrics and the API description of one replica."""

    def __init__(
        self,
        *,
        metrics: GatewayMetrics,
        failures: StoreFailures,
        readiness: Readiness,
        upstream: Upstream,
        read_usage: Callable[[], Awaitable[Usage]],
        slot_limit: int,
        bearer_token: str | None,
        read_budgets: Callable[[], Awaitable[dict[str, float]]] | None = None,
    ) -> None:
        self.metrics = metrics
        self.failures = failures
        self.readiness = readiness
        self.upstream = upstream
        self.slot_limit = slot_limit
        self.bearer_token = bearer_token
        # Concurrent scrapes share one read of the quota (on the ops client).
        self._read_quota = SharedRead(read_usage)
        self._read_budgets = SharedRead(read_budgets) if read_budgets else None
        self._document: dict[str, Any] = {}

    def routes(self) -> list[Route]:
        return [
            Route("/healthz", self.healthz, methods=["GET"]),
            Route("/readyz", self.readyz, methods=["GET"]),
            Route("/metrics", self.metrics_page, methods=["GET"]),
        ]

    def describe(self, routes: Iterable[BaseRoute]) -> Route:
        """The `/openapi.json` route, describing `routes` (built once, served as is)."""
        self._document = openapi_document(routes, __version__)
        return Route("/openapi.json", self.openapi_json, methods=["GET"])

    @operation("The process is alive")
    async def healthz(self, request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @operation("Ready: config loaded, the store answering, the tracker's calls not starved")
    async def readyz(self, request: Request) -> Response:
        # Only what no client can cause: slow or many clients (a full api pool) would
        # fail every replica at once. That is logged, counted and alerted instead.
        if self.upstream.tracker_starved:
            return upstream_starved().response()
        if not self.readiness.ready():
            return self.readiness.error().response()
        return JSONResponse({"status": "ready"})

    @operation("Prometheus metrics", answer="text/plain")
    async def metrics_page(self, request: Request) -> Response:
        expected = self.bearer_token
        if expected is not None and not bearer_matches(request.headers, expected):
            return invalid_api_key("This page needs its bearer token.").response()
        try:
            usage: Usage = await self._read_quota()
            budgets = await self._read_budgets() if self._read_budgets else {}
        except StoreFailure as exc:
            self.failures.count(exc, "the metrics page's quota read")
            gauges = None
        else:
            gauges = QuotaGauges(
                usage.in_use, self.slot_limit, usage.waiting, usage.queued, budgets=budgets
            )
        return Response(self.metrics.exposition(gauges), media_type=CONTENT_TYPE_LATEST)

    async def openapi_json(self, request: Request) -> Response:
        return JSONResponse(self._document)
