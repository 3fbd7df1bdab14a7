"""`create_app(settings)`: the Starlette application with its routes, middleware and lifespan.

The process-wide resources (one Redis client, one upstream HTTP client) are created in
the lifespan and closed with it; handlers receive them through their owner objects,
never through module globals.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

import redis.exceptions
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from .auth import TeamDirectory
from .config import Settings
from .errors import GatewayError, store_unavailable
from .middleware import RequestIdMiddleware, TeamAuthMiddleware
from .registry import VideoRegistry
from .store import connect
from .upstream import Upstream
from .videos import VideoRoutes

log = logging.getLogger("gateway")

STORE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)


def create_app(settings: Settings, *, redis_url: str | None = None) -> ASGIApp:
    """Build the gateway. `redis_url` overrides the config (the embedded store's address)."""
    url = redis_url or settings.store.redis_url
    if url is None:
        raise ValueError("no store URL: set store.redis_url or start the embedded store")
    store = connect(url)
    upstream = Upstream(settings.upstream)
    videos = VideoRoutes(
        registry=VideoRegistry(store),
        upstream=upstream,
        max_body_bytes=settings.limits.max_body_bytes,
        remix_route=settings.upstream.remix_route,
    )

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        try:
            await store.ping()
        except (*STORE_ERRORS, OSError):
            return store_unavailable().response()
        return JSONResponse({"status": "ready"})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await upstream.aclose()
            await store.aclose()

    app = Starlette(
        routes=[
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
            *videos.routes(),
        ],
        exception_handlers={
            GatewayError: _gateway_error,
            HTTPException: _http_error,
            redis.exceptions.ConnectionError: _store_error,
            redis.exceptions.TimeoutError: _store_error,
            Exception: _internal_error,
        },
        lifespan=lifespan,
    )
    return RequestIdMiddleware(TeamAuthMiddleware(app, TeamDirectory(settings.teams)))


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


async def _store_error(request: Request, exc: Exception) -> Response:
    log.warning("store unreachable: %s", type(exc).__name__)
    return store_unavailable().response()


async def _internal_error(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return GatewayError(500, "internal_error", "The gateway failed unexpectedly.").response()
