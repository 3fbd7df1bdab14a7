"""Issue 14's acceptance: policy, budgets and usage, seen from outside (CONTRACT §9).

Real processes only: a Redis-compatible store with its append-only file, the bundled
simulator, gateways as `python -m gateway serve`, the official SDK where a client's view
matters. Every amount a test expects is worked out from the prices below: sora-2 costs
$0.10 a second at any size, so a 4-second job reserves $0.40 and $2 a day pays for five.
"""

from __future__ import annotations

import calendar
import csv
import datetime as dt
import io
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from gateway.auth import key_digest, new_key
from support.api import TERMINAL, assert_envelope, assert_error, ok
from support.metrics import scrape
from support.processes import Process, wait_until, write_config
from support.simulator import UpstreamWatch, sim_config
from support.stack import Rig, aof_written

pytestmark = [
    pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning"),
    pytest.mark.timeout(240),
]

PRICING = {
    "sora-2": {"*": 0.10},
    "sora-2-pro": {"720x1280": 0.30, "1280x720": 0.30, "1024x1792": 0.50, "1792x1024": 0.50},
}
# What the simulator assumes for an omitted field (gateway.simulator.jobs): the same.
DEFAULTS = {"model": "sora-2", "size": "720x1280", "seconds": "4"}
ADMIN_KEY = new_key()
# The team of the policy tests: sora-2 at 1280x720, up to 8 s (issue 14's acceptance).
POLICY = {"models": ["sora-2"], "sizes": ["1280x720"], "max_seconds": 8}
FAST_TRACKER = {"poll_interval_s": 0.1, "lease_s": 1.5}
IMMEDIATE_S = 1.5  # an answer within this did not wait for anything
CSV_HEADER = ["date", "team", "model", "jobs", "video_seconds", "cost_usd"]
USD = 1e-6  # amounts are kept in µUSD: a report exact to the micro-dollar


class BudgetRig(Rig):
    """A rig whose gateways know the prices, the admin key and upstream's defaults; a
    test gives each team its policy and budgets (`policy=`)."""

    def config(
        self, *, policy: dict[str, dict[str, Any]] | None = None, **sections: Any
    ) -> dict[str, Any]:
        sections.setdefault("pricing", PRICING)
        sections.setdefault("admin", {"key_sha256": [key_digest(ADMIN_KEY)]})
        upstream = {"defaults": DEFAULTS, **(sections.pop("upstream", None) or {})}
        return super().config(upstream=upstream, team_options=policy, **sections)

    def admin(self, gateway: Process | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=(gateway or self.gateway).url,
            headers={"authorization": f"Bearer {ADMIN_KEY}"},
            timeout=self.client_timeout,
        )

    def admin_jobs(self, gateway: Process | None = None) -> list[dict[str, Any]]:
        with self.admin(gateway) as admin:
            listing = ok(admin.get("/admin/jobs"))
        assert listing["object"] == "list", listing
        return listing["data"]

    def usage(self, team: str, gateway: Process | None = None, **params: str) -> dict[str, Any]:
        with self.client(team, gateway) as client:
            return ok(client.get("/v1/usage", params=params))

    def sdk(self, team: str, sent: list[httpx.Request] | None = None) -> OpenAI:
        """The SDK with its default retries; `sent` collects every request it makes."""
        hooks = {"request": [sent.append]} if sent is not None else {}
        return OpenAI(
            base_url=self.gateway.url + "/v1",
            api_key=self.keys[team],
            http_client=httpx.Client(event_hooks=hooks, timeout=self.client_timeout),
        )


@pytest.fixture(scope="module")
def budget_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BudgetRig]:
    workdir = tmp_path_factory.mktemp("budgets")
    with BudgetRig.open(workdir, persistent=True, queue_s=0, run_s=0.3) as rig:
        yield rig


@pytest.fixture
def rig(budget_rig: BudgetRig) -> Iterator[BudgetRig]:
    with budget_rig.fresh() as fresh:
        try:
            yield fresh
        finally:  # no graceful drain of the long jobs a test leaves running
            fresh.stop_gateways(signal.SIGKILL)


# -- helpers ---------------------------------------------------------------------------------


def timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    began = time.monotonic()
    reply = call()
    return reply, time.monotonic() - began


def today() -> str:
    return dt.datetime.now(dt.UTC).date().isoformat()


def next_midnight() -> int:
    now = dt.datetime.now(dt.UTC)
    return calendar.timegm((now.date() + dt.timedelta(days=1)).timetuple())


def next_month() -> int:
    now = dt.datetime.now(dt.UTC)
    year, month = (now.year + 1, 1) if now.month == 12 else (now.year, now.month + 1)
    return calendar.timegm(dt.date(year, month, 1).timetuple())


def queue_depth(gateway: Process) -> dict[str, float]:
    return {labels["team"]: value for labels, value in scrape(gateway)["sora_gateway_queue_depth"]}


