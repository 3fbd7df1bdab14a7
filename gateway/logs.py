"""Structured logs: one line per request and per job state change, JSON or text.

A request's line is assembled while it is handled: the edge middleware opens its
fields in a context variable, and the pieces that learn something (the upstream
client, the slot wait, the handler's video id) add to it without being passed it.
Nothing that could hold a credential is ever a field: headers are not logged at all.

A line per request is the busiest thing the gateway writes, so writing is cheap: a
record carries no caller, thread or process lookups nobody prints, the timestamp's
text is made once a second, and the access lines of one event-loop pass leave in one
write.
"""

from __future__ import annotations

import asyncio
import contextvars
import json
import logging
import sys
import time
from typing import Any, TextIO

access_log = logging.getLogger("gateway.access")

# Attributes every LogRecord has; anything else on a record came from `extra=`.
# uvicorn adds `color_message`, the same text with terminal colour codes: not for JSON.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}
# `extra={FIELDS: {...}}` hands all of a line's fields over as one attribute.
FIELDS = "fields"
_ENCODER = json.JSONEncoder(default=str)
_current: contextvars.ContextVar[dict[str, Any] | None] = contextvars.ContextVar(
    "request_log", default=None
)


def note(**fields: Any) -> None:
    """Add fields to the current request's log line (a no-op outside a request)."""
    current = _current.get()
    if current is not None:
        current.update(fields)


def open_fields(**initial: Any) -> tuple[dict[str, Any], contextvars.Token[Any]]:
    """Start the current request's log fields; `note` adds to them until `close_fields`."""
    fields = dict(initial)
    return fields, _current.set(fields)


def close_fields(token: contextvars.Token[Any]) -> None:
    _current.reset(token)


def _line_fields(record: logging.LogRecord) -> dict[str, Any]:
    """A record's own fields: handed over as one `FIELDS` dict, or as `extra=` keys."""
    fields = record.__dict__.get(FIELDS)
    if isinstance(fields, dict):
        return fields
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k[0] != "_"}


class JsonFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def format(self, record: logging.LogRecord) -> str:
        second = int(record.created)
        if second != self._second:
            self._second = second
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        line: dict[str, Any] = {
            "time": f"{self._stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request = _current.get()
        if request is not None and "request_id" in request:
            line["request_id"] = request["request_id"]
        line.update(_line_fields(record))
        if record.exc_info:
            line["error"] = self.formatException(record.exc_info)
        return _ENCODER.encode(line)


# An access line's main facts come first, where a reader's eye starts.
_LEADING = ("method", "route", "status", "team", "duration_ms")


class TextFormatter(logging.Formatter):
    """For a terminal: `time LEVEL logger: message key=value ...`, the JSON line's facts.

    Without its fields an access line would say only "request"; with them it says the
    method, route, status, team and duration. A value with spaces or quotes is quoted.
    """

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        own = _line_fields(record)
        fields = {key: own[key] for key in _LEADING if key in own} | own
        request = _current.get()
        if request is not None and "request_id" in request:
            fields.setdefault("request_id", request["request_id"])
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        if not pairs:
            return text
        head, newline, rest = text.partition("\n")  # a traceback stays below the line
        return f"{head} {pairs}{newline}{rest}"


def _text_value(value: Any) -> str:
    if not isinstance(value, str) or value == "" or any(c in value for c in ' "=\n'):
        return _ENCODER.encode(value)
    return value


class LoopBatchingHandler(logging.StreamHandler[TextIO]):
    """A stream handler that writes the access lines of one event-loop pass together.

    Under load many requests end in the same pass of the loop; one write for all their
    lines instead of one each saves a system call per request. They leave at the end
    of the pass, so nothing waits on a timer. Every other line (startup, shutdown,
    warnings, job events) is written at once, after the access lines before it: a
    process that dies right after logging one (a worker's SIGTERM) loses none of those.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream or sys.stderr)
        self._pending: list[str] = []
        self._flush_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
        except Exception:
            self.handleError(record)
            return
        self._pending.append(line)
        loop = _running_loop() if record.name == access_log.name else None
        if loop is None:
            self.flush()
        elif self._flush_loop is not loop:  # none scheduled, or on a loop that stopped
            self._flush_loop = loop
            loop.call_soon(self.flush)

    def flush(self) -> None:
        self.acquire()
        try:
            self._flush_loop = None
            if self._pending:
                text = "".join(self._pending)
                self._pending.clear()
                self.stream.write(text)
            super().flush()
        except Exception:
            self.handleError(logging.makeLogRecord({"msg": "log write failed"}))
        finally:
            self.release()


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


# uvicorn's error line for an answer that ended unfinished. ASGI's only way to abort a
# started answer is to return without finishing it (the server then closes the
# connection); the gateway does so on purpose, in `Relay` only, after logging why.
UNFINISHED_ANSWER = "ASGI callable returned without completing response."


def _not_an_abort(record: logging.LogRecord) -> bool:
    return record.msg != UNFINISHED_ANSWER


def configure(level: str = "info", fmt: str = "json") -> None:
    """Route every logger (ours, uvicorn's, httpx's) through one handler and format."""
    # The logging HOWTO's "Optimization": no formatter here prints the caller, thread
    # or process, so each record skips looking them up.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    handler = LoopBatchingHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
    logging.getLogger("uvicorn.access").disabled = True  # the gateway logs its own access
    uvicorn_errors = logging.getLogger("uvicorn.error")
    uvicorn_errors.removeFilter(_not_an_abort)  # configure may run twice in one process
    uvicorn_errors.addFilter(_not_an_abort)
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
