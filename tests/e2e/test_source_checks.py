"""Remix, edit and extension sources are checked by the gateway before anything is spent.

Each refusal must come with nothing job-creating sent upstream and no job made there (the
simulator's request log and `jobs_created` are compared around every refusal). A record
the gateway still holds as running may be refreshed with a GET first: that is the only
upstream traffic a refusal may cause.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from support.api import assert_error, completed, create, multipart, ok, settle
from support.processes import wait_until
from support.simulator import UpstreamWatch, direct, sim_config, sim_control, upstream_status

UNKNOWN = "video_0123456789abcdef0123456789abcdef"


@pytest.fixture
def quick_jobs(stack: Any) -> Any:
    sim_config(stack, queue_s=0.05, run_s=0.1)
    return stack


@pytest.fixture
def sim_settings(stack: Any) -> Iterator[Any]:
    """Lets a test change the simulator's timings; puts the previous ones back afterwards."""
    before = sim_control(stack).get("/_sim/config").json()
    yield stack
    keys = ("queue_s", "run_s", "expire_s", "max_running", "poll_after_ms")
    sim_config(stack, **{key: before[key] for key in keys})


def source_requests(video_id: str, prompt: str = "a new take") -> list[tuple[str, str, dict]]:
    """(label, path, httpx kwargs) for every route that takes a source video, both encodings."""
    return [
        ("remix by path", f"/v1/videos/{video_id}/remix", {"json": {"prompt": prompt}}),
        (
            "remix by path, multipart",
            f"/v1/videos/{video_id}/remix",
            multipart({"prompt": prompt}),
        ),
        ("remix by body", "/v1/videos/remix", {"json": {"video_id": video_id, "prompt": prompt}}),
        ("edit", "/v1/videos/edits", {"json": {"prompt": prompt, "video": {"id": video_id}}}),
        (
            "edit, multipart",
            "/v1/videos/edits",
            multipart({"prompt": prompt, "video[id]": video_id}),
        ),
        (
            "extension",
            "/v1/videos/extensions",
            {"json": {"prompt": prompt, "video": {"id": video_id}}},
        ),
        (
            "extension, multipart",
            "/v1/videos/extensions",
            multipart({"prompt": prompt, "video[id]": video_id}),
        ),
    ]


def source_param(path: str) -> str:
    return "video_id" if "/remix" in path else "video.id"


def assert_all_refused(
    stack: Any, video_id: str, code: str, *, refreshed: str | None = None
) -> None:
    """Every source route refuses `video_id` with `code`; nothing job-creating goes upstream."""
    with stack.client("alpha") as client:
        for label, path, kwargs in source_requests(video_id):
            watch = UpstreamWatch(stack)
            reply = client.post(path, **kwargs)
            assert reply.status_code == 400, f"{label}: {reply.status_code} {reply.text}"
            assert_error(reply, 400, code, source_param(path))
            if refreshed is None:
                watch.assert_nothing_sent()
            else:
                watch.assert_no_job_started(refreshed=refreshed)


# -- refusals -------------------------------------------------------------------------------


def test_unknown_source_is_invalid_video_id(stack):
    assert_all_refused(stack, UNKNOWN, "invalid_video_id")
    assert stack.sim_stats()["requests"] == 0


@pytest.mark.parametrize("state", ["queued", "in_progress"])
def test_running_source_is_video_not_completed(stack, sim_settings, state):
    if state == "queued":
        sim_config(stack, queue_s=30, run_s=30)
    else:
        sim_config(stack, queue_s=0, run_s=30)
    with stack.client("alpha") as client:
        source = create(client, "a very long take")["id"]
        wait_until(
            lambda: upstream_status(stack, source)["status"] == state, 5, f"{source} {state}"
        )
        assert_all_refused(stack, source, "video_not_completed", refreshed=source)
        assert ok(client.get(f"/v1/videos/{source}"))["status"] == state
    assert stack.sim_stats()["jobs_created"] == 1


