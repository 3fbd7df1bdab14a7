"""Session fixtures: a real Redis-compatible server, the simulator, real gateway processes.

Nothing here is faked: the store is a server process started on a free port, the
upstream is the bundled simulator in its own process, and the gateway runs as
`python -m gateway serve` exactly as deployed.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from processes import Process, start_gateway, start_simulator

from gateway.auth import key_digest, new_key
from gateway.embedded_store import EmbeddedRedis

TEAMS = ("alpha", "beta", "gamma")


@dataclass
class Stack:
    """One running gateway in front of the simulator, with a key for each team."""

    gateway: Process
    simulator: Process
    store: EmbeddedRedis
    keys: dict[str, str]
    token: str

    @property
    def base_url(self) -> str:
        return self.gateway.url + "/v1"

    def client(self, team: str = "alpha", **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 30.0)
        return httpx.Client(
            base_url=self.gateway.url,
            headers={"authorization": f"Bearer {self.keys[team]}"},
            **kwargs,
        )

    def sim(self) -> httpx.Client:
        return httpx.Client(base_url=self.simulator.url, timeout=10.0)

    def sim_stats(self) -> dict[str, Any]:
        with self.sim() as sim:
            return sim.get("/_sim/stats").json()

    def sim_requests(self) -> list[dict[str, Any]]:
        with self.sim() as sim:
            return sim.get("/_sim/requests", params={"limit": 1000}).json()

    def secrets(self) -> list[str]:
        return [self.token, *self.keys.values()]


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def store_server(workdir: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(workdir / "store", persistent=False).start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def team_keys() -> dict[str, str]:
    return {team: new_key() for team in TEAMS}


@pytest.fixture(scope="session")
def upstream_token() -> str:
    return "upstream-" + secrets.token_urlsafe(24)


def gateway_config(
    simulator_url: str, store_url: str, token: str, keys: dict[str, str], **upstream: Any
) -> dict[str, Any]:
    return {
        "upstream": {"base_url": simulator_url + "/v1", "token": token, **upstream},
        "store": {"redis_url": store_url},
        "tracker": {"poll_interval_s": 0.5, "lease_s": 3},
        "limits": {"max_body_bytes": 4 * 1024 * 1024},
        "teams": [{"name": team, "key_sha256": [key_digest(key)]} for team, key in keys.items()],
    }


@pytest.fixture(scope="session")
def session_stack(
    workdir: Path, store_server: EmbeddedRedis, team_keys: dict[str, str], upstream_token: str
) -> Iterator[Stack]:
    simulator = start_simulator(workdir, upstream_token, queue_s=0.2, run_s=0.6)
    try:
        gateway = start_gateway(
            workdir, gateway_config(simulator.url, store_server.url, upstream_token, team_keys)
        )
    except BaseException:
        simulator.stop()
        raise
    yield Stack(gateway, simulator, store_server, team_keys, upstream_token)
    gateway.stop()
    simulator.stop()


@pytest.fixture
def stack(session_stack: Stack) -> Stack:
    """The shared stack, with an empty store and a fresh simulator for each test."""
    redis.Redis.from_url(session_stack.store.url).flushall()
    with session_stack.sim() as sim:
        sim.post("/_sim/reset").raise_for_status()
    return session_stack
