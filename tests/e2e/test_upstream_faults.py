"""Upstream misbehaving beyond clean errors: CONTRACT §2 (502 `upstream_error` / 504
`upstream_timeout`, `x-should-retry: false` on a create whose job may exist) and §3 (the
tracker keeps the ledger right whatever the answers looked like).

Faults come from the simulator's knobs: `latency_ms` near the gateway's
`upstream.timeout_s`, `flap` (failing and served requests alternating), bursts of
`fail_next` and `create_then_500_next`, JSON answers cut mid-body (`truncate_json_next`) or
cut short but framed as complete (`garble_json_next`), and downloads cut half-way
(`truncate_next`) or stalled half-way (`stall_next`). After each one the test checks that
the jobs upstream made are each recorded for the team that asked, that every slot comes
free once the jobs end, that upstream's own limit was never hit, and that the gateway is
healthy and admitting.

The module has its own store, simulator and gateway (the session stack's gateway would
adopt these slots). Every wait polls with a deadline.
"""

from __future__ import annotations

import secrets
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest

from gateway.store import SLOTS, WAITER_TEAM
from support.processes import wait_until
from support.raw_http import read_head
from support.stack import Rig

TEAMS = ("alpha", "beta", "gamma")
LIMIT = 2
TIMEOUT_S = 1.0  # upstream.timeout_s: connect, and the longest wait between two reads
WAIT_S = 2.0  # quota.wait_s
TRACKER = {"poll_interval_s": 0.3, "lease_s": 2}
CONTENT_BYTES = 3 * 1024 * 1024 + 12345
# A create waits for a slot, then for upstream; one bound for every answer.
ANSWER_BOUND_S = WAIT_S + 2 * TIMEOUT_S + 3.0
SETTLE_S = 15.0
THREADS = 4
FAULT_WINDOW_S = 2.5
QUOTA_CODES = ("concurrency_limit_exceeded", "team_concurrency_limit_exceeded")


# -- the rig ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rig_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("upstream-faults")
    with Rig.open(
        workdir,
        client_timeout=ANSWER_BOUND_S + 10,
        queue_s=0.2,
        run_s=0.8,
        content_bytes=CONTENT_BYTES,
    ) as rig:
        rig.start_gateway(
            upstream={"timeout_s": TIMEOUT_S},
            tracker=TRACKER,
            quota={"when_full": "wait", "max_in_flight": LIMIT, "wait_s": WAIT_S},
        )
        yield rig


@pytest.fixture
def rig(rig_base: Rig) -> Rig:
    """No slot held (so the tracker calls upstream for nothing) and a fresh simulator."""
    rig_base.sim("POST", "/_sim/reset")  # wakes anything a previous test left hanging
    wait_until(lambda: rig_base.holders() == 0, SETTLE_S, "no slot held before the test")
    rig_base.sim("POST", "/_sim/reset")
    return rig_base


# -- driving and checking --------------------------------------------------------------------


@dataclass
class Answer:
    kind: str  # create | retrieve
    team: str
    prompt: str
    status: int
    code: str | None
    elapsed: float
    headers: dict[str, str] = field(default_factory=dict)
    video_id: str | None = None


def call(rig: Rig, kind: str, team: str, prompt: str, video_id: str | None = None) -> Answer:
    started = time.monotonic()
    with rig.client(team) as client:
        if kind == "create":
            reply = client.post("/v1/videos", json={"prompt": prompt})
        else:
            reply = client.get(f"/v1/videos/{video_id}")
    elapsed = time.monotonic() - started
    code = None
    if reply.status_code == 200:
        video_id = reply.json()["id"]
    else:
        error = reply.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}, error
        code = error["code"]
    return Answer(
        kind, team, prompt, reply.status_code, code, elapsed, dict(reply.headers), video_id
    )


def drive(rig: Rig, seconds: float, tag: str) -> list[Answer]:
    """THREADS clients: create, and retrieve what was created, back to back."""
    answers: list[Answer] = []
    failures: list[BaseException] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def worker(index: int) -> None:
        team = TEAMS[index % len(TEAMS)]
        try:
            for count in range(40):
                if time.monotonic() >= stop_at:
                    break
                prompt = f"{tag} {team} #{index}.{count} {secrets.token_hex(4)}"
                created = call(rig, "create", team, prompt)
                batch = [created]
                if created.status == 200:
                    batch.append(call(rig, "retrieve", team, prompt, created.video_id))
                with lock:
                    answers.extend(batch)
        except BaseException as exc:  # reported below, not lost in the thread
            failures.append(exc)

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(seconds + 3 * (ANSWER_BOUND_S + 10))
    assert not any(t.is_alive() for t in threads), "a client never got an answer"
    assert not failures, f"a client failed: {failures[0]!r}"
    return answers


