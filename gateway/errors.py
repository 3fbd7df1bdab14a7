"""Every error a client can be answered with, in one catalogue, in the OpenAI envelope.

SDKs map the status to an exception class and read `error.code`, so the code is the
contract; the message is for the human reading the exception. Each code below has
one factory, and nowhere else writes a code:

    400 invalid_request                  invalid_request(message, param)
    400 invalid_video_id                 source_unknown(param)
    400 video_not_completed              source_not_completed(status, param),
                                         video_not_ready(video_id, status)
    400 video_expired                    source_expired(param)
    400 model_not_allowed                model_not_allowed(message)
    400 size_not_allowed                 size_not_allowed(message)
    400 seconds_not_allowed              seconds_not_allowed(message)
    401 invalid_api_key                  invalid_api_key(message)
    404 video_not_found                  video_not_found()
    404 character_not_found              character_not_found()
    404 not_found                        route_not_found(message)
    405 method_not_allowed               method_not_allowed(method)
    408 request_timeout                  request_timeout(seconds)
    413 request_too_large                request_too_large(limit)
    429 concurrency_limit_exceeded       concurrency_limit_exceeded(retry_s)
    429 team_concurrency_limit_exceeded  team_concurrency_limit_exceeded(retry_s)
    429 queue_full                       queue_full(retry_s)
    429 team_queue_full                  team_queue_full(retry_s)
    429 budget_exceeded                  budget_exceeded(message)  (x-should-retry: false)
    429 upstream_rate_limited            upstream_rate_limited(headers)
    429 too_many_requests                too_many_requests(retry_after_s)
    429 too_many_downloads               too_many_downloads(message, retry_after_s)
    431 request_header_fields_too_large  request_header_fields_too_large()
    499 client_disconnected              client_disconnected()
    500 internal_error                   internal_error()
    502 upstream_error                   upstream_error(message), upstream_connection_failed()
    502 upstream_unavailable             upstream_unreachable()
    503 store_unavailable                store_unavailable()
    503 store_busy                       store_busy()
    503 upstream_starved                 upstream_starved()
    504 upstream_timeout                 upstream_connect_timeout(), upstream_answer_timeout()
    4xx upstream's own code              from_upstream(...)  (passed through, scrubbed)
    any other status the server raises   http_error(status, message)  (code null)

One code is no HTTP answer but a failed video's `error.code`: QUEUE_TIMEOUT
(`queue_timeout`), a queued job that waited past `quota.max_queue_s` (CONTRACT §8).

The four transport failures are `UpstreamError`s, which also say whether the request
may have reached upstream (`maybe_sent`); upstream.py maps aiohttp's exceptions to them.
`no_retry` is a property of an error, not a header a caller remembers to add: an error
answered after upstream may have started a job says `x-should-retry: false`, because
the SDKs would otherwise retry the create and pay for a duplicate job.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from starlette.responses import Response

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    431: "invalid_request_error",
    429: "rate_limit_error",
}
UPSTREAM_TYPE = "upstream_error"
# The header the OpenAI SDKs obey over their own retry rules.
NO_RETRY = {"x-should-retry": "false"}
# The `error.code` of a queued job that waited past quota.max_queue_s: the video is
# `failed` with it (a retrieve answers 200 with that error), no request is refused.
QUEUE_TIMEOUT = "queue_timeout"


class GatewayError(Exception):
    """A refusal with its HTTP status and OpenAI error code; raised anywhere, rendered once."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        param: str | None = None,
        type: str | None = None,
        headers: Mapping[str, str] | None = None,
        no_retry: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "api_error")
        self._headers = dict(headers or {})
        self.no_retry = no_retry

    @property
    def headers(self) -> dict[str, str]:
        """The answer's headers (a copy), with `x-should-retry: false` when `no_retry`."""
        return {**self._headers, **NO_RETRY} if self.no_retry else dict(self._headers)

    def envelope(self) -> dict[str, dict[str, str | None]]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        return Response(
            json.dumps(self.envelope()).encode(),
            status_code=self.status,
            headers=self.headers,
            media_type="application/json",
        )