def by_team_and_state(jobs: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    return Counter((job["team"], job["state"]) for job in jobs)


def finished(
    client: httpx.Client, video_id: str, timeout: float = 20.0, *, store_restarted: bool = False
) -> dict[str, Any]:
    """Retrieved until it ended; the final object. After a store restart, a pooled
    connection the restart cut answers one 503 `store_unavailable` (CONTRACT §2: try
    again) on the route it serves next: asked again."""
    seen: dict[str, Any] = {}

    def ended() -> bool:
        reply = client.get(f"/v1/videos/{video_id}")
        if store_restarted and reply.status_code == 503:
            assert_error(reply, 503, "store_unavailable")
            return False
        seen.update(ok(reply))
        return seen["status"] in TERMINAL

    wait_until(ended, timeout, f"{video_id} ended (last: {seen.get('status')})")
    return seen


def usage_when(
    rig: BudgetRig,
    team: str,
    gateway: Process,
    ready: Callable[[dict[str, Any]], bool],
    message: str,
    timeout: float = 10.0,
) -> dict[str, Any]:
    """The team's report once `ready` says so; an answer other than 200 (the store
    coming back, say) is asked again."""
    seen: list[dict[str, Any]] = []

    def check() -> bool:
        with rig.client(team, gateway) as client:
            try:
                reply = client.get("/v1/usage")
            except httpx.HTTPError:
                return False
        if reply.status_code != 200:
            return False
        seen.append(reply.json())
        return ready(seen[-1])

    wait_until(check, timeout, f"{team}'s usage: {message} (last: {seen[-1:]})", interval=0.1)
    return seen[-1]


def day_of(report: dict[str, Any], date: str) -> dict[str, Any]:
    days = [day for day in report["days"] if day["date"] == date]
    assert len(days) == 1, report["days"]
    return days[0]


def assert_report_adds_up(report: dict[str, Any]) -> None:
    """The total is the sum of the days, and each day's jobs the sum of its outcomes."""
    days = report["days"]
    assert report["total"]["jobs"] == sum(sum(day["jobs"].values()) for day in days), report
    assert report["total"]["video_seconds"] == pytest.approx(
        sum(day["video_seconds"] for day in days)
    )
    assert report["total"]["cost_usd"] == pytest.approx(
        sum(day["cost_usd"] for day in days), abs=USD
    )


def csv_rows(rig: BudgetRig, **params: str) -> list[dict[str, str]]:
    with rig.admin() as admin:
        reply = admin.get("/admin/usage", params={"format": "csv", **params})
    assert reply.status_code == 200, reply.text
    assert reply.headers["content-type"].startswith("text/csv"), reply.headers
    reader = csv.DictReader(io.StringIO(reply.text))
    rows = list(reader)
    assert reader.fieldnames == CSV_HEADER
    return rows


# -- policy: refused before anything waits -----------------------------------------------------


@dataclass(frozen=True)
class Refused:
    """A request the policy refuses: its route, its JSON body, the code and param."""

    name: str
    path: str
    body: dict[str, Any]
    code: str
    param: str


# For alpha, allowed sora-2 at 1280x720 up to 8 s; `{portrait}`, `{pro}`, `{long}` and
# `{fine}` are its sources (see `sources`), put in at run time.
MODEL, SIZE, SECONDS = "model_not_allowed", "size_not_allowed", "seconds_not_allowed"
HD = {"size": "1280x720"}
REFUSED = [
    Refused("pro model", "/v1/videos", {"model": "sora-2-pro", **HD}, MODEL, "model"),
    Refused("unpriced model", "/v1/videos", {"model": "sora-3", **HD}, MODEL, "model"),
    Refused("size", "/v1/videos", {"size": "720x1280"}, SIZE, "size"),
    Refused("upstream's default size", "/v1/videos", {}, SIZE, "size"),
    Refused("seconds", "/v1/videos", {"seconds": "12", **HD}, SECONDS, "seconds"),
    Refused("integer seconds", "/v1/videos", {"seconds": 12, **HD}, SECONDS, "seconds"),
    # the contract's order: syntax, then model, size, seconds
    Refused(
        "model first",
        "/v1/videos",
        {"model": "sora-2-pro", "size": "720x1280", "seconds": "12"},
        MODEL,
        "model",
    ),
    Refused(
        "syntax before policy",
        "/v1/videos",
        {"size": "1", "seconds": "12"},
        "invalid_request",
        "size",
    ),
    Refused(
        "size before seconds", "/v1/videos", {"size": "720x1280", "seconds": "12"}, SIZE, "size"
    ),
    Refused(
        "seconds syntax first",
        "/v1/videos",
        {"model": "sora-2-pro", "seconds": "4.5"},
        "invalid_request",
        "seconds",
    ),
    # a remix, an edit, an extension: the source's model, size and seconds apply
    Refused("remix size", "/v1/videos/{portrait}/remix", {}, SIZE, "size"),
    Refused("remix model", "/v1/videos/{pro}/remix", {}, MODEL, "model"),
    Refused("remix seconds", "/v1/videos/{long}/remix", {}, SECONDS, "seconds"),
    Refused("seed remix", "/v1/videos/remix", {"video_id": "{portrait}"}, SIZE, "size"),
    Refused("edit size", "/v1/videos/edits", {"video": {"id": "{portrait}"}}, SIZE, "size"),
    Refused(
        "extension adds too much",
        "/v1/videos/extensions",
        {"seconds": "12", "video": {"id": "{fine}"}},
        SECONDS,
        "seconds",
    ),
]
# Allowed, so queued like any job: the refusals above are the policy's.
ALLOWED = [
    ("/v1/videos", {"seconds": "8", **HD}),
    ("/v1/videos/{fine}/remix", {}),
    ("/v1/videos/extensions", {"seconds": "8", "video": {"id": "{fine}"}}),  # 12 s in all
]


def fill(body: Any, ids: dict[str, str]) -> Any:
    if isinstance(body, str):
        return body.format(**ids)
    if isinstance(body, dict):
        return {key: fill(value, ids) for key, value in body.items()}
    return body


def sources(rig: BudgetRig) -> dict[str, str]:
    """alpha's completed videos, made by a gateway without its policy (a policy applies
    to what a team asks for now, not to what it made before)."""
    specs = {
        "portrait": {"size": "720x1280", "seconds": "4"},
        "pro": {"model": "sora-2-pro", "size": "1280x720", "seconds": "4"},
        "long": {"size": "1280x720", "seconds": "12"},
        "fine": {"size": "1280x720", "seconds": "4"},
    }
    gateway = rig.start_gateway()
    ids = {}
    with rig.client("alpha", gateway) as client:
        for name, spec in specs.items():
            ids[name] = ok(client.post("/v1/videos", json={"prompt": f"source {name}", **spec}))[
                "id"
            ]
        for video_id in ids.values():
            assert finished(client, video_id)["status"] == "completed"
    rig.stop_gateways()
    return ids


def hold_both_slots_and_queue(rig: BudgetRig, gateway: Process, queued: int) -> None:
    """beta's long jobs: two running upstream, `queued` more in the gateway's queue."""
    with rig.client("beta", gateway) as client:
        for number in range(2 + queued):
            ok(client.post("/v1/videos", json={"prompt": f"long take {number}"}))
    held = by_team_and_state(rig.admin_jobs(gateway))
    assert held == {("beta", "running"): 2, ("beta", "queued"): queued}, held


def post(
    client: httpx.Client, path: str, body: dict[str, Any], ids: dict[str, str]
) -> httpx.Response:
    return client.post(fill(path, ids), json={"prompt": "a policy check", **fill(body, ids)})


def test_each_refused_variant_is_answered_at_once_with_both_slots_busy_and_20_queued(rig):
    """§9 first bullet: model, size and seconds are checked before anything waits or is
    sent; no refused request joins the queue, however full it is. A team without a
    model list may use only the priced models."""
    ids = sources(rig)
    sim_config(rig, run_s=600)
    gateway = rig.start_gateway(policy={"alpha": POLICY})
    hold_both_slots_and_queue(rig, gateway, queued=20)
    watch = UpstreamWatch(rig)
    with rig.client("alpha", gateway) as client:
        for case in REFUSED:
            reply, took = timed(lambda c=case: post(client, c.path, c.body, ids))
            assert reply.status_code == 400, f"{case.name}: {reply.status_code} {reply.text}"
            assert_error(reply, 400, case.code, case.param)
            assert took < IMMEDIATE_S, f"{case.name}: answered after {took:.2f} s"
    with rig.client("beta", gateway) as client:
        reply = post(client, "/v1/videos", {"model": "sora-3"}, ids)
        assert_error(reply, 400, MODEL, "model")
    assert by_team_and_state(rig.admin_jobs(gateway)) == {
        ("beta", "running"): 2,
        ("beta", "queued"): 20,
    }
    assert queue_depth(gateway) == {"alpha": 0, "beta": 20, "gamma": 0}
    sent = [(r["method"], r["path"]) for r in watch.new_requests()]
    assert [s for s in sent if s[0] != "GET"] == [], sent  # the tracker's polls only
    assert rig.stats()["jobs_created"] == watch.jobs_before

    with rig.client("alpha", gateway) as client:
        for path, body in ALLOWED:
            accepted = ok(post(client, path, body, ids))
            assert accepted["status"] == "queued", accepted
    held = by_team_and_state(rig.admin_jobs(gateway))
    assert held["alpha", "queued"] == len(ALLOWED), held


def test_a_refused_variant_does_not_wait_for_a_slot_in_wait_mode(rig):
    """With `when_full: wait` an allowed job waits `wait_s` for a slot and hears 429; a
    refused one hears its 400 at once, and nothing of it waits."""
    ids = sources(rig)
    sim_config(rig, run_s=600)
    wait_s = 4
    gateway = rig.start_gateway(
        policy={"alpha": POLICY}, quota={"when_full": "wait", "wait_s": wait_s}
    )
    with rig.client("beta", gateway) as client:
        for number in range(2):
            ok(client.post("/v1/videos", json={"prompt": f"long take {number}"}))
    with rig.client("alpha", gateway) as client:
        for case in (REFUSED[2], REFUSED[-1]):
            reply, took = timed(lambda c=case: post(client, c.path, c.body, ids))
            assert_error(reply, 400, case.code, case.param)
            assert took < IMMEDIATE_S, f"{case.name}: answered after {took:.2f} s"
        assert rig.waiting() == 0
        allowed, took = timed(lambda: post(client, "/v1/videos", HD, ids))
    assert_error(allowed, 429, "concurrency_limit_exceeded")
    assert took >= wait_s - 0.5, f"the control did not wait: {took:.2f} s"


def test_policy_rejections_are_counted_by_code(rig):
    """§9 metrics: `policy_rejections_total{team,code}`."""
    gateway = rig.start_gateway(policy={"alpha": POLICY})
    with rig.client("alpha", gateway) as client:
        for body in ({"prompt": "p", "size": "720x1280"}, {"prompt": "p"}):
            assert_error(client.post("/v1/videos", json=body), 400, "size_not_allowed")
        body = {"prompt": "p", "size": "1280x720", "seconds": "12"}
        assert_error(client.post("/v1/videos", json=body), 400, "seconds_not_allowed")
    counted = {
        (labels["team"], labels["code"]): value
        for labels, value in scrape(gateway)["sora_gateway_policy_rejections_total"]
    }
    assert counted[("alpha", "size_not_allowed")] == 2, counted
    assert counted[("alpha", "seconds_not_allowed")] == 1, counted


def test_policy_prices_and_budgets_reload_on_sighup(rig):
    """Reloadable like `teams` (issue 14): a new policy, price and budget apply to the
    next request, without a restart."""
    sim_config(rig, run_s=600)
    gateway = rig.start_gateway()
    with rig.client("alpha", gateway) as client:
        assert ok(client.post("/v1/videos", json={"prompt": "portrait"}))["size"] == "720x1280"
    assert rig.usage("alpha", gateway)["budget"] is None
    config = rig.config(
        policy={"alpha": {**POLICY, "budget_usd_per_day": 5}},
        pricing={**PRICING, "sora-2": {"*": 0.20}},
    )
    write_config(Path(gateway.args[gateway.args.index("--config") + 1]), config)
    assert gateway.popen is not None
    gateway.popen.send_signal(signal.SIGHUP)
    budget = usage_when(
        rig, "alpha", gateway, lambda r: r["budget"] is not None, "the budget applies"
    )["budget"]
    assert budget["limit_usd"] == pytest.approx(5.0), budget
    with rig.client("alpha", gateway) as client:
        assert_error(client.post("/v1/videos", json={"prompt": "portrait"}), 400, SIZE, "size")
        ok(client.post("/v1/videos", json={"prompt": "landscape", **HD}))
    budget = rig.usage("alpha", gateway)["budget"]
    # Every job reserves its cost, budget or not: the portrait one 4 s at the old $0.10,
    # the landscape one 4 s at the new $0.20.
    assert budget["reserved_usd"] == pytest.approx(0.4 + 0.8, abs=USD), budget


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"policy": {"alpha": {"models": ["sora-3"]}}}, ["sora-3", "price"]),
        ({"pricing": {"sora-2": {"*": 0}}}, ["pricing"]),
        ({"pricing": {"sora-2": {"*": -0.1}}}, ["pricing"]),
        ({"pricing": {"sora-2": {"*": "cheap"}}}, ["pricing"]),
    ],
    ids=["unpriced model", "zero price", "negative price", "price not a number"],
)
def test_check_config_refuses_an_unpriced_model_and_prices_that_are_not_positive(
    rig, tmp_path, change, words
):
    good = write_config(tmp_path / "good.yaml", rig.config())
    assert check_config(good).returncode == 0
    bad = write_config(tmp_path / "bad.yaml", rig.config(**change))
    checked = check_config(bad)
    assert checked.returncode == 1, checked.stdout + checked.stderr
    said = checked.stdout + checked.stderr
    assert all(word in said for word in words), said
    assert rig.token not in said


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


