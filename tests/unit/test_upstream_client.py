"""The upstream client against a real HTTP server: what it keeps between requests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from starlette.datastructures import Headers

from gateway.config import UpstreamSettings
from gateway.metrics import GatewayMetrics
from gateway.upstream import Upstream


@pytest.fixture
async def cookie_setting_upstream() -> AsyncIterator[tuple[str, list[dict[str, str]]]]:
    """Answers every request with a Set-Cookie, and records the headers it was sent."""
    seen: list[dict[str, str]] = []

    async def video(request: web.Request) -> web.Response:
        seen.append({k.lower(): v for k, v in request.headers.items()})
        response = web.json_response({"id": request.match_info["id"], "object": "video"})
        response.set_cookie("upstream_session", "team-alpha-session")
        return response

    app = web.Application()
    app.router.add_get("/v1/videos/{id}", video)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://localhost:{port}/v1", seen  # a name: no jar keeps an IP's cookies
    finally:
        await runner.cleanup()


async def test_upstream_cookies_are_never_sent_back(cookie_setting_upstream):
    """One session serves every team: a cookie jar would replay one team's cookie on
    another team's request."""
    base_url, seen = cookie_setting_upstream
    upstream = Upstream(UpstreamSettings(base_url, "tok"), GatewayMetrics([]))
    try:
        for request_id in ("req_alpha", "req_beta"):
            reply = await upstream.call(
                "GET", "videos/video_1", inbound=Headers(), request_id=request_id
            )
            assert reply.status == 200
    finally:
        await upstream.aclose()
    assert len(seen) == 2
    assert "cookie" not in seen[1], seen[1]
