"""What an upstream answer must be before the gateway believes it, in one place.

A video object is written to the registry under its id, so an answer about another
video than the one asked for would overwrite that other video's record (possibly
another team's). Every read of a single video goes through `video_object` with the
id it asked for; a mismatch is upstream's error, and nothing is written.
"""

from __future__ import annotations

import re
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