# -- budgets: reserved at admission, 429 at once ------------------------------------------------


def test_a_2_dollar_day_runs_five_4_second_jobs_and_the_sixth_is_429_at_once(rig):
    """§9 cost: five $0.40 jobs reserve $2.00 (two start, three queue); the sixth would
    pass the budget: 429 `budget_exceeded`, `x-should-retry: false` (the SDK does not
    retry it), a message with the budget, what is spent and when it resets; nothing waits,
    nothing is sent, nothing is queued."""
    sim_config(rig, run_s=600)
    gateway = rig.start_gateway(policy={"gamma": {"budget_usd_per_day": 2}})
    sent: list[httpx.Request] = []
    with rig.sdk("gamma", sent) as sdk:
        videos = [
            sdk.videos.create(prompt=f"job {n}", model="sora-2", seconds="4", size="1280x720")
            for n in range(1, 6)
        ]
        assert len(sent) == 5
        assert [video.status for video in videos].count("queued") >= 3, videos
        assert by_team_and_state(rig.admin_jobs(gateway)) == {
            ("gamma", "running"): 2,
            ("gamma", "queued"): 3,
        }
        watch = UpstreamWatch(rig)
        began = time.monotonic()
        with pytest.raises(openai.RateLimitError) as refused:
            sdk.videos.create(prompt="job 6", model="sora-2", seconds="4", size="1280x720")
        took = time.monotonic() - began
    assert len(sent) == 6, "the SDK retried a budget_exceeded"
    assert took < IMMEDIATE_S, f"answered after {took:.2f} s"
    reply = refused.value.response
    error = assert_error(reply, 429, "budget_exceeded")
    assert reply.headers["x-should-retry"] == "false", reply.headers
    message = error["message"]
    assert re.search(r"\$\s?2(\.00?)?\b|\b2(\.00?)? ?USD", message), message
    assert "spent" in message.lower(), message
    assert "reset" in message.lower(), message
    assert by_team_and_state(rig.admin_jobs(gateway)) == {
        ("gamma", "running"): 2,
        ("gamma", "queued"): 3,
    }
    assert queue_depth(gateway)["gamma"] == 3
    assert [r for r in watch.new_requests() if r["method"] != "GET"] == []
    with rig.client("gamma", gateway) as client:  # a malformed job hears its 400 first
        bad = client.post("/v1/videos", json={"prompt": "p", "seconds": "0"})
    assert_error(bad, 400, "invalid_request", "seconds")

    budget = rig.usage("gamma", gateway)["budget"]
    assert budget == {
        "period": "day",
        "limit_usd": pytest.approx(2.0),
        "spent_usd": pytest.approx(0.0),
        "reserved_usd": pytest.approx(2.0),
        "resets_at": next_midnight(),
    }, budget
    samples = scrape(gateway)["sora_gateway_budget_used_ratio"]
    ratio = {labels["team"]: value for labels, value in samples}
    assert ratio["gamma"] == pytest.approx(1.0), ratio


