"""CONTRACT §3 end to end: the shared quota of 2 running jobs, over replicas and teams.

Everything here is a real process: gateway replicas (`python -m gateway serve`), the
bundled simulator (which enforces its own 2-job limit and records the highest
concurrency it saw, and every request it received) and a Redis-compatible store. The
module has its OWN store and simulator: the session stack's gateway would otherwise
adopt these tests' slots and poll them against the wrong upstream.

Clients are raw httpx (or a raw socket) without retries. Every wait polls with a
deadline (`wait_until`); nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import secrets
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from support.metrics import scrape
from support.processes import Process, wait_until
from support.stack import Rig

TEAMS = ("alpha", "beta", "gamma")
LIMIT = 2
POLL_S = 0.3
LEASE_S = 2.0
QUEUE_S = 0.2
RUN_S = 0.8
JOB_S = QUEUE_S + RUN_S
PINNED_S = 600.0  # a job that runs until its test deletes it
MARGIN_S = 1.5  # scheduling slack on a busy machine; far below any failure mode's delay
RUNNING = ("queued", "in_progress")

ENVELOPE_FIELDS = {"message", "type", "param", "code"}
QUOTA_CODES = ("concurrency_limit_exceeded", "team_concurrency_limit_exceeded")


# -- the rig: one store, one simulator, gateways started per test ----------------------------


def start_replicas(
    rig: Rig,
    count: int,
    *,
    wait_s: float,
    poll_s: float = POLL_S,
    lease_s: float = LEASE_S,
    gamma_cap: int | None = None,
    **upstream: Any,
) -> list[Process]:
    """`count` replicas sharing the quota of LIMIT; `gamma_cap` caps team gamma alone."""
    return rig.start_gateways(
        count,
        upstream=upstream,
        quota={"when_full": "wait", "max_in_flight": LIMIT, "wait_s": wait_s},
        tracker={"poll_interval_s": poll_s, "lease_s": lease_s},
        team_caps=None if gamma_cap is None else {"gamma": gamma_cap},
    )


def create_posts(rig: Rig) -> list[dict[str, Any]]:
    """Every `POST /v1/videos` upstream received, oldest first."""
    log = rig.upstream_requests()
    return [r for r in log if r["method"] == "POST" and r["path"] == "/v1/videos"]


def posted_ids(rig: Rig) -> list[str]:
    return [r["headers"].get("x-request-id", "") for r in create_posts(rig)]


def upstream_job(rig: Rig, prompt: str) -> dict[str, Any] | None:
    return next((job for job in rig.upstream_jobs() if job["prompt"] == prompt), None)


@pytest.fixture(scope="module")
def rig_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with Rig.open(tmp_path_factory.mktemp("quota"), queue_s=QUEUE_S, run_s=RUN_S) as rig:
        yield rig


@pytest.fixture
def rig(rig_base: Rig) -> Iterator[Rig]:
    with rig_base.fresh() as rig:
        yield rig


# -- client side ------------------------------------------------------------------------------


def create(
    gateway: Process, key: str, prompt: str, request_id: str | None = None, timeout: float = 30.0
) -> httpx.Response:
    """One raw `POST /v1/videos`, JSON, no retries."""
    headers = {"authorization": f"Bearer {key}"}
    if request_id is not None:
        headers["x-request-id"] = request_id
    return httpx.post(
        gateway.url + "/v1/videos", json={"prompt": prompt}, headers=headers, timeout=timeout
    )


def new_request_id(tag: str) -> str:
    return f"req_{tag}_{secrets.token_hex(6)}"


def assert_envelope(reply: httpx.Response, status: int, codes: tuple[str, ...]) -> dict:
    assert reply.status_code == status, f"{reply.status_code}: {reply.text}"
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    assert reply.headers.get("x-request-id"), reply.headers
    body = reply.json()
    assert isinstance(body, dict), body
    assert list(body) == ["error"], body
    error = body["error"]
    assert set(error) == ENVELOPE_FIELDS, error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    assert isinstance(error["type"], str), error
    assert error["type"], error
    assert error["code"] in codes, error
    return error


def assert_quota_429(reply: httpx.Response, codes: tuple[str, ...] = QUOTA_CODES) -> str:
    """The contract's 429: envelope, one of `codes`, and both retry hints, consistent."""
    error = assert_envelope(reply, 429, codes)
    retry_after = reply.headers.get("retry-after", "")
    retry_after_ms = reply.headers.get("retry-after-ms", "")
    assert retry_after.isdigit(), reply.headers
    assert int(retry_after) >= 1, reply.headers
    assert retry_after_ms.isdigit(), reply.headers
    assert int(retry_after_ms) >= 1, reply.headers
    assert int(retry_after) * 1000 >= int(retry_after_ms), reply.headers
    return error["code"]


