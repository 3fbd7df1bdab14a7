"""A lost create's job goes to the team whose request it is, never to another one.

Two teams send the same prompt with a different model, size and length, and both
answers are lost (the simulator's `fail_next`: a 500 before any job is made, and
`create_then_500_next`: the job is made, then a 500). The tracker finds the jobs among
upstream's recent ones; matching by prompt alone handed beta's job to alpha.
"""

from __future__ import annotations

from typing import Any

from support.api import assert_error, ok
from support.processes import wait_until
from support.simulator import direct, sim_config, sim_faults

PROMPT = "one prompt two teams"
ALPHA = {"prompt": PROMPT, "model": "sora-2", "size": "720x1280", "seconds": "4"}
BETA = {"prompt": PROMPT, "model": "sora-2-pro", "size": "1280x720", "seconds": "8"}


def listed(stack: Any, team: str) -> set[str]:
    with stack.client(team) as client:
        return {video["id"] for video in ok(client.get("/v1/videos"))["data"]}


def lost_create(stack: Any, team: str, body: dict[str, str], fault: str) -> None:
    sim_faults(stack, **{fault: 1})
    with stack.client(team) as client:
        reply = client.post("/v1/videos", json=body)
    assert_error(reply, 502, "upstream_error")
    assert reply.headers["x-should-retry"] == "false"


def upstream_job(stack: Any, **fields: str) -> str:
    with direct(stack) as sim:
        jobs = ok(sim.get("/videos", params={"limit": 100}))["data"]
    (found,) = [j["id"] for j in jobs if all(j[k] == v for k, v in fields.items())]
    return found


def owner(stack: Any, video_id: str) -> str | None:
    """Which team's list shows the job, once the tracker has settled it."""
    return next((team for team in ("alpha", "beta") if video_id in listed(stack, team)), None)


def test_a_lost_create_never_takes_another_teams_job_with_the_same_prompt(stack):
    """Alpha's job never reached upstream; beta's did. Alpha's slot, older, settles first."""
    sim_config(stack, queue_s=0, run_s=30)
    lost_create(stack, "alpha", ALPHA, "fail_next")
    lost_create(stack, "beta", BETA, "create_then_500_next")
    beta_job = upstream_job(stack, size="1280x720")

    assert wait_until(lambda: owner(stack, beta_job), 10, "the lost job settled") == "beta"
    assert listed(stack, "alpha") == set()


def test_two_lost_creates_with_the_same_prompt_each_find_their_own_job(stack):
    sim_config(stack, queue_s=0, run_s=30)
    lost_create(stack, "alpha", ALPHA, "create_then_500_next")
    lost_create(stack, "beta", BETA, "create_then_500_next")
    alpha_job = upstream_job(stack, size="720x1280")
    beta_job = upstream_job(stack, size="1280x720")

    wait_until(lambda: listed(stack, "alpha") == {alpha_job}, 10, "alpha's job found")
    wait_until(lambda: listed(stack, "beta") == {beta_job}, 10, "beta's job found")