def test_over_budget_is_429_at_once_in_wait_mode_with_both_slots_busy(rig):
    """`when_full: wait`: a job within budget would wait `wait_s` for a slot; one over
    budget is refused at once, without waiting."""
    sim_config(rig, run_s=600)
    gateway = rig.start_gateway(
        policy={"gamma": {"budget_usd_per_day": 0.8}}, quota={"when_full": "wait", "wait_s": 10}
    )
    with rig.client("gamma", gateway) as client:
        for number in range(2):  # $0.80: the budget, and both slots
            ok(client.post("/v1/videos", json={"prompt": f"job {number}", **HD}))
        reply, took = timed(lambda: client.post("/v1/videos", json={"prompt": "over", **HD}))
    assert_error(reply, 429, "budget_exceeded")
    assert reply.headers["x-should-retry"] == "false"
    assert took < IMMEDIATE_S, f"answered after {took:.2f} s"
    assert rig.waiting() == 0


def test_replicas_admitting_at_once_never_pass_a_budget_together(rig):
    """18 creates at once, six through each of three replicas, against $2 a day: five
    are accepted (started or queued), the rest refused, whichever replica took them."""
    sim_config(rig, run_s=600)
    replicas = rig.start_gateways(3, policy={"gamma": {"budget_usd_per_day": 2}})
    clients = [rig.client("gamma", replica) for replica in replicas]
    start = threading.Barrier(18)

    def create(number: int) -> int:
        start.wait(timeout=10)
        body = {"prompt": f"rush {number}", "seconds": "4", **HD}
        return clients[number % 3].post("/v1/videos", json=body).status_code

    try:
        with ThreadPoolExecutor(18) as pool:
            statuses = Counter(pool.map(create, range(18)))
    finally:
        for client in clients:
            client.close()
    assert statuses == {200: 5, 429: 13}, statuses
    assert len(rig.admin_jobs(replicas[0])) == 5
    budget = rig.usage("gamma", replicas[1])["budget"]
    assert budget["reserved_usd"] == pytest.approx(2.0, abs=USD), budget


