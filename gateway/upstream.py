"""The one place that talks to the upstream Videos API.

One pooled `httpx.AsyncClient` per process. Outbound headers are built from an
allow-list and the real token is added here, so no client credential, cookie or
organisation header can reach upstream and the token can never flow back. Transport
failures become the contract's errors, each marked with whether the request may have
reached upstream (a create that may exist upstream must not invite a blind retry).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.datastructures import Headers

from .config import UpstreamSettings
from .errors import GatewayError
from .logs import note
from .metrics import GatewayMetrics

# Request headers a client may pass to upstream; everything else is dropped.
FORWARDED_REQUEST_HEADERS = ("accept", "range", "user-agent", "openai-beta", "if-range")
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


class UpstreamError(GatewayError):
    """A failure reaching upstream; `maybe_sent` tells whether upstream may have acted on it."""

    def __init__(self, status: int, code: str, message: str, *, maybe_sent: bool) -> None:
        super().__init__(status, code, message, type="upstream_error")
        self.maybe_sent = maybe_sent


@dataclass
class Reply:
    """A buffered upstream answer (JSON objects are small; content is streamed instead)."""

    status: int
    headers: httpx.Headers
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Upstream:
    def __init__(
        self,
        settings: UpstreamSettings,
        metrics: GatewayMetrics,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        if settings.auth_header == "api-key":
            self._auth = ("api-key", settings.token)
        else:
            self._auth = ("authorization", f"Bearer {settings.token}")
        self._client = httpx.AsyncClient(
            base_url=settings.base_url + "/",
            timeout=httpx.Timeout(settings.timeout_s),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
            follow_redirects=False,
            transport=transport,
        )

    async def aclose(self) -> None:
        await self._client.aclose()

    def _headers(
        self,
        inbound: Headers,
        request_id: str,
        *,
        content_type: str | None,
        content_length: int | None,
        pass_encoding: bool,
    ) -> dict[str, str]:
        headers = {name: inbound[name] for name in FORWARDED_REQUEST_HEADERS if name in inbound}
        if pass_encoding and "accept-encoding" in inbound:
            headers["accept-encoding"] = inbound["accept-encoding"]
        else:
            # Bodies the gateway reads must arrive as plain bytes it can parse.
            headers["accept-encoding"] = "identity"
        if content_type is not None:
            headers["content-type"] = content_type
        if content_length is not None:
            headers["content-length"] = str(content_length)
        headers["x-request-id"] = request_id
        name, value = self._auth
        headers[name] = value
        return headers

    async def open(
        self,
        method: str,
        path: str,
        *,
        inbound: Headers,
        request_id: str,
        params: Mapping[str, str] | None = None,
        content: bytes | AsyncIterable[bytes] | None = None,
        content_type: str | None = None,
        content_length: int | None = None,
        pass_encoding: bool = False,
    ) -> httpx.Response:
        """Send a request and return the response with its body not yet read."""
        if isinstance(content, bytes):
            content_length = len(content)
        request = self._client.build_request(
            method,
            path,
            params=params,
            content=content,
            headers=self._headers(
                inbound,
                request_id,
                content_type=content_type,
                content_length=content_length,
                pass_encoding=pass_encoding,
            ),
        )
        route = route_template(path)
        started = time.perf_counter()
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise self.failed(exc) from None
        status = response.status_code
        elapsed = time.perf_counter() - started
        self.metrics.upstream_duration.labels(route, str(status)).observe(elapsed)
        note(upstream_status=status, upstream_ms=round(elapsed * 1000, 2))
        if status >= 500:
            self.metrics.upstream_errors.labels("error").inc()
        elif status == 429:
            self.metrics.upstream_errors.labels("rate_limited").inc()
        return response

    async def call(self, method: str, path: str, **kwargs: Any) -> Reply:
        """Send a request and read the whole answer."""
        response = await self.open(method, path, **kwargs)
        try:
            body = await response.aread()
        except httpx.HTTPError as exc:
            raise self.failed(exc) from None
        finally:
            await response.aclose()
        return Reply(response.status_code, response.headers, body)

    def failed(self, exc: httpx.HTTPError) -> UpstreamError:
        """The contract's error for a transport failure, counted by kind."""
        error = _transport_error(exc)
        self.metrics.upstream_errors.labels(error.code.removeprefix("upstream_")).inc()
        return error

    def scrub(self, text: str) -> str:
        """Remove the token from text that came from upstream, in case it quotes it."""
        return text.replace(self.settings.token, "***") if self.settings.token else text


def route_template(path: str) -> str:
    """`videos/video_123/content` -> `/videos/{id}/content`: bounded metric labels."""
    return "/" + "/".join(s if s in _PATH_WORDS else "{id}" for s in path.strip("/").split("/"))


def _transport_error(exc: httpx.HTTPError) -> UpstreamError:
    if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
        return UpstreamError(
            504, "upstream_timeout", "Timed out connecting to the upstream API.", maybe_sent=False
        )
    if isinstance(exc, httpx.ConnectError):
        return UpstreamError(
            502, "upstream_unavailable", "The upstream API is unreachable.", maybe_sent=False
        )
    if isinstance(exc, httpx.TimeoutException):
        return UpstreamError(
            504, "upstream_timeout", "The upstream API did not answer in time.", maybe_sent=True
        )
    return UpstreamError(
        502, "upstream_error", "The connection to the upstream API failed.", maybe_sent=True
    )


def response_headers(upstream: httpx.Headers, *, streaming: bool = False) -> dict[str, str]:
    """The upstream headers a client may see."""
    names = FORWARDED_RESPONSE_HEADERS + (STREAM_RESPONSE_HEADERS if streaming else ())
    headers = {name: upstream[name] for name in names if name in upstream}
    if "x-request-id" in upstream:
        headers["x-upstream-request-id"] = upstream["x-request-id"]
    return headers


def error_from_reply(reply: Reply, scrub: Any) -> GatewayError:
    """Turn a non-2xx upstream answer into the envelope the client gets.

    4xx keep upstream's status and code. Upstream's 401/403 mean the gateway's own
    credentials were refused: that is the operator's problem, not the caller's, and the
    message may quote the token, so it becomes a 502. 5xx become 502 `upstream_error`.
    """
    status = reply.status
    if status in (401, 403):
        return GatewayError(
            502,
            "upstream_error",
            "The upstream API refused the gateway's credentials; tell the gateway's operator.",
            type="upstream_error",
        )
    if status >= 500 or status < 400:
        return GatewayError(
            502,
            "upstream_error",
            f"The upstream API failed with HTTP {status}.",
            type="upstream_error",
        )
    error: dict[str, Any] = {}
    try:
        parsed = reply.json()
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
            error = parsed["error"]
        elif isinstance(parsed, dict):
            error = {"message": parsed.get("message") or parsed.get("detail")}
    except ValueError:
        error = {"message": reply.body[:500].decode("utf-8", "replace")}
    headers = {
        name: reply.headers[name]
        for name in ("retry-after", "retry-after-ms", "content-range")
        if name in reply.headers
    }
    return GatewayError(
        status,
        _text(error.get("code")),
        scrub(_text(error.get("message")) or f"The upstream API answered HTTP {status}."),
        param=_text(error.get("param")),
        type=_text(error.get("type")) or None,
        headers=headers,
    )


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
