"""The shared store going away and coming back: CONTRACT §2 (Redis unreachable -> 503
`store_unavailable`, fail closed), §3 (a slot is released only on evidence, and jobs are
tracked by the gateway itself) and §7 (with Redis down every team-scoped route is 503).

Every gateway here is a `Rig`'s: on a store of its own, stopped and restarted on the same
port by the test, in front of a simulator of its own. Nothing is shared with the session
stack, whose gateway would otherwise adopt these slots.

A store without persistence forgets the ledger when it restarts (nothing can release a
slot that is no longer recorded), so the tests that follow a job across the outage use
a store with an append-only file, as a production Redis would have.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from support.api import assert_error, multipart
from support.metrics import scrape
from support.processes import wait_until
from support.stack import Rig

TEAMS = ("alpha", "beta")
TRACKER = {"poll_interval_s": 0.3, "lease_s": 2}
RECOVERY_S = 10.0  # the brief's bound for ready-and-admitting after the store is back
NOT_READY_S = 3.0  # readiness is checked each second, each check bounded to one second
# §7: a slot is free within 2 x poll_interval of its job ending; the rest is slack for a
# loaded machine (the first tick after a restart also reconnects to the store).
RELEASE_S = 2 * TRACKER["poll_interval_s"] + 3.0


# -- module fixtures: two rigs, each a gateway on a store of its own -----------------------


class OutageRig(Rig):
    """A rig whose one gateway alone uses its store, which the test stops and starts on
    the same port (the address in the gateway's config)."""

    def store_down(self) -> None:
        self.store.stop()

    def store_up(self) -> None:
        if self.store.process is None:
            self.store.start()

    def metric(self, name: str, **labels: str) -> float | None:
        """One sample of the gateway's /metrics, by name and exact labels."""
        samples = scrape(self.gateway).get("sora_gateway_" + name, [])
        return next((value for found, value in samples if found == labels), None)

    def slots_in_use(self) -> float | None:
        return self.metric("slots_in_use")


def _rig(
    tmp_path_factory: pytest.TempPathFactory, name: str, *, persistent: bool
) -> Iterator[OutageRig]:
    workdir = tmp_path_factory.mktemp(f"store-outage-{name}")
    with OutageRig.open(
        workdir, teams=TEAMS, client_timeout=15.0, persistent=persistent, queue_s=0.2, run_s=1.0
    ) as rig:
        rig.start_gateway(tracker=TRACKER)
        yield rig


@pytest.fixture(scope="module")
def volatile_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutageRig]:
    """A gateway on a throwaway store (no persistence)."""
    yield from _rig(tmp_path_factory, "volatile", persistent=False)


@pytest.fixture(scope="module")
def durable_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OutageRig]:
    """A gateway on a store with an append-only file, which survives a restart."""
    yield from _rig(tmp_path_factory, "durable", persistent=True)


def _fresh(rig: OutageRig) -> OutageRig:
    """The store up, the gateway ready again, and the simulator back to its start (no
    jobs, no faults, no log). Readiness first: after a store restart, the first command
    on a connection the restart killed fails once, and that must not be a test's create."""
    rig.store_up()
    wait_until(rig.ready, RECOVERY_S, "/readyz 200 before the test")
    rig.sim("POST", "/_sim/reset")
    return rig


@pytest.fixture
def volatile(volatile_rig: OutageRig) -> Iterator[OutageRig]:
    yield _fresh(volatile_rig)
    volatile_rig.store_up()


@pytest.fixture
def durable(durable_rig: OutageRig) -> Iterator[OutageRig]:
    yield _fresh(durable_rig)
    durable_rig.store_up()


def _not_ready(node: OutageRig) -> bool:
    """`/readyz` answers from a check run each second: 503 `store_unavailable` soon."""
    reply = httpx.get(node.gateway.url + "/readyz", timeout=5.0)
    if reply.status_code == 200:
        return False
    assert_error(reply, 503, "store_unavailable")
    return True


def _create(client: httpx.Client, prompt: str) -> httpx.Response:
    return client.post("/v1/videos", json={"prompt": prompt})


