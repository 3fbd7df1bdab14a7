"""The syntax of a job's `model`, `size` and `seconds`, checked before any slot is waited for.

Upstream refuses a malformed model, size or length only after the gateway has waited
for a slot and spent a request on it; CONTRACT §9 fixes the syntax of size and seconds
so the gateway can refuse them first, in the envelope, naming the param. A model name is
an open string upstream, but a short token all the same: bounding it here keeps a
client's megabyte "model" out of the slot ledger, where what the request fixed is kept
(see `matching`). Only the syntax: which models, sizes and lengths a team may use is
policy, and which ones upstream supports is upstream's to say.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import invalid_request

# `sora-2`, `sora-2-pro`, dated snapshots, and room for a provider's `org/model:tag`.
MODEL_SYNTAX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
SIZE_SYNTAX = re.compile(r"[0-9]{2,5}x[0-9]{2,5}")
SECONDS_TEXT = re.compile(r"[0-9]{1,3}")
MAX_SECONDS = 600


def check_job_params(fields: Mapping[str, Any]) -> None:
    """Refuse a `model`, `size` or `seconds` that no upstream could accept; absent ones
    are fine.

    `seconds` is a string as the SDKs send it, or a JSON integer as curl users write it.
    """
    if "model" in fields:
        model = fields["model"]
        if not isinstance(model, str) or not MODEL_SYNTAX.fullmatch(model):
            raise invalid_request(
                "model must be a model name of 1 to 128 letters, digits and ._:/-, e.g. sora-2.",
                "model",
            )
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