def gauge(gateway: Process, name: str) -> float | None:
    values = scrape(gateway).get(name)
    return values[0][1] if values else None


def slots_in_use_everywhere(gateways: list[Process]) -> list[float | None]:
    return [gauge(g, "sora_gateway_slots_in_use") for g in gateways]


def jobs_ended(gateway: Process, outcome: str) -> float:
    samples = scrape(gateway).get("sora_gateway_jobs_total", [])
    return sum(value for labels, value in samples if labels.get("outcome") == outcome)


def eventually(
    predicate: Callable[[], Any], timeout: float, message: str, state: Callable[[], Any]
) -> None:
    """`wait_until`, with what `state()` shows at the deadline added to the failure."""
    try:
        wait_until(predicate, timeout, message)
    except AssertionError as exc:
        raise AssertionError(f"{exc} (at the deadline: {state()!r})") from None


def remaining(deadline: float) -> float:
    return max(0.1, deadline - time.monotonic())


class SlotSampler(threading.Thread):
    """Reads the store's held slots every ~10 ms; keeps the highest count per team."""

    def __init__(self, rig: Rig) -> None:
        super().__init__(daemon=True)
        self.rig = rig
        self.stopping = threading.Event()
        self.max_total = 0
        self.max_team: dict[str, int] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                held = self.rig.held_slots()
                per_team: dict[str, int] = {}
                for record in held:
                    per_team[record["team"]] = per_team.get(record["team"], 0) + 1
                self.max_total = max(self.max_total, len(held))
                for team, count in per_team.items():
                    self.max_team[team] = max(self.max_team.get(team, 0), count)
                self.stopping.wait(0.01)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc

    def finish(self) -> None:
        self.stopping.set()
        self.join(timeout=5)
        assert self.error is None, f"the store sampler failed: {self.error!r}"


# -- 1. three replicas, three teams, a burst of 24 ------------------------------------------------