@pytest.mark.parametrize("marker", ["#fail", "#cancel"])
def test_failed_or_cancelled_source_is_video_not_completed(stack, quick_jobs, marker):
    with stack.client("alpha") as client:
        source = create(client, f"a doomed take {marker}")["id"]
        ended = settle(client, source)  # the gateway's record is now terminal
        assert ended["status"] == {"#fail": "failed", "#cancel": "cancelled"}[marker]
    assert_all_refused(stack, source, "video_not_completed")
    assert stack.sim_stats()["jobs_created"] == 1


def test_expired_source_is_video_expired(stack, sim_settings):
    sim_config(stack, queue_s=0.05, run_s=0.1, expire_s=0.5)
    with stack.client("alpha") as client:
        source = settle(client, create(client, "a short-lived take")["id"])
    assert source["status"] == "completed"
    assert source["expires_at"] is not None
    wait_until(lambda: time.time() > source["expires_at"] + 0.01, 5, "the source expired")
    assert_all_refused(stack, source["id"], "video_expired")
    assert stack.sim_stats()["jobs_created"] == 1


def test_source_that_expired_while_the_record_said_queued_is_video_expired(stack, sim_settings):
    """The refresh of a non-terminal record learns the expiry too."""
    sim_config(stack, queue_s=0.05, run_s=0.1, expire_s=0.5)
    with stack.client("alpha") as client:
        source = create(client, "never polled through the gateway")["id"]
    upstream = wait_until(
        lambda: (video := upstream_status(stack, source))["status"] == "completed" and video,
        5,
        "completed upstream",
    )
    wait_until(lambda: time.time() > upstream["expires_at"] + 0.01, 5, "the source expired")
    with stack.client("alpha") as client:
        watch = UpstreamWatch(stack)
        reply = client.post(f"/v1/videos/{source}/remix", json={"prompt": "too late"})
        assert_error(reply, 400, "video_expired", "video_id")
        watch.assert_no_job_started(refreshed=source)
    assert stack.sim_stats()["jobs_created"] == 1


BAD_IDS = ["bad id!", "../x", "..%2Fx", "video_abc/../../v1", "a" * 129, "vidéo_1", " video_1"]


@pytest.mark.parametrize("bad", BAD_IDS)
def test_bad_source_id_syntax_is_invalid_request_naming_the_field(stack, bad):
    watch = UpstreamWatch(stack)
    with stack.client("alpha") as client:
        replies = {
            "remix by body": (
                client.post("/v1/videos/remix", json={"video_id": bad, "prompt": "p"}),
                "video_id",
            ),
            "edit": (
                client.post("/v1/videos/edits", json={"prompt": "p", "video": {"id": bad}}),
                "video.id",
            ),
            "extension": (
                client.post("/v1/videos/extensions", json={"prompt": "p", "video": {"id": bad}}),
                "video.id",
            ),
            "edit, multipart": (
                client.post("/v1/videos/edits", **multipart({"prompt": "p", "video[id]": bad})),
                "video.id",
            ),
            "extension, multipart": (
                client.post(
                    "/v1/videos/extensions", **multipart({"prompt": "p", "video[id]": bad})
                ),
                "video.id",
            ),
        }
        if "/" not in bad and "%" not in bad:  # a (decoded) slash is another route
            replies["remix by path"] = (
                client.post(f"/v1/videos/{bad}/remix", json={"prompt": "p"}),
                "video_id",
            )
    for label, (reply, param) in replies.items():
        assert reply.status_code == 400, f"{label}: {reply.text}"
        assert_error(reply, 400, "invalid_request", param)
    watch.assert_nothing_sent()


def test_longest_valid_id_is_checked_not_refused_for_syntax(stack):
    assert_all_refused(stack, "v" * 128, "invalid_video_id")


