"""CONTRACT §9's usage and admin routes, end to end: who may read what, and in which form.

Black box: a real gateway process in front of the bundled simulator, on the module's own
store (a `Rig`). The usage hashes are written straight into the store here, in the
format the budget core's scripts write (`store.usage_day_key`): these tests are about
the reading routes; the scripts' own tests settle real jobs. Every wait polls with a
deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from gateway.auth import key_digest, new_admin_key
from gateway.store import USAGE_PREFIX, usage_day_key, usage_month_key
from support.api import assert_error, ok, settle
from support.metrics import scrape
from support.processes import Process, start_gateway, wait_until
from support.stack import Rig

ADMIN_KEY = new_admin_key()
PRICING = {"sora-2": {"*": 0.10}, "sora-2-pro": {"*": 0.30}}
PINNED_S = 600.0  # a job that runs until its test deletes it
SECRET_PROMPT = "a secret storyboard for the launch"
JOB = {"model": "sora-2", "size": "1280x720", "seconds": "4"}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    with Rig.open(tmp_path_factory.mktemp("usage"), queue_s=0.05, run_s=0.5) as rig:
        yield rig


@pytest.fixture(scope="module")
def gateway(rig: Rig) -> Process:
    """One slot, queued when full; alpha has $2 a day, beta $50 a month, gamma no budget."""
    config = rig.config(
        upstream={"defaults": {"model": "sora-2", "size": "720x1280", "seconds": "4"}},
        tracker={"poll_interval_s": 0.2, "lease_s": 2},
        quota={"max_in_flight": 1},
    )
    config["pricing"] = PRICING
    config["admin"] = {"key_sha256": [key_digest(ADMIN_KEY)]}
    budgets = {"alpha": {"budget_usd_per_day": 2}, "beta": {"budget_usd_per_month": 50}}
    for team in config["teams"]:
        team.update(budgets.get(team["name"], {}))
    gateway = start_gateway(rig.workdir, config)
    rig.gateways.append(gateway)
    return gateway


@pytest.fixture
def usage(rig: Rig) -> Iterator[Rig]:
    """No usage before and after the test."""

    def clear() -> None:
        for key in rig.redis.scan_iter(match=USAGE_PREFIX + "*"):
            rig.redis.delete(key)

    clear()
    yield rig
    clear()


def client(gateway: Process, key: str | None) -> httpx.Client:
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=gateway.url, headers=headers, timeout=15.0)


def today() -> datetime:
    return datetime.now(UTC)


def write_day(rig: Rig, team: str, day: str, fields: dict[str, int]) -> None:
    rig.redis.hset(usage_day_key(team, day), mapping=fields)


def sora2(jobs: dict[str, int], seconds: int, cost: int, model: str = "sora-2") -> dict[str, int]:
    """One model's settled fields of a day hash, as the settlement script writes them."""
    fields = {f"{model}|seconds": seconds, f"{model}|cost": cost}
    fields.update({f"{model}|jobs|{outcome}": n for outcome, n in jobs.items()})
    return fields


# -- who may call ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/admin/usage", "/admin/usage?format=csv", "/admin/jobs"])
def test_a_team_key_or_none_on_admin_is_401_in_the_envelope(rig, gateway, path):
    for key in (rig.keys["alpha"], None, "sgw-admin-not-a-key"):
        with client(gateway, key) as caller:
            error = assert_error(caller.get(path), 401, "invalid_api_key")
        assert rig.keys["alpha"] not in error["message"]
    with client(gateway, ADMIN_KEY) as admin:
        assert admin.get(path).status_code == 200


def test_an_admin_key_is_not_a_team_key(gateway):
    with client(gateway, ADMIN_KEY) as admin:
        assert_error(admin.get("/v1/usage"), 401, "invalid_api_key")
        assert_error(admin.get("/v1/videos"), 401, "invalid_api_key")
        assert_error(admin.get("/admin/no-such-route"), 404, "not_found")
    with client(gateway, None) as anonymous:
        assert_error(anonymous.get("/admin/no-such-route"), 401, "invalid_api_key")


# -- GET /v1/usage ---------------------------------------------------------------------------