def test_a_delete_while_queued_is_refunded_and_one_while_running_is_charged(rig):
    """§9 settlement: a job deleted while queued costs nothing (its $0.40 comes back at
    once: the refused sixth now fits); one deleted while running is charged as reserved
    (upstream may have billed it), so the budget stays full."""
    sim_config(rig, run_s=600)
    gateway = rig.start_gateway(policy={"gamma": {"budget_usd_per_day": 2}})
    job = {"prompt": "a job", "model": "sora-2", "seconds": "4", "size": "1280x720"}
    with rig.client("gamma", gateway) as client:
        ids = [ok(client.post("/v1/videos", json=job))["id"] for _ in range(5)]
        assert_error(client.post("/v1/videos", json=job), 429, "budget_exceeded")
        states = {j["id"]: j["state"] for j in rig.admin_jobs(gateway)}
        queued = [video_id for video_id in ids if states[video_id] == "queued"]
        running = [video_id for video_id in ids if states[video_id] == "running"]
        assert (len(queued), len(running)) == (3, 2), states

        assert ok(client.delete(f"/v1/videos/{queued[0]}"))["deleted"] is True
        budget = rig.usage("gamma", gateway)["budget"]
        assert (budget["spent_usd"], budget["reserved_usd"]) == pytest.approx((0.0, 1.6))
        ids.append(ok(client.post("/v1/videos", json=job))["id"])  # fits again
        assert_error(client.post("/v1/videos", json=job), 429, "budget_exceeded")

        assert ok(client.delete(f"/v1/videos/{running[0]}"))["deleted"] is True
        budget = rig.usage("gamma", gateway)["budget"]
        assert (budget["spent_usd"], budget["reserved_usd"]) == pytest.approx((0.4, 1.6))
        assert_error(client.post("/v1/videos", json=job), 429, "budget_exceeded")
    jobs = day_of(rig.usage("gamma", gateway), today())["jobs"]
    assert jobs == {"deleted": 2}, jobs


def test_a_month_budget_refuses_what_would_pass_it_and_takes_what_still_fits(rig):
    """$1 a month: two $0.40 jobs fit, a third does not, a 2-second one ($0.20) does;
    the report's budget is the month's, resetting on the first of the next month."""
    sim_config(rig, run_s=600)
    gateway = rig.start_gateway(policy={"beta": {"budget_usd_per_month": 1}})
    job = {"prompt": "a job", "model": "sora-2", "size": "1280x720"}
    with rig.client("beta", gateway) as client:
        for _ in range(2):
            ok(client.post("/v1/videos", json={**job, "seconds": "4"}))
        error = assert_error(
            client.post("/v1/videos", json={**job, "seconds": "4"}), 429, "budget_exceeded"
        )
        assert "month" in error["message"].lower(), error
        ok(client.post("/v1/videos", json={**job, "seconds": "2"}))
    budget = rig.usage("beta", gateway)["budget"]
    assert budget == {
        "period": "month",
        "limit_usd": pytest.approx(1.0),
        "spent_usd": pytest.approx(0.0),
        "reserved_usd": pytest.approx(1.0),
        "resets_at": next_month(),
    }, budget


@pytest.mark.parametrize(
    ("day_usd", "month_usd", "period"), [(5, 1, "month"), (1, 5, "day")], ids=["month", "day"]
)
def test_the_report_gives_the_tighter_budget_when_both_are_set(rig, day_usd, month_usd, period):
    gateway = rig.start_gateway(
        policy={"beta": {"budget_usd_per_day": day_usd, "budget_usd_per_month": month_usd}}
    )
    budget = rig.usage("beta", gateway)["budget"]
    assert (budget["period"], budget["limit_usd"]) == (period, 1), budget
    assert budget["resets_at"] == (next_month() if period == "month" else next_midnight())


# -- settlement: once, on what upstream produced ------------------------------------------------


