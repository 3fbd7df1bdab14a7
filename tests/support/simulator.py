"""The simulated upstream seen from a test: its control routes (/_sim/...) and its own /v1
with the real token, i.e. what upstream itself received and holds.

`stack` is anything with a `simulator` (a `Process`) and a `token`: the session `Stack`
or a module's `Rig`.
"""

from __future__ import annotations

import atexit
import functools
from typing import Any

import httpx

from support.api import ok

# Every header the gateway may send upstream: its allow-list, its credential, and the
# framing headers its HTTP client adds. (`connection` aside: a test that allows it says so.)
UPSTREAM_REQUEST_HEADERS = frozenset(
    {
        "host",
        "accept",
        "accept-encoding",
        "user-agent",
        "content-type",
        "content-length",
        "x-request-id",
        "authorization",
        "range",
        "if-range",
        "openai-beta",
    }
)


@functools.cache
def _client(base_url: str, token: str | None = None) -> httpx.Client:
    """One kept-alive client per address for the many small control calls of a test run."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(base_url=base_url, headers=headers, timeout=10.0)
    atexit.register(client.close)
    return client


def sim_control(stack: Any) -> httpx.Client:
    """The simulator's control routes (/_sim/...)."""
    return _client(stack.simulator.url)


def sim_config(stack: Any, **settings: Any) -> dict[str, Any]:
    reply = sim_control(stack).post("/_sim/config", json=settings)
    reply.raise_for_status()
    return reply.json()


def sim_faults(stack: Any, **faults: int) -> None:
    sim_control(stack).post("/_sim/faults", json=faults).raise_for_status()


def sim_stats(stack: Any) -> dict[str, Any]:
    return sim_control(stack).get("/_sim/stats").json()


def sim_requests(stack: Any) -> list[dict[str, Any]]:
    return sim_control(stack).get("/_sim/requests", params={"limit": 1000}).json()


def direct(stack: Any) -> httpx.Client:
    """The simulator's own /v1 with the real token: what upstream itself says."""
    return httpx.Client(
        base_url=stack.simulator.url + "/v1",
        headers={"authorization": f"Bearer {stack.token}"},
        timeout=10.0,
    )


def upstream_status(stack: Any, video_id: str) -> dict[str, Any]:
    """The video as upstream has it, asked directly with the real token."""
    return ok(_client(stack.simulator.url + "/v1", stack.token).get(f"/videos/{video_id}"))


class UpstreamWatch:
    """What reached the simulator's /v1 between this object's creation and the checks."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        stats = sim_stats(stack)
        self.requests_before = stats["requests"]
        self.jobs_before = stats["jobs_created"]

    def new_requests(self) -> list[dict[str, Any]]:
        count = sim_stats(self.stack)["requests"] - self.requests_before
        return sim_requests(self.stack)[-count:] if count > 0 else []

    def assert_nothing_sent(self) -> None:
        assert self.new_requests() == []
        assert sim_stats(self.stack)["jobs_created"] == self.jobs_before

    def assert_no_job_started(self, *, refreshed: str | None = None) -> None:
        """No job-creating request went upstream; at most GETs refreshing `refreshed`."""
        allowed = {("GET", f"/v1/videos/{refreshed}")} if refreshed else set()
        sent = [(r["method"], r["path"]) for r in self.new_requests()]
        assert [s for s in sent if s not in allowed] == [], sent
        assert sim_stats(self.stack)["jobs_created"] == self.jobs_before