class UpstreamError(GatewayError):
    """A failure reaching upstream; `maybe_sent` tells whether upstream may have acted on it."""

    code: str  # always set: the metrics label is made from it

    def __init__(self, status: int, code: str, message: str, *, maybe_sent: bool) -> None:
        super().__init__(status, code, message, type=UPSTREAM_TYPE)
        self.maybe_sent = maybe_sent


def _retry_headers(seconds: float) -> dict[str, str]:
    return {"retry-after": str(math.ceil(seconds)), "retry-after-ms": str(int(seconds * 1000))}


# -- 4xx: the request, as sent, is refused --------------------------------------------------


def invalid_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request", message, param=param)


def source_unknown(param: str) -> GatewayError:
    return GatewayError(
        400, "invalid_video_id", "The source video is unknown to this team.", param=param
    )


def source_not_completed(status: str, param: str) -> GatewayError:
    return GatewayError(
        400,
        "video_not_completed",
        f"The source video is {status or 'not completed'}; only a completed video can be used.",
        param=param,
    )


def video_not_ready(video_id: str, status: str) -> GatewayError:
    """Content of a job that has not started yet (it waits in the gateway's queue)."""
    return GatewayError(
        400, "video_not_completed", f"Video '{video_id}' is {status}; no content yet."
    )


def source_expired(param: str) -> GatewayError:
    return GatewayError(400, "video_expired", "The source video has expired.", param=param)


def model_not_allowed(message: str) -> GatewayError:
    """CONTRACT §9: a model outside the team's list, or with no price."""
    return GatewayError(400, "model_not_allowed", message, param="model")


def size_not_allowed(message: str) -> GatewayError:
    """CONTRACT §9: a size outside the team's list, or with no price for the model."""
    return GatewayError(400, "size_not_allowed", message, param="size")


def seconds_not_allowed(message: str) -> GatewayError:
    """CONTRACT §9: a job longer than the team's max_seconds."""
    return GatewayError(400, "seconds_not_allowed", message, param="seconds")


def invalid_api_key(message: str) -> GatewayError:
    return GatewayError(401, "invalid_api_key", message)


def video_not_found() -> GatewayError:
    # One message for "unknown" and "another team's": the two must be indistinguishable.
    return GatewayError(404, "video_not_found", "No video with that id was found.")


def character_not_found() -> GatewayError:
    return GatewayError(404, "character_not_found", "No character with that id was found.")


def route_not_found(message: str) -> GatewayError:
    return GatewayError(404, "not_found", message)


def method_not_allowed(method: str, headers: Mapping[str, str] | None = None) -> GatewayError:
    return GatewayError(
        405, "method_not_allowed", f"{method} is not allowed here.", headers=headers
    )


def request_timeout(seconds: float) -> GatewayError:
    return GatewayError(
        408, "request_timeout", f"The request body did not arrive within {seconds:g} s."
    )


def request_too_large(limit: int) -> GatewayError:
    return GatewayError(413, "request_too_large", f"The request body is larger than {limit} bytes.")


def request_header_fields_too_large() -> GatewayError:
    return GatewayError(
        431, "request_header_fields_too_large", "The request headers are too large."
    )


def client_disconnected() -> GatewayError:
    # Nobody will read this answer; it only ends the request quietly.
    return GatewayError(499, "client_disconnected", "The client went away.")


def http_error(status: int, message: str) -> GatewayError:
    """A status the HTTP layer itself raised, for which no code is defined."""
    return GatewayError(status, None, message)


# -- 429: not now ---------------------------------------------------------------------------


def concurrency_limit_exceeded(retry_s: float) -> GatewayError:
    return GatewayError(
        429,
        "concurrency_limit_exceeded",
        "All shared video job slots are busy; try again later.",
        headers=_retry_headers(retry_s),
    )


def team_concurrency_limit_exceeded(retry_s: float) -> GatewayError:
    return GatewayError(
        429,
        "team_concurrency_limit_exceeded",
        "Your team already runs as many video jobs as it may; try again later.",
        headers=_retry_headers(retry_s),
    )


