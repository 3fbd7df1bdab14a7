"""`upstream.remix_route: body`: the source goes upstream in the body, and only the checked one."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from support.api import assert_error
from support.processes import Process, start_gateway, wait_until
from support.stack import Stack, gateway_config


@pytest.fixture(scope="module")
def body_route_gateway(session_stack: Stack, workdir: Path):
    config = gateway_config(
        session_stack.simulator.url,
        session_stack.store.url,
        session_stack.token,
        session_stack.keys,
        remix_route="body",
    )
    gateway = start_gateway(workdir, config)
    yield gateway
    gateway.stop()


def client(stack: Stack, gateway: Process, team: str) -> httpx.Client:
    headers = {"authorization": f"Bearer {stack.keys[team]}"}
    return httpx.Client(base_url=gateway.url, headers=headers, timeout=30)


def completed_video(stack: Stack, gateway: Process, team: str) -> str:
    with client(stack, gateway, team) as c:
        video = c.post("/v1/videos", json={"prompt": f"{team}'s source"}).json()
        wait_until(
            lambda: c.get(f"/v1/videos/{video['id']}").json()["status"] == "completed",
            15,
            "the source completes",
        )
    return video["id"]


def test_both_remix_forms_reach_upstream_as_the_body_form(stack: Stack, body_route_gateway):
    source = completed_video(stack, body_route_gateway, "alpha")
    with client(stack, body_route_gateway, "alpha") as c:
        by_path = c.post(f"/v1/videos/{source}/remix", json={"prompt": "sunny"})
        assert by_path.status_code == 200, by_path.text
        assert by_path.json()["remixed_from_video_id"] == source
        by_body = c.post("/v1/videos/remix", json={"video_id": source, "prompt": "rain"})
        assert by_body.status_code == 200, by_body.text
    remixes = [r for r in stack.sim_requests() if r["method"] == "POST" and "remix" in r["path"]]
    assert [r["path"] for r in remixes] == ["/v1/videos/remix", "/v1/videos/remix"]


def test_a_second_source_in_the_body_of_the_path_form_is_refused(
    stack: Stack, body_route_gateway
) -> None:
    mine = completed_video(stack, body_route_gateway, "beta")
    theirs = completed_video(stack, body_route_gateway, "alpha")
    before = stack.sim_stats()["jobs_created"]
    with client(stack, body_route_gateway, "beta") as c:
        smuggled = c.post(
            f"/v1/videos/{mine}/remix",
            files={"prompt": (None, "p"), "video_id": (None, theirs)},
        )
    assert_error(smuggled, 400, "invalid_request", "video_id")
    assert stack.sim_stats()["jobs_created"] == before, "nothing may start upstream"
