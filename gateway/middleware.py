"""ASGI middleware that must see every request: request ids, and team auth on /v1.

Both are plain ASGI so they also cover responses that Starlette's own error handling
produces, and so auth runs before routing: an unknown /v1 path without a valid key is
a 401, not a 404 that would confirm the path does not exist.
"""

from __future__ import annotations

import re
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import TeamDirectory
from .errors import GatewayError

REQUEST_ID_HEADER = "x-request-id"
MAX_HEADER_BYTES = 64 * 1024
# Any printable ASCII the client chose, within reason; anything else gets a fresh id.
_CLIENT_REQUEST_ID = re.compile(r"^[\x21-\x7e][\x20-\x7e]{0,127}$")


class RequestIdMiddleware:
    """Gives every request an id (the client's, when it is sane) and echoes it back.

    It also refuses a header block over MAX_HEADER_BYTES with 431 before anything else
    looks at it. The HTTP parser has read those bytes by then: to bound that memory,
    a front proxy must cap header size too (nginx does, by default).
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        offered = Headers(scope=scope).get(REQUEST_ID_HEADER, "")
        oversized = sum(len(k) + len(v) for k, v in scope["headers"]) > MAX_HEADER_BYTES
        if oversized:
            offered = ""
        request_id = offered if _CLIENT_REQUEST_ID.fullmatch(offered) else f"req_{uuid.uuid4().hex}"
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = request_id
            await send(message)

        if oversized:
            refusal = GatewayError(
                431, "request_header_fields_too_large", "The request headers are too large."
            )
            await refusal.response()(scope, receive, send_with_id)
            return
        await self.app(scope, receive, send_with_id)


class TeamAuthMiddleware:
    """Resolves the caller's team for every /v1 request, or answers 401 right away.

    It also refuses an encoded slash in a /v1 path: the server decodes `%2F` before
    routing, so `<id>%2Fcontent` would otherwise reach a route the client never named.
    """

    def __init__(self, app: ASGIApp, teams: TeamDirectory) -> None:
        self.app = app
        self.teams = teams

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if path == "/v1" or path.startswith("/v1/"):
            try:
                team = self.teams.authenticate(Headers(scope=scope))
                if b"%2f" in scope.get("raw_path", b"").lower():
                    raise GatewayError(404, "not_found", "No such route.")
            except GatewayError as exc:
                await exc.response()(scope, receive, send)
                return
            scope.setdefault("state", {})["team"] = team
        await self.app(scope, receive, send)
