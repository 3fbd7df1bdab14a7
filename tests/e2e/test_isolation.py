"""Team isolation: another team's videos and characters do not exist for you.

Team beta, holding the id of one of alpha's completed videos, can neither read, download,
delete, remix, edit, extend, list nor page past it; each refusal is the same answer an
unknown id gets, and none of them sends anything upstream.
"""

from __future__ import annotations

from typing import Any

import pytest

from support.api import assert_envelope, assert_error, completed, multipart, ok, settle
from support.simulator import UpstreamWatch, sim_config, sim_stats

UNKNOWN = "video_0123456789abcdef0123456789abcdef"


@pytest.fixture
def alphas_video(stack: Any) -> dict[str, Any]:
    """One completed video of team alpha (jobs made short: these tests are not about time)."""
    sim_config(stack, queue_s=0.05, run_s=0.1)
    with stack.client("alpha") as alpha:
        return completed(alpha, "alpha's secret launch teaser")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1/videos/{id}"),
        ("DELETE", "/v1/videos/{id}"),
        ("GET", "/v1/videos/{id}/content"),
        ("GET", "/v1/videos/{id}/content?variant=video"),
        ("GET", "/v1/videos/{id}/content?variant=thumbnail"),
        ("GET", "/v1/videos/{id}/content?variant=spritesheet"),
    ],
)
def test_another_teams_video_is_not_found(stack, alphas_video, method, path):
    watch = UpstreamWatch(stack)
    with stack.client("beta") as beta:
        foreign = beta.request(method, path.format(id=alphas_video["id"]))
        unknown = beta.request(method, path.format(id=UNKNOWN))
    error = assert_error(foreign, 404, "video_not_found")
    # Indistinguishable from an id that does not exist at all.
    assert error == assert_error(unknown, 404, "video_not_found")
    assert alphas_video["id"] not in foreign.text
    watch.assert_nothing_sent()
    # alpha's video is untouched, even after beta's DELETE.
    with stack.client("alpha") as alpha:
        again = ok(alpha.get(f"/v1/videos/{alphas_video['id']}"))
        assert again["status"] == "completed"
        assert alpha.get(f"/v1/videos/{alphas_video['id']}/content").content[4:8] == b"ftyp"
    assert sim_stats(stack)["jobs_created"] == 1


