"""Recognising a lost create's job among upstream's recent ones.

When a create's answer is lost (timeout, reset, 5xx) the job may exist upstream
under an id the gateway never saw. The tracker finds it by comparing what the request
fixed with what each job object echoes (`prompt`, `model`, `size`, `seconds`,
`remixed_from_video_id`), so a job is only ever handed to a team whose request it
could be: two teams sending the same prompt with another model, size or length, or
one a create and the other a remix, are told apart. A field the request left to
upstream matches whatever upstream chose, and a field upstream does not echo cannot
tell jobs apart, so it matches too.

The slot record keeps this description (`Want`); the prompt itself is kept only as a
short digest, never in the ledger.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from typing import Any

Want = dict[str, str]

LIST_MATCH_SKEW_S = 60  # a lost create's job was created at most this long before its slot
RUNNING = ("queued", "in_progress")
# A dated snapshot of a model: upstream may echo `sora-2-2025-10-06` for `sora-2`.
_SNAPSHOT = r"-\d{4}-\d{2}-\d{2}"
_ECHOED = ("model", "size", "seconds")


def fingerprint(prompt: str) -> str:
    """A short digest of the prompt: enough to recognise it, without keeping it."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def wanted(kind: str, fields: Mapping[str, Any], source: str | None, source_body: str) -> Want:
    """What a job-creating request fixed, as the job object will echo it.

    A create fixes the fields it sends, and has no source. A remix and an edit of a
    video by id inherit the source's model, size and seconds; an extension its model
    and size (its `seconds` is the stitched total). Only a remix's source is echoed
    (`remixed_from_video_id`); an upload's job inherits nothing known.
    """
    want: Want = {"prompt": fingerprint(str(fields["prompt"]))}
    if kind == "create":
        want.update({k: v for k in _ECHOED if (v := _text(fields.get(k))) is not None})
        want["source"] = ""
    elif source is not None:
        inherited = ("model", "size") if kind == "extension" else _ECHOED
        origin = _object(source_body)
        want.update({k: v for k in inherited if (v := _text(origin.get(k))) is not None})
        if kind == "remix":
            want["source"] = source
    return want


def could_be(want: Mapping[str, str], job: Mapping[str, Any]) -> bool:
    """False when a field the job echoes contradicts what the request fixed."""
    prompt = job.get("prompt")
    if "prompt" in want and isinstance(prompt, str) and fingerprint(prompt) != want["prompt"]:
        return False
    for name in _ECHOED:
        echoed = _text(job.get(name))
        if name in want and echoed is not None and not _same(name, want[name], echoed):
            return False
    if "source" in want and "remixed_from_video_id" in job:
        return (_text(job["remixed_from_video_id"]) or "") == want["source"]
    return True


def pick(
    want: Mapping[str, str], started_ms: int, candidates: list[dict[str, Any]]
) -> dict[str, Any] | None:
    """The candidate most likely to be this slot's job, or None.

    Among jobs created after the slot (with skew) that could be its request's: first
    the oldest that echoes the prompt, else the oldest running one that does not (an
    upstream that does not echo prompts: counting a running job nobody counts keeps
    the account under its limit, and its other fields still had to agree).
    """
    earliest = started_ms / 1000 - LIST_MATCH_SKEW_S
    fitting = sorted(
        (
            job
            for job in candidates
            if (not isinstance(job.get("created_at"), int | float) or job["created_at"] >= earliest)
            and could_be(want, job)
        ),
        key=lambda job: job.get("created_at") or 0,
    )
    for job in fitting:
        if isinstance(job.get("prompt"), str):
            return job
    for job in fitting:
        if "prompt" not in job and job.get("status") in RUNNING:
            return job
    return None


def _same(name: str, wanted_value: str, echoed: str) -> bool:
    if name == "model":
        return echoed == wanted_value or bool(
            re.fullmatch(re.escape(wanted_value) + _SNAPSHOT, echoed)
        )
    return echoed == wanted_value


def _text(value: Any) -> str | None:
    """A field as text: "8" and 8 are the same `seconds`; anything else is no value."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return value if isinstance(value, str) and value else None


def _object(body: str) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