def check_answers(answers: list[Answer]) -> None:
    """The contract's answers only, each in time; a failed create never invites a retry."""
    assert answers
    for a in answers:
        assert a.elapsed <= ANSWER_BOUND_S, a
        if a.status == 200:
            continue
        if a.kind == "create" and a.status == 429:
            assert a.code in QUOTA_CODES, a
            continue
        assert (a.status, a.code) in ((502, "upstream_error"), (504, "upstream_timeout")), a
        if a.kind == "create":  # the job may exist upstream: the SDKs must not pay twice
            assert a.headers.get("x-should-retry") == "false", a


def count(answers: list[Answer]) -> dict[tuple[str, int, str | None], int]:
    counts: dict[tuple[str, int, str | None], int] = {}
    for a in answers:
        key = (a.kind, a.status, a.code)
        counts[key] = counts.get(key, 0) + 1
    return counts


def check_ledger_and_health(rig: Rig, answers: list[Answer]) -> None:
    """Once the faults are off: every upstream job is its asker's, every slot comes free,
    upstream's limit was never hit, and the gateway is healthy and admitting."""
    rig.faults(latency_ms=0, fail_next=0, flap=0, create_then_500_next=0)
    wait_until(rig.healthy, 10, "/healthz and /readyz 200")
    after = call(rig, "create", "alpha", f"after the faults {secrets.token_hex(4)}")
    assert after.status == 200, after
    asked_by = {a.prompt: a.team for a in [*answers, after]}
    wait_until(
        lambda: rig.holders() == 0 and rig.stats()["running"] == 0,
        SETTLE_S,
        "every job ended and its slot freed by the tracker",
        interval=0.1,
    )
    assert rig.redis.hlen(SLOTS) == 0
    assert rig.redis.hlen(WAITER_TEAM) == 0  # nobody left waiting
    jobs = rig.upstream_jobs()
    assert len(jobs) == rig.stats()["jobs_created"]
    lost = {job["id"]: job["prompt"] for job in jobs if rig.owner(job["id"]) is None}
    assert not lost, f"jobs upstream that no team owns: {lost}"
    for job in jobs:
        assert rig.owner(job["id"]) == asked_by[job["prompt"]], job
    stats = rig.stats()
    assert stats["limit_hits"] == 0, stats
    assert stats["max_concurrency"] <= LIMIT, stats


def completed_video(rig: Rig, team: str = "alpha") -> Answer:
    """A create whose job has ended (and freed its slot): its answer."""
    answer = call(rig, "create", team, f"to download {secrets.token_hex(4)}")
    assert answer.status == 200, answer
    assert answer.video_id is not None
    wait_until(lambda: rig.holders() == 0, SETTLE_S, "the job ended and its slot freed")
    return answer


# -- slow, flapping and failing upstream -----------------------------------------------------


def test_an_upstream_just_under_the_timeout_is_slow_not_failing(rig: Rig) -> None:
    rig.faults(latency_ms=TIMEOUT_S * 1000 * 0.6)
    answers = drive(rig, FAULT_WINDOW_S, "just in time")
    check_answers(answers)
    assert {a.status for a in answers} <= {200, 429}, count(answers)
    assert any(a.kind == "create" and a.status == 200 for a in answers), count(answers)
    check_ledger_and_health(rig, answers)


def test_an_upstream_past_the_timeout_is_504_and_its_jobs_are_still_found(rig: Rig) -> None:
    """The jobs are made upstream, the answers come too late: 504, do not retry; the
    tracker then finds each job by its prompt and gives it to the team that asked."""
    first = completed_video(rig)
    video_id = first.video_id
    rig.faults(latency_ms=TIMEOUT_S * 1000 * 1.5)
    retrieve = call(rig, "retrieve", "alpha", "", video_id)
    answers = [first, *drive(rig, FAULT_WINDOW_S, "too late")]
    check_answers([retrieve, *answers])
    assert (retrieve.status, retrieve.code) == (504, "upstream_timeout"), retrieve
    timed_out = [a for a in answers if a.kind == "create" and a.status == 504]
    assert timed_out, count(answers)
    assert rig.stats()["jobs_created"] >= 1 + len(timed_out)  # each one did start a job
    check_ledger_and_health(rig, answers)
    with rig.client("alpha") as client:
        assert client.get(f"/v1/videos/{video_id}").status_code == 200


