"""The door of /v1: log the request, apply latency and fail_next, then check the credential.

A pure ASGI middleware, so streamed downloads pass through untouched and latency can be
added just before the answer starts (after the work is done, as on a slow network).
"""

from __future__ import annotations

import asyncio
import hmac
import uuid

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .jobs import SimError
from .state import SimulatorState


def is_v1(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def error_response(error: SimError) -> JSONResponse:
    return JSONResponse(error.envelope(), status_code=error.status, headers=error.headers)


class V1Gate:
    """Every /v1 request is recorded, may be delayed or failed, and must authenticate."""

    def __init__(self, app: ASGIApp, sim: SimulatorState) -> None:
        self.app = app
        self.sim = sim

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_v1(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        self.sim.traffic.record(
            scope["method"], scope["path"], scope["query_string"].decode("latin-1"), headers
        )
        send = self._delayed(send)
        refusal = self._refusal(headers)
        if refusal is not None:
            await error_response(refusal)(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, headers: dict[str, str]) -> SimError | None:
        """fail_next first (it does nothing at all), then the credential."""
        if self.sim.faults.take("fail_next"):
            return SimError(
                500,
                "internal_error",
                "The server had an error while processing your request (simulated).",
                type="server_error",
            )
        presented = self._credential(headers)
        expected = self.sim.settings.token
        if presented is not None and (
            expected is None or hmac.compare_digest(presented.encode(), expected.encode())
        ):
            return None
        self.sim.traffic.auth_rejected += 1
        return SimError(401, "invalid_api_key", "Incorrect API key provided.")

    def _credential(self, headers: dict[str, str]) -> str | None:
        """The key presented (Authorization wins over api-key); records every one seen."""
        authorization = headers.get("authorization", "").strip()
        api_key = headers.get("api-key", "").strip()
        bearer = None
        if authorization:
            scheme, _, token = authorization.partition(" ")
            bearer = token.strip() if scheme.lower() == "bearer" and token.strip() else None
            self.sim.traffic.saw_credential(bearer or authorization)
        if api_key:
            self.sim.traffic.saw_credential(api_key)
        if authorization:
            return bearer
        return api_key or None

    def _delayed(self, send: Send) -> Send:
        """Hold the answer's first message for `latency_ms`, and stamp an x-request-id."""

        async def delayed_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                delay = self.sim.faults.latency_ms / 1000
                if delay > 0:
                    await asyncio.sleep(delay)
                request_id = f"req_{uuid.uuid4().hex}".encode()
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", request_id)],
                }
            await send(message)

        return delayed_send


def _headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers
