"""One pass around every request that records it: its log line and its metrics.

Both need the same facts (route template, status, team, duration) at the same moment,
so one plain ASGI middleware gathers them once, outermost but for the request id, and
writes both when the response is complete.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .logs import access_log, request_fields
from .metrics import GatewayMetrics

# Probes and scrapes every few seconds would drown the log; they stay in the metrics.
_PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
_METHODS = frozenset({"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"})


class RequestObserver:
    def __init__(self, app: ASGIApp, metrics: GatewayMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        state = scope.setdefault("state", {})
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        with request_fields(request_id=state.get("request_id")) as fields:
            try:
                await self.app(scope, receive, send_status)
            finally:
                self._record(scope, state, status, time.perf_counter() - started, fields)

    def _record(
        self, scope: Scope, state: dict[str, Any], status: int, elapsed: float, fields: dict
    ) -> None:
        route = getattr(scope.get("route"), "path", None)
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        team = getattr(state.get("team"), "name", None)
        label = route or "unmatched"
        self.metrics.requests.labels(label, method, str(status), self.metrics.team(team)).inc()
        self.metrics.request_duration.labels(label, method).observe(elapsed)
        access_log.log(
            logging.DEBUG if route in _PROBES else logging.INFO,
            "request",
            extra={
                **fields,
                "team": team,
                "method": scope["method"],
                "route": route,
                "status": status,
                "duration_ms": round(elapsed * 1000, 2),
            },
        )