def _completed(node: OutageRig) -> float:
    """Jobs of team alpha seen to complete, per this gateway's `jobs_total`."""
    return node.metric("jobs_total", team="alpha", kind="create", outcome="completed") or 0.0


def _upstream_status(node: OutageRig, video_id: str) -> str:
    return node.upstream_video(video_id)["status"]


# -- the store is down: alive, not ready, and nothing is admitted ---------------------------


def test_with_the_store_down_the_gateway_is_alive_not_ready_and_fails_closed(volatile):
    node = volatile
    with node.client() as client:
        assert _create(client, "before the outage").status_code == 200  # pooled connections
    wait_until(lambda: node.slots_in_use() == 0, 10.0, "the warm-up job's slot freed")
    errors_before = node.metric("store_errors_total") or 0.0
    before = node.stats()
    log_before = node.upstream_requests()

    node.store_down()

    wait_until(lambda: _not_ready(node), NOT_READY_S, "/readyz 503 once the store is down")
    # Twice: the first requests meet the pool's dead connections, later ones a refused port.
    for _ in range(2):
        ready = httpx.get(node.gateway.url + "/readyz", timeout=10.0)
        assert_error(ready, 503, "store_unavailable")
        health = httpx.get(node.gateway.url + "/healthz", timeout=10.0)
        assert health.status_code == 200, health.text
        assert health.headers.get("x-request-id")
        with node.client() as client:
            assert_error(_create(client, "a kite over dunes"), 503, "store_unavailable")
            form = multipart({"prompt": "a kite over dunes", "seconds": "4"})
            assert_error(client.post("/v1/videos", **form), 503, "store_unavailable")
            remix = client.post("/v1/videos/video_abc/remix", json={"prompt": "again"})
            assert_error(remix, 503, "store_unavailable")
            assert_error(client.get("/v1/videos"), 503, "store_unavailable")
            assert_error(client.get("/v1/videos/video_abc"), 503, "store_unavailable")
            assert_error(client.delete("/v1/videos/video_abc"), 503, "store_unavailable")

    # Fail closed: not one request reached upstream, let alone a job-creating one.
    after = node.stats()
    assert after["jobs_created"] == before["jobs_created"]
    assert after["requests"] == before["requests"]
    assert node.upstream_requests() == log_before
    # The failures are visible to whoever scrapes the gateway.
    assert (node.metric("store_errors_total") or 0.0) > errors_before


def test_with_the_store_down_a_character_is_not_created_upstream(volatile):
    """§7: with Redis down every team-scoped route is 503 (ownership lives in Redis), and
    §2: fail closed. A 503 tells the client nothing happened, so nothing may have."""
    node = volatile
    before = node.stats()["requests"]
    node.store_down()
    form = multipart({"name": "Mo the cat"}, {"video": ("mo.mp4", b"\0" * 64, "video/mp4")})
    with node.client() as client:
        reply = client.post("/v1/videos/characters", **form)
    assert_error(reply, 503, "store_unavailable")
    assert node.stats()["requests"] == before


def test_once_the_store_is_back_the_gateway_recovers_without_a_manual_step(volatile):
    node = volatile
    node.store_down()
    wait_until(lambda: _not_ready(node), NOT_READY_S, "/readyz 503 once the store is down")
    with node.client() as client:
        assert_error(_create(client, "during the outage"), 503, "store_unavailable")
    assert node.stats()["jobs_created"] == 0

    node.store.start()  # same port, same address in the gateway's config
    back = time.monotonic()
    wait_until(node.ready, RECOVERY_S, "/readyz 200 after the store came back")
    created: dict[str, Any] = {}

    def admitted() -> bool:
        with node.client() as client:
            reply = _create(client, "after the outage")
        if reply.status_code != 200:
            assert_error(reply, 503, "store_unavailable")  # still reconnecting: refused
            return False
        created.update(reply.json())
        return True

    wait_until(admitted, RECOVERY_S - (time.monotonic() - back), "a create admitted again")
    assert node.stats()["jobs_created"] == 1
    with node.client() as client:
        listed = client.get("/v1/videos")
    assert listed.status_code == 200, listed.text
    assert [v["id"] for v in listed.json()["data"]] == [created["id"]]
    assert node.slots_in_use() == 1
    # The tracker is back at work too: the job's slot comes free with no client polling.
    wait_until(
        lambda: node.slots_in_use() == 0,
        1.2 + RELEASE_S,
        "the new job's slot freed by the tracker",
    )
    assert node.stats()["limit_hits"] == 0


