"""An upstream answer about another video than the one asked for is upstream's error.

The gateway stores what upstream says of a video under that video's id; an answer that
names another id (a confused upstream or cache: the simulator's `other_id_next`) must
not overwrite the other video's record, which may be another team's. Both readers of a
single video are covered: a client's retrieve and the tracker's poll.
"""

from __future__ import annotations

from typing import Any

from support.api import assert_error, completed, create, ok
from support.processes import wait_until
from support.simulator import sim_config, sim_control, sim_faults


def listed(stack: Any, team: str) -> list[dict[str, Any]]:
    """The team's list, as the gateway's records hold it (no upstream call)."""
    with stack.client(team) as client:
        return ok(client.get("/v1/videos"))["data"]


def fault_left(stack: Any) -> int:
    return sim_control(stack).get("/_sim/faults").json()["other_id_next"]


def gets_of(stack: Any, video_id: str) -> int:
    path = f"/v1/videos/{video_id}"
    return sum(1 for r in stack.sim_requests() if (r["method"], r["path"]) == ("GET", path))


def test_a_retrieve_answered_with_another_id_is_502_and_writes_nothing(stack):
    sim_config(stack, queue_s=0.05, run_s=0.1)
    with stack.client("alpha") as alpha:
        own = completed(alpha, "alpha's own take")["id"]
    with stack.client("beta") as beta:
        completed(beta, "beta's private take")  # the newest other video upstream
    alpha_before, beta_before = listed(stack, "alpha"), listed(stack, "beta")

    sim_faults(stack, other_id_next=1)
    with stack.client("alpha") as alpha:
        reply = alpha.get(f"/v1/videos/{own}")
    assert fault_left(stack) == 0  # the answer did name the other video
    assert_error(reply, 502, "upstream_error")
    assert "beta's private take" not in reply.text
    assert listed(stack, "beta") == beta_before
    assert listed(stack, "alpha") == alpha_before


def test_a_poll_answered_with_another_id_writes_nothing(stack):
    sim_config(stack, queue_s=0.05, run_s=0.1)
    with stack.client("beta") as beta:
        completed(beta, "beta's private take")
    sim_config(stack, queue_s=0, run_s=60)
    with stack.client("alpha") as alpha:
        running = create(alpha, "alpha's long take")["id"]  # only the tracker polls it
    beta_before = listed(stack, "beta")

    sim_faults(stack, other_id_next=1)
    wait_until(lambda: fault_left(stack) == 0, 10, "the tracker polled into the fault")
    # The tracker polls one slot's job again only after it has handled the last answer.
    seen = gets_of(stack, running)
    wait_until(lambda: gets_of(stack, running) > seen, 10, "the tracker's next poll")
    assert listed(stack, "beta") == beta_before
    with stack.client("alpha") as alpha:
        assert ok(alpha.get(f"/v1/videos/{running}"))["status"] == "in_progress"
