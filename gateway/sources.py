"""Which field of a job-creating body names its source video, and nothing else does.

The gateway checks one source (ownership, status, expiry) and then replays the body's
own bytes, so the body must not name any other video an upstream might read instead:
a remix takes its source from the path (or `video_id` in the reseller's form), an
edit or extension from `video` (a file, or `{"id"}` / `video[id]`), a character from
its `video` file, and a create from nowhere. Any other field whose name says it is a
video (`video_id` on a create, `source_video`, `remix_video_id`, `video[url]`...) is
refused, so an upstream that reads more fields than the gateway checks still cannot
be pointed at another team's video. The body itself already names each field once
(see `body.RequestBody.paths`).
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

from .body import Path, RequestBody
from .errors import (
    GatewayError,
    invalid_request,
    source_expired,
    source_not_completed,
    source_unknown,
)
from .registry import VideoRecord

# A path segment that names a video: video, videos, source_video, video_id, video_ids...
VIDEO_WORD = re.compile(r"(?:^|_)videos?(?:_ids?)?$")

NO_SOURCE: frozenset[Path] = frozenset()
REMIX_BY_BODY_SOURCE: frozenset[Path] = frozenset({("video_id",)})
DERIVED_SOURCE: frozenset[Path] = frozenset({("video",), ("video", "id")})
CHARACTER_SOURCE: frozenset[Path] = frozenset({("video",)})  # the uploaded file only


def refuse_other_sources(body: RequestBody, allowed: Collection[Path]) -> None:
    """400 naming the first field, other than the route's own `allowed`, that names a video."""
    for path, name in sorted(body.paths.items()):
        if path not in allowed and any(VIDEO_WORD.search(segment) for segment in path):
            raise invalid_request(
                f"The field {name!r} may not name a video here: this route takes its "
                "source only from its own source field, and checks it.",
                name,
            )


def derived_source(body: RequestBody) -> Any:
    """The `video.id` an edit or extension refers to (unchecked); None for an upload.

    A file part `video` beside a `video` or `video[id]` text part never gets here: the
    body names each field once.
    """
    refuse_other_sources(body, DERIVED_SOURCE)
    if "video" in body.files:
        return None
    if body.is_multipart:
        reference = body.fields.get("video[id]")
    else:
        video = body.fields.get("video")
        if video is not None and not isinstance(video, dict):
            raise invalid_request('video must be a file or an object {"id": ...}.', "video")
        reference = video.get("id") if video else None
    if reference is None:
        raise invalid_request('video is required: a file or {"id": ...}.', "video")
    return reference


def source_refusal(record: VideoRecord | None, param: str, *, now: float) -> GatewayError | None:
    """Why this record cannot be a remix/edit/extension source at `now`, or None.

    `record` is the caller's own record of the video (None when it has none: unknown
    and another team's video are refused alike).
    """
    if record is None:
        return source_unknown(param)
    if record.status != "completed":
        return source_not_completed(record.status, param)
    if record.expires_at is not None and record.expires_at <= now:
        return source_expired(param)
    return None