@pytest.mark.parametrize("pattern", ["flap", "bursts"])
def test_a_flapping_or_bursting_upstream(rig: Rig, pattern: str) -> None:
    """Failing and served requests alternate (`flap`), or come in bursts of 5xx before
    (`fail_next`) and after (`create_then_500_next`) the job was made."""
    stop = threading.Event()

    def bursts() -> None:
        while not stop.wait(0.4):
            rig.faults(fail_next=3, create_then_500_next=1)

    burster = threading.Thread(target=bursts, daemon=True)
    if pattern == "flap":
        rig.faults(flap=1)
    else:
        rig.faults(fail_next=3, create_then_500_next=1)
        burster.start()
    try:
        answers = drive(rig, FAULT_WINDOW_S, pattern)
    finally:
        stop.set()
        if burster.is_alive():
            burster.join(5)
    check_answers(answers)
    assert any(a.status == 502 for a in answers), count(answers)
    if pattern == "flap":  # a burst's lost creates may hold both slots all window long
        assert any(a.kind == "create" and a.status == 200 for a in answers), count(answers)
    check_ledger_and_health(rig, answers)


# -- answers cut short -----------------------------------------------------------------------


@pytest.mark.parametrize("knob", ["truncate_json_next", "garble_json_next"])
def test_a_create_whose_answer_is_cut_short_keeps_its_slot_and_its_job(rig: Rig, knob: str) -> None:
    """The job is made, its answer is unreadable (the connection closed mid-body, or a
    complete message whose JSON stops half-way): 502; the slot stays counted until the
    tracker has found the job, given it to the team and seen it end."""
    rig.faults(**{knob: 1})
    answer = call(rig, "create", "beta", f"cut short {knob} {secrets.token_hex(4)}")
    assert (answer.status, answer.code) == (502, "upstream_error"), answer
    assert rig.stats()["jobs_created"] == 1
    assert rig.holders() == 1  # the job runs upstream: its slot is held
    (job,) = rig.upstream_jobs()
    assert job["prompt"] == answer.prompt
    with rig.client("beta") as client:

        def listed() -> bool:
            page = client.get("/v1/videos", params={"limit": 100}).json()["data"]
            return job["id"] in {video["id"] for video in page}

        wait_until(listed, SETTLE_S, "the job recorded for the team that asked")
    check_ledger_and_health(rig, [answer])


def test_a_create_answer_cut_mid_body_forbids_a_retry(rig: Rig) -> None:
    rig.faults(truncate_json_next=1)
    answer = call(rig, "create", "alpha", f"cut {secrets.token_hex(4)}")
    check_answers([answer])
    assert answer.headers.get("x-should-retry") == "false", answer.headers


def test_a_create_answer_that_is_not_json_forbids_a_retry(rig: Rig) -> None:
    rig.faults(garble_json_next=1)
    answer = call(rig, "create", "alpha", f"garbled {secrets.token_hex(4)}")
    assert (answer.status, answer.code) == (502, "upstream_error"), answer
    assert rig.stats()["jobs_created"] == 1  # upstream did make the job
    assert answer.headers.get("x-should-retry") == "false", answer.headers


@pytest.mark.parametrize("knob", ["truncate_json_next", "garble_json_next"])
def test_a_retrieve_whose_answer_is_cut_short_is_502_and_changes_nothing(
    rig: Rig, knob: str
) -> None:
    video_id = completed_video(rig).video_id
    with rig.client("alpha") as client:
        before = client.get(f"/v1/videos/{video_id}")
        assert before.status_code == 200, before.text
        rig.faults(**{knob: 1})
        broken = call(rig, "retrieve", "alpha", "", video_id)
        assert (broken.status, broken.code) == (502, "upstream_error"), broken
        after = client.get(f"/v1/videos/{video_id}")
        assert after.status_code == 200, after.text
        assert after.json() == before.json()
        listed = client.get("/v1/videos", params={"limit": 100}).json()["data"]
        assert [v for v in listed if v["id"] == video_id] == [before.json()]
    assert rig.healthy()


# -- downloads cut or stalled half-way -------------------------------------------------------


def raw_download(rig: Rig, video_id: str, timeout: float) -> tuple[int, int, float]:
    """GET the content on a raw socket; (announced length, body bytes received, seconds
    until the gateway closed the connection)."""
    request = (
        f"GET /v1/videos/{video_id}/content HTTP/1.1\r\n"
        f"host: 127.0.0.1:{rig.gateway.port}\r\n"
        f"authorization: Bearer {rig.keys['alpha']}\r\n"
        "connection: keep-alive\r\n\r\n"
    ).encode()
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", rig.gateway.port), timeout=timeout) as conn:
        conn.sendall(request)
        status, headers, body = read_head(conn)
        assert status == 200, headers
        assert "transfer-encoding" not in headers, headers
        length = int(headers["content-length"])
        got = len(body)
        while got < length:
            chunk = conn.recv(1 << 20)  # a socket timeout here fails the test: a hang
            if not chunk:
                break
            got += len(chunk)
        closed_after = time.monotonic() - started
        if got == length:  # whole: the connection may stay open for the next request
            return length, got, closed_after
    return length, got, closed_after


