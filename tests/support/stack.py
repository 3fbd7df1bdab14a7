"""Running stacks: the base gateway config, the session `Stack`, and the `Rig` factory.

Nothing is faked: the store is a server process on a free port, the upstream is the
bundled simulator in its own process, and each gateway runs as `python -m gateway serve`
exactly as deployed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from gateway.auth import key_digest
from gateway.embedded_store import EmbeddedRedis
from support.processes import Process

TEAMS = ("alpha", "beta", "gamma")


def gateway_config(
    simulator_url: str, store_url: str, token: str, keys: dict[str, str], **upstream: Any
) -> dict[str, Any]:
    """The config every test gateway starts from: fast tracker, one key per team."""
    return {
        "upstream": {"base_url": simulator_url + "/v1", "token": token, **upstream},
        "store": {"redis_url": store_url},
        "tracker": {"poll_interval_s": 0.5, "lease_s": 3},
        "limits": {"max_body_bytes": 4 * 1024 * 1024},
        "teams": [{"name": team, "key_sha256": [key_digest(key)]} for team, key in keys.items()],
    }


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
