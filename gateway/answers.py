"""What an upstream answer must be before the gateway believes it, in one place.

A video object is written to the registry under its id, so an answer about another
video than the one asked for would overwrite that other video's record (possibly
another team's). Every read of a single video goes through `video_object` with the
id it asked for; a mismatch is upstream's error, and nothing is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from .errors import upstream_error
from .upstream import Reply

ID_SYNTAX = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def json_object(reply: Reply) -> dict[str, Any]:
    """Upstream's JSON object, or 502 `upstream_error` for anything else."""
    try:
        value = reply.json()
    except ValueError:
        value = None
    if not isinstance(value, dict):
        raise upstream_error("Upstream answered with something not JSON.")
    return value


def video_object(reply: Reply, asked: str | None = None) -> dict[str, Any]:
    """A video object with a well-formed id; when `asked` is given, that very id.

    Without `asked` (a create: the id is new) any well-formed id is taken. The 502 is
    marked not to be retried blindly: after a create the job may well exist.
    """
    video = json_object(reply)
    video_id = video.get("id")
    if not isinstance(video_id, str) or not ID_SYNTAX.fullmatch(video_id):
        raise upstream_error("Upstream answered without a video id.", no_retry=True)
    if asked is not None and video_id != asked:
        raise upstream_error("Upstream answered about another video than the one asked.")
    return video


def in_client_ids(video: dict[str, Any], ids: Mapping[str, str]) -> dict[str, Any]:
    """Upstream's video object as the client knows it: every id it names (its own, the
    video it was remixed from) that the client knows by a gateway id, rewritten to it.
    Upstream never sees a gateway id, and a client never sees the upstream id of a job
    that started from the queue (CONTRACT §8.3)."""
    if not ids:
        return video
    seen = dict(video)
    for name in ("id", "remixed_from_video_id"):
        value = seen.get(name)
        if isinstance(value, str) and value in ids:
            seen[name] = ids[value]
    return seen


def client_reply(reply: Reply, video: dict[str, Any], ids: Mapping[str, str]) -> Reply:
    """`reply` with its body in the client's ids; unchanged (the same bytes) when none
    of its ids needs rewriting."""
    seen = in_client_ids(video, ids)
    if seen == video:
        return reply
    return replace(reply, body=json.dumps(seen).encode())


def queued_object(
    job_id: str,
    *,
    kind: str,
    fields: Mapping[str, Any],
    inherited: Mapping[str, Any],
    defaults: Mapping[str, str | None],
    source: str | None,
    created_at: int,
) -> dict[str, Any]:
    """The video object of a job that had to queue (CONTRACT §8.2): what the request
    fixed, else what its source had (a remix, edit or extension of a video by id),
    else what upstream assumes when a field is omitted (`upstream.defaults`)."""
    video: dict[str, Any] = {"id": job_id, "object": "video", "status": "queued", "progress": 0}
    video["created_at"] = created_at
    for name in ("model", "size", "seconds"):
        own = fields.get(name) if not (kind == "remix" and name != "model") else None
        value = own if own not in (None, "") else inherited.get(name)
        if value in (None, ""):
            value = defaults.get(name)
        video[name] = str(value) if isinstance(value, int | float) else value
    video["prompt"] = fields.get("prompt")
    video["remixed_from_video_id"] = source if kind == "remix" else None
    video.update(completed_at=None, expires_at=None, error=None)
    return video


def failed_object(video: Mapping[str, Any], code: str, message: str) -> dict[str, Any]:
    """A queued job that ended before upstream started it (CONTRACT §8.4, §8.6)."""
    return {**video, "status": "failed", "error": {"code": code, "message": message}}
