"""The upstream client against a real HTTP server: what it keeps between requests."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

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
            reply = await upstream.calls(request_id=request_id).call("GET", "videos/video_1")
            assert reply.status == 200
    finally:
        await upstream.aclose()
    assert len(seen) == 2
    assert "cookie" not in seen[1], seen[1]


@pytest.fixture
async def content_upstream() -> AsyncIterator[str]:
    """Serves downloads of the size asked for, and a video."""

    async def content(request: web.Request) -> web.Response:
        return web.Response(body=b"v" * int(request.query["size"]), content_type="video/mp4")

    async def video(request: web.Request) -> web.Response:
        return web.json_response({"id": request.match_info["id"], "object": "video"})

    app = web.Application()
    app.router.add_get("/v1/videos/{id}/content", content)
    app.router.add_get("/v1/videos/{id}", video)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def _download(upstream: Upstream, size: int) -> tuple[bytes, int]:
    """The whole body, and the unread bytes past which aiohttp stopped reading it."""
    download = await upstream.calls(request_id="req_download").open(
        "GET", "videos/video_1/content", params={"size": str(size)}
    )
    try:
        content = download._response.content
        _, high_water = content.get_read_buffer_limits()
        # All of it in aiohttp's buffer before the first read, as when a client reads
        # slower than upstream sends.
        deadline = time.monotonic() + 5.0
        while content.total_bytes < size:
            assert time.monotonic() < deadline, f"{content.total_bytes} of {size} bytes arrived"
            await asyncio.sleep(0.01)
        return b"".join([chunk async for chunk in download.chunks()]), high_water
    finally:
        download.close()


async def test_a_pooled_connection_is_not_failed_by_the_download_it_served(content_upstream):
    """A download read after aiohttp paused it can end inside aiohttp's resume, which then
    re-armed its per-connection read timer on the connection it had just pooled: once
    that fired, the next request on it failed at once with a read timeout (a 504)."""
    timeout_s = 0.2
    upstream = Upstream(
        UpstreamSettings(content_upstream, "tok", timeout_s=timeout_s), GatewayMetrics([])
    )
    try:
        _, high_water = await _download(upstream, 1)
        # One byte past the mark: only the read carrying the body's last byte can cross
        # it, however the kernel splits the stream, so aiohttp pauses with the end of
        # the answer parsed but not yet delivered, and delivers it when the body is read.
        body, _ = await _download(upstream, high_water + 1)
        assert len(body) == high_water + 1
        # The pooled connection idles past the read timeout. Not a wait for an event:
        # the loop runs timers in deadline order, so any timer the download left armed
        # has fired by the time this one wakes.
        await asyncio.sleep(2 * timeout_s)
        reply = await upstream.calls(request_id="req_after").call("GET", "videos/video_1")
        assert reply.status == 200
        assert reply.json()["id"] == "video_1"
    finally:
        await upstream.aclose()
