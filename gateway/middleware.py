"""The one ASGI layer every request passes: its id, its header size, its team, its record.

Plain ASGI, so it also covers responses that Starlette's own error handling produces,
and so auth runs before routing: an unknown /v1 path without a valid key is a 401, not
a 404 that would confirm the path does not exist.

These four steps are one layer rather than a stack of middlewares because each layer
wraps `send` and reads the headers again: on a retrieve, three layers cost about a
tenth of the gateway's CPU (README, Performance).
"""

from __future__ import annotations

import random
import re
import time
from typing import Any

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import AdminKeys, TeamDirectory
from .errors import GatewayError, request_header_fields_too_large, route_not_found
from .logs import close_fields, open_fields
from .observe import RequestRecorder

REQUEST_ID_HEADER = "x-request-id"
MAX_HEADER_BYTES = 64 * 1024
# Any printable ASCII the client chose, within reason; anything else gets a fresh id.
_CLIENT_REQUEST_ID = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,127}$")


def fresh_request_id() -> str:
    """128 random bits: unique without a system call (`random` reseeds in a forked child)."""
    return f"req_{random.getrandbits(128):032x}"


class GatewayMiddleware:
    """Gives every request an id (the client's, when it is sane) and echoes it back;
    refuses a header block over MAX_HEADER_BYTES with 431; resolves the caller's team
    on /v1, or checks the admin key on /admin, or answers 401; and records the request
    once it is answered. An admin request has no team (its metrics say `anonymous`), and
    is refused before routing like /v1, so an unknown /admin path is a 401 too.

    The HTTP parser has read an oversized header block by then: to bound that memory,
    a front proxy must cap header size too (nginx does, by default). An encoded slash
    in a /v1 path is refused: the server decodes `%2F` before routing, so
    `<id>%2Fcontent` would otherwise reach a route the client never named.
    """

    def __init__(
        self,
        app: ASGIApp,
        teams: TeamDirectory,
        recorder: RequestRecorder,
        admins: AdminKeys | None = None,
    ) -> None:
        self.app = app
        self.teams = teams
        self.recorder = recorder
        self.admins = admins or AdminKeys(())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = Headers(scope=scope)
        oversized = sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES
        offered = "" if oversized else headers.get(REQUEST_ID_HEADER, "")
        request_id = offered if _CLIENT_REQUEST_ID.fullmatch(offered) else fresh_request_id()
        state = scope.setdefault("state", {})
        state["request_id"] = request_id
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        fields, token = open_fields(request_id=request_id)
        try:
            refusal = self._refusal(scope, headers, state, oversized)
            if refusal is not None:
                await refusal.response()(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        finally:
            try:
                self.recorder.record(scope, state, status, time.perf_counter() - started, fields)
            finally:
                close_fields(token)

    def _refusal(
        self, scope: Scope, headers: Headers, state: dict[str, Any], oversized: bool
    ) -> GatewayError | None:
        """Why this request is answered here and now, or None; sets the team on /v1."""
        if oversized:
            return request_header_fields_too_large()
        path = scope["path"]
        try:
            if path == "/v1" or path.startswith("/v1/"):
                state["team"] = self.teams.authenticate(headers)
            elif path == "/admin" or path.startswith("/admin/"):
                self.admins.authenticate(headers)
            else:
                return None
        except GatewayError as exc:
            return exc
        if b"%2f" in scope.get("raw_path", b"").lower():
            return route_not_found("No such route.")
        return None