def test_v1_usage_shows_only_the_callers_team_with_its_budget(rig, gateway, usage):
    now = today()
    day, month = now.strftime("%Y-%m-%d"), now.strftime("%Y-%m")
    write_day(
        rig,
        "alpha",
        day,
        {
            "spent": 1_200_000,
            "reserved": 400_000,
            **sora2({"completed": 3, "failed": 1}, 12, 1_200_000),
        },
    )
    rig.redis.hset(
        usage_month_key("alpha", month), mapping={"spent": 1_200_000, "reserved": 400_000}
    )
    write_day(
        rig,
        "beta",
        day,
        {"spent": 9_000_000, **sora2({"completed": 3}, 30, 9_000_000, "sora-2-pro")},
    )
    rig.redis.hset(usage_month_key("beta", month), mapping={"spent": 40_000_000})

    with client(gateway, rig.keys["alpha"]) as alpha:
        report = ok(alpha.get("/v1/usage"))
    first = now.replace(day=1).strftime("%Y-%m-%d")
    assert (report["object"], report["team"], report["start"], report["end"]) == (
        "usage",
        "alpha",
        first,
        day,
    )
    # Every date of the month so far, in order, used or not.
    assert [d["date"] for d in report["days"]] == [
        (now.replace(day=1) + timedelta(days=n)).strftime("%Y-%m-%d") for n in range(now.day)
    ]
    (today_report,) = [d for d in report["days"] if d["date"] == day]
    assert today_report == {
        "date": day,
        "jobs": {"completed": 3, "failed": 1},
        "video_seconds": 12,
        "cost_usd": 1.2,
    }
    assert report["total"] == {"jobs": 4, "video_seconds": 12, "cost_usd": 1.2}
    midnight = datetime(now.year, now.month, now.day, tzinfo=UTC) + timedelta(days=1)
    assert report["budget"] == {
        "period": "day",
        "limit_usd": 2.0,
        "spent_usd": 1.2,
        "reserved_usd": 0.4,
        "resets_at": int(midnight.timestamp()),
    }
    assert "sora-2-pro" not in str(report)  # beta's model, beta's cost: not alpha's to see

    with client(gateway, rig.keys["beta"]) as beta:
        report = ok(beta.get("/v1/usage", params={"start": day, "end": day}))
    assert report["team"] == "beta"
    assert report["total"] == {"jobs": 3, "video_seconds": 30, "cost_usd": 9.0}
    assert (report["budget"]["period"], report["budget"]["spent_usd"]) == ("month", 40.0)
    with client(gateway, rig.keys["gamma"]) as gamma:
        report = ok(gamma.get("/v1/usage", params={"start": day, "end": day}))
    assert report["total"] == {"jobs": 0, "video_seconds": 0, "cost_usd": 0.0}
    assert report["budget"] is None


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ({"start": "2026-02-30"}, "start"),
        ({"end": "tomorrow"}, "end"),
        ({"start": "2026-12-10", "end": "2026-12-01"}, "start"),
        ({"start": "2024-01-01", "end": "2025-12-31"}, "start"),
    ],
)
def test_a_bad_range_is_400_naming_the_param(rig, gateway, query, param):
    with client(gateway, rig.keys["alpha"]) as alpha:
        assert_error(alpha.get("/v1/usage", params=query), 400, "invalid_request", param)
    with client(gateway, ADMIN_KEY) as admin:
        assert_error(admin.get("/admin/usage", params=query), 400, "invalid_request", param)


def test_jobs_the_gateway_settles_are_the_usage_it_reports(rig, gateway, usage):
    """The budget core's own writes, read back: two 4 s sora-2 jobs at $0.10/s and one
    that fails (charged nothing) on alpha's daily budget."""
    with client(gateway, rig.keys["alpha"]) as alpha:
        ids = [
            ok(alpha.post("/v1/videos", json={"prompt": f"a fox {n}", **JOB}))["id"]
            for n in range(2)
        ]
        ids.append(ok(alpha.post("/v1/videos", json={"prompt": "a fox #fail", **JOB}))["id"])
        ended = [settle(alpha, video_id)["status"] for video_id in ids]
        assert ended == ["completed", "completed", "failed"]
        day = today().strftime("%Y-%m-%d")

        def settled() -> bool:
            return ok(alpha.get("/v1/usage", params={"start": day}))["total"]["jobs"] == 3

        wait_until(settled, 10.0, "the three jobs were settled")
        report = ok(alpha.get("/v1/usage", params={"start": day}))
    assert report["days"] == [
        {
            "date": day,
            "jobs": {"completed": 2, "failed": 1},
            "video_seconds": 8,
            "cost_usd": 0.8,
        }
    ]
    assert (report["budget"]["spent_usd"], report["budget"]["reserved_usd"]) == (0.8, 0.0)
    with client(gateway, ADMIN_KEY) as admin:
        reply = admin.get("/admin/usage", params={"start": day, "format": "csv"})
    assert [
        (row["team"], row["model"], row["jobs"], row["video_seconds"], row["cost_usd"])
        for row in csv.DictReader(io.StringIO(reply.text))
    ] == [("alpha", "sora-2", "3", "8", "0.800000")]


# -- GET /admin/usage ------------------------------------------------------------------------


