"""CONTRACT §8 end to end, as a client sees it: a job that cannot start now is queued.

Black box: real gateway processes in front of the bundled simulator, on the module's own
store (a `Rig`: the session stack's gateway would otherwise start these tests' queued
jobs against the wrong upstream). The quota's `when_full` is left at its default, which
is `queue`, except in the test of wait mode.

A slot is held by a "pinned" job: the simulator's `run_s` is raised while it is
created, so it runs until its test deletes it (a delete frees a running job's slot at
once); the jobs queued behind it are short. What upstream received is read from the
simulator itself: its request log (method, path, query, headers), its job list (with
the token), its counters. Every wait polls with a deadline; nothing sleeps to
synchronise.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Mapping
from typing import Any

import httpx
import pytest
from openai import OpenAI

from support.api import assert_error, multipart, ok
from support.metrics import scrape
from support.processes import Process, start_gateway, wait_until
from support.simulator import UpstreamWatch
from support.stack import Rig

# The Videos API methods are marked deprecated in the SDK; they still are the API.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

LIMIT = 2  # quota.max_in_flight, and the simulator's own limit
QUEUE_S = 0.05  # the simulator's queued phase of a job
RUN_S = 0.5  # a short job's run
PINNED_S = 600.0  # a job that runs until its test deletes it
PINNED_PROMPT = "a pinned take"
TRACKER = {"poll_interval_s": 0.2, "lease_s": 2}
DEFAULTS = {"model": "sora-2", "size": "720x1280", "seconds": "4"}  # the simulator's
# §8.3: a queued job starts within 1 s of its slot coming free; a slot is free within
# 2 x poll_interval of its job ending (§7). The margin is scheduling slack on a busy
# 2-core machine, far below any failure mode's delay (a job that never starts).
START_S = 1.0
MARGIN_S = 2.0
SETTLE_S = 15.0  # a short job, queued or not, ends through the gateway by then
AT_ONCE_S = 3.0  # far below quota.wait_s (20 s by default): the create did not wait
GATEWAY_ID = re.compile(r"video_[0-9a-f]{32}")
RUNNING = ("queued", "in_progress")


# -- the rig: one store, one simulator, gateways started per test --------------------------


@pytest.fixture(scope="module")
def rig_base(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with Rig.open(tmp_path_factory.mktemp("queue"), queue_s=QUEUE_S, run_s=RUN_S) as rig:
        yield rig


@pytest.fixture
def rig(rig_base: Rig) -> Iterator[Rig]:
    with rig_base.fresh() as rig:
        yield rig


def start(
    rig: Rig,
    count: int = 1,
    *,
    quota: Mapping[str, Any] | None = None,
    teams: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Process]:
    """`count` replicas of one config: LIMIT slots, `quota` added (no `when_full`: the
    product's default), and each of `teams` (name -> settings) merged into that team."""
    config = rig.config(
        upstream={"defaults": DEFAULTS},
        tracker=TRACKER,
        quota={"max_in_flight": LIMIT, **(quota or {})},
    )
    for team in config["teams"]:
        team.update((teams or {}).get(team["name"], {}))
    started = [start_gateway(rig.workdir, config) for _ in range(count)]
    rig.gateways.extend(started)
    return started


# -- client and upstream side ----------------------------------------------------------------


def post(client: httpx.Client, path: str = "/v1/videos", **body: Any) -> httpx.Response:
    return client.post(path, json=body)


def hold_slots(rig: Rig, client: httpx.Client, count: int = LIMIT) -> list[str]:
    """`count` pinned jobs started upstream through the gateway; their upstream ids."""
    rig.sim("POST", "/_sim/config", json={"queue_s": 0, "run_s": PINNED_S})
    try:
        held = []
        for n in range(count):
            reply = post(client, prompt=f"{PINNED_PROMPT} {n} {time.monotonic_ns()}")
            video = ok(reply)
            assert "x-queue-position" not in reply.headers, "a free slot must start the job"
            held.append(video["id"])
    finally:
        rig.sim("POST", "/_sim/config", json={"queue_s": QUEUE_S, "run_s": RUN_S})
    assert {job["id"] for job in rig.upstream_jobs()} >= set(held)
    return held


def free_slots(client: httpx.Client, held: list[str]) -> None:
    for video_id in held:
        assert client.delete(f"/v1/videos/{video_id}").status_code == 200


def assert_queued(reply: httpx.Response, position: int | None = None) -> dict[str, Any]:
    """§8.2's answer: 200 at once, a gateway id, status queued, the queue headers."""
    video = ok(reply)
    assert GATEWAY_ID.fullmatch(video["id"]), video
    assert video["object"] == "video", video
    assert video["status"] == "queued", video
    assert video["progress"] == 0, video
    assert isinstance(video["created_at"], int), video
    assert abs(video["created_at"] - time.time()) < 60, video
    for name in ("completed_at", "expires_at", "error"):
        assert name in video, video
        assert video[name] is None, video
    assert reply.headers.get("x-queue-position", "").isdigit(), reply.headers
    if position is not None:
        assert int(reply.headers["x-queue-position"]) == position, reply.headers
    assert int(reply.headers["x-queue-position"]) >= 1, reply.headers
    poll_after = reply.headers.get("openai-poll-after-ms", "")
    assert poll_after.isdigit(), reply.headers
    assert 0 < int(poll_after) <= 10000, reply.headers
    assert reply.headers.get("x-request-id"), reply.headers
    assert reply.elapsed.total_seconds() < AT_ONCE_S, reply.elapsed
    return video


def queue_position(reply: httpx.Response) -> int:
    return int(reply.headers["x-queue-position"])


def upstream_jobs_in_order(rig: Rig) -> list[dict[str, Any]]:
    """Every job upstream still has, in the order it admitted them."""
    return rig.sim(
        "GET",
        "/v1/videos",
        params={"limit": 100, "order": "asc"},
        headers={"authorization": f"Bearer {rig.token}"},
    )["data"]


def upstream_job(rig: Rig, prompt: str) -> dict[str, Any] | None:
    return next((job for job in rig.upstream_jobs() if job["prompt"] == prompt), None)


def started(rig: Rig, prompt: str, timeout: float) -> dict[str, Any]:
    """The upstream job of `prompt`, once upstream has it."""
    return wait_until(lambda: upstream_job(rig, prompt), timeout, f"{prompt!r} started upstream")


def ended(client: httpx.Client, video_id: str, timeout: float = SETTLE_S) -> dict[str, Any]:
    """Retrieve by `video_id` through the gateway until the job is no longer running."""
    seen: dict[str, Any] = {}

    def done() -> bool:
        seen.update(ok(client.get(f"/v1/videos/{video_id}")))
        return seen["status"] not in RUNNING

    wait_until(done, timeout, f"{video_id} ended (last seen {seen.get('status')})", 0.1)
    return seen


def job_requests(watch: UpstreamWatch) -> list[tuple[str, str]]:
    """What reached upstream since `watch` besides GETs (the tracker polls held jobs)."""
    return [(r["method"], r["path"]) for r in watch.new_requests() if r["method"] != "GET"]


def assert_upstream_never_saw(rig: Rig, gateway_ids: list[str]) -> None:
    """No gateway id in any request upstream received (path, query, headers), nor as an
    upstream job's id or source (a body names its source there)."""
    log = json.dumps(rig.upstream_requests())
    jobs = upstream_jobs_in_order(rig)
    named = {job["id"] for job in jobs} | {job["remixed_from_video_id"] for job in jobs}
    for video_id in gateway_ids:
        assert video_id not in log, video_id
        assert video_id not in named, video_id


def metric(gateways: list[Process], name: str, **labels: str) -> float:
    """One sample summed over `gateways` (0 where a replica has none): a counter's total;
    for a gauge read from the store pass one replica."""
    total = 0.0
    for gateway in gateways:
        samples = scrape(gateway).get("sora_gateway_" + name, [])
        total += sum(value for found, value in samples if found == labels)
    return total


# -- accept: 200 at once, queued ---------------------------------------------------------------


def test_a_create_that_cannot_start_is_answered_200_queued_at_once(rig: Rig) -> None:
    start(rig)
    with rig.client("alpha") as alpha, rig.client("beta") as beta:
        hold_slots(rig, alpha)
        watch = UpstreamWatch(rig)
        asked = {"prompt": "a queued fox", "model": "sora-2-pro", "size": "1280x720"}
        first = assert_queued(post(beta, **asked, seconds="8"), position=1)
        assert {k: first[k] for k in ("model", "size", "seconds", "prompt")} == {
            **asked,
            "seconds": "8",
        }
        assert first.get("remixed_from_video_id") is None, first
        # Omitted fields come from upstream.defaults; multipart as the SDKs send it.
        second = assert_queued(
            beta.post("/v1/videos", **multipart({"prompt": "a queued hare"})), position=2
        )
        assert {k: second[k] for k in ("model", "size", "seconds")} == DEFAULTS, second
        assert second["prompt"] == "a queued hare"
        assert second["id"] != first["id"]
        # Nothing was sent upstream for either.
        assert job_requests(watch) == []
        assert rig.stats()["jobs_created"] == LIMIT
    assert_upstream_never_saw(rig, [first["id"], second["id"]])


def test_a_queued_job_is_retrieved_and_listed_without_asking_upstream(rig: Rig) -> None:
    start(rig)
    with rig.client("alpha") as alpha, rig.client("beta") as beta:
        hold_slots(rig, alpha)
        ahead = assert_queued(post(beta, prompt="ahead in the queue"), position=1)
        queued = assert_queued(post(beta, prompt="a queued owl", size="1280x720"), position=2)
        watch = UpstreamWatch(rig)
        retrieved = beta.get(f"/v1/videos/{queued['id']}")
        assert ok(retrieved) == queued
        assert queue_position(retrieved) == 2
        assert ok(beta.get(f"/v1/videos/{ahead['id']}")) == ahead
        listed = ok(beta.get("/v1/videos"))["data"]
        assert [(v["id"], v["status"]) for v in listed] == [
            (queued["id"], "queued"),
            (ahead["id"], "queued"),
        ]
        # Another team does not see it, as for any video.
        assert_error(alpha.get(f"/v1/videos/{queued['id']}"), 404, "video_not_found")
        # Upstream saw only the tracker's polls of the held jobs.
        assert job_requests(watch) == []
        for request in watch.new_requests():
            assert queued["id"] not in json.dumps(request), request
    assert_upstream_never_saw(rig, [ahead["id"], queued["id"]])


# -- start: by itself, under the gateway's id -----------------------------------------------------


def test_a_queued_job_starts_by_itself_and_keeps_the_gateway_id_everywhere(rig: Rig) -> None:
    """Queued through replica A; the held jobs end upstream and nobody polls them; the
    job starts, and replica B serves it by the gateway's id: retrieve, content, list,
    delete."""
    a, b = start(rig, 2)
    prompt = "a queued heron"
    with rig.client("alpha", a) as alpha_a, rig.client("beta", a) as beta_a:
        rig.sim("POST", "/_sim/config", json={"queue_s": 0, "run_s": 1.5})
        held = [ok(post(alpha_a, prompt=f"a short hold {n}"))["id"] for n in range(LIMIT)]
        rig.sim("POST", "/_sim/config", json={"queue_s": QUEUE_S, "run_s": RUN_S})
        queued = assert_queued(post(beta_a, prompt=prompt, seconds="8"), position=1)
    gateway_id = queued["id"]

    job = started(rig, prompt, 1.5 + 2 * TRACKER["poll_interval_s"] + START_S + MARGIN_S + 2)
    seen_at = time.time()
    freed_at = min(rig.upstream_video(video_id)["completed_at"] for video_id in held)
    # completed_at is a whole second, floored: up to 1 s before the job's real end.
    assert seen_at - freed_at <= 1 + 2 * TRACKER["poll_interval_s"] + START_S + MARGIN_S
    assert job["id"] != gateway_id
    assert (job["model"], job["size"], job["seconds"]) == (
        queued["model"],
        queued["size"],
        queued["seconds"],
    )

    with rig.client("beta", b) as beta_b:
        done = ended(beta_b, gateway_id)
        assert done["status"] == "completed", done
        assert done["id"] == gateway_id
        assert (done["prompt"], done["size"], done["seconds"]) == (prompt, job["size"], "8")
        content = beta_b.get(f"/v1/videos/{gateway_id}/content")
        assert content.status_code == 200, content.text
        with rig.direct() as direct:
            assert content.content == direct.get(f"/videos/{job['id']}/content").content
        listed = ok(beta_b.get("/v1/videos"))["data"]
        assert [(v["id"], v["status"]) for v in listed] == [(gateway_id, "completed")]
        deleted = ok(beta_b.delete(f"/v1/videos/{gateway_id}"))
        assert (deleted["id"], deleted["deleted"]) == (gateway_id, True), deleted
        assert upstream_job(rig, prompt) is None  # the delete reached upstream's job
        assert_error(beta_b.get(f"/v1/videos/{gateway_id}"), 404, "video_not_found")
    assert_upstream_never_saw(rig, [gateway_id])
    stats = rig.stats()
    assert (stats["limit_hits"], stats["jobs_created"]) == (0, LIMIT + 1), stats
    # §8.8: accept -> start upstream observed once, for its team, over both replicas.
    assert metric([a, b], "queue_seconds_count", team="beta") == 1
    assert metric([a, b], "queue_seconds_count", team="alpha") == 0


def test_create_and_poll_of_the_sdk_completes_through_a_queued_job(rig: Rig) -> None:
    (gateway,) = start(rig)
    sdk = OpenAI(base_url=gateway.url + "/v1", api_key=rig.keys["beta"], max_retries=0)
    with rig.client("alpha") as alpha:
        rig.sim("POST", "/_sim/config", json={"queue_s": 0, "run_s": 1.0})
        for n in range(LIMIT):
            ok(post(alpha, prompt=f"a short hold {n}"))
        rig.sim("POST", "/_sim/config", json={"queue_s": QUEUE_S, "run_s": RUN_S})
    raw = sdk.videos.with_raw_response.create(prompt="a queued sdk take", size="1280x720")
    assert raw.headers.get("x-queue-position") == "1", raw.headers
    queued = raw.parse()
    assert queued.status == "queued"
    assert GATEWAY_ID.fullmatch(queued.id)
    # And the one call most clients make, queued behind it.
    video = sdk.videos.create_and_poll(prompt="a queued sdk poll", poll_interval_ms=100)
    assert video.status == "completed", video
    assert GATEWAY_ID.fullmatch(video.id)
    job = upstream_job(rig, "a queued sdk poll")
    assert job is not None
    assert job["id"] != video.id  # it was queued: the client keeps the gateway's id
    first = sdk.videos.poll(queued.id, poll_interval_ms=100)
    assert (first.id, first.status, first.size) == (queued.id, "completed", "1280x720")
    assert sdk.videos.download_content(video.id).read()[4:8] == b"ftyp"
    sdk.close()
    assert_upstream_never_saw(rig, [queued.id, video.id])


# -- remix and the gateway's ids ---------------------------------------------------------------


def test_a_remix_of_a_queued_born_video_names_it_by_the_gateway_id(rig: Rig) -> None:
    start(rig)
    with rig.client("alpha") as alpha, rig.client("beta") as beta:
        held = hold_slots(rig, alpha)
        source = assert_queued(post(beta, prompt="a queued source", size="1280x720", seconds="8"))
        gateway_id = source["id"]
        free_slots(alpha, held)
        assert ended(beta, gateway_id)["status"] == "completed"
        upstream_source = upstream_job(rig, "a queued source")
        assert upstream_source is not None

        # A remix that starts at once: upstream's answer, its source under the gateway id.
        now = beta.post(f"/v1/videos/{gateway_id}/remix", json={"prompt": "remixed at once"})
        assert "x-queue-position" not in now.headers
        at_once = ok(now)
        assert at_once["remixed_from_video_id"] == gateway_id, at_once
        remixed = ended(beta, at_once["id"])
        assert (remixed["status"], remixed["remixed_from_video_id"]) == ("completed", gateway_id)

        # A remix that has to queue (the seed's body form): it inherits size and seconds.
        held = hold_slots(rig, alpha)
        later = assert_queued(
            post(beta, "/v1/videos/remix", video_id=gateway_id, prompt="remixed later")
        )
        assert later["remixed_from_video_id"] == gateway_id, later
        assert (later["size"], later["seconds"]) == ("1280x720", "8"), later
        free_slots(alpha, held)
        done = ended(beta, later["id"])
        assert (done["status"], done["remixed_from_video_id"]) == ("completed", gateway_id)
        listed = {v["id"]: v for v in ok(beta.get("/v1/videos"))["data"]}
        assert listed[later["id"]]["remixed_from_video_id"] == gateway_id

    # Upstream was asked for both remixes by the source's upstream id.
    remixes = {j["prompt"]: j for j in rig.upstream_jobs() if j["remixed_from_video_id"]}
    assert set(remixes) == {"remixed at once", "remixed later"}, remixes
    assert {j["remixed_from_video_id"] for j in remixes.values()} == {upstream_source["id"]}
    assert_upstream_never_saw(rig, [gateway_id, later["id"]])


def test_a_video_still_queued_is_not_a_source(rig: Rig) -> None:
    start(rig)
    with rig.client("alpha") as alpha, rig.client("beta") as beta:
        hold_slots(rig, alpha)
        queued = assert_queued(post(beta, prompt="not yet made"))
        watch = UpstreamWatch(rig)
        refusals = {
            "remix by path": beta.post(f"/v1/videos/{queued['id']}/remix", json={"prompt": "x"}),
            "remix by body": post(beta, "/v1/videos/remix", video_id=queued["id"], prompt="x"),
            "extension": post(
                beta, "/v1/videos/extensions", prompt="x", video={"id": queued["id"]}
            ),
        }
        for label, reply in refusals.items():
            assert reply.status_code == 400, (label, reply.text)
            assert_error(reply, 400, "video_not_completed")
        assert job_requests(watch) == []
        # Still queued, and the only job in the queue: the refusals queued nothing.
        assert queue_position(beta.get(f"/v1/videos/{queued['id']}")) == 1
        assert [v["id"] for v in ok(beta.get("/v1/videos"))["data"]] == [queued["id"]]
    assert_upstream_never_saw(rig, [queued["id"]])


# -- delete, failures at start, limits ----------------------------------------------------------


def test_a_deleted_queued_job_is_never_started(rig: Rig) -> None:
    start(rig)
    with rig.client("alpha") as alpha, rig.client("beta") as beta:
        held = hold_slots(rig, alpha)
        doomed = assert_queued(post(beta, prompt="deleted while queued"), position=1)
        kept = assert_queued(post(beta, prompt="queued behind it"), position=2)
        watch = UpstreamWatch(rig)
        answer = beta.delete(f"/v1/videos/{doomed['id']}")
        assert ok(answer) == {"id": doomed["id"], "object": "video.deleted", "deleted": True}
        assert job_requests(watch) == []  # nothing to delete upstream
        assert_error(beta.get(f"/v1/videos/{doomed['id']}"), 404, "video_not_found")
        assert queue_position(beta.get(f"/v1/videos/{kept['id']}")) == 1
        alpha.delete(f"/v1/videos/{held[0]}")
        freed_at = time.monotonic()
        started(rig, "queued behind it", START_S + MARGIN_S)
        assert time.monotonic() - freed_at <= START_S + MARGIN_S
        assert ended(beta, kept["id"])["status"] == "completed"
        free_slots(alpha, held[1:])
        assert_error(beta.get(f"/v1/videos/{doomed['id']}"), 404, "video_not_found")
        assert_error(beta.delete(f"/v1/videos/{doomed['id']}"), 404, "video_not_found")
    assert upstream_job(rig, "deleted while queued") is None
    assert rig.stats()["jobs_created"] == LIMIT + 1
    assert_upstream_never_saw(rig, [doomed["id"], kept["id"]])


def test_upstream_refusing_a_queued_job_at_start_fails_it_with_upstreams_code(rig: Rig) -> None:
    """The simulator makes only its four sizes: 640x640 is well-formed (the gateway
    passes it) and refused upstream with 400 `invalid_value`. The refusal frees the slot
    for the next job."""
    start(rig)
    with rig.client("alpha") as alpha, rig.client("beta") as beta:
        held = hold_slots(rig, alpha)
        refused = assert_queued(post(beta, prompt="an odd size", size="640x640"), position=1)
        after = assert_queued(post(beta, prompt="a good size"), position=2)
        alpha.delete(f"/v1/videos/{held[0]}")  # one slot, for both in turn
        failed = ended(beta, refused["id"], START_S + MARGIN_S + 5)
        assert failed["status"] == "failed", failed
        assert failed["id"] == refused["id"]
        assert failed["error"]["code"] == "invalid_value", failed
        assert isinstance(failed["error"]["message"], str), failed
        assert failed["error"]["message"], failed
        assert rig.token not in json.dumps(failed)
        assert ended(beta, after["id"])["status"] == "completed"
        # It stays failed, and is no source.
        assert ok(beta.get(f"/v1/videos/{refused['id']}"))["status"] == "failed"
        remix = beta.post(f"/v1/videos/{refused['id']}/remix", json={"prompt": "x"})
        assert_error(remix, 400, "video_not_completed")
        free_slots(alpha, held[1:])
    assert upstream_job(rig, "an odd size") is None
    assert rig.stats()["jobs_created"] == LIMIT + 1
    refusals = metric(rig.gateways, "jobs_total", team="beta", kind="create", outcome="refused")
    assert refusals == 1
    assert_upstream_never_saw(rig, [refused["id"], after["id"]])


def test_a_source_that_expired_or_vanished_while_queued_fails_the_job(rig: Rig) -> None:
    start(rig)
    with rig.client("alpha") as alpha, rig.client("beta") as beta:
        rig.sim("POST", "/_sim/config", json={"queue_s": 0, "run_s": 0.2, "expire_s": 3.0})
        short_lived = ok(post(beta, prompt="a short-lived source"))["id"]
        rig.sim("POST", "/_sim/config", json={"expire_s": 86400.0})
        lasting = ok(post(beta, prompt="a lasting source"))["id"]
        expiring = ended(beta, short_lived, 5)
        assert ended(beta, lasting, 5)["status"] == "completed"
        assert expiring["status"] == "completed", expiring
        held = hold_slots(rig, alpha)
        assert time.time() < expiring["expires_at"], "too slow: the source already expired"
        of_expired = assert_queued(
            beta.post(f"/v1/videos/{short_lived}/remix", json={"prompt": "too late"})
        )
        of_vanished = assert_queued(
            beta.post(f"/v1/videos/{lasting}/remix", json={"prompt": "source gone"})
        )
        assert ok(beta.delete(f"/v1/videos/{lasting}"))["deleted"] is True
        wait_until(lambda: time.time() > expiring["expires_at"] + 0.5, 5, "the source expired")
        watch = UpstreamWatch(rig)
        free_slots(alpha, held)
        expired = ended(beta, of_expired["id"], START_S + MARGIN_S + 5)
        vanished = ended(beta, of_vanished["id"], START_S + MARGIN_S + 5)
    assert (expired["status"], expired["error"]["code"]) == ("failed", "video_expired"), expired
    assert (vanished["status"], vanished["error"]["code"]) == ("failed", "invalid_video_id")
    # Refused by the gateway: neither remix was sent upstream.
    assert [r for r in job_requests(watch) if r[0] == "POST"] == []
    assert_upstream_never_saw(rig, [of_expired["id"], of_vanished["id"]])


def assert_queue_429(reply: httpx.Response, code: str) -> None:
    assert_error(reply, 429, code)
    assert reply.headers.get("retry-after", "").isdigit(), reply.headers
    assert int(reply.headers["retry-after"]) >= 1, reply.headers
    # Room comes back when one queued job starts: minutes at most, never the queue's
    # whole length of jobs.
    assert int(reply.headers["retry-after"]) <= 600, reply.headers


def test_a_full_queue_and_a_teams_full_queue_are_429_with_retry_after(rig: Rig) -> None:
    start(rig, quota={"max_queued": 3}, teams={"beta": {"max_queued": 1}})
    with (
        rig.client("alpha") as alpha,
        rig.client("beta") as beta,
        rig.client("gamma") as gamma,
    ):
        hold_slots(rig, alpha)
        watch = UpstreamWatch(rig)
        assert_queued(post(beta, prompt="beta's one"))
        assert_queue_429(post(beta, prompt="beta's two"), "team_queue_full")
        first = assert_queued(post(alpha, prompt="alpha's one"))
        assert_queued(post(alpha, prompt="alpha's two"))
        assert_queue_429(post(alpha, prompt="alpha's three"), "queue_full")
        assert_queue_429(post(gamma, prompt="gamma's one"), "queue_full")
        # A queued job deleted makes room again.
        assert ok(alpha.delete(f"/v1/videos/{first['id']}"))["deleted"] is True
        assert_queued(post(gamma, prompt="gamma's two"))
        assert job_requests(watch) == []
        depth = {team: metric(rig.gateways, "queue_depth", team=team) for team in rig.keys}
        assert depth == {"alpha": 1, "beta": 1, "gamma": 1}, depth
    assert rig.stats()["jobs_created"] == LIMIT
    rejections = {
        (team, reason): metric(rig.gateways, "queue_rejections_total", team=team, reason=reason)
        for team in rig.keys
        for reason in ("queue_full", "team_queue_full")
    }
    assert {key: n for key, n in rejections.items() if n} == {
        ("beta", "team_queue_full"): 1,
        ("alpha", "queue_full"): 1,
        ("gamma", "queue_full"): 1,
    }


def test_an_upload_over_max_queued_body_bytes_waits_as_in_wait_mode(rig: Rig) -> None:
    """Its body is not stored in Redis: it waits for a slot up to wait_s, then 429,
    while a small request is queued as ever."""
    start(rig, quota={"max_queued_body_bytes": 4096, "wait_s": 1.0})
    upload = multipart(
        {"prompt": "a big reference"},
        {"input_reference": ("ref.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 8192, "image/png")},
    )
    with rig.client("alpha") as alpha, rig.client("beta") as beta:
        held = hold_slots(rig, alpha)
        watch = UpstreamWatch(rig)
        big = beta.post("/v1/videos", **upload)
        assert_error(big, 429, "concurrency_limit_exceeded")
        assert big.elapsed.total_seconds() >= 0.9, big.elapsed
        assert "x-queue-position" not in big.headers
        small = assert_queued(post(beta, prompt="a small request"), position=1)
        assert job_requests(watch) == []
        # With a slot free the upload starts at once, upstream's object as ever.
        free_slots(alpha, held)
        ended(beta, small["id"])
        now = beta.post("/v1/videos", **upload)
        assert "x-queue-position" not in now.headers
        assert ok(now)["id"] == started(rig, "a big reference", 1)["id"]


def test_a_job_queued_past_max_queue_s_fails_with_queue_timeout(rig: Rig) -> None:
    start(rig, quota={"max_queue_s": 1.0})
    with rig.client("alpha") as alpha, rig.client("beta") as beta:
        hold_slots(rig, alpha)
        watch = UpstreamWatch(rig)
        queued_at = time.monotonic()
        queued = assert_queued(post(beta, prompt="waits too long"))
        timed_out = ended(beta, queued["id"], 1.0 + MARGIN_S + 3)
        assert time.monotonic() - queued_at >= 0.9
        assert timed_out["status"] == "failed", timed_out
        assert timed_out["error"]["code"] == "queue_timeout", timed_out
        assert timed_out["id"] == queued["id"]
        assert job_requests(watch) == []
    assert upstream_job(rig, "waits too long") is None
    labels = {"team": "beta", "kind": "create", "outcome": "queue_timeout"}
    assert metric(rig.gateways, "jobs_total", **labels) == 1


def test_a_capped_team_queues_while_another_team_starts_at_once(rig: Rig) -> None:
    start(rig, teams={"gamma": {"max_in_flight": 1}})
    with rig.client("alpha") as alpha, rig.client("gamma") as gamma:
        held = hold_slots(rig, gamma, 1)
        capped = assert_queued(post(gamma, prompt="gamma's second"), position=1)
        now = post(alpha, prompt="alpha starts at once")
        assert "x-queue-position" not in now.headers
        assert ok(now)["id"] == started(rig, "alpha starts at once", 1)["id"]
        assert ended(alpha, ok(now)["id"])["status"] == "completed"
        # Gamma's job waits for gamma's own slot, free as the other one is.
        assert ok(gamma.get(f"/v1/videos/{capped['id']}"))["status"] == "queued"
        free_slots(gamma, held)
        assert ended(gamma, capped["id"], START_S + MARGIN_S + 5)["status"] == "completed"


# -- wait mode, and the fair order ------------------------------------------------------------


def test_wait_mode_still_waits_then_answers_429(rig: Rig) -> None:
    start(rig, quota={"when_full": "wait", "wait_s": 1.0}, teams={"gamma": {"max_in_flight": 1}})
    with rig.client("alpha") as alpha, rig.client("gamma") as gamma:
        alphas = hold_slots(rig, alpha, 1)
        hold_slots(rig, gamma, 1)
        watch = UpstreamWatch(rig)
        full = post(alpha, prompt="no slot")
        assert_error(full, 429, "concurrency_limit_exceeded")
        assert full.elapsed.total_seconds() >= 0.9, full.elapsed
        assert full.headers.get("retry-after", "").isdigit(), full.headers
        assert full.headers.get("retry-after-ms", "").isdigit(), full.headers
        free_slots(alpha, alphas)
        capped = post(gamma, prompt="gamma over its cap")
        assert_error(capped, 429, "team_concurrency_limit_exceeded")
        assert capped.elapsed.total_seconds() >= 0.9, capped.elapsed
        assert job_requests(watch) == [("DELETE", f"/v1/videos/{alphas[0]}")]
        # A free slot is taken at once, upstream's object as ever.
        now = post(alpha, prompt="a free slot")
        assert "x-queue-position" not in now.headers
        assert ok(now)["id"] == started(rig, "a free slot", 1)["id"]


ALPHAS = [f"alpha's take {n}" for n in range(10)]


def queue_behind_alpha(
    rig: Rig, alpha: httpx.Client, beta: httpx.Client
) -> tuple[list[str], list[dict[str, Any]], dict[str, Any]]:
    """Alpha's two jobs run and ten more are queued; then beta's first arrives. Returns
    the held jobs, alpha's queued ones and beta's."""
    held = hold_slots(rig, alpha)
    queued = [assert_queued(post(alpha, prompt=p), position=n + 1) for n, p in enumerate(ALPHAS)]
    # Beta has used no slot time: its job is the next to start (§8.1).
    return held, queued, assert_queued(post(beta, prompt="beta's first"), position=1)


def test_a_team_arriving_behind_a_long_queue_starts_at_the_next_free_slot(rig: Rig) -> None:
    start(rig)
    with rig.client("alpha") as alpha, rig.client("beta") as beta:
        held, queued, betas = queue_behind_alpha(rig, alpha, beta)
        alpha.delete(f"/v1/videos/{held[0]}")
        first = wait_until(
            lambda: next(
                (
                    j
                    for j in upstream_jobs_in_order(rig)
                    if not j["prompt"].startswith(PINNED_PROMPT)
                ),
                None,
            ),
            START_S + MARGIN_S,
            "a queued job started",
        )
        assert first["prompt"] == "beta's first", first
        free_slots(alpha, held[1:])

        def status(video_id: str) -> str:
            return str(ok(alpha.get(f"/v1/videos/{video_id}"))["status"])

        wait_until(
            lambda: all(status(v["id"]) == "completed" for v in queued),
            SETTLE_S,
            "alpha's queue done",
            0.2,
        )
        assert ended(beta, betas["id"])["status"] == "completed"
    order = [j["prompt"] for j in upstream_jobs_in_order(rig)]
    assert order == ["beta's first", *ALPHAS], order  # and alpha's in arrival order
    assert rig.stats()["limit_hits"] == 0


def test_queue_positions_follow_the_fair_order(rig: Rig) -> None:
    """1 = the next to start (§8.2): once beta's job is ahead, alpha's read 2..11."""
    start(rig)
    with rig.client("alpha") as alpha, rig.client("beta") as beta:
        _, queued, betas = queue_behind_alpha(rig, alpha, beta)
        positions = [queue_position(alpha.get(f"/v1/videos/{v['id']}")) for v in queued]
        assert queue_position(beta.get(f"/v1/videos/{betas['id']}")) == 1
        assert positions == list(range(2, 12)), positions
