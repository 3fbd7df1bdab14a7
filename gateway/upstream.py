"""The one place that talks to the upstream Videos API.

One pooled aiohttp session per process: on this path httpx costs several times more
CPU per request (README, Performance); httpx stays the client of the tests and tools,
and no other module knows which client this is. Outbound headers are built from an
allow-list and the real token is added here, so no client credential, cookie or
organisation header can reach upstream and the token can never flow back. Transport
failures become the contract's errors, each marked with whether the request may have
reached upstream (a create that may exist upstream must not invite a blind retry).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, Unpack

import aiohttp
from starlette.datastructures import Headers
from starlette.requests import Request

from .config import UpstreamSettings
from .errors import (
    GatewayError,
    UpstreamError,
    from_upstream,
    upstream_answer_timeout,
    upstream_connect_timeout,
    upstream_connection_failed,
    upstream_error,
    upstream_unreachable,
)
from .logs import note
from .metrics import GatewayMetrics
from .parse import loads_json
from .pools import API_CONNECTIONS, PoolClaim, PoolGate
from .scrub import Scrubber, url_secret

log = logging.getLogger("gateway.upstream")

# Each kind of call has a connection pool of its own, so long downloads (bounded by
# limits.max_downloads) can never take the connections that retrieves, creates and the
# tracker's polls need. The tracker polls at most 8 jobs at once (tracker.py), so no
# client can fill its pool; a team can fill at most limits.max_team_upstream_calls of
# the api pool.
Pool = Literal["api", "tracker", "download"]
TRACKER_CONNECTIONS = 16
DOWNLOAD_CHUNK_BYTES = 1 << 16

# Request headers a client may pass to upstream; everything else is dropped.
FORWARDED_REQUEST_HEADERS = ("accept", "range", "user-agent", "openai-beta", "if-range")
_FORWARDED = frozenset(name.encode() for name in FORWARDED_REQUEST_HEADERS)
# Response headers upstream may pass to the client; set-cookie and hop-by-hop never do.
FORWARDED_RESPONSE_HEADERS = (
    "content-type",
    "content-range",
    "accept-ranges",
    "content-disposition",
    "etag",
    "last-modified",
    "cache-control",
    "openai-poll-after-ms",
    "openai-processing-ms",
    "retry-after",
    "retry-after-ms",
)
STREAM_RESPONSE_HEADERS = ("content-length", "content-encoding")
# Fixed path words; any other segment is an id and becomes a placeholder in metrics.
_PATH_WORDS = frozenset({"videos", "remix", "edits", "extensions", "characters", "content"})


def _unchanged(text: str) -> str:
    return text


@dataclass
class Reply:
    """A buffered upstream answer (JSON objects are small; content is streamed instead)."""

    status: int
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    # What upstream might quote back (the token) is taken out of any error made of it.
    scrub: Callable[[str], str] = field(default=_unchanged, repr=False, compare=False)

    def json(self) -> Any:
        return loads_json(self.body)

    def raise_for_status(self) -> Reply:
        """This reply if it is a 2xx, else raise the client's error for it (as httpx's
        `Response.raise_for_status()`; see `error_from_reply`)."""
        if self.status >= 300:
            raise error_from_reply(self, self.scrub)
        return self


class Download:
    """An upstream answer whose body is streamed: status and headers first, bytes after.

    Each body read waits at most `upstream.timeout_s` for upstream; time spent while the
    gateway's own client is not reading does not count, so a slow reader is never cut.
    """

    def __init__(
        self, upstream: Upstream, response: aiohttp.ClientResponse, claim: PoolClaim
    ) -> None:
        self._upstream = upstream
        self._response = response
        self._claim = claim
        self.status = response.status
        self.headers = _lowercase(response.headers)
        # A body smaller than aiohttp's low-water mark can never pause its reader, so
        # aiohttp's own timer is safe for it (and costs nothing more); any other body's
        # reads are timed here instead (see `_take_over_read_timeout`).
        self._timed_here = not _cannot_pause(response)
        if self._timed_here:
            _take_over_read_timeout(response)

    async def chunks(self) -> AsyncGenerator[bytes, None]:
        """The raw bytes as they arrive (still content-encoded, if upstream encoded them).

        At most 64 KiB each: aiohttp's own `iter_any` hands over all it has buffered
        (often 256-384 KiB, one socket read past its high-water mark), and every chunk
        in flight to a slow reader is held by the gateway until the client takes it.
        Each read is timed here, not by aiohttp (see `_take_over_read_timeout`).
        """
        content = self._response.content
        timeout_s = self._upstream.settings.timeout_s
        try:
            while True:
                async with asyncio.timeout(timeout_s):
                    chunk = await content.read(DOWNLOAD_CHUNK_BYTES)
                if not chunk:
                    return
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._upstream.failed(exc) from None

    async def read(self) -> bytes:
        """The whole body, for the small JSON answers: aiohttp's own read, one timeout."""
        try:
            if not self._timed_here:
                return await self._response.read()
            async with asyncio.timeout(self._upstream.settings.timeout_s):
                return await self._response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise self._upstream.failed(exc) from None

    def close(self) -> None:
        """Give the connection back (closed, if its body was not read to the end)."""
        self._response.release()
        self._claim.release()