def test_admin_usage_csv_has_one_row_per_team_day_and_model(rig, gateway, usage):
    now = today()
    day, yesterday = now.strftime("%Y-%m-%d"), (now - timedelta(days=1)).strftime("%Y-%m-%d")
    both = {
        "spent": 1_400_000,
        **sora2({"completed": 1}, 4, 400_000),
        **sora2({"completed": 1, "vanished": 1}, 4, 1_000_000, "sora-2-pro"),
    }
    write_day(rig, "alpha", yesterday, both)
    write_day(rig, "beta", day, {"spent": 0, **sora2({"failed": 2}, 0, 0)})
    write_day(rig, "gamma", day, {"reserved": 400_000})  # reserved only: no row yet
    query = {"start": yesterday, "end": day}

    with client(gateway, ADMIN_KEY) as admin:
        reply = admin.get("/admin/usage", params={**query, "format": "csv"})
        assert reply.status_code == 200, reply.text
        assert reply.headers["content-type"].startswith("text/csv")
        rows = list(csv.DictReader(io.StringIO(reply.text)))
        report = ok(admin.get("/admin/usage", params=query))
    assert rows == [
        {
            "date": yesterday,
            "team": "alpha",
            "model": "sora-2",
            "jobs": "1",
            "video_seconds": "4",
            "cost_usd": "0.400000",
        },
        {
            "date": yesterday,
            "team": "alpha",
            "model": "sora-2-pro",
            "jobs": "2",
            "video_seconds": "4",
            "cost_usd": "1.000000",
        },
        {
            "date": day,
            "team": "beta",
            "model": "sora-2",
            "jobs": "2",
            "video_seconds": "0",
            "cost_usd": "0.000000",
        },
    ]
    # The JSON holds every configured team's report, each as the team's own route has it.
    assert (report["object"], report["start"], report["end"]) == ("usage", yesterday, day)
    by_team = {team["team"]: team for team in report["teams"]}
    assert set(by_team) == {"alpha", "beta", "gamma"}
    assert by_team["alpha"]["total"] == {"jobs": 3, "video_seconds": 8, "cost_usd": 1.4}
    with client(gateway, rig.keys["alpha"]) as alpha:
        assert ok(alpha.get("/v1/usage", params=query)) == by_team["alpha"]


def test_admin_usage_refuses_an_unknown_format(gateway):
    with client(gateway, ADMIN_KEY) as admin:
        assert_error(admin.get("/admin/usage?format=xlsx"), 400, "invalid_request", "format")


# -- GET /admin/jobs -------------------------------------------------------------------------


def test_admin_jobs_lists_running_and_queued_jobs_without_prompts(rig, gateway):
    rig.sim("POST", "/_sim/config", json={"queue_s": 0, "run_s": PINNED_S})
    created: list[tuple[str, str]] = []
    try:
        with client(gateway, rig.keys["gamma"]) as gamma:
            running = ok(gamma.post("/v1/videos", json={"prompt": SECRET_PROMPT, **JOB}))
            created.append(("gamma", running["id"]))
            wait_until(
                lambda: rig.holders() == 1 and rig.held_slots()[0].get("state") == "bound",
                10.0,
                "the first job holds the slot",
            )
        queued_ids = []
        for team in ("alpha", "beta"):
            with client(gateway, rig.keys[team]) as caller:
                reply = caller.post("/v1/videos", json={"prompt": f"{SECRET_PROMPT} {team}", **JOB})
                video = ok(reply)
                assert video["status"] == "queued", video
                created.append((team, video["id"]))
                queued_ids.append(video["id"])
        with client(gateway, ADMIN_KEY) as admin:
            reply = admin.get("/admin/jobs")
        listed = ok(reply)
        assert "secret storyboard" not in reply.text
        assert listed["object"] == "list"
        first, *waiting = listed["data"]
        assert {k: first[k] for k in ("id", "team", "kind", "state", "queue_position")} == {
            "id": running["id"],
            "team": "gamma",
            "kind": "create",
            "state": "running",
            "queue_position": None,
        }
        assert (first["model"], first["size"], first["seconds"]) == ("sora-2", "1280x720", 4)
        assert abs(first["started_at"] - time.time()) < 60
        assert {job["id"] for job in waiting} == set(queued_ids)
        assert {job["state"] for job in waiting} == {"queued"}
        # By queue position, 1 the next (the fair share's order, not arrival's). Teams
        # that used no slot time yet may both read 1: it is an estimate.
        places = [job["queue_position"] for job in waiting]
        assert places == sorted(places)
        assert places[0] == 1
        assert all(abs(job["queued_at"] - time.time()) < 60 for job in waiting)
        assert all(job["started_at"] is None for job in waiting)
    finally:
        rig.sim("POST", "/_sim/config", json={"queue_s": 0.05, "run_s": 0.5})
        for team, video_id in reversed(created):
            with client(gateway, rig.keys[team]) as caller:
                caller.delete(f"/v1/videos/{video_id}")
    wait_until(lambda: rig.holders() == 0, 15.0, "every slot came free")


def test_the_routes_are_counted_by_their_template(rig, gateway):
    with client(gateway, ADMIN_KEY) as admin:
        ok(admin.get("/admin/jobs"))
    with client(gateway, rig.keys["alpha"]) as alpha:
        ok(alpha.get("/v1/usage"))
    routes = {labels["route"] for labels, _ in scrape(gateway)["sora_gateway_requests_total"]}
    assert {"/admin/jobs", "/v1/usage"} <= routes
    admin_routes = {route for route in routes if route.startswith("/admin")}
    assert admin_routes <= {"/admin/jobs", "/admin/usage"}  # templates, never raw paths
    teams = {
        labels["team"]
        for labels, _ in scrape(gateway)["sora_gateway_requests_total"]
        if labels["route"] == "/admin/jobs"
    }
    assert teams == {"anonymous"}  # an admin is no team
