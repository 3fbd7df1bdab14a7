"""What one team, or a slow upstream, may take of a replica's upstream connections.

- One team has at most `limits.max_team_upstream_calls` calls on the api pool at once;
  beyond that it is refused at once with 429 `too_many_requests` and `retry-after`.
- A full api pool (slow clients, or many) is a log line and a metric, never a failed
  readiness: that would take every replica out of rotation at once.

The simulator's `latency_ms` holds every answer, so the calls stay in flight; every
wait polls with a deadline on what the simulator or the gateway has seen.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from gateway.pools import API_CONNECTIONS
from support.processes import wait_until
from support.stack import Rig

TEAM_CALLS = 100  # limits.max_team_upstream_calls
OVER = 4  # alpha's calls past its share
BETA_CALLS = API_CONNECTIONS - TEAM_CALLS + 2  # two more than the pool has left
LATENCY_MS = 10_000  # far longer than it takes to start every call
SETTLE_S = 20.0
STARVED = re.compile(r'^sora_gateway_upstream_pool_starved_total\{pool="api"\} (\S+)$', re.M)


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("upstream-pools")
    with Rig.open(
        workdir,
        teams=("alpha", "beta"),
        client_timeout=LATENCY_MS / 1000 + 30,
        queue_s=0.2,
        run_s=0.5,
    ) as rig:
        rig.start_gateway(
            upstream={"timeout_s": 60.0}, limits={"max_team_upstream_calls": TEAM_CALLS}
        )
        yield rig


def get(rig: Rig, team: str, path: str) -> httpx.Response:
    with rig.client(team) as client:
        return client.get(path)


def upstream_saw(rig: Rig, path: str) -> int:
    """How many GETs of `path` upstream has received."""
    log = rig.upstream_requests()
    return sum(1 for r in log if r["method"] == "GET" and r["path"] == "/v1/" + path)


def starved_calls(rig: Rig) -> float:
    match = STARVED.search(httpx.get(rig.gateway.url + "/metrics", timeout=10).text)
    assert match is not None
    return float(match.group(1))


def code(reply: httpx.Response) -> str | None:
    return reply.json()["error"]["code"] if reply.status_code >= 400 else None


def test_one_team_gets_its_share_and_a_full_api_pool_keeps_the_replica_ready(rig: Rig) -> None:
    alpha_video, beta_video = rig.video("alpha", SETTLE_S), rig.video("beta", SETTLE_S)
    alpha_path, beta_path = f"videos/{alpha_video}", f"videos/{beta_video}"
    seen = {path: upstream_saw(rig, path) for path in (alpha_path, beta_path)}

    def new_calls(path: str) -> int:
        return upstream_saw(rig, path) - seen[path]

    def refusals() -> list[httpx.Response] | None:
        done = [f.result() for f in alpha if f.done()]
        return done if len(done) >= OVER else None

    httpx.post(
        rig.simulator.url + "/_sim/faults", json={"latency_ms": LATENCY_MS}
    ).raise_for_status()
    try:
        with ThreadPoolExecutor(TEAM_CALLS + OVER + BETA_CALLS) as pool:
            alpha = [
                pool.submit(get, rig, "alpha", "/v1/" + alpha_path)
                for _ in range(TEAM_CALLS + OVER)
            ]
            # Past its share, alpha is refused at once, while its other calls are held.
            refused = wait_until(refusals, SETTLE_S, "alpha's calls past its share refused")
            assert [code(r) for r in refused] == ["too_many_requests"] * OVER, refused
            assert all(r.status_code == 429 and r.headers["retry-after"].isdigit() for r in refused)
            wait_until(lambda: new_calls(alpha_path) == TEAM_CALLS, SETTLE_S, "alpha's share")
            # Beta still gets what is left of the pool; two of its calls must wait for it.
            beta = [pool.submit(get, rig, "beta", "/v1/" + beta_path) for _ in range(BETA_CALLS)]
            wait_until(lambda: new_calls(beta_path) == BETA_CALLS - 2, SETTLE_S, "the pool full")
            # Until a waiting call gets its connection (and is counted), the replica is
            # starved for connections, and ready all the same.
            while starved_calls(rig) == 0:
                ready = httpx.get(rig.gateway.url + "/readyz", timeout=10)
                assert ready.status_code == 200, ready.text
                assert all(not f.done() for f in beta)
            answers = [f.result() for f in alpha + beta]
    finally:
        httpx.post(rig.simulator.url + "/_sim/faults", json={"latency_ms": 0})
    codes = [code(r) for r in answers]
    assert codes.count(None) == TEAM_CALLS + BETA_CALLS
    assert codes.count("too_many_requests") == OVER
    assert starved_calls(rig) == 2
    lines = [line for line in rig.gateway.log().splitlines() if "the pool is exhausted" in line]
    assert len(lines) == 1, lines
    assert '"pool": "api"' in lines[0], lines
