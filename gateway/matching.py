"""Recognising a lost create's job among upstream's recent ones.

When a create's answer is lost (timeout, reset, 5xx) the job may exist upstream
under an id the gateway never saw. The tracker finds it by comparing what the request
fixed with what each job object echoes (`prompt`, `model`, `size`, `seconds`,
`remixed_from_video_id`), so a job is only ever handed to a team whose request it
could be: two teams sending the same prompt with another model, size or length, or
one a create and the other a remix, are told apart. A field the request left to
upstream matches whatever upstream chose, and a field upstream does not echo cannot
tell jobs apart, so it matches too; but a job is handed over only on evidence (see
`pick`), since handing it gives the team its video.

The slot record keeps this description (`Want`), every value bounded: the prompt is
kept only as a short digest, and any other long value too, so a record stays small.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

Want = dict[str, str]

LIST_MATCH_SKEW_S = 60  # a lost create's job was created at most this long before its slot
RUNNING = ("queued", "in_progress")
# A dated snapshot of a model: upstream may echo `sora-2-2025-10-06` for `sora-2`.
_SNAPSHOT = r"-\d{4}-\d{2}-\d{2}"
_ECHOED = ("model", "size", "seconds")
# The longest value kept as itself in a slot's `want`: a checked model is at most 128
# characters, a video id too; a longer value is kept as a digest. So a `want` is at most
# a few hundred bytes (`ledger.MAX_WANT_BYTES`).
MAX_VALUE_CHARS = 128
# The job fields each kind's body takes (the route schemas in `videos`): a create its
# model, size and seconds, an edit its seconds. (An extension's `seconds` is the length
# it adds, never the job's.)
_TAKES: dict[str, tuple[str, ...]] = {"create": _ECHOED, "edit": ("seconds",)}


def fingerprint(prompt: str) -> str:
    """A short digest of the prompt: enough to recognise it, without keeping it."""
    return hashlib.sha256(prompt.encode()).hexdigest()[:16]


def wanted(kind: str, fields: Mapping[str, Any], source: str | None, source_body: str) -> Want:
    """What a job-creating request fixed, as the job object will echo it.

    A remix, edit or extension of a video by id inherits the source's model, size and
    seconds. A field the route takes (`_TAKES`) is the request's own: upstream makes the
    job that was asked for, so it overrides the inherited one. An extension's `seconds`
    is the length added, not the stitched total the job echoes, so it fixes none. A field
    the route does not take but the request sent anyway, unlike the source's, may be
    used by upstream or not: neither value is fixed. A create fixes that it has no
    source; only a remix's source is echoed (`remixed_from_video_id`). Every value is
    bounded (`_bounded`): an inherited one comes from upstream's answer, unchecked.
    """
    want: Want = {"prompt": fingerprint(str(fields["prompt"]))}
    origin = loads_object(source_body) if source is not None else {}
    for name in _ECHOED if kind != "extension" else ("model", "size"):
        own, inherited = _field(name, fields.get(name)), _field(name, origin.get(name))
        if own is not None and name in _TAKES.get(kind, ()):
            want[name] = own
        elif inherited is not None and own in (None, inherited):
            want[name] = inherited
    if kind == "create":
        want["source"] = ""
    elif kind == "remix" and source is not None:
        want["source"] = source
    return {name: _bounded(value) for name, value in want.items()}


def could_be(want: Mapping[str, str], job: Mapping[str, Any]) -> bool:
    """False when a field the job echoes contradicts what the request fixed."""
    prompt = job.get("prompt")
    if "prompt" in want and isinstance(prompt, str) and fingerprint(prompt) != want["prompt"]:
        return False
    for name in _ECHOED:
        echoed = _field(name, job.get(name))
        if name in want and echoed is not None and not _same(name, want[name], echoed):
            return False
    if "source" in want and "remixed_from_video_id" in job:
        return _bounded(_text(job["remixed_from_video_id"]) or "") == want["source"]
    return True


def pick(
    want: Mapping[str, str],
    started_ms: int,
    candidates: list[dict[str, Any]],
    rivals: Iterable[Mapping[str, str]] = (),
) -> dict[str, Any] | None:
    """The candidate that is this slot's job, or None when that is not certain.

    Handing a job to a slot gives its team the video, so a wrong guess leaks another
    team's video, while no guess only lets the slot be freed as `never_started` (the
    count runs low for a while). So only evidence counts, among jobs created after the
    slot (with skew) that no field contradicts:
    - a job that echoes the prompt the request fixed: the oldest such job;
    - else (upstream does not echo prompts) a running job that echoes every other field
      the request fixed, equal, if it is the only one that fits and could not be the
      job of another team's slot whose job is not known yet either (`rivals`: reserved
      or unknown, on any replica).
    A slot that does not know its request's prompt (a record re-created by `bind`, or
    written before `want` existed without one) is never handed a job: an empty `want`
    contradicts nothing, so any job would fit.
    """
    if "prompt" not in want:
        return None
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
    quiet = [
        job
        for job in fitting
        if "prompt" not in job and job.get("status") in RUNNING and _echoes_all(want, job)
    ]
    if len(quiet) != 1 or any(could_be(rival, quiet[0]) for rival in rivals):
        return None
    return quiet[0]


def _echoes_all(want: Mapping[str, str], job: Mapping[str, Any]) -> bool:
    """Every model, size and seconds the request fixed is echoed by the job, and agrees."""
    for name in _ECHOED:
        if name in want:
            echoed = _field(name, job.get(name))
            if echoed is None or not _same(name, want[name], echoed):
                return False
    return True


def _same(name: str, wanted_value: str, echoed: str) -> bool:
    if _bounded(echoed) == wanted_value:
        return True
    # A dated snapshot of the model asked for (`sora-2-2025-10-06` for `sora-2`).
    return name == "model" and _bounded(re.sub(_SNAPSHOT + "$", "", echoed)) == wanted_value


def _bounded(value: str) -> str:
    """The value itself if short printable ASCII, else a digest of it (marked with `#`,
    which no model, size, seconds or id contains): what goes into the ledger stays small
    whatever an upstream answer or a request held, and a long value matches only itself."""
    if len(value) <= MAX_VALUE_CHARS and value.isascii() and value.isprintable():
        return value
    return "#" + hashlib.sha256(value.encode()).hexdigest()[:32]


def _field(name: str, value: Any) -> str | None:
    """A field as text, `seconds` as a plain number: "08", "8" and 8 are the same."""
    text = _text(value)
    # (Not int() of any length: Python refuses to convert more than 4300 digits.)
    if name == "seconds" and text is not None and text.isascii() and text.isdigit():
        return text.lstrip("0") or "0"
    return text


def _text(value: Any) -> str | None:
    """A field as text: "8" and 8 are the same `seconds`; anything else is no value."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer()):
        return str(int(value))
    return value if isinstance(value, str) and value else None


def loads_object(body: str) -> dict[str, Any]:
    """A stored JSON body as an object; {} for anything else (it came from upstream)."""
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