@pytest.mark.parametrize(
    "body",
    [{}, {"prompt": ""}, {"prompt": "   "}, {"prompt": None}, {"prompt": 42}],
    ids=["absent", "empty", "blank", "null", "number"],
)
def test_missing_prompt_is_invalid_request_prompt(stack, quick_jobs, body):
    with stack.client("alpha") as client:
        source = completed(client)["id"]
        watch = UpstreamWatch(stack)
        replies = {
            "create": client.post("/v1/videos", json=body),
            "remix by path": client.post(f"/v1/videos/{source}/remix", json=body),
            "remix by body": client.post("/v1/videos/remix", json={**body, "video_id": source}),
            "edit": client.post("/v1/videos/edits", json={**body, "video": {"id": source}}),
            "extension": client.post(
                "/v1/videos/extensions", json={**body, "video": {"id": source}}
            ),
        }
        # The body is checked before the source: an unknown source does not change the answer.
        replies["remix of an unknown source"] = client.post(
            f"/v1/videos/{UNKNOWN}/remix", json=body
        )
        replies["edit of an unknown source"] = client.post(
            "/v1/videos/edits", json={**body, "video": {"id": UNKNOWN}}
        )
    for label, reply in replies.items():
        assert reply.status_code == 400, f"{label}: {reply.text}"
        assert_error(reply, 400, "invalid_request", "prompt")
    watch.assert_nothing_sent()


def test_multipart_without_prompt_is_invalid_request_prompt(stack, quick_jobs):
    with stack.client("alpha") as client:
        source = completed(client)["id"]
        watch = UpstreamWatch(stack)
        for path, fields in [
            ("/v1/videos", {"model": "sora-2"}),
            (f"/v1/videos/{source}/remix", {}),
            ("/v1/videos/edits", {"video[id]": source}),
            ("/v1/videos/extensions", {"video[id]": source, "seconds": "4"}),
        ]:
            assert_error(client.post(path, **multipart(fields)), 400, "invalid_request", "prompt")
    watch.assert_nothing_sent()


# -- acceptance -----------------------------------------------------------------------------


def test_source_completed_upstream_while_the_record_said_queued_is_accepted(stack, quick_jobs):
    """The gateway refreshes a non-terminal record before refusing it."""
    with stack.client("alpha") as client:
        source = create(client, "polled only upstream")["id"]
        # The gateway's own record (what its list serves) still says queued...
        (listed,) = ok(client.get("/v1/videos"))["data"]
        assert listed["status"] == "queued"
        # ...while upstream, asked directly and never through the gateway, has finished it.
        wait_until(lambda: upstream_status(stack, source)["status"] == "completed", 5, "completed")

        remix = client.post(f"/v1/videos/{source}/remix", json={"prompt": "accepted"})
        assert remix.status_code == 200, remix.text
        assert remix.json()["remixed_from_video_id"] == source
        listed_now = {v["id"]: v["status"] for v in ok(client.get("/v1/videos"))["data"]}
        assert listed_now[source] == "completed"
        assert settle(client, remix.json()["id"])["status"] == "completed"
    assert stack.sim_stats()["jobs_created"] == 2


@pytest.mark.parametrize("route", ["remix by body", "edit", "extension, multipart"])
def test_source_refreshed_on_every_source_route(stack, quick_jobs, route):
    with stack.client("alpha") as client:
        source = create(client, "polled only upstream")["id"]
        wait_until(lambda: upstream_status(stack, source)["status"] == "completed", 5, "completed")
        _, path, kwargs = next(r for r in source_requests(source) if r[0] == route)
        job = ok(client.post(path, **kwargs))
        assert settle(client, job["id"])["status"] == "completed"
    assert stack.sim_stats()["jobs_created"] == 2


def test_a_completed_unexpired_source_is_accepted_on_every_route(stack, quick_jobs):
    """Control for the refusals: the same requests with a good source all start a job."""
    with stack.client("alpha") as client:
        source = completed(client)["id"]
        for label, path, kwargs in source_requests(source):
            job = ok(client.post(path, **kwargs))
            assert settle(client, job["id"])["status"] == "completed", label
    assert stack.sim_stats()["jobs_created"] == 1 + len(source_requests(source))
    with direct(stack) as sim:
        assert ok(sim.get(f"/videos/{source}"))["status"] == "completed"