def _derived_requests(video_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    """Every way to name a source video on a job-creating route: (label, path, kwargs)."""
    return [
        ("remix by path", f"/v1/videos/{video_id}/remix", {"json": {"prompt": "mine now"}}),
        (
            "remix by path, multipart",
            f"/v1/videos/{video_id}/remix",
            multipart({"prompt": "mine now"}),
        ),
        (
            "remix by body",
            "/v1/videos/remix",
            {"json": {"video_id": video_id, "prompt": "mine now"}},
        ),
        (
            "edit, json",
            "/v1/videos/edits",
            {"json": {"prompt": "mine now", "video": {"id": video_id}}},
        ),
        (
            "edit, multipart",
            "/v1/videos/edits",
            multipart({"prompt": "mine now", "video[id]": video_id}),
        ),
        (
            "extension, json",
            "/v1/videos/extensions",
            {"json": {"prompt": "mine now", "video": {"id": video_id}}},
        ),
        (
            "extension, multipart",
            "/v1/videos/extensions",
            multipart({"prompt": "mine now", "video[id]": video_id, "seconds": "4"}),
        ),
    ]


def test_another_teams_video_cannot_be_a_source(stack, alphas_video):
    watch = UpstreamWatch(stack)
    with stack.client("beta") as beta:
        for label, path, kwargs in _derived_requests(alphas_video["id"]):
            reply = beta.post(path, **kwargs)
            param = "video.id" if "/remix" not in path else "video_id"
            error = assert_error(reply, 400, "invalid_video_id", param)
            assert alphas_video["id"] not in error["message"], label
    watch.assert_nothing_sent()
    # The same requests with an unknown id get the very same answers.
    with stack.client("beta") as beta:
        for (label, path, kwargs), (_, unknown_path, unknown_kwargs) in zip(
            _derived_requests(alphas_video["id"]), _derived_requests(UNKNOWN), strict=True
        ):
            foreign = beta.post(path, **kwargs).json()
            unknown = beta.post(unknown_path, **unknown_kwargs).json()
            assert foreign == unknown, label
    watch.assert_nothing_sent()


def test_the_source_owner_can_remix_where_beta_could_not(stack, alphas_video):
    """Control for the test above: the same requests from alpha are accepted."""
    with stack.client("alpha") as alpha:
        for label, path, kwargs in _derived_requests(alphas_video["id"])[::3]:
            job = ok(alpha.post(path, **kwargs))
            assert settle(alpha, job["id"])["status"] == "completed", label


def test_list_shows_only_the_callers_videos(stack, alphas_video):
    with stack.client("beta") as beta:
        betas = completed(beta, "beta's own")
        watch = UpstreamWatch(stack)
        listed = ok(beta.get("/v1/videos"))
        assert [v["id"] for v in listed["data"]] == [betas["id"]]
        assert (listed["first_id"], listed["last_id"], listed["has_more"]) == (
            betas["id"],
            betas["id"],
            False,
        )
        ascending = beta.get("/v1/videos", params={"order": "asc", "limit": 100})
        assert alphas_video["id"] not in ascending.text
        assert ascending.status_code == 200
        for after in (alphas_video["id"], UNKNOWN):
            reply = beta.get("/v1/videos", params={"after": after})
            assert_error(reply, 400, "invalid_request", "after")
            assert after not in reply.json()["error"]["message"]
    with stack.client("gamma") as gamma:
        assert ok(gamma.get("/v1/videos"))["data"] == []
    with stack.client("alpha") as alpha:
        assert [v["id"] for v in ok(alpha.get("/v1/videos"))["data"]] == [alphas_video["id"]]
        page = ok(alpha.get("/v1/videos", params={"after": alphas_video["id"]}))
        assert page["data"] == []
        assert page["has_more"] is False
    watch.assert_nothing_sent()


def test_limit_zero_is_an_empty_page_that_says_whether_videos_exist(stack, alphas_video):
    """OpenAI's schema allows `limit=0` (minimum 0): no videos, and `has_more` per the team."""
    with stack.client("alpha") as alpha:
        page = ok(alpha.get("/v1/videos", params={"limit": 0}))
        assert page == {
            "object": "list",
            "data": [],
            "first_id": None,
            "last_id": None,
            "has_more": True,
        }
        after = ok(alpha.get("/v1/videos", params={"limit": 0, "after": alphas_video["id"]}))
        assert after["data"] == []
        assert after["has_more"] is False
        for bad in (
            "101",
            "-1",
            "\u00b2",
            "\u0663",
        ):  # "²" and an Arabic-Indic 3: digits to isdigit()
            assert_error(
                alpha.get("/v1/videos", params={"limit": bad}), 400, "invalid_request", "limit"
            )
    with stack.client("gamma") as gamma:
        assert ok(gamma.get("/v1/videos", params={"limit": 0}))["has_more"] is False


def test_another_teams_character_is_not_found(stack, alphas_video):
    with stack.client("alpha") as alpha:
        created = alpha.post(
            "/v1/videos/characters",
            **multipart(
                {"name": "Captain Alpha"}, {"video": ("clip.mp4", b"\0" * 2048, "video/mp4")}
            ),
        )
        character = ok(created)
        assert ok(alpha.get(f"/v1/videos/characters/{character['id']}"))["name"] == "Captain Alpha"
    watch = UpstreamWatch(stack)
    with stack.client("beta") as beta:
        foreign = beta.get(f"/v1/videos/characters/{character['id']}")
        unknown = beta.get("/v1/videos/characters/char_0123456789abcdef0123456789abcdef")
    error = assert_error(foreign, 404, assert_envelope(unknown)["code"])
    # Exactly what an unknown character gets: nothing tells beta the id exists.
    assert (foreign.status_code, error) == (unknown.status_code, unknown.json()["error"])
    assert error["code"] in ("character_not_found", "video_not_found")
    assert character["id"] not in foreign.text
    watch.assert_nothing_sent()
