"""The OpenAI error envelope: every failure the gateway answers looks like one of OpenAI's.

SDKs map the status to an exception class and read `error.code`, so the code is the
contract; the message is for the human reading the exception.
"""

from __future__ import annotations

import json
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
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "api_error")
        self.headers = dict(headers or {})

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


def invalid_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request", message, param=param)


def video_not_found() -> GatewayError:
    # One message for "unknown" and "another team's": the two must be indistinguishable.
    return GatewayError(404, "video_not_found", "No video with that id was found.")


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