def test_a_failed_job_is_refunded_exactly_once_when_three_replicas_and_a_client_see_its_end(rig):
    """§9 settlement across replicas, 50 times: each failed job is retrieved through all
    three replicas at once, in tight loops, while their trackers poll it too. A refund
    lost would fill the $2 budget by the sixth job; one given twice would show a negative
    reservation; one job counted twice, a failed count above the jobs made."""
    replicas = rig.start_gateways(
        3, tracker=FAST_TRACKER, policy={"beta": {"budget_usd_per_day": 2}}
    )
    clients = [rig.client("beta", replica) for replica in replicas]
    start = threading.Barrier(len(clients))

    def watch(client: httpx.Client, video_id: str) -> str:
        start.wait(timeout=10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            status = ok(client.get(f"/v1/videos/{video_id}"))["status"]
            if status in TERMINAL:
                return status
        raise AssertionError(f"{video_id} still running")

    job = {"model": "sora-2", "seconds": "4", "size": "1280x720"}
    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            for number in range(50):
                creator = clients[number % len(clients)]
                reply = creator.post("/v1/videos", json={"prompt": f"#fail {number}", **job})
                video_id = ok(reply)["id"]
                seen = list(pool.map(lambda c, v=video_id: watch(c, v), clients))
                assert seen == ["failed"] * 3, seen
                report = usage_when(
                    rig,
                    "beta",
                    replicas[number % 3],
                    lambda r: r["budget"]["reserved_usd"] == 0,
                    f"job {number}'s reservation settled",
                )
                assert day_of(report, today())["jobs"] == {"failed": number + 1}, report
                assert report["budget"]["spent_usd"] == 0, report
            for number in range(3):  # and three that complete: $1.20 spent
                reply = clients[number].post("/v1/videos", json={"prompt": f"ok {number}", **job})
                assert finished(clients[number], ok(reply)["id"])["status"] == "completed"
    finally:
        for client in clients:
            client.close()
    wait_until(lambda: rig.holders() == 0, 5, "every slot free")
    for replica in replicas:
        report = rig.usage("beta", replica)
        assert day_of(report, today())["jobs"] == {"failed": 50, "completed": 3}, report
        assert report["total"]["jobs"] == 53, report
        assert report["total"]["video_seconds"] == 12, report
        assert report["total"]["cost_usd"] == pytest.approx(1.2, abs=USD), report
        assert report["budget"]["spent_usd"] == pytest.approx(1.2, abs=USD), report
        assert report["budget"]["reserved_usd"] == 0, report
        assert_report_adds_up(report)
    rows = [row for row in csv_rows(rig) if row["team"] == "beta"]
    assert [(r["date"], r["model"], r["jobs"]) for r in rows] == [(today(), "sora-2", "53")]
    assert float(rows[0]["cost_usd"]) == pytest.approx(1.2, abs=USD)


def test_a_completed_job_is_charged_the_seconds_its_result_says(rig):
    """Asked for 4 s, upstream produced (and billed) 8: charged $0.80, not the $0.40
    reserved; the report and the metrics say 8 video-seconds."""
    gateway = rig.start_gateway(tracker=FAST_TRACKER)
    sim_config(rig, result_seconds=8)
    with rig.client("alpha", gateway) as client:
        created = ok(
            client.post(
                "/v1/videos",
                json={"prompt": "a", "model": "sora-2", "seconds": "4", "size": "1280x720"},
            )
        )
        assert created["seconds"] == "4", created
        done = finished(client, created["id"])
    assert (done["status"], done["seconds"]) == ("completed", "8"), done
    report = usage_when(rig, "alpha", gateway, lambda r: r["total"]["jobs"] == 1, "settled")
    day = day_of(report, today())
    assert (day["jobs"], day["video_seconds"]) == ({"completed": 1}, 8), day
    assert day["cost_usd"] == pytest.approx(0.8, abs=USD), day
    samples = scrape(gateway)
    seconds = {(s["team"], s["model"]): v for s, v in samples["sora_gateway_video_seconds_total"]}
    cost = {(s["team"], s["model"]): v for s, v in samples["sora_gateway_cost_usd_total"]}
    assert seconds[("alpha", "sora-2")] == 8, seconds
    assert cost[("alpha", "sora-2")] == pytest.approx(0.8, abs=USD), cost


def settled_as(rig: BudgetRig, team: str, gateway: Process, jobs: dict[str, int]) -> dict:
    """Today's figures of `team` once its jobs by outcome are `jobs`, and nothing is
    reserved any more."""
    report = usage_when(
        rig,
        team,
        gateway,
        lambda r: day_of(r, today())["jobs"] == jobs and r["total"]["jobs"] == sum(jobs.values()),
        f"settled as {jobs}",
    )
    return day_of(report, today())


def test_a_job_gone_upstream_is_charged_as_reserved(rig):
    """§9: `vanished` (upstream answers 404 for a job it had) is charged as reserved:
    upstream may have billed it."""
    sim_config(rig, run_s=600)
    gateway = rig.start_gateway(policy={"alpha": {"budget_usd_per_day": 5}})
    with rig.client("alpha", gateway) as client:
        video_id = ok(client.post("/v1/videos", json={"prompt": "gone", **HD}))["id"]
        with rig.direct() as direct:
            ok(direct.delete(f"/videos/{video_id}"))
        assert_error(client.get(f"/v1/videos/{video_id}"), 404, "video_not_found")
    day = settled_as(rig, "alpha", gateway, {"vanished": 1})
    assert (day["video_seconds"], day["cost_usd"]) == (4, pytest.approx(0.4, abs=USD)), day
    assert rig.usage("alpha", gateway)["budget"]["reserved_usd"] == 0


def test_a_job_released_by_max_job_s_is_charged_as_reserved(rig):
    sim_config(rig, run_s=600)
    gateway = rig.start_gateway(tracker=FAST_TRACKER, quota={"max_job_s": 1.5})
    with rig.client("alpha", gateway) as client:
        ok(client.post("/v1/videos", json={"prompt": "endless", "seconds": "8", **HD}))
    day = settled_as(rig, "alpha", gateway, {"lease_expired": 1})
    assert (day["video_seconds"], day["cost_usd"]) == (8, pytest.approx(0.8, abs=USD)), day


def test_a_queued_job_refused_at_start_or_timed_out_is_charged_nothing(rig):
    """§9: `refused` (upstream's 4xx when a queued job starts; the simulator takes no
    2-second job) and `queue_timeout` cost nothing; a delete while running costs what
    was reserved."""
    sim_config(rig, run_s=600)
    gateway = rig.start_gateway(tracker=FAST_TRACKER, quota={"max_queue_s": 2})
    with rig.client("beta", gateway) as client:
        blockers = [ok(client.post("/v1/videos", json={"prompt": f"b{n}"}))["id"] for n in (1, 2)]
    with rig.client("alpha", gateway) as client:
        doomed = ok(client.post("/v1/videos", json={"prompt": "late", **HD}))
        assert doomed["status"] == "queued", doomed
        assert rig.usage("alpha", gateway)["budget"] is None
        timed_out = finished(client, doomed["id"])
        assert timed_out["error"]["code"] == "queue_timeout", timed_out
        settled_as(rig, "alpha", gateway, {"queue_timeout": 1})
        short = ok(client.post("/v1/videos", json={"prompt": "short", "seconds": "2", **HD}))
        assert short["status"] == "queued", short
        with rig.client("beta", gateway) as blocker:  # a slot comes free: it starts
            assert ok(blocker.delete(f"/v1/videos/{blockers[0]}"))["deleted"] is True
        refused = finished(client, short["id"])
        assert refused["status"] == "failed", refused
    day = settled_as(rig, "alpha", gateway, {"queue_timeout": 1, "refused": 1})
    assert (day["video_seconds"], day["cost_usd"]) == (0, 0), day
    beta = settled_as(rig, "beta", gateway, {"deleted": 1})
    assert beta["cost_usd"] == pytest.approx(0.4, abs=USD), beta


def test_a_remix_costs_its_sources_seconds_and_an_extension_the_seconds_it_adds(rig):
    """A remix inherits its source's 8 s ($0.80); an extension adding 4 s to it costs
    $0.40, though its result reports the stitched 12 s (CONTRACT §9: an extension is
    charged the seconds it asked for)."""
    gateway = rig.start_gateway(tracker=FAST_TRACKER)
    with rig.client("alpha", gateway) as client:
        source = ok(client.post("/v1/videos", json={"prompt": "s", "seconds": "8", **HD}))["id"]
        assert finished(client, source)["status"] == "completed"
        remix = ok(client.post(f"/v1/videos/{source}/remix", json={"prompt": "r"}))["id"]
        assert finished(client, remix)["status"] == "completed"
        body = {"prompt": "e", "seconds": "4", "video": {"id": source}}
        extension = ok(client.post("/v1/videos/extensions", json=body))["id"]
        done = finished(client, extension)
    assert (done["status"], done["seconds"]) == ("completed", "12"), done
    day = settled_as(rig, "alpha", gateway, {"completed": 3})
    assert day["video_seconds"] == 8 + 8 + 4, day
    assert day["cost_usd"] == pytest.approx(0.8 + 0.8 + 0.4, abs=USD), day


# -- usage: a team's own, the admin's all ------------------------------------------------------


def run_some_jobs(rig: BudgetRig, gateway: Process) -> None:
    """alpha: one completed sora-2 4 s ($0.40), one failed; beta: one completed sora-2-pro
    1280x720 4 s ($1.20), one completed sora-2 8 s ($0.80)."""
    jobs = {
        "alpha": [("sora-2", "4", "a"), ("sora-2", "4", "a #fail")],
        "beta": [("sora-2-pro", "4", "b"), ("sora-2", "8", "b")],
    }
    for team, specs in jobs.items():
        with rig.client(team, gateway) as client:
            for model, seconds, prompt in specs:
                body = {"prompt": prompt, "model": model, "seconds": seconds, "size": "1280x720"}
                finished(client, ok(client.post("/v1/videos", json=body))["id"])
    wait_until(lambda: rig.holders() == 0, 5, "every job settled")


def test_v1_usage_shows_only_the_callers_team(rig):
    gateway = rig.start_gateway()
    run_some_jobs(rig, gateway)
    alpha = rig.usage("alpha", gateway)
    assert alpha["object"] == "usage"
    assert alpha["team"] == "alpha"
    assert alpha["budget"] is None  # no budget set
    day = day_of(alpha, today())
    assert day["jobs"] == {"completed": 1, "failed": 1}, day
    assert (day["video_seconds"], day["cost_usd"]) == (4, pytest.approx(0.4, abs=USD)), day
    assert alpha["total"] == {"jobs": 2, "video_seconds": 4, "cost_usd": pytest.approx(0.4)}
    assert_report_adds_up(alpha)
    # Asking for another team's figures gets the caller's own, or a refusal: never beta's.
    with rig.client("alpha", gateway) as client:
        reply = client.get("/v1/usage", params={"team": "beta"})
    if reply.status_code == 200:
        assert reply.json() == alpha
    else:
        assert_envelope(reply)
    beta = rig.usage("beta", gateway)
    assert (beta["team"], beta["total"]["jobs"]) == ("beta", 2), beta
    assert beta["total"]["cost_usd"] == pytest.approx(2.0, abs=USD), beta
    gamma = rig.usage("gamma", gateway)
    assert (gamma["team"], gamma["total"]["jobs"], gamma["total"]["cost_usd"]) == ("gamma", 0, 0)


def test_v1_usage_range_defaults_to_this_month_and_refuses_bad_ranges(rig):
    gateway = rig.start_gateway()
    now = dt.datetime.now(dt.UTC).date()
    report = rig.usage("alpha", gateway)
    last = now.replace(day=calendar.monthrange(now.year, now.month)[1])
    assert report["start"] == now.replace(day=1).isoformat(), report
    assert report["end"] in (now.isoformat(), last.isoformat()), report  # the month so far
    with rig.client("alpha", gateway) as client:
        for params in (
            {"start": "2026-02-10", "end": "2026-02-01"},  # ends before it starts
            {"start": "2024-01-01", "end": "2025-12-31"},  # over 366 days
            {"start": "2026-13-01", "end": "2026-12-31"},
            {"start": "yesterday"},
        ):
            reply = client.get("/v1/usage", params=params)
            assert reply.status_code == 400, (params, reply.text)
            assert_envelope(reply)
        one_day = ok(client.get("/v1/usage", params={"start": today(), "end": today()}))
    assert [day["date"] for day in one_day["days"]] in ([today()], []), one_day


def test_admin_usage_reports_every_team_as_json_and_as_csv(rig):
    """One CSV row per date, team and model (`jobs` counting every outcome), parsed as a
    spreadsheet would; the JSON holds each team's own report."""
    gateway = rig.start_gateway()
    run_some_jobs(rig, gateway)
    with rig.admin(gateway) as admin:
        everything = ok(admin.get("/admin/usage"))
    assert everything["object"] == "usage", everything
    teams = {report["team"]: report for report in everything["teams"]}
    assert set(teams) == {"alpha", "beta", "gamma"}, teams
    for team in ("alpha", "beta"):
        assert teams[team] == rig.usage(team, gateway), team

    every_row = csv_rows(rig)
    keys = [(row["date"], row["team"], row["model"]) for row in every_row]
    assert len(keys) == len(set(keys)), f"a date, team and model twice: {keys}"
    rows = [row for row in every_row if int(row["jobs"]) > 0]  # a report may list idle days
    got = {
        (row["team"], row["model"]): (int(row["jobs"]), float(row["video_seconds"]))
        for row in rows
        if row["date"] == today()
    }
    assert got == {
        ("alpha", "sora-2"): (2, 4),
        ("beta", "sora-2-pro"): (1, 4),
        ("beta", "sora-2"): (1, 8),
    }, rows
    cost = {(row["team"], row["model"]): float(row["cost_usd"]) for row in rows}
    assert cost == {
        ("alpha", "sora-2"): pytest.approx(0.4, abs=USD),
        ("beta", "sora-2-pro"): pytest.approx(1.2, abs=USD),
        ("beta", "sora-2"): pytest.approx(0.8, abs=USD),
    }
    for team, report in teams.items():
        mine = [row for row in rows if row["team"] == team]
        assert sum(int(row["jobs"]) for row in mine) == report["total"]["jobs"], team
        assert sum(float(row["cost_usd"]) for row in mine) == pytest.approx(
            report["total"]["cost_usd"], abs=USD
        )


def test_admin_jobs_lists_queued_and_running_jobs_without_prompts(rig):
    sim_config(rig, run_s=600)
    gateway = rig.start_gateway()
    secret_prompt = "a prompt no admin listing may show " + new_key()
    with rig.client("alpha", gateway) as client:
        ids = [
            ok(client.post("/v1/videos", json={"prompt": secret_prompt, "size": "1280x720"}))["id"]
            for _ in range(3)
        ]
    with rig.admin(gateway) as admin:
        reply = admin.get("/admin/jobs")
    assert secret_prompt not in reply.text
    jobs = {job["id"]: job for job in ok(reply)["data"]}
    assert set(jobs) == set(ids), jobs
    fields = {"id", "team", "kind", "state", "model", "size", "seconds", "queued_at",
              "started_at", "queue_position"}  # fmt: skip
    for job in jobs.values():
        assert set(job) == fields, job
        assert (job["team"], job["kind"], job["size"]) == ("alpha", "create", "1280x720"), job
    states = Counter(job["state"] for job in jobs.values())
    assert states == {"running": 2, "queued": 1}, jobs
    (waiting,) = [job for job in jobs.values() if job["state"] == "queued"]
    assert (waiting["queue_position"], waiting["started_at"]) == (1, None), waiting


@pytest.mark.parametrize("route", ["/admin/usage", "/admin/usage?format=csv", "/admin/jobs"])
def test_a_team_key_on_an_admin_route_is_401(rig, route):
    gateway = rig.start_gateway()
    for headers in (
        {"authorization": f"Bearer {rig.keys['alpha']}"},
        {"api-key": rig.keys["alpha"]},
        {},
        {"authorization": "Bearer not-a-key"},
    ):
        reply = httpx.get(gateway.url + route, headers=headers, timeout=10)
        assert_error(reply, 401, "invalid_api_key")
        assert rig.keys["alpha"] not in reply.text
    with rig.admin(gateway) as admin:  # and the admin key is no team key
        assert_error(admin.get("/v1/usage"), 401, "invalid_api_key")
        assert admin.get(route).status_code == 200


# -- durability ---------------------------------------------------------------------------------


def kill_and_restart_the_store(rig: Rig) -> None:
    wait_until(lambda: aof_written(rig), 10, "the append-only file written")
    assert rig.store.process is not None
    rig.store.process.kill()
    rig.store.process.wait()
    rig.store.process = None
    rig.store.start()


def test_usage_survives_a_store_restart_from_its_append_only_file(rig):
    """Settled usage, and a reservation still open (a job running across the restart,
    settled after it), come back from the append-only file: nothing lost or doubled."""
    gateway = rig.start_gateway(tracker=FAST_TRACKER, policy={"alpha": {"budget_usd_per_day": 5}})
    run_some_jobs(rig, gateway)
    sim_config(rig, run_s=8)
    with rig.client("alpha", gateway) as client:
        body = {"prompt": "across", "model": "sora-2", "seconds": "8", "size": "1280x720"}
        running = ok(client.post("/v1/videos", json=body))["id"]
    before = rig.usage("alpha", gateway)
    assert before["budget"]["reserved_usd"] == pytest.approx(0.8), before
    csv_before = csv_rows(rig)

    kill_and_restart_the_store(rig)
    wait_until(lambda: rig.ready(gateway), 15, "the gateway ready again")
    assert usage_when(rig, "alpha", gateway, lambda r: True, "answered") == before
    assert csv_rows(rig) == csv_before

    with rig.client("alpha", gateway) as client:
        assert finished(client, running, store_restarted=True)["status"] == "completed"
    after = usage_when(rig, "alpha", gateway, lambda r: r["total"]["jobs"] == 3, "settled")
    assert after["budget"]["reserved_usd"] == 0, after
    assert after["budget"]["spent_usd"] == pytest.approx(1.2, abs=USD), after
    assert day_of(after, today())["jobs"] == {"completed": 2, "failed": 1}, after


JOBS_UNDER_CHAOS = 40
KILL_EVERY_S = 0.6


def no_job_left(rig: BudgetRig, replicas: list[Process]) -> bool:
    """No slot held and no job queued, as the first replica up says."""
    if rig.holders():
        return False
    for replica in replicas:
        try:
            return not rig.admin_jobs(replica)
        except (httpx.HTTPError, AssertionError):  # killed, or coming up
            continue
    return False


def test_kill_9_of_replicas_while_jobs_end_loses_no_settlement_and_doubles_none(rig):
    """40 one-second jobs (a quarter failing, an eighth cancelled) end one after another
    while the three replicas are killed (-9) and restarted in turn, no client polling:
    every job is settled once, by the trackers, with the outcome its client then sees,
    and what was charged is what completed."""
    replicas = rig.start_gateways(
        3, tracker=FAST_TRACKER, policy={"beta": {"budget_usd_per_day": 100}}
    )
    sim_config(rig, run_s=1.0)
    ids = []
    for number in range(JOBS_UNDER_CHAOS):
        marker = "#fail" if number % 4 == 1 else "#cancel" if number % 8 == 3 else ""
        body = {"prompt": f"chaos {number} {marker}", "seconds": "4", "size": "1280x720"}
        with rig.client("beta", replicas[number % 3]) as client:
            ids.append(ok(client.post("/v1/videos", json=body))["id"])

    stop = threading.Event()
    kills: list[tuple[int, int]] = []  # (replica, jobs still held or queued then)

    def chaos() -> None:
        victim = 0
        while not stop.wait(KILL_EVERY_S):
            replicas[victim].stop(signal.SIGKILL)
            kills.append((victim, rig.holders()))
            replicas[victim].start("/readyz")
            victim = (victim + 1) % 3

    killer = threading.Thread(target=chaos, daemon=True)
    killer.start()
    try:
        wait_until(lambda: no_job_left(rig, replicas), 120, "every job ended", interval=0.3)
    finally:
        stop.set()
        killer.join(30)
    assert not killer.is_alive()
    assert sum(1 for _, held in kills if held) >= 4, f"too few kills while jobs ran: {kills}"
    for replica in replicas:
        if replica.popen is None:
            replica.start("/readyz")
    # What the trackers settled, read before any client retrieve could settle a job.
    report = rig.usage("beta", replicas[1])
    outcomes: Counter[str] = Counter()
    with rig.client("beta", replicas[0]) as client:
        for video_id in ids:
            outcomes[finished(client, video_id)["status"]] += 1
    assert outcomes == {"completed": 25, "failed": 10, "cancelled": 5}, outcomes
    assert day_of(report, today())["jobs"] == dict(outcomes), (report, kills)
    assert report["total"]["jobs"] == JOBS_UNDER_CHAOS, report
    assert report["budget"]["reserved_usd"] == 0, report
    assert report["budget"]["spent_usd"] == pytest.approx(25 * 0.4, abs=USD), report
    assert report["total"]["video_seconds"] == 25 * 4, report
    assert rig.usage("beta", replicas[2]) == report, "a retrieve settled a job again"
    upstream = Counter(job["prompt"] for job in rig.upstream_jobs())
    assert sorted(upstream.values()) == [1] * JOBS_UNDER_CHAOS, upstream
