"""The syntax of a job's `size` and `seconds`, checked before any slot is waited for.

Upstream refuses a malformed size or length only after the gateway has waited for a
slot and spent a request on it; CONTRACT §9 fixes the syntax so the gateway can refuse
it first, in the envelope, naming the param. Only the syntax: which sizes and lengths a
team may use is policy, and which ones upstream supports is upstream's to say.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import invalid_request

SIZE_SYNTAX = re.compile(r"[0-9]{2,5}x[0-9]{2,5}")
SECONDS_TEXT = re.compile(r"[0-9]{1,3}")
MAX_SECONDS = 600


def check_job_params(fields: Mapping[str, Any]) -> None:
    """Refuse a `size` or `seconds` that no upstream could accept; absent ones are fine.

    `seconds` is a string as the SDKs send it, or a JSON integer as curl users write it.
    """
    if "size" in fields:
        size = fields["size"]
        if not isinstance(size, str) or not SIZE_SYNTAX.fullmatch(size):
            raise invalid_request("size must be WIDTHxHEIGHT, e.g. 1280x720.", "size")
    if "seconds" in fields and _seconds(fields["seconds"]) is None:
        raise invalid_request(f"seconds must be a whole number from 1 to {MAX_SECONDS}.", "seconds")


def _seconds(value: Any) -> int | None:
    if isinstance(value, str) and SECONDS_TEXT.fullmatch(value):
        number = int(value)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    else:
        return None
    return number if 1 <= number <= MAX_SECONDS else None
