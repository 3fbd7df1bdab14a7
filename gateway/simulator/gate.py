"""The door of /v1: log the request, apply latency and fail_next, then check the credential.

A pure ASGI middleware, so streamed downloads pass through untouched and latency can be
added just before the answer starts (after the work is done, as on a slow network). The
knobs that break an answer half-way (a download or a JSON body cut, stalled or garbled)
act here too, on the messages the app sends.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import uuid
from urllib.parse import quote, quote_plus

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .faults import Faults
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
        send = _Cutter(self.sim.faults, self._delayed(send), scope)
        try:
            refusal = self._refusal(headers)
            if refusal is not None:
                await error_response(refusal)(scope, receive, send)
                return
            await self.app(scope, receive, send)
        except _Cut:
            # The answer stops mid-body: returning without its last message makes the
            # server close the connection, as a crashed or cut-off upstream would.
            return

    def _refusal(self, headers: dict[str, str]) -> SimError | None:
        """fail_next and flap first (they do nothing at all), then the credential."""
        if self.sim.faults.take("fail_next") or self.sim.faults.flapping():
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
            if self.sim.faults.take("quote_credential_next"):
                return _quoting(presented)
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


def _quoting(credential: str) -> SimError:
    """An error that quotes the credential in every field, each in another encoding."""
    return SimError(
        400,
        json.dumps(credential)[1:-1],
        f"Refused {credential}; the request was {json.dumps({'api_key': credential})}.",
        param=quote_plus(credential),
        type=quote(credential, safe=""),
    )


def _headers(scope: Scope) -> dict[str, str]:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


class _Cut(Exception):
    """Raised out of `send` to end an answer half-way; the gate swallows it."""


class _Cutter:
    """A `send` that breaks one answer half-way when a knob asks for it.

    Content downloads (200/206 of `.../content`): `stall_next`, then `truncate_next`.
    Any other JSON answer: `truncate_json_next`, then `garble_json_next`. A cut or
    stalled answer announces its whole length and sends half of it; a garbled one
    announces and sends half, so its HTTP framing is complete but its JSON is not.
    """

    def __init__(self, faults: Faults, send: Send, scope: Scope) -> None:
        self._faults = faults
        self._send = send
        self._content = scope["path"].endswith("/content")
        self._head = scope["method"] == "HEAD"
        self._mode: str | None = None
        self._left = 0
        self._held: Message | None = None
        self._body = bytearray()

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._mode = None if self._head else self._choose(message)
            if self._mode == "garble":
                self._held = message
                return
            self._left = max(1, _content_length(message) // 2)
            await self._send(message)
            return
        if message["type"] != "http.response.body" or self._mode is None:
            await self._send(message)
            return
        body = message.get("body", b"")
        if self._mode == "garble":
            self._body += body
            if message.get("more_body", False):
                return
            assert self._held is not None
            half = bytes(self._body[: len(self._body) // 2])
            headers = [(k, v) for k, v in self._held.get("headers", []) if k != b"content-length"]
            headers.append((b"content-length", str(len(half)).encode()))
            await self._send({**self._held, "headers": headers})
            await self._send({"type": "http.response.body", "body": half, "more_body": False})
            return
        if len(body) < self._left:
            self._left -= len(body)
            await self._send(message)
            return
        piece = body[: self._left]
        await self._send({"type": "http.response.body", "body": piece, "more_body": True})
        if self._mode == "stall":
            await self._faults.hang()
        raise _Cut

    def _choose(self, start: Message) -> str | None:
        take = self._faults.take
        if self._content:
            if start["status"] >= 300:
                return None
            if take("stall_next"):
                return "stall"
            return "cut" if take("truncate_next") else None
        if not _header(start, b"content-type").startswith(b"application/json"):
            return None
        if take("truncate_json_next"):
            return "cut"
        return "garble" if take("garble_json_next") else None


def _header(start: Message, name: bytes) -> bytes:
    for key, value in start.get("headers", []):
        if key.lower() == name:
            return value
    return b""


def _content_length(start: Message) -> int:
    value = _header(start, b"content-length")
    return int(value) if value.isdigit() else 0