def test_burst_over_three_replicas_keeps_the_shared_and_team_limits(rig: Rig) -> None:
    # Which code a capped team's 429 carries is the state when its wait runs out: if its
    # job has just ended and the freed slot went to an earlier waiter of another team,
    # the shared limit is what refused it. So gamma's first job runs until this test
    # deletes it, after every wait has ended: gamma is at its cap for each of its waits,
    # whichever way the burst interleaves, while the other shared slot turns over.
    replicas = start_replicas(rig, 3, wait_s=1.5, gamma_cap=1)
    sampler = SlotSampler(rig)
    sampler.start()
    results: list[tuple[str, httpx.Response, float]] = []
    try:
        rig.sim("POST", "/_sim/config", json={"run_s": PINNED_S})
        pinned = create(replicas[0], rig.keys["gamma"], "burst 0 for gamma")
        assert pinned.status_code == 200, pinned.text
        rig.sim("POST", "/_sim/config", json={"run_s": RUN_S})  # every later job: RUN_S
        assert rig.holders() == 1, rig.held_slots()
        with ThreadPoolExecutor(max_workers=23) as pool:

            def send(team: str, gateway: Process, n: int) -> Future:
                def run() -> tuple[str, httpx.Response, float]:
                    reply = create(gateway, rig.keys[team], f"burst {n} for {team}")
                    return team, reply, time.monotonic()

                return pool.submit(run)

            # gamma's second create queues through another replica while a shared slot
            # is free: only gamma's own cap keeps it waiting, and it is first in line.
            futures = [send("gamma", replicas[1], 1)]
            wait_until(
                lambda: rig.waiting() + rig.holders() == 2, 5, "gamma's second create arrived"
            )
            assert rig.holders() == 1, f"gamma holds 2 slots: {rig.held_slots()}"
            # Then 22 at once, round-robin over teams, each team over every replica.
            for n in range(2, 24):
                futures.append(send(TEAMS[n % 3], replicas[(n // 3) % 3], n))
            results = [f.result(timeout=60) for f in futures]
    finally:
        sampler.finish()

    # gamma: every later create waited while gamma ran its one job, and was refused for it.
    for team, reply, _ in results:
        if team == "gamma":
            assert_quota_429(reply, ("team_concurrency_limit_exceeded",))
        elif reply.status_code != 200:
            # The others have no cap of their own: only the shared limit can refuse them.
            assert_quota_429(reply, ("concurrency_limit_exceeded",))
    ok = [(team, reply, at) for team, reply, at in results if reply.status_code == 200]
    # The slot free when the burst came went at once to one of the others, with no wait.
    assert ok, [r.status_code for _, r, _ in results]
    video_ids = {reply.json()["id"] for _, reply, _ in ok} | {pinned.json()["id"]}
    assert len(video_ids) == len(ok) + 1

    stats = rig.stats()
    assert stats["limit_hits"] == 0, stats
    assert stats["max_concurrency"] <= LIMIT, stats
    assert stats["jobs_created"] == len(ok) + 1, stats  # each admitted create went up once
    assert sampler.max_total == LIMIT, sampler.max_total  # it saw the account full
    assert sampler.max_team.get("gamma") == 1, sampler.max_team

    # gamma's job ends by a delete (its slot is free at once); no client polls anything
    # else: the trackers alone see the other jobs end and free their slots, within 2 poll
    # intervals of the last job's end (it ended at most JOB_S after its create was
    # answered).
    deleted = httpx.delete(
        f"{replicas[2].url}/v1/videos/{pinned.json()['id']}",
        headers={"authorization": f"Bearer {rig.keys['gamma']}"},
        timeout=10.0,
    )
    assert deleted.status_code == 200, deleted.text
    last_answer = max(at for _, _, at in ok)
    deadline = last_answer + JOB_S + 2 * POLL_S + MARGIN_S
    eventually(
        lambda: slots_in_use_everywhere(replicas) == [0, 0, 0],
        remaining(deadline),
        "slots_in_use back to 0 on every replica",
        lambda: slots_in_use_everywhere(replicas),
    )
    for replica in replicas:
        assert gauge(replica, "sora_gateway_slots_limit") == LIMIT
    assert rig.holders() == 0
    assert rig.stats()["limit_hits"] == 0


# -- 2. arrival order ---------------------------------------------------------------------------


def test_waiters_reach_upstream_in_arrival_order(rig: Rig) -> None:
    # The trackers are slowed right down so that only this test frees slots, one at a
    # time (a client's retrieve that shows a job's end frees its slot at once): two slots
    # freed in the same instant would let two waiters race to upstream, which says
    # nothing about the order they were admitted in.
    replicas = start_replicas(rig, 2, wait_s=30, poll_s=30, lease_s=60)
    count = 8
    request_ids = [new_request_id(f"order{n}") for n in range(count)]
    # One team, through both replicas: across teams the order is the fair share's
    # (CONTRACT §8.1, in wait mode too), within a team it is arrival order.
    teams = ["alpha"] * count
    by_request_id: dict[str, tuple[int, Future]] = {}

    def arrived() -> int:
        return rig.stats()["jobs_created"] + rig.waiting()

    with ThreadPoolExecutor(max_workers=count) as pool:
        for n in range(count):
            future = pool.submit(
                create, replicas[n % 2], rig.keys[teams[n]], f"in order {n}", request_ids[n]
            )
            by_request_id[request_ids[n]] = (n, future)
            # The next one starts only once this one is admitted or queued.
            wait_until(lambda n=n: arrived() >= n + 1, 10, f"create {n} admitted or queued")
        assert rig.stats()["jobs_created"] == LIMIT
        assert rig.waiting() == count - LIMIT

        for k in range(count - LIMIT):
            # Both slots held, nobody else admitted; free the oldest job's slot only.
            wait_until(
                lambda k=k: len(create_posts(rig)) == k + LIMIT,
                10,
                f"{k + LIMIT} creates upstream",
            )
            oldest = posted_ids(rig)[k]
            n, future = by_request_id[oldest]
            reply = future.result(timeout=10)
            assert reply.status_code == 200, reply.text
            video_id = reply.json()["id"]

            def ended(video_id: str = video_id, team: str = teams[n]) -> bool:
                seen = httpx.get(
                    f"{replicas[0].url}/v1/videos/{video_id}",
                    headers={"authorization": f"Bearer {rig.keys[team]}"},
                    timeout=10.0,
                )
                assert seen.status_code == 200, seen.text
                return seen.json()["status"] not in RUNNING

            wait_until(ended, 10, f"job of create {n} ended")
        replies = {rid: f.result(timeout=30) for rid, (_, f) in by_request_id.items()}

    for request_id, reply in replies.items():
        assert reply.status_code == 200, reply.text  # none got a 429 with wait_s 30
        assert reply.headers["x-request-id"] == request_id
    assert posted_ids(rig) == request_ids
    stats = rig.stats()
    assert stats["limit_hits"] == 0, stats
    assert stats["max_concurrency"] <= LIMIT, stats


# -- 3. a replica killed while it holds both slots -----------------------------------------------


def test_killed_replicas_slots_are_adopted_and_freed_by_the_survivors(rig: Rig) -> None:
    run_s = 4.0
    rig.sim("POST", "/_sim/config", json={"run_s": run_s})
    doomed, *survivors = start_replicas(rig, 3, wait_s=0.5)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(create, doomed, rig.keys[team], f"doomed {team}") for team in TEAMS[:2]
        ]
        created = [f.result(timeout=30) for f in futures]
    answered_at = time.monotonic()
    for reply in created:
        assert reply.status_code == 200, reply.text
    held = rig.held_slots()
    assert len(held) == LIMIT, held
    assert all(s["state"] == "bound" for s in held), held
    doomed_pid = doomed.pid()
    assert all(f":{doomed_pid}:" in s["owner"] for s in held), held
    assert rig.stats()["running"] == LIMIT
    # Every replica reads the shared count from the store, not its own share of it.
    assert slots_in_use_everywhere(survivors) == [LIMIT, LIMIT]

    doomed.stop(signal.SIGKILL)
    killed_at = time.monotonic()

    # The dead replica's jobs still run upstream and stay counted: a survivor turns a
    # new create away rather than sending it upstream.
    turned_away_id = new_request_id("while_dead")
    reply = create(survivors[0], rig.keys["gamma"], "while the slots are orphaned", turned_away_id)
    assert_quota_429(reply, ("concurrency_limit_exceeded",))
    assert turned_away_id not in posted_ids(rig)
    assert rig.stats()["jobs_created"] == LIMIT

    # The survivors adopt the slots once the lease runs out, with no client polling.
    survivor_pids = {s.pid() for s in survivors}

    def adopted() -> bool:
        slots = rig.held_slots()
        return len(slots) == LIMIT and all(
            int(s["owner"].split(":")[-2]) in survivor_pids for s in slots
        )

    eventually(adopted, LEASE_S + POLL_S + MARGIN_S, "slots adopted by survivors", rig.held_slots)
    assert time.monotonic() - killed_at >= LEASE_S / 2, "adopted long before the lease ran out"
    assert rig.stats()["running"] >= 1, "the jobs ended before the adoption could be seen"

    # ... and free them when the jobs end.
    deadline = answered_at + QUEUE_S + run_s + 2 * POLL_S + MARGIN_S
    eventually(
        lambda: slots_in_use_everywhere(survivors) == [0, 0],
        remaining(deadline),
        "survivors' slots_in_use back to 0",
        lambda: slots_in_use_everywhere(survivors),
    )
    assert rig.holders() == 0
    # Freed on evidence (the jobs completed), not by a lease or max_job_s expiry.
    assert sum(jobs_ended(s, "completed") for s in survivors) == LIMIT
    assert sum(gauge(s, "sora_gateway_lease_expiries_total") or 0 for s in survivors) == 0

    rig.sim("POST", "/_sim/config", json={"run_s": RUN_S})
    after = [
        create(survivor, rig.keys[team], f"after the kill {team}")
        for survivor, team in zip(survivors, ("alpha", "beta"), strict=True)
    ]
    for reply in after:
        assert reply.status_code == 200, reply.text
    stats = rig.stats()
    assert stats["limit_hits"] == 0, stats
    assert stats["max_concurrency"] <= LIMIT, stats
    assert stats["jobs_created"] == 2 * LIMIT, stats


# -- 4. created upstream, answered 500 ---------------------------------------------------------


def test_a_create_answered_500_keeps_its_slot_until_the_tracker_finds_its_job(rig: Rig) -> None:
    replicas = start_replicas(rig, 2, wait_s=10)
    rig.sim("POST", "/_sim/faults", json={"create_then_500_next": 1})
    lost_prompt = f"lost answer {secrets.token_hex(4)}"

    lost = create(replicas[0], rig.keys["alpha"], lost_prompt)
    assert_envelope(lost, 502, ("upstream_error",))
    assert lost.headers.get("x-should-retry") == "false", lost.headers
    job = upstream_job(rig, lost_prompt)
    assert job is not None, job  # the job does exist upstream
    assert job["status"] in RUNNING, job
    assert rig.holders() == 1, rig.held_slots()  # and it stays counted

    # Two more creates at once: only one slot is free until the lost job ends.
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(create, replicas[n], rig.keys["beta"], f"next {n}") for n in range(2)
        ]
        replies = [f.result(timeout=30) for f in futures]
    for reply in replies:
        assert reply.status_code == 200, reply.text

    stats = rig.stats()
    assert stats["limit_hits"] == 0, stats
    assert stats["max_concurrency"] <= LIMIT, stats
    assert stats["jobs_created"] == 3, stats

    # The tracker found the lost job and gave it to the team that asked for it.
    def listed(team: str) -> list[str]:
        page = httpx.get(
            replicas[1].url + "/v1/videos",
            headers={"authorization": f"Bearer {rig.keys[team]}"},
            timeout=10.0,
        )
        assert page.status_code == 200, page.text
        return [video["id"] for video in page.json()["data"]]

    wait_until(lambda: job["id"] in listed("alpha"), 10, "the lost job in alpha's list")
    assert job["id"] not in listed("beta")
    eventually(
        lambda: slots_in_use_everywhere(replicas) == [0, 0],
        2 * JOB_S + 2 * POLL_S + MARGIN_S,
        "slots back to 0",
        lambda: slots_in_use_everywhere(replicas),
    )
    assert rig.stats()["limit_hits"] == 0


# -- 5. a create that hangs ------------------------------------------------------------------


def test_a_hung_create_times_out_and_keeps_its_slot_until_its_job_ends(rig: Rig) -> None:
    run_s = 3.0
    rig.sim("POST", "/_sim/config", json={"run_s": run_s})
    (gateway,) = start_replicas(rig, 1, wait_s=10, timeout_s=1)
    rig.sim("POST", "/_sim/faults", json={"create_then_hang_next": 1})
    hung_prompt = f"hung answer {secrets.token_hex(4)}"

    started = time.monotonic()
    hung = create(gateway, rig.keys["alpha"], hung_prompt)
    assert time.monotonic() - started >= 0.9
    assert_envelope(hung, 504, ("upstream_timeout",))
    assert hung.headers.get("x-should-retry") == "false", hung.headers
    job = upstream_job(rig, hung_prompt)
    assert job is not None, job
    assert job["status"] in RUNNING, job
    held = rig.held_slots()
    assert len(held) == 1, held
    assert held[0]["team"] == "alpha", held

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [
            pool.submit(create, gateway, rig.keys[team], f"behind the hung one {team}")
            for team in ("beta", "gamma")
        ]

        # The tracker finds the job while it still runs and counts it as the slot's.
        def found() -> bool:
            return any(s["video"] == job["id"] and s["state"] == "bound" for s in rig.held_slots())

        eventually(found, 5, "the hung create's job bound to its slot", rig.held_slots)
        assert upstream_job(rig, hung_prompt)["status"] in RUNNING
        replies = [f.result(timeout=30) for f in futures]
    for reply in replies:
        assert reply.status_code == 200, reply.text

    stats = rig.stats()
    assert stats["limit_hits"] == 0, stats
    assert stats["max_concurrency"] <= LIMIT, stats
    wait_until(lambda: rig.holders() == 0, 2 * (QUEUE_S + run_s) + MARGIN_S, "every slot freed")
    assert upstream_job(rig, hung_prompt)["status"] == "completed"
    assert gauge(gateway, "sora_gateway_slots_in_use") == 0


# -- 6. a waiter that goes away --------------------------------------------------------------


def test_a_waiting_client_that_disconnects_leaves_the_queue(rig: Rig) -> None:
    rig.sim("POST", "/_sim/config", json={"run_s": 30})
    holder, waiter = start_replicas(rig, 2, wait_s=30)
    videos = []
    for team in ("alpha", "beta"):
        reply = create(holder, rig.keys[team], f"long job {team}")
        assert reply.status_code == 200, reply.text
        videos.append((team, reply.json()["id"]))
    assert rig.holders() == LIMIT

    abandoned_id = new_request_id("abandoned")
    body = json.dumps({"prompt": "nobody waits for me"}).encode()
    head = (
        "POST /v1/videos HTTP/1.1\r\n"
        f"host: 127.0.0.1:{waiter.port}\r\n"
        f"authorization: Bearer {rig.keys['gamma']}\r\n"
        f"x-request-id: {abandoned_id}\r\n"
        "content-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", waiter.port), timeout=10) as conn:
        conn.sendall(head + body)
        wait_until(lambda: rig.waiting() == 1, 5, "the request queued")
    # Closed: the gateway notices within its re-check interval and leaves the queue.
    wait_until(lambda: rig.waiting() == 0, 3, "the abandoned request left the queue")

    # Free both slots (a delete ends a job at once); the abandoned request must not take
    # one: a new create goes through, and upstream never heard of the abandoned one.
    for team, video_id in videos:
        deleted = httpx.delete(
            f"{holder.url}/v1/videos/{video_id}",
            headers={"authorization": f"Bearer {rig.keys[team]}"},
            timeout=10.0,
        )
        assert deleted.status_code == 200, deleted.text
    assert rig.holders() == 0
    fresh_id = new_request_id("fresh")
    fresh = create(waiter, rig.keys["gamma"], "after the abandoned one", fresh_id)
    assert fresh.status_code == 200, fresh.text
    posted = posted_ids(rig)
    assert abandoned_id not in posted
    assert posted[-1] == fresh_id
    assert rig.stats()["jobs_created"] == LIMIT + 1
    assert rig.held_slots()[0]["team"] == "gamma"
