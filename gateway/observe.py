"""The record of every answered request: its access-log line and its metrics.

Both need the same facts (route template, status, team, duration) at the same moment,
so the edge middleware hands them over once, when the response is complete.
"""

from __future__ import annotations

import logging
from typing import Any

from starlette.types import Scope

from .logs import FIELDS, access_log
from .metrics import GatewayMetrics

# Probes and scrapes every few seconds would drown the log; they stay in the metrics.
_PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
_METHODS = frozenset({"GET", "POST", "DELETE", "PUT", "PATCH", "HEAD", "OPTIONS"})


class RequestRecorder:
    def __init__(self, metrics: GatewayMetrics) -> None:
        self.metrics = metrics

    def record(
        self,
        scope: Scope,
        state: dict[str, Any],
        status: int,
        elapsed: float,
        fields: dict[str, Any],
    ) -> None:
        route = getattr(scope.get("route"), "path", None)
        method = scope["method"] if scope["method"] in _METHODS else "OTHER"
        team = getattr(state.get("team"), "name", None)
        self.metrics.request_done(route or "unmatched", method, status, team, elapsed)
        level = logging.DEBUG if route in _PROBES else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        fields.update(
            team=team,
            method=scope["method"],
            route=route,
            status=status,
            duration_ms=round(elapsed * 1000, 2),
        )
        access_log.log(level, "request", extra={FIELDS: fields})