def test_a_download_cut_half_way_is_visibly_incomplete(rig: Rig) -> None:
    created = completed_video(rig)
    video_id = created.video_id
    rig.faults(truncate_next=1)
    with rig.client("alpha") as client:
        received = 0
        with client.stream("GET", f"/v1/videos/{video_id}/content") as reply:
            assert reply.status_code == 200
            announced = int(reply.headers["content-length"])
            assert announced == CONTENT_BYTES
            # The error comes part-way through the loop, after the bytes it counts.
            with pytest.raises(httpx.RemoteProtocolError):  # noqa: PT012
                for chunk in reply.iter_raw():
                    received += len(chunk)
        assert 0 < received < announced  # never a short body passed off as the whole
        # The same on the wire: the gateway hangs up short of what it announced.
        rig.faults(truncate_next=1)
        length, got, _ = raw_download(rig, video_id, timeout=10)
        assert got < length == CONTENT_BYTES
        # The next download is whole, byte for byte what upstream serves.
        whole = client.get(f"/v1/videos/{video_id}/content")
    with rig.direct() as direct:
        expected = direct.get(f"/videos/{video_id}/content").content
    assert whole.status_code == 200
    assert whole.content == expected
    assert len(expected) == CONTENT_BYTES
    assert rig.healthy()
    check_ledger_and_health(rig, [created])


def test_a_download_stalled_upstream_is_cut_after_the_read_timeout(rig: Rig) -> None:
    """Upstream sends half, then nothing: the gateway gives up after `upstream.timeout_s`
    without a byte and hangs up on the client, short of the announced length."""
    created = completed_video(rig)
    video_id = created.video_id
    rig.faults(stall_next=1)
    length, got, closed_after = raw_download(rig, video_id, timeout=TIMEOUT_S + 10)
    assert got < length == CONTENT_BYTES
    assert TIMEOUT_S * 0.9 <= closed_after <= TIMEOUT_S + 3.0, closed_after
    rig.sim("POST", "/_sim/reset")  # frees the stalled upstream answer (and forgets jobs)
    assert rig.healthy()
    check_ledger_and_health(rig, [created])


def new_log(rig: Rig, since: int) -> str:
    return rig.gateway.log()[since:]


@pytest.mark.parametrize("knob", ["truncate_next", "stall_next"])
def test_a_download_broken_upstream_is_one_log_line_and_no_traceback(rig: Rig, knob: str) -> None:
    created = completed_video(rig)
    since = len(rig.gateway.log())
    rig.faults(**{knob: 1})
    length, got, _ = raw_download(rig, created.video_id, timeout=TIMEOUT_S + 10)
    assert got < length
    wait_until(
        lambda: "upstream stream broke mid-download" in new_log(rig, since), SETTLE_S, "its line"
    )
    rig.sim("POST", "/_sim/reset")  # frees a stalled upstream answer (and forgets jobs)
    assert rig.healthy()  # more requests after it: anything it logged is written by now
    lines = [
        line
        for line in new_log(rig, since).splitlines()
        if '"logger": "gateway.access"' not in line
    ]
    text = "\n".join(lines)
    assert text.count("upstream stream broke mid-download") == 1, text
    for noise in ("Traceback", "unhandled error", "Exception in ASGI", "without completing"):
        assert noise not in text, text


def test_a_client_gone_while_upstream_stalls_frees_its_download_at_once(rig: Rig) -> None:
    """A gateway that would wait a minute on the stalled upstream: the client's leaving
    must end the download (its budget claim, its upstream connection) now, not then."""
    created = completed_video(rig)
    gateway = rig.start_gateway(
        upstream={"timeout_s": 60.0},
        tracker=TRACKER,
        limits={"max_downloads": 1, "max_team_downloads": 1},
    )
    try:
        rig.faults(stall_next=1)
        request = (
            f"GET /v1/videos/{created.video_id}/content HTTP/1.1\r\nhost: gateway\r\n"
            f"authorization: Bearer {rig.keys['alpha']}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=20) as conn:
            conn.sendall(request)
            received = b""
            while b"\r\n\r\n" not in received:
                received += conn.recv(65536)
            got = len(received.split(b"\r\n\r\n", 1)[1])
            while got < CONTENT_BYTES // 2:  # all upstream sends before it stalls
                got += len(conn.recv(1 << 20))
        # Gone. The one download the replica allows is free again long before 60 s.
        with httpx.Client(
            base_url=gateway.url, headers={"authorization": f"Bearer {rig.keys['alpha']}"}
        ) as client:
            wait_until(
                lambda: (
                    client.get(
                        f"/v1/videos/{created.video_id}/content", headers={"range": "bytes=0-9"}
                    ).status_code
                    == 206
                ),
                SETTLE_S,
                "the stalled download's claim released",
            )
    finally:
        gateway.stop()
        rig.sim("POST", "/_sim/reset")
