"""Structured logs: one JSON line per request and per job state change.

A request's line is assembled while it is handled: the observer (observe.py) opens
its fields in a context variable, and the pieces that learn something (the upstream
client, the slot wait, the handler's video id) add to it without being passed it.
Nothing that could hold a credential is ever a field: headers are not logged at all.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

access_log = logging.getLogger("gateway.access")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
# uvicorn adds `color_message`, the same text with terminal colour codes: not for JSON.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
_current: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "request_log", default=None
)


def note(**fields: Any) -> None:
    """Add fields to the current request's log line (a no-op outside a request)."""
    current = _current.get()
    if current is not None:
        current.update(fields)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request = _current.get()
        if request is not None and "request_id" in request:
            line["request_id"] = request["request_id"]
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                line[key] = value
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def configure(level: str = "info", fmt: str = "json") -> None:
    """Route every logger (ours, uvicorn's, httpx's) through one handler and format."""
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the gateway logs its own access
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


@contextlib.contextmanager
def request_fields(**initial: Any) -> Iterator[dict[str, Any]]:
    """Open the current request's log fields; `note` adds to them until the block ends."""
    fields = dict(initial)
    token = _current.set(fields)
    try:
        yield fields
    finally:
        _current.reset(token)