# -- a job across the outage (a store with an append-only file) ----------------------------


def test_a_job_that_ends_during_the_outage_is_released_once_the_store_is_back(durable):
    node = durable
    completed_before = _completed(node)
    with node.client() as client:
        reply = _create(client, "a slow tide")
    assert reply.status_code == 200, reply.text
    video_id = reply.json()["id"]
    assert node.slots_in_use() == 1

    node.store_down()
    # The job ends upstream while nobody can write the ledger; a client's retrieve
    # cannot free it either (ownership lives in the store).
    wait_until(lambda: _upstream_status(node, video_id) == "completed", 10.0, "job ended")
    with node.client() as client:
        assert_error(client.get(f"/v1/videos/{video_id}"), 503, "store_unavailable")
        assert_error(_create(client, "not now"), 503, "store_unavailable")
    assert node.stats()["jobs_created"] == 1

    node.store.start()
    # Still counted after the restart until the tracker sees the end, then released once.
    wait_until(lambda: node.slots_in_use() == 0, RELEASE_S, "the ended job's slot released")
    assert _completed(node) == completed_before + 1  # its end is counted once
    with node.client() as client:
        video = client.get(f"/v1/videos/{video_id}")
    assert video.status_code == 200, video.text
    assert video.json()["status"] == "completed"


def test_a_create_answered_during_the_outage_keeps_its_slot_until_settled(durable):
    """The job started upstream, but the gateway could not record it: the slot stays
    counted (the job may be running), the client is told not to retry, and after the
    restart the tracker finds the job, gives it to the team and frees the slot at its end."""
    node = durable
    completed_before = _completed(node)
    prompt = f"a lantern festival {secrets.token_hex(4)}"
    node.sim("POST", "/_sim/config", json={"run_s": 3.0})
    node.faults(latency_ms=1000)
    answer: dict[str, httpx.Response] = {}

    def send() -> None:
        with node.client() as client:
            answer["reply"] = _create(client, prompt)

    sender = threading.Thread(target=send)
    sender.start()
    try:
        # The job is admitted upstream; its answer is held back by the simulator.
        wait_until(lambda: node.stats()["jobs_created"] == 1, 10.0, "create reached upstream")
        node.store_down()
    finally:
        sender.join(30)
    reply = answer["reply"]
    assert_error(reply, 503, "store_unavailable")
    assert reply.headers.get("x-should-retry") == "false"  # the job exists: do not pay twice
    node.faults(latency_ms=0)
    jobs = node.upstream_jobs()
    assert [job["prompt"] for job in jobs] == [prompt]
    video_id = jobs[0]["id"]

    node.store.start()
    # While the job runs, its slot is held (admitted before the outage, kept through it).
    assert _upstream_status(node, video_id) in ("queued", "in_progress")
    # The first scrape after the restart may still meet a dead pooled connection.
    in_use = wait_until(node.slots_in_use, 5.0, "the quota gauges readable again")
    assert in_use == 1
    # The tracker settles the lost answer: the job becomes the team's, and only the team's.
    with node.client() as alpha:
        wait_until(
            lambda: alpha.get(f"/v1/videos/{video_id}").status_code == 200,
            RELEASE_S + 2,
            "the lost create's job recorded for its team",
        )
    with node.client("beta") as beta:
        # A pooled store connection the restart left dead answers one 503 (retryable).
        reply = wait_until(
            lambda: (r := beta.get(f"/v1/videos/{video_id}")).status_code != 503 and r,
            5.0,
            "the store reachable for beta's request",
        )
        assert_error(reply, 404, "video_not_found")
    wait_until(
        lambda: _upstream_status(node, video_id) == "completed", 10.0, "the job ended upstream"
    )
    wait_until(lambda: node.slots_in_use() == 0, RELEASE_S, "the settled job's slot released")
    assert _completed(node) == completed_before + 1
    stats = node.stats()
    assert stats["jobs_created"] == 1
    assert stats["limit_hits"] == 0