def _cannot_pause(response: aiohttp.ClientResponse) -> bool:
    """Whether the whole body fits under aiohttp's low-water mark (a known length)."""
    length = response.content_length
    low_water, _ = response.content.get_read_buffer_limits()
    return length is not None and length <= low_water


def _take_over_read_timeout(response: aiohttp.ClientResponse) -> None:
    """From the answer's head on, body reads are timed by `Download`, not by aiohttp.

    aiohttp's `sock_read` timer belongs to the pooled connection, not to the request.
    When a body aiohttp had paused (its reader slower than upstream) ends inside
    aiohttp's resume, aiohttp 3.14 re-arms that timer after it has already put the
    connection back in the pool; when it fires, the connection's next request fails at
    once with a read timeout. With the connection's read timeout off once the head has
    arrived nothing can be left armed (aiohttp's `ws_connect` hands the timeout over the
    same way); the next request on the connection sets it again.
    """
    connection = response.connection
    if connection is not None and connection.protocol is not None:
        connection.protocol.read_timeout = None


class Upstream:
    def __init__(
        self,
        settings: UpstreamSettings,
        metrics: GatewayMetrics,
        *,
        max_downloads: int = 128,
        max_team_calls: int = API_CONNECTIONS,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        if settings.auth_header == "api-key":
            self._auth = ("api-key", settings.token)
        else:
            self._auth = ("authorization", f"Bearer {settings.token}")
        # What upstream might quote back: the token, and a credential in the base URL.
        self.scrub = Scrubber([settings.token, url_secret(settings.base_url)])
        starved = metrics.upstream_pool_starved
        self._gates: dict[Pool, PoolGate] = {
            "api": PoolGate(
                "api", API_CONNECTIONS, starved=starved.labels("api"), per_team=max_team_calls
            ),
            "tracker": PoolGate("tracker", TRACKER_CONNECTIONS, starved=starved.labels("tracker")),
            "download": PoolGate("download", max_downloads, starved=starved.labels("download")),
        }
        self._sessions: dict[Pool, aiohttp.ClientSession] = {}

    @property
    def tracker_starved(self) -> bool:
        """Whether a tracker poll has waited for a connection over a second: this
        replica cannot see its jobs end. No client can fill that pool, so unlike a
        busy api pool this is the replica's own fault. Cheap, for readiness."""
        return self._gates["tracker"].starved

    def _client(self, pool: Pool) -> aiohttp.ClientSession:
        # Made on first use, inside the running loop, as aiohttp requires.
        session = self._sessions.get(pool)
        if session is None or session.closed:
            timeout = self.settings.timeout_s
            session = self._sessions[pool] = aiohttp.ClientSession(
                # The gate admits no more calls than this: aiohttp never queues.
                connector=aiohttp.TCPConnector(limit=self._gates[pool].limit, keepalive_timeout=30),
                timeout=aiohttp.ClientTimeout(
                    total=None, connect=timeout, sock_connect=timeout, sock_read=timeout
                ),
                auto_decompress=False,  # content passes through as upstream encoded it
                skip_auto_headers=("Accept-Encoding", "User-Agent", "Content-Type"),
                raise_for_status=False,
                # Upstream's cookies are nobody's: a shared jar would replay one
                # team's cookies on another team's requests.
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return session

    async def aclose(self) -> None:
        for session in self._sessions.values():
            await session.close()

    def for_request(self, request: Request) -> UpstreamCalls:
        """The calls made on behalf of one client request: its allowed headers and its
        request id are read once, and every call counts in its team's share."""
        return self.calls(
            headers=request.headers,
            request_id=request.state.request_id,
            team=request.state.team.name,
        )

    def for_stored(self, forwarded: Mapping[str, str], request_id: str | None) -> UpstreamCalls:
        """The start of a queued job: the headers its client sent (already filtered, see
        `UpstreamCalls.forwarded`), on the tracker's pool, for no team: a job that
        waited its turn must not then wait for its team's busy connections."""
        return UpstreamCalls(
            self, dict(forwarded), None, request_id, "req_gateway_", None, "tracker"
        )

    def for_tracker(self) -> UpstreamCalls:
        """The tracker's own calls: no client headers, on the pool no client can fill."""
        return self.calls(pool="tracker", request_id_prefix="req_tracker_")

    def calls(
        self,
        *,
        headers: Headers | None = None,
        request_id: str | None = None,
        team: str | None = None,
        pool: Pool = "api",
        request_id_prefix: str = "req_gateway_",
    ) -> UpstreamCalls:
        """Calls with these client `headers` (filtered by the allow-list) and this
        `request_id` (when None, a fresh one per call with `request_id_prefix`: the
        tracker's calls are told apart upstream by theirs), on `pool`."""
        forwarded: dict[str, str] = {}
        encoding: str | None = None
        for raw_name, raw_value in headers.raw if headers is not None else ():
            # One pass; the first value of each header wins.
            if raw_name in _FORWARDED:
                forwarded.setdefault(raw_name.decode("latin-1"), raw_value.decode("latin-1"))
            elif raw_name == b"accept-encoding" and encoding is None:
                encoding = raw_value.decode("latin-1")
        return UpstreamCalls(self, forwarded, encoding, request_id, request_id_prefix, team, pool)

    async def _send(
        self,
        method: str,
        path: str,
        headers: dict[str, str],
        *,
        params: Mapping[str, str] | None,
        content: bytes | AsyncIterable[bytes] | None,
        pool: Pool,
        team: str | None,
    ) -> Download:
        """Send a request on `pool`'s connections; the answer's body is not read yet.

        A `team` call counts against that team's share of the pool (429 beyond it).
        """
        name, value = self._auth
        headers[name] = value
        route = route_template(path)
        url = f"{self.settings.base_url}/{path}"
        claim = await self._gates[pool].claim(team)
        started = time.perf_counter()
        try:
            response = await self._client(pool).request(
                method, url, params=params, data=content, headers=headers,
                allow_redirects=False,
            )  # fmt: skip
        except BaseException as exc:
            claim.release()
            if isinstance(exc, aiohttp.ClientError | TimeoutError):
                raise self.failed(exc) from None
            raise
        status = response.status
        elapsed = time.perf_counter() - started
        self.metrics.upstream_answered(route, status, elapsed)
        note(upstream_status=status, upstream_ms=round(elapsed * 1000, 2))
        if status >= 500:
            self.metrics.upstream_failed("error")
        elif status == 429:
            self.metrics.upstream_failed("rate_limited")
        return Download(self, response, claim)

    def failed(self, exc: BaseException) -> UpstreamError:
        """The contract's error for a transport failure, counted by kind."""
        error = _transport_error(exc)
        self.metrics.upstream_failed(error.code.removeprefix("upstream_"))
        return error


class CallOptions(TypedDict, total=False):
    """What a JSON call may carry besides its method and path (see `UpstreamCalls.open`)."""

    params: Mapping[str, str] | None
    content: bytes | AsyncIterable[bytes] | None
    content_type: str | None
    content_length: int | None


class UpstreamCalls:
    """Calls upstream for one caller: a client request, or the tracker.

    Made by `Upstream.for_request` / `for_tracker`; holds what every call of the caller
    shares (the allowed client headers, the request id, the team whose share a call
    counts in, the pool), so no handler repeats it.
    """

    def __init__(
        self,
        upstream: Upstream,
        forwarded: dict[str, str],
        accept_encoding: str | None,
        request_id: str | None,
        id_prefix: str,
        team: str | None,
        pool: Pool,
    ) -> None:
        self.upstream = upstream
        self._forwarded = forwarded
        self._accept_encoding = accept_encoding
        self._request_id = request_id  # the caller's own, or None: a fresh one per call
        self._id_prefix = id_prefix
        self._team = team
        self._pool = pool

    @property
    def forwarded(self) -> dict[str, str]:
        """The client headers these calls send upstream (allow-listed): what a queued
        job keeps to be sent later as it would have been now."""
        return dict(self._forwarded)

    @property
    def request_id(self) -> str | None:
        return self._request_id

    async def open(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
        content_type: str | None = None,
        content_length: int | None = None,
        pass_encoding: bool = False,
        pool: Pool | None = None,
    ) -> Download:
        """Send a request; its answer's body is streamed (`Download`). With
        `pass_encoding` the client's accept-encoding goes upstream too (content passes
        through as encoded); otherwise answers arrive as plain bytes the gateway reads."""
        headers = dict(self._forwarded)
        headers["accept-encoding"] = (
            self._accept_encoding if pass_encoding and self._accept_encoding else "identity"
        )
        if isinstance(content, bytes):
            content_length = len(content)
        if content_type is not None:
            headers["content-type"] = content_type
        if content_length is not None:
            headers["content-length"] = str(content_length)
        headers["x-request-id"] = self._request_id or f"{self._id_prefix}{uuid.uuid4().hex[:16]}"
        pool = pool or self._pool
        return await self.upstream._send(
            method,
            path,
            headers,
            params=params,
            content=content,
            pool=pool,
            # Team shares are kept on the api pool; downloads have their own per-team
            # budget (downloads.py), and the tracker acts for no team.
            team=self._team if pool == "api" else None,
        )

    async def call(self, method: str, path: str, **request: Unpack[CallOptions]) -> Reply:
        """Send a request (options as `open`'s) and read the whole (small, JSON) answer."""
        download = await self.open(method, path, **request)
        try:
            body = await download.read()
        finally:
            download.close()
        return Reply(download.status, download.headers, body, self.upstream.scrub)


def route_template(path: str) -> str:
    """`videos/video_123/content` -> `/videos/{id}/content`: bounded metric labels."""
    return "/" + "/".join(s if s in _PATH_WORDS else "{id}" for s in path.strip("/").split("/"))


def _transport_error(exc: BaseException) -> UpstreamError:
    """The one place aiohttp's exceptions become the gateway's (see errors.py)."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return upstream_connect_timeout()
    if isinstance(exc, aiohttp.ClientConnectorError):
        return upstream_unreachable()
    if isinstance(exc, TimeoutError):
        return upstream_answer_timeout()
    return upstream_connection_failed()


def _lowercase(headers: Mapping[str, str]) -> dict[str, str]:
    # The first value of each header, by lower-case name (set-cookie is never read).
    lowered: dict[str, str] = {}
    for name, value in headers.items():
        lowered.setdefault(name.lower(), value)
    return lowered


def response_headers(upstream: Mapping[str, str], *, streaming: bool = False) -> dict[str, str]:
    """The upstream headers a client may see."""
    names = FORWARDED_RESPONSE_HEADERS + (STREAM_RESPONSE_HEADERS if streaming else ())
    headers = {name: upstream[name] for name in names if name in upstream}
    if "x-request-id" in upstream:
        headers["x-upstream-request-id"] = upstream["x-request-id"]
    return headers


def error_from_reply(reply: Reply, scrub: Callable[[str], str]) -> GatewayError:
    """Turn a non-2xx upstream answer into the envelope the client gets.

    4xx keep upstream's status and code. Every text field upstream wrote (message,
    type, param, code) passes `scrub`: an upstream may quote the token in any of them.
    Upstream's 401/403 mean the gateway's own
    credentials were refused: that is the operator's problem, not the caller's, and the
    message may quote the token, so it becomes a 502. 5xx become 502 `upstream_error`.
    """
    status = reply.status
    if status in (401, 403):
        return upstream_error(
            "The upstream API refused the gateway's credentials; tell the gateway's operator."
        )
    if status >= 500 or status < 400:
        return upstream_error(f"The upstream API failed with HTTP {status}.")
    error: dict[str, Any] = {}
    try:
        parsed = reply.json()
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            error = parsed["error"]
        elif isinstance(parsed, dict):
            error = {"message": parsed.get("message") or parsed.get("detail")}
    except ValueError:
        # Scrubbed before it is cut, so a cut cannot leave half a token behind.
        error = {"message": scrub(reply.body.decode("utf-8", "replace"))[:500]}
    headers = {
        name: reply.headers[name]
        for name in ("retry-after", "retry-after-ms", "content-range")
        if name in reply.headers
    }

    def text(name: str) -> str | None:
        value = error.get(name)
        return scrub(value) if isinstance(value, str) else None

    return from_upstream(
        status,
        text("code"),
        text("message") or f"The upstream API answered HTTP {status}.",
        param=text("param"),
        type=text("type") or None,
        headers=headers,
    )
