"""Text from outside (clients, upstream, the config) parsed without surprises.

Python's own checks accept more than they seem to: `"²".isdigit()` is True but
`int("²")` raises, and `json.loads` of a document nested a few thousand levels deep
raises RecursionError rather than ValueError. Each of these once turned a bad input into
a 500 with a traceback; the parsers here fail the way their callers already handle.
"""

from __future__ import annotations

import json
from typing import Any

# The contract's bodies and upstream's answers nest a few levels; nothing needs 32.
MAX_JSON_DEPTH = 32


class JsonTooDeep(ValueError):
    """A JSON document nested deeper than MAX_JSON_DEPTH (a ValueError, as bad JSON is)."""

    def __init__(self) -> None:
        super().__init__(f"nested deeper than {MAX_JSON_DEPTH} levels")


# More digits than any count, size or port needs; Python refuses over 4,300 (a ValueError).
MAX_DIGITS = 18


def whole_number(text: str) -> int | None:
    """`text` as a non-negative integer if it is at most MAX_DIGITS ASCII digits, else None."""
    if len(text) > MAX_DIGITS or not (text.isascii() and text.isdigit()):
        return None
    return int(text)


def loads_json(data: str | bytes, **options: Any) -> Any:
    """`json.loads`, but a document nested too deeply is a ValueError like any bad JSON.

    The bound also keeps what was parsed safe to encode again (the gateway re-encodes
    some bodies for upstream), whatever the stack depth at that point.
    """
    try:
        value = json.loads(data, **options)
    except RecursionError:
        raise JsonTooDeep() from None
    if _may_nest_deeper(data, MAX_JSON_DEPTH) and _deeper_than(value, MAX_JSON_DEPTH):
        raise JsonTooDeep()
    return value


def _may_nest_deeper(data: str | bytes, limit: int) -> bool:
    """False when the text has too few opening brackets to nest past `limit`: a quick
    count in C spares the walk over the value for the usual small objects."""
    if isinstance(data, str):
        return data.count("{") + data.count("[") > limit
    return data.count(b"{") + data.count(b"[") > limit


def _deeper_than(value: Any, limit: int) -> bool:
    # Iterative, so measuring the depth cannot itself run out of stack.
    pending = [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        pending.extend((child, depth + 1) for child in children)
    return False
