"""The body that reaches upstream can name only the source video the gateway checked.

The gateway checks one source and replays the client's bytes; an upstream that reads
the body another way (the simulator flattens JSON `{"video": {"id"}}` to `video[id]`,
later keys winning; other parsers keep the first duplicate, ignore case or read
`video.id`) must not find another video in it. Alpha owns a completed video, beta
another; every way of smuggling beta's id next to alpha's (or into a route that takes
no source from the body) is refused before anything is sent upstream.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from support.api import assert_error, completed, create, multipart, ok, settle
from support.simulator import UpstreamWatch
from support.simulator import sim_config as _sim_config


@pytest.fixture
def videos(stack: Any) -> tuple[str, str]:
    """(alpha's own completed video, beta's completed video of another size)."""
    _sim_config(stack, queue_s=0.05, run_s=0.1)
    with stack.client("alpha") as alpha:
        own = completed(alpha, "alpha's own take")["id"]
    with stack.client("beta") as beta:
        other = settle(beta, create(beta, "beta's take", size="1280x720", seconds="8")["id"])
    assert other["status"] == "completed", other
    return own, other["id"]


def raw_json(text: str) -> dict[str, Any]:
    return {"content": text.encode(), "headers": {"content-type": "application/json"}}


def assert_refused(stack: Any, cases: list[tuple[str, str, dict[str, Any], str]]) -> None:
    """Each (label, path, request, param) is 400 invalid_request naming `param`, and
    nothing at all reaches upstream (the sources are terminal: no refresh either)."""
    with stack.client("alpha") as alpha:
        for label, path, kwargs, param in cases:
            watch = UpstreamWatch(stack)
            reply = alpha.post(path, **kwargs)
            assert reply.status_code == 400, f"{label}: {reply.status_code} {reply.text}"
            assert_error(reply, 400, "invalid_request", param)
            watch.assert_nothing_sent()


def test_json_aliases_of_the_source_are_refused(stack, videos):
    own, other = videos
    p = "a new take"
    cases = []
    for route in ("edits", "extensions"):
        path = f"/v1/videos/{route}"
        cases += [
            (
                f"{route}: flat video[id]",
                path,
                {"json": {"prompt": p, "video": {"id": own}, "video[id]": other}},
                "video[id]",
            ),
            (
                f"{route}: video[]",
                path,
                {"json": {"prompt": p, "video": {"id": own}, "video[]": other}},
                "video[]",
            ),
            (
                f"{route}: dotted video.id",
                path,
                {"json": {"prompt": p, "video": {"id": own}, "video.id": other}},
                "video.id",
            ),
            (
                f"{route}: duplicate key",
                path,
                raw_json(
                    json.dumps({"prompt": p})[:-1]
                    + f', "video": {{"id": "{other}"}}, "video": {{"id": "{own}"}}}}'
                ),
                "video",
            ),
            (
                f"{route}: key in another case",
                path,
                {"json": {"prompt": p, "video": {"id": own}, "Video": {"id": other}}},
                "Video",
            ),
            (
                f"{route}: nested key in another case",
                path,
                {"json": {"prompt": p, "video": {"id": own, "ID": other}}},
                "ID",
            ),
            (
                f"{route}: a second source field",
                path,
                {"json": {"prompt": p, "video": {"id": own}, "source_video_id": other}},
                "source_video_id",
            ),
            (
                f"{route}: more inside video",
                path,
                {"json": {"prompt": p, "video": {"id": own, "url": other}}},
                "video.url",
            ),
        ]
    assert_refused(stack, cases)
    assert stack.sim_stats()["jobs_created"] == 2


def test_multipart_aliases_of_the_source_are_refused(stack, videos):
    own, other = videos
    p = ("prompt", "a new take")
    cases = []
    for route in ("edits", "extensions"):
        path = f"/v1/videos/{route}"
        cases += [
            (
                f"{route}: video[id] twice",
                path,
                multipart([p, ("video[id]", own), ("video[id]", other)]),
                "video[id]",
            ),
            (
                f"{route}: video text beside video[id]",
                path,
                multipart([p, ("video[id]", own), ("video", other)]),
                "video",
            ),
            (
                f"{route}: name in another case",
                path,
                multipart([p, ("video[id]", own), ("Video[id]", other)]),
                "Video[id]",
            ),
            (
                f"{route}: video[]",
                path,
                multipart([p, ("video[id]", own), ("video[]", other)]),
                "video[]",
            ),
            (
                f"{route}: dotted video.id",
                path,
                multipart([p, ("video[id]", own), ("video.id", other)]),
                "video.id",
            ),
            (
                f"{route}: deeper video[id][id]",
                path,
                multipart([p, ("video[id]", own), ("video[id][id]", other)]),
                "video[id][id]",
            ),
            (
                f"{route}: a file beside video[id]",
                path,
                multipart([p, ("video[id]", other)], {"video": ("v.mp4", b"\0" * 64, "video/mp4")}),
                "video",
            ),
            (
                f"{route}: a second source field",
                path,
                multipart([p, ("video[id]", own), ("remix_video_id", other)]),
                "remix_video_id",
            ),
        ]
    assert_refused(stack, cases)
    assert stack.sim_stats()["jobs_created"] == 2


def test_a_source_in_the_body_of_a_route_that_takes_none_there_is_refused(stack, videos):
    own, other = videos
    p = "a new take"
    by_path = f"/v1/videos/{own}/remix"
    cases = [
        ("create: video_id", "/v1/videos", {"json": {"prompt": p, "video_id": other}}, "video_id"),
        (
            "create: remix_video_id",
            "/v1/videos",
            {"json": {"prompt": p, "remix_video_id": other}},
            "remix_video_id",
        ),
        (
            "create: video object",
            "/v1/videos",
            {"json": {"prompt": p, "video": {"id": other}}},
            "video.id",
        ),
        (
            "create, multipart: video[id]",
            "/v1/videos",
            multipart({"prompt": p, "video[id]": other}),
            "video[id]",
        ),
        (
            "create, multipart: Video_Id",
            "/v1/videos",
            multipart({"prompt": p, "Video_Id": other}),
            "Video_Id",
        ),
        (
            "remix by path: video_id",
            by_path,
            {"json": {"prompt": p, "video_id": other}},
            "video_id",
        ),
        (
            "remix by path: video object",
            by_path,
            {"json": {"prompt": p, "video": {"id": other}}},
            "video.id",
        ),
        (
            "remix by path, multipart: video[id]",
            by_path,
            multipart({"prompt": p, "video[id]": other}),
            "video[id]",
        ),
        (
            "remix by body: video[id]",
            "/v1/videos/remix",
            {"json": {"prompt": p, "video_id": own, "video[id]": other}},
            "video[id]",
        ),
        (
            "remix by body: remixed_from_video_id",
            "/v1/videos/remix",
            {"json": {"prompt": p, "video_id": own, "remixed_from_video_id": other}},
            "remixed_from_video_id",
        ),
        (
            "remix by body: VIDEO_ID twice",
            "/v1/videos/remix",
            {"json": {"prompt": p, "video_id": own, "VIDEO_ID": other}},
            "VIDEO_ID",
        ),
    ]
    assert_refused(stack, cases)
    assert stack.sim_stats()["jobs_created"] == 2


def test_a_character_takes_its_video_only_from_the_uploaded_file(stack, videos):
    """Finding 8: no text part beside the `video` file may name a video upstream might
    read instead (another team's, here)."""
    _, other = videos
    clip = {"video": ("v.mp4", b"\0" * 64, "video/mp4")}
    cases = [
        (
            f"characters: {field}",
            "/v1/videos/characters",
            multipart({"name": "Captain", field: other}, clip),
            field,
        )
        for field in ("video_id", "source_video_id", "remixed_from_video_id", "videos")
    ]
    assert_refused(stack, cases)
    assert stack.sim_stats()["jobs_created"] == 2


def test_fields_that_name_no_video_still_pass_through(stack, videos):
    """Control: nested and reseller-specific fields that name no video are not refused."""
    own, _ = videos
    with stack.client("alpha") as alpha:
        edit = ok(
            alpha.post(
                "/v1/videos/edits",
                json={"prompt": "an edit", "video": {"id": own}, "style": {"tone": "warm"}},
            )
        )
        assert edit["size"] == "720x1280"  # the source's: alpha's own video
        made = ok(
            alpha.post(
                "/v1/videos",
                **multipart(
                    {"prompt": "a create", "input_reference[image_url]": "https://x/a.png"}
                ),
            )
        )
        assert made["status"] == "queued"