def queue_full(retry_s: float) -> GatewayError:
    return GatewayError(
        429,
        "queue_full",
        "The gateway's job queue is full; try again later.",
        headers=_retry_headers(retry_s),
    )


def team_queue_full(retry_s: float) -> GatewayError:
    return GatewayError(
        429,
        "team_queue_full",
        "Your team already has as many video jobs queued as it may; "
        "try again when one has started.",
        headers=_retry_headers(retry_s),
    )


def budget_exceeded(message: str) -> GatewayError:
    """CONTRACT §9: the job would pass the team's budget. No retry-after, and the SDKs
    told not to retry: the same job is refused again until the budget resets, and the
    message says when."""
    return GatewayError(429, "budget_exceeded", message, no_retry=True)


def upstream_rate_limited(upstream_headers: Mapping[str, str]) -> GatewayError:
    """Upstream's own limit; its retry hints are passed on (one second if it gave none)."""
    headers = {
        name: upstream_headers[name]
        for name in ("retry-after", "retry-after-ms")
        if name in upstream_headers
    }
    headers.setdefault("retry-after", "1")
    return GatewayError(
        429,
        "upstream_rate_limited",
        "The upstream API is at its concurrency limit; try again shortly.",
        headers=headers,
    )


def too_many_requests(retry_after_s: int) -> GatewayError:
    return GatewayError(
        429,
        "too_many_requests",
        "Your team has too many upstream calls in progress on this replica; "
        "try again when one has finished.",
        headers={"retry-after": str(retry_after_s)},
    )


def too_many_downloads(message: str, retry_after_s: int) -> GatewayError:
    return GatewayError(
        429,
        "too_many_downloads",
        f"{message} Try again when one has finished.",
        headers={"retry-after": str(retry_after_s)},
    )


# -- 5xx: the gateway or what stands behind it failed ---------------------------------------


def internal_error() -> GatewayError:
    return GatewayError(500, "internal_error", "The gateway failed unexpectedly.")


def upstream_error(message: str, *, no_retry: bool = False) -> GatewayError:
    """Upstream answered, but not something the gateway can pass on (5xx, not JSON...)."""
    return GatewayError(502, "upstream_error", message, type=UPSTREAM_TYPE, no_retry=no_retry)


def upstream_connect_timeout() -> UpstreamError:
    return UpstreamError(
        504, "upstream_timeout", "Timed out connecting to the upstream API.", maybe_sent=False
    )


def upstream_unreachable() -> UpstreamError:
    return UpstreamError(
        502, "upstream_unavailable", "The upstream API is unreachable.", maybe_sent=False
    )


def upstream_answer_timeout() -> UpstreamError:
    return UpstreamError(
        504, "upstream_timeout", "The upstream API did not answer in time.", maybe_sent=True
    )


def upstream_connection_failed() -> UpstreamError:
    return UpstreamError(
        502, "upstream_error", "The connection to the upstream API failed.", maybe_sent=True
    )


def from_upstream(
    status: int,
    code: str | None,
    message: str,
    *,
    param: str | None,
    type: str | None,
    headers: Mapping[str, str],
) -> GatewayError:
    """Upstream's own 4xx refusal, passed on with its status and code (already scrubbed)."""
    return GatewayError(status, code, message, param=param, type=type, headers=headers)


def store_unavailable() -> GatewayError:
    return GatewayError(
        503,
        "store_unavailable",
        "The gateway's shared store is unreachable; try again shortly.",
        headers={"retry-after": "1"},
    )


def store_busy() -> GatewayError:
    # This replica had no free store connection for a moment; the store itself is up.
    return GatewayError(
        503,
        "store_busy",
        "The gateway is busy; try again shortly.",
        headers={"retry-after": "1"},
    )


def upstream_starved() -> GatewayError:
    return GatewayError(
        503, "upstream_starved", "The tracker's upstream calls are waiting for connections."
    )
