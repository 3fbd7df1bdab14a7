"""The shared store behind Redis Sentinel, and a failover while both slots are held.

CONTRACT §3: the jobs sent upstream and not yet seen to end never exceed the limit, over
every replica, and slots come free only on evidence. A failover of the store must not
make the gateways forget jobs that are running upstream (that would let a third job
through and hit the account's limit), and must not need a manual step: the gateways
find the new primary through the Sentinels themselves (`store.sentinel`).

The module runs its own store (a primary, one replica, three Sentinels: the same
server binary in sentinel mode), and a `Rig` for its own simulator and two gateways;
nothing is shared with the session stack, whose gateway would otherwise adopt these
slots. The rig's own store stands idle: the gateways find theirs through the Sentinels.

Sentinel mode needs only this: a config file per Sentinel that the Sentinel can write
(it rewrites the file with what it learns: the replica, the other Sentinels, the new
primary after a failover), passed as `<binary> <file> --sentinel`. The same holds for
`redis-server` and `valkey-server`. The data servers get config files too, so that the
`CONFIG REWRITE` a Sentinel sends with a promotion succeeds, as it would in production.

Every wait polls with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from gateway.embedded_store import free_port, server_binary
from gateway.store import HOLDERS, SLOTS
from support.api import assert_error
from support.processes import Process, wait_until
from support.stack import Rig

MASTER = "mymaster"
TRACKER = {"poll_interval_s": 0.3, "lease_s": 2}
LIMIT = 2
QUEUE_S = 0.2
RUN_S = 8.0  # long enough to outlast the failover with both jobs still running
READY_AFTER_KILL_S = 15.0  # the bound for both gateways to be ready on the new primary
STARTUP_S = 15.0
# §7: freed within 2 x poll_interval of the job's end; the rest is slack for a busy machine.
RELEASE_S = 2 * TRACKER["poll_interval_s"] + 3.0


# -- the store: real server processes ------------------------------------------------------


@dataclass
class Server:
    """One server process (data or sentinel) on a loopback port, with its own log."""

    name: str
    port: int
    conf: Path
    log: Path
    popen: subprocess.Popen[bytes]

    def client(self, **kwargs: Any) -> redis.Redis:
        kwargs.setdefault("socket_timeout", 2.0)
        kwargs.setdefault("socket_connect_timeout", 2.0)
        return redis.Redis(host="127.0.0.1", port=self.port, decode_responses=True, **kwargs)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _start(name: str, directory: Path, conf_text: str, *args: str) -> Server:
    """Write `name`.conf in a directory of its own and start the binary on it."""
    port = free_port()
    home = directory / name
    home.mkdir(parents=True, exist_ok=True)
    conf = home / f"{name}.conf"
    log = home / f"{name}.log"
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {home}\nlogfile {log}\n" + conf_text, encoding="utf-8"
    )
    popen = subprocess.Popen(
        [server_binary(), str(conf), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = Server(name, port, conf, log, popen)

    def answers() -> bool:
        if not server.alive():
            raise AssertionError(f"{name} exited at startup:\n{server.log_tail()}")
        try:
            with server.client(socket_connect_timeout=0.5) as client:
                return bool(client.ping())
        except redis.RedisError:
            return False

    try:
        wait_until(answers, STARTUP_S, f"{name} answering on port {port}")
    except BaseException:
        server.kill()
        raise
    return server


@dataclass
class Cluster:
    primary: Server
    replica: Server
    sentinels: list[Server]

    def all(self) -> list[Server]:
        return [self.primary, self.replica, *self.sentinels]

    @property
    def sentinel_hosts(self) -> list[str]:
        return [f"127.0.0.1:{s.port}" for s in self.sentinels]

    def master_addresses(self) -> set[tuple[str, int] | None]:
        """What each live Sentinel currently names as the primary."""
        seen: set[tuple[str, int] | None] = set()
        for sentinel in self.sentinels:
            with sentinel.client() as client:
                addr = client.sentinel_get_master_addr_by_name(MASTER)
            seen.add((addr[0], int(addr[1])) if addr else None)
        return seen

    def monitoring_ready(self) -> bool:
        """Every Sentinel sees the primary, the other two Sentinels and a synced replica."""
        with self.replica.client() as client:
            if client.info("replication").get("master_link_status") != "up":
                return False
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as client:
                    master = client.sentinel_master(MASTER)
                    replicas = client.sentinel_slaves(MASTER)
            except redis.RedisError:
                return False
            if master.get("num-other-sentinels") != len(self.sentinels) - 1:
                return False
            if master.get("port") != self.primary.port or not master.get("is_master"):
                return False
            if [(r.get("port"), r.get("master-link-status")) for r in replicas] != [
                (self.replica.port, "ok")
            ]:
                return False
        return True


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("sentinel")


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[Cluster]:
    started: list[Server] = []
    try:
        data = 'save ""\nappendonly no\n'
        primary = _start("primary", workdir, data)
        started.append(primary)
        replica = _start("replica", workdir, data, "--replicaof", "127.0.0.1", str(primary.port))
        started.append(replica)
        monitor = (
            f"sentinel monitor {MASTER} 127.0.0.1 {primary.port} 2\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\n"
            f"sentinel failover-timeout {MASTER} 5000\n"
            f"sentinel parallel-syncs {MASTER} 1\n"
        )
        for n in range(3):
            started.append(_start(f"sentinel{n + 1}", workdir, monitor, "--sentinel"))
        cluster = Cluster(primary, replica, started[2:])
        wait_until(
            cluster.monitoring_ready,
            STARTUP_S,
            "the Sentinels see the primary, each other and the synced replica",
            interval=0.1,
        )
        yield cluster
    finally:
        for server in reversed(started):
            server.kill()


@pytest.fixture(scope="module")
def rig(workdir: Path) -> Iterator[Rig]:
    with Rig.open(workdir, teams=("alpha", "beta"), queue_s=QUEUE_S, run_s=RUN_S) as rig:
        yield rig


@pytest.fixture(scope="module")
def gateways(cluster: Cluster, rig: Rig) -> Iterator[list[Process]]:
    try:
        yield rig.start_gateways(
            2,
            store={"sentinel": {"master_name": MASTER, "hosts": cluster.sentinel_hosts}},
            tracker=TRACKER,
            quota={"when_full": "wait", "max_in_flight": LIMIT, "wait_s": 1.0},
        )
    finally:
        rig.stop_gateways(signal.SIGKILL)


# -- helpers ---------------------------------------------------------------------------------


def _create(rig: Rig, gateway: Process, team: str, prompt: str) -> httpx.Response:
    with rig.client(team, gateway, timeout=20.0) as client:
        return client.post("/v1/videos", json={"prompt": prompt})


def _held_videos(store: Server) -> set[str]:
    """The video of every slot the ledger at `store` counts."""
    with store.client() as client:
        held = client.zrange(HOLDERS, 0, -1)
        records = client.hgetall(SLOTS)
    return {json.loads(records[slot])["video"] for slot in held if slot in records}


def _assert_account_never_over(rig: Rig) -> dict[str, Any]:
    stats = rig.stats()
    assert stats["limit_hits"] == 0, stats
    assert stats["max_concurrency"] <= LIMIT, stats
    return stats


# -- the failover ------------------------------------------------------------------------------


def test_a_failover_keeps_the_admitted_jobs_counted_and_needs_no_manual_step(
    cluster: Cluster, gateways: list[Process], rig: Rig
) -> None:
    a, b = gateways
    for gateway in gateways:
        assert rig.ready(gateway), gateway.log()[-2000:]

    # Both slots taken, one job through each replica.
    created = []
    for gateway, team in ((a, "alpha"), (b, "beta")):
        reply = _create(rig, gateway, team, f"before the failover via {team}")
        assert reply.status_code == 200, reply.text
        created.append(reply.json()["id"])
    with cluster.primary.client() as primary:
        assert primary.zcard(HOLDERS) == LIMIT
    assert _held_videos(cluster.primary) == set(created)

    # Replication is asynchronous: a write acknowledged by the primary can be lost in a
    # failover. A production setup narrows that window with `min-replicas-to-write` /
    # `min-replicas-max-lag` on the primary; here the test makes sure the replica has the
    # admissions before the kill, since what is under test is the gateways, not Redis.
    def replicated() -> bool:
        with cluster.replica.client() as replica:
            return replica.zcard(HOLDERS) == LIMIT

    wait_until(replicated, 5.0, "both admissions replicated", interval=0.05)
    assert _held_videos(cluster.replica) == set(created)

    killed_at = time.monotonic()
    cluster.primary.kill(signal.SIGKILL)

    # During the failover the gateways fail closed: never a 200 while the count is unknown.
    during = _create(rig, a, "alpha", "during the failover")
    assert during.status_code in (429, 503), during.text
    assert_error(
        during,
        during.status_code,
        "store_unavailable" if during.status_code == 503 else "concurrency_limit_exceeded",
    )

    new_primary = ("127.0.0.1", cluster.replica.port)
    wait_until(
        lambda: cluster.master_addresses() == {new_primary},
        READY_AFTER_KILL_S,
        "every Sentinel names the replica as the new primary",
        interval=0.1,
    )
    promoted_s = time.monotonic() - killed_at
    for gateway in gateways:
        wait_until(
            lambda gateway=gateway: rig.ready(gateway),
            max(0.1, READY_AFTER_KILL_S - (time.monotonic() - killed_at)),
            f"gateway {gateway.port} /readyz 200 on the new primary "
            f"(promotion took {promoted_s:.1f}s)\n{gateway.log()[-3000:]}",
            interval=0.1,
        )
    ready_s = time.monotonic() - killed_at
    assert ready_s <= READY_AFTER_KILL_S

    # The jobs admitted before the failover are still counted on the new primary ...
    with cluster.replica.client() as store:
        assert store.info("replication")["role"] == "master"
        assert store.zcard(HOLDERS) == LIMIT
    assert _held_videos(cluster.replica) == set(created)
    # ... while they still run upstream (else this machine is too slow for the test) ...
    running = rig.stats()["running"]
    assert running == LIMIT, f"the jobs ended before the check ({ready_s:.1f}s after the kill)"
    # ... so neither replica admits a third job.
    for gateway, team in ((a, "alpha"), (b, "beta")):
        reply = _create(rig, gateway, team, f"after the failover via {team}")
        assert_error(reply, 429, "concurrency_limit_exceeded")
        assert reply.headers.get("retry-after")
    stats = _assert_account_never_over(rig)
    assert stats["jobs_created"] == LIMIT

    # The trackers (no client polling) see the jobs end and free their slots on the new
    # primary; then the gateways admit again.
    def freed() -> bool:
        with cluster.replica.client() as store:
            return store.zcard(HOLDERS) == 0

    ends_in = QUEUE_S + RUN_S - (time.monotonic() - killed_at)
    wait_until(freed, max(0.0, ends_in) + RELEASE_S, "the trackers freed the ended jobs' slots")
    for gateway, team in ((a, "alpha"), (b, "beta")):
        reply = _create(rig, gateway, team, f"after the jobs ended via {team}")
        assert reply.status_code == 200, reply.text
    with cluster.replica.client() as store:
        assert store.zcard(HOLDERS) == LIMIT
    stats = _assert_account_never_over(rig)
    assert stats["jobs_created"] == 2 * LIMIT
