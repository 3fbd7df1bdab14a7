"""Running stacks: the base gateway config, the session `Stack`, and the `Rig` factory.

Nothing is faked: the store is a server process on a free port, the upstream is the
bundled simulator in its own process, and each gateway runs as `python -m gateway serve`
exactly as deployed.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import signal
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import httpx
import redis

from gateway.auth import key_digest, new_key
from gateway.embedded_store import EmbeddedRedis
from gateway.store import BEATS, HOLDERS, QUEUED_TEAMS, SLOTS, WAITER_TEAM, queue_key, video_key
from support.api import ok
from support.processes import Process, start_gateway, start_simulator, wait_until

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


class Rig:
    """A test module's own store, simulator and gateways, with a key for each team.

    For the modules whose gateways must not meet the session stack's: its gateway would
    adopt their slots and poll them against the wrong upstream. `Rig.open` starts the
    store and the simulator and, on leaving, stops every gateway started since, then
    them. Gateways start from `gateway_config` plus the module's own sections
    (`start_gateways`); they reach the store at `store_url`, which a subclass may point
    at something in front of it.
    """

    def __init__(
        self,
        workdir: Path,
        store: EmbeddedRedis,
        simulator: Process,
        token: str,
        keys: dict[str, str],
        *,
        client_timeout: float = 30.0,
    ) -> None:
        self.workdir = workdir
        self.store = store
        self.simulator = simulator
        self.token = token
        self.keys = keys
        self.client_timeout = client_timeout
        self.store_url = store.url
        self.redis = redis.Redis.from_url(store.url, decode_responses=True)
        self.gateways: list[Process] = []

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        workdir: Path,
        *,
        teams: tuple[str, ...] = TEAMS,
        client_timeout: float = 30.0,
        persistent: bool = False,
        token: str | None = None,
        **simulator_options: Any,
    ) -> Iterator[Self]:
        """A rig in `workdir`; `simulator_options` are `simulate` options (`run_s=0.8`).

        `persistent` gives the store an append-only file, for a test that restarts it and
        needs the ledger back; `token` is the upstream token (a random one by default).
        """
        token = token or "upstream-" + secrets.token_urlsafe(24)
        keys = {team: new_key() for team in teams}
        with contextlib.ExitStack() as started:
            store = EmbeddedRedis(workdir / "store", persistent=persistent).start()
            started.callback(store.cleanup)
            simulator = start_simulator(workdir, token, **simulator_options)
            started.callback(simulator.stop)
            rig = cls(workdir, store, simulator, token, keys, client_timeout=client_timeout)
            started.callback(rig.close)
            yield rig

    def close(self) -> None:
        self.stop_gateways()
        self.redis.close()

    @contextlib.contextmanager
    def fresh(self) -> Iterator[Self]:
        """This rig for one test: an empty store and a reset simulator; every gateway the
        test starts is stopped after it."""
        self.redis.flushall()
        self.sim("POST", "/_sim/reset")
        try:
            yield self
        finally:
            self.stop_gateways()

    # -- gateways

    def config(
        self,
        *,
        upstream: Mapping[str, Any] | None = None,
        team_caps: Mapping[str, int] | None = None,
        team_options: Mapping[str, Mapping[str, Any]] | None = None,
        **sections: Any,
    ) -> dict[str, Any]:
        """`gateway_config` with `upstream` options added, each of `sections` (`quota=`,
        `tracker=`, `limits=`, `pricing=`) in place of the base one, `team_caps` as
        teams' `max_in_flight`, and `team_options` (team -> fields) added to teams."""
        config = gateway_config(
            self.simulator.url, self.store_url, self.token, self.keys, **(upstream or {})
        )
        config.update({name: dict(section) for name, section in sections.items()})
        for team in config["teams"]:
            if team["name"] in (team_caps or {}):
                team["max_in_flight"] = team_caps[team["name"]]
            team.update((team_options or {}).get(team["name"], {}))
        return config

    def start_gateways(
        self,
        count: int,
        *,
        env: dict[str, str] | None = None,
        extra_args: tuple[str, ...] = (),
        name: str = "gateway",
        **config: Any,
    ) -> list[Process]:
        """`count` replicas of one config (`config`'s arguments), stopped by `close`;
        `env`, `extra_args` and `name` as for `start_gateway`."""
        settings = self.config(**config)
        started = []
        for _ in range(count):
            gateway = start_gateway(self.workdir, settings, env, extra_args, name)
            self.gateways.append(gateway)
            started.append(gateway)
        return started

    def start_gateway(self, **options: Any) -> Process:
        (gateway,) = self.start_gateways(1, **options)
        return gateway

    @property
    def gateway(self) -> Process:
        """The first gateway started: the module's, where it has one."""
        return self.gateways[0]

    def stop_gateways(self, sig: int = signal.SIGTERM) -> None:
        """Every gateway started, newest first; SIGKILL for a test that must not wait for a
        graceful drain of whatever it left in flight."""
        while self.gateways:
            self.gateways.pop().stop(sig)

    def client(
        self, team: str = "alpha", gateway: Process | None = None, timeout: float | None = None
    ) -> httpx.Client:
        """A client of `gateway` (the first one by default) with `team`'s key."""
        return httpx.Client(
            base_url=(gateway or self.gateway).url,
            headers={"authorization": f"Bearer {self.keys[team]}"},
            timeout=self.client_timeout if timeout is None else timeout,
        )

    def video(self, team: str, timeout: float = 15.0) -> str:
        """A completed video of `team`, created (as JSON) and polled on the first gateway."""
        with self.client(team) as client:
            created = client.post("/v1/videos", json={"prompt": f"a video of {team}"})
            assert created.status_code == 200, created.text
            video_id = created.json()["id"]
            wait_until(
                lambda: client.get(f"/v1/videos/{video_id}").json()["status"] == "completed",
                timeout,
                "the video completed",
            )
        return video_id

    def ready(self, gateway: Process | None = None) -> bool:
        try:
            reply = httpx.get((gateway or self.gateway).url + "/readyz", timeout=5.0)
        except httpx.HTTPError:
            return False
        return reply.status_code == 200

    def healthy(self, gateway: Process | None = None) -> bool:
        """/healthz and /readyz both 200."""
        url = (gateway or self.gateway).url
        try:
            health = httpx.get(url + "/healthz", timeout=5.0)
            ready = httpx.get(url + "/readyz", timeout=5.0)
        except httpx.HTTPError:
            return False
        return health.status_code == 200 and ready.status_code == 200

    # -- the simulator: its control routes and its own /v1 (with the real token)

    def sim(self, method: str, path: str, **kwargs: Any) -> Any:
        reply = httpx.request(method, self.simulator.url + path, timeout=10.0, **kwargs)
        reply.raise_for_status()
        return reply.json()

    def stats(self) -> dict[str, Any]:
        return self.sim("GET", "/_sim/stats")

    def faults(self, **knobs: float) -> None:
        self.sim("POST", "/_sim/faults", json=knobs)

    def upstream_requests(self) -> list[dict[str, Any]]:
        """Every /v1 request upstream received (as many as it keeps), oldest first."""
        return self.sim("GET", "/_sim/requests", params={"limit": 1000})

    def direct(self) -> httpx.Client:
        """The simulator's own /v1 with the real token: what upstream itself says."""
        return httpx.Client(
            base_url=self.simulator.url + "/v1",
            headers={"authorization": f"Bearer {self.token}"},
            timeout=10.0,
        )

    def upstream_jobs(self) -> list[dict[str, Any]]:
        return self.sim(
            "GET",
            "/v1/videos",
            params={"limit": 100},
            headers={"authorization": f"Bearer {self.token}"},
        )["data"]

    def upstream_video(self, video_id: str) -> dict[str, Any]:
        with self.direct() as direct:
            return ok(direct.get(f"/videos/{video_id}"))

    # -- the store, read beside the gateways

    def holders(self) -> int:
        return int(self.redis.zcard(HOLDERS))

    def waiting(self) -> int:
        return int(self.redis.zcard(BEATS))

    def held_slots(self) -> list[dict[str, Any]]:
        """The records of the slots counted in `holders` (one transaction)."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zrange(HOLDERS, 0, -1)
            pipe.hgetall(SLOTS)
            held, records = pipe.execute()
        return [json.loads(records[slot]) for slot in held if slot in records]

    def ledger(self) -> dict[str, int]:
        """The ledger's counts, in one transaction."""
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.zcard(HOLDERS)
            pipe.hlen(SLOTS)
            pipe.zcard(BEATS)  # every waiter has a heartbeat
            pipe.hlen(WAITER_TEAM)  # one entry per waiter in the teams' FIFOs
            pipe.scard(QUEUED_TEAMS)
            for team in self.keys:
                pipe.zcard(queue_key(team))
            holders, slots, beats, waiter_team, queued_teams, *fifos = pipe.execute()
        return {
            "holders": holders,
            "slots": slots,
            "queue": sum(fifos),  # waiters in the teams' FIFOs
            "queued_teams": queued_teams,
            "beats": beats,
            "waiter_team": waiter_team,
        }

    def owner(self, video_id: str) -> str | None:
        """The team the store records as the video's owner."""
        return self.redis.hget(video_key(video_id), "team")


def aof_written(rig: Rig) -> bool:
    """Every write the store acknowledged is in its append-only file (not in its buffer)."""
    info = rig.redis.info("persistence")
    return (
        info.get("aof_enabled") == 1
        and info.get("aof_buffer_length", 0) == 0
        and info.get("aof_pending_bio_fsync", 0) == 0
    )
