"""CONTRACT §6 for an operator: the shipped dashboard and alerts against a REAL Prometheus.

Two gateway replicas share one private store and one private simulator (the session
stack's gateway would otherwise adopt these tests' slots): `multi` runs `serve --workers
2` (prometheus-client multiprocess mode), `single` runs one process. Prometheus (Debian's
`prometheus` package; skipped when the binary is missing) scrapes both every second.

- The quota's gauges are the ledger's number on every replica and every worker, and
  `jobs_total` counts each ended job once over all replicas (no Prometheus needed).
- A workload produces every series; then every PromQL expression of
  deploy/grafana/dashboards/sora-gateway.json must return data, and every rule of
  deploy/prometheus/alerts.yml must parse and be loaded and evaluated by Prometheus.
- `promtool` checks the shipped config and rules, and a generated promtool unit test
  shows each alert fires in the situation it describes.

Every wait polls with a deadline; nothing sleeps to synchronise.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.multiprocess import MultiProcessCollector

from gateway.embedded_store import free_port
from gateway.store import BEATS
from support.metrics import scrape
from support.processes import Process, wait_until, write_config
from support.stack import Rig

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sora-gateway.json"
DATASOURCES = DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS = DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml"
PROMETHEUS_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"

PROMETHEUS = shutil.which("prometheus")
PROMTOOL = shutil.which("promtool")
MISSING = "needs Debian's `prometheus` package (apt-get install -y prometheus): {} not on PATH"

JOB = "sora-gateway"  # the scrape job name the dashboard and the alerts expect
LIMIT = 2
POLL_S = 0.3
LEASE_S = 2
WAIT_S = 0.5
QUEUE_S = 0.2
RUN_S = 0.6
LONG_RUN_S = 60.0  # jobs that hold their slots until deleted
WAITERS = BEATS  # every waiter has a heartbeat
PROMPT = "a heron standing in a misty river"
# What Grafana puts in place of its variables when every team is selected.
GRAFANA_VARIABLES = {
    "${team}": ".*",
    "$team": ".*",
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "5m",
}
METRICS = {
    "sora_gateway_" + name
    for name in (
        "requests_total",
        "request_duration_seconds",
        "upstream_request_duration_seconds",
        "slots_in_use",
        "slots_limit",
        "slot_queue_length",
        "slot_wait_seconds",
        "quota_rejections_total",
        "jobs_total",
        "job_duration_seconds",
        "remix_rejections_total",
        "store_errors_total",
        "upstream_errors_total",
        "lease_expiries_total",
        "queue_depth",
        "queue_seconds",
        "queue_rejections_total",
        # CONTRACT §9
        "video_seconds_total",
        "cost_usd_total",
        "budget_used_ratio",
        "policy_rejections_total",
    )
}


# -- Prometheus --------------------------------------------------------------------------------


@dataclass
class Prometheus:
    popen: subprocess.Popen[bytes]
    port: int
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: str) -> dict[str, Any]:
        reply = httpx.get(self.url + "/api/v1/" + path, params=params, timeout=10.0)
        return reply.json()

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_prometheus(tmp: Path, targets: list[str]) -> Prometheus:
    """Prometheus on a free port scraping `targets` every second, with the shipped rules."""
    assert PROMETHEUS is not None
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [{"job_name": JOB, "static_configs": [{"targets": targets}]}],
    }
    config_path = write_config(tmp / "prometheus.yml", config)
    port = free_port()
    log_path = tmp / "prometheus.log"
    with log_path.open("ab") as log:
        popen = subprocess.Popen(
            [
                PROMETHEUS,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prometheus = Prometheus(popen, port, log_path)

    def ready() -> bool:
        if popen.poll() is not None:
            raise AssertionError(f"prometheus exited:\n{log_path.read_text()[-3000:]}")
        try:
            return httpx.get(prometheus.url + "/-/ready", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 30, "prometheus ready")
    except BaseException:
        prometheus.stop()
        raise
    return prometheus


# -- the rig: one store, one simulator, two replicas (one with two workers) ---------------------


class Replicas(Rig):
    """The rig with its two replicas, `multi` (`serve --workers 2`) and `single`, and
    Prometheus scraping both where it is installed."""

    metrics_dir: Path  # the multi replica's PROMETHEUS_MULTIPROC_DIR, once started
    prometheus: Prometheus | None = None

    def start_replicas(self) -> None:
        config: dict[str, Any] = {
            "quota": {"when_full": "wait", "max_in_flight": LIMIT, "wait_s": WAIT_S},
            "tracker": {"poll_interval_s": POLL_S, "lease_s": LEASE_S},
            "team_caps": {"gamma": 1},
            # Prices and one budget, so the Spend row's series exist (CONTRACT §9).
            "upstream": {"defaults": {"model": "sora-2", "size": "720x1280", "seconds": "4"}},
            "pricing": {"sora-2": {"*": 0.10}},
            "team_options": {"alpha": {"budget_usd_per_day": 1000}},
        }
        # The worker processes' metric files go to a fresh directory under TMPDIR.
        worker_tmp = self.workdir / "multi-tmp"
        worker_tmp.mkdir()
        self.start_gateway(
            name="gateway --workers 2",
            env={"TMPDIR": str(worker_tmp)},
            extra_args=("--workers", "2"),
            **config,
        )
        self.start_gateway(**config)
        (self.metrics_dir,) = worker_tmp.glob("sgw-metrics-*")
        if PROMETHEUS is not None:
            targets = [f"127.0.0.1:{gateway.port}" for gateway in self.gateways]
            self.prometheus = start_prometheus(self.workdir, targets)

    def close(self) -> None:
        if self.prometheus is not None:
            self.prometheus.stop()
        super().close()

    @property
    def multi(self) -> Process:
        return self.gateways[0]

    @property
    def single(self) -> Process:
        return self.gateways[1]

    def jobs_ended(self) -> dict[tuple[str, str, str], float]:
        """`jobs_total` by (team, kind, outcome), summed over both replicas."""
        totals: dict[tuple[str, str, str], float] = {}
        for gateway in self.gateways:
            for labels, value in scrape(gateway).get("sora_gateway_jobs_total", []):
                key = (labels["team"], labels["kind"], labels["outcome"])
                totals[key] = totals.get(key, 0.0) + value
        return totals

    def scrapes_by_worker(self) -> dict[str, float]:
        """How many /metrics requests each worker of `multi` answered, from its own file."""
        counts: dict[str, float] = {}
        for path in self.metrics_dir.glob("counter_*.db"):
            served = 0.0
            for family in MultiProcessCollector.merge([str(path)], accumulate=False):
                for sample in family.samples:
                    if (
                        sample.name == "sora_gateway_requests_total"
                        and sample.labels.get("route") == "/metrics"
                    ):
                        served += sample.value
            counts[path.stem] = served
        return counts


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Replicas]:
    with Replicas.open(tmp_path_factory.mktemp("monitoring"), queue_s=QUEUE_S, run_s=RUN_S) as rig:
        rig.start_replicas()
        yield rig


def create(client: httpx.Client, prompt: str = PROMPT) -> str:
    reply = client.post("/v1/videos", json={"prompt": prompt})
    assert reply.status_code == 200, reply.text
    return reply.json()["id"]


def settle(client: httpx.Client, video_id: str) -> str:
    """Retrieve until the job ended; returns its final status."""
    seen: dict[str, str] = {}

    def ended() -> bool:
        reply = client.get(f"/v1/videos/{video_id}")
        assert reply.status_code == 200, reply.text
        seen["status"] = reply.json()["status"]
        return seen["status"] not in ("queued", "in_progress")

    wait_until(ended, 15, f"{video_id} ended")
    return seen["status"]


def error_code(reply: httpx.Response, status: int) -> str:
    assert reply.status_code == status, reply.text
    return reply.json()["error"]["code"]


# -- the metrics themselves, on every replica and worker -----------------------------------------


def test_slots_in_use_is_the_ledger_count_on_every_replica_and_worker(rig: Replicas) -> None:
    # Both jobs are admitted by `single`: `multi`'s workers only know them from the store.
    rig.sim("POST", "/_sim/config", json={"run_s": LONG_RUN_S})
    try:
        with rig.client("alpha", rig.single) as alpha, rig.client("beta", rig.single) as beta:
            running = [create(alpha), create(beta)]
    finally:
        rig.sim("POST", "/_sim/config", json={"run_s": RUN_S})
    assert rig.holders() == LIMIT
    served_before = rig.scrapes_by_worker()
    readings: list[tuple[str, float, int]] = []

    def read(gateway: Process) -> None:
        samples = scrape(gateway)
        ledger = rig.holders()
        ((_, in_use),) = samples["sora_gateway_slots_in_use"]
        ((_, limit),) = samples["sora_gateway_slots_limit"]
        ((_, waiting),) = samples["sora_gateway_slot_queue_length"]
        readings.append((gateway.name, in_use, ledger))
        assert in_use == ledger == LIMIT, readings
        assert limit == LIMIT
        assert waiting == rig.redis.zcard(WAITERS) == 0

    def both_workers_answered() -> bool:
        with ThreadPoolExecutor(4) as pool:
            list(pool.map(read, [rig.multi] * 4 + [rig.single]))
        served = rig.scrapes_by_worker()
        fresh = [n - served_before.get(worker, 0) for worker, n in served.items()]
        return len(readings) >= 30 and sum(1 for n in fresh if n >= 3) >= 2

    wait_until(both_workers_answered, 20, "both workers of `multi` answered /metrics", 0)

    with rig.client("alpha", rig.multi) as alpha, rig.client("beta", rig.multi) as beta:
        assert alpha.delete(f"/v1/videos/{running[0]}").status_code == 200
        assert beta.delete(f"/v1/videos/{running[1]}").status_code == 200
    assert rig.holders() == 0

    def all_zero() -> bool:
        return all(
            scrape(gateway)["sora_gateway_slots_in_use"][0][1] == 0
            for gateway in [rig.multi, rig.multi, rig.multi, rig.single]
        )

    wait_until(all_zero, 5, "every replica and worker shows the freed slots")


def test_jobs_total_counts_each_ended_job_once_over_all_replicas(rig: Replicas) -> None:
    before = rig.jobs_ended()
    jobs = [
        ("alpha", "a calm lake at dawn"),
        ("beta", "a storm over the sea #fail"),
        ("gamma", "a night train #cancel"),
        ("alpha", "a kite over a beach"),
    ]
    clients = {
        (gateway.name, team): rig.client(team, gateway)
        for gateway in rig.gateways
        for team in ("alpha", "beta", "gamma")
    }
    finals: list[str] = []
    created: list[str] = []
    try:
        for pair in (jobs[:2], jobs[2:]):
            ids = [
                (team, create(clients[(gateway.name, team)], prompt))
                for gateway, (team, prompt) in zip(rig.gateways, pair, strict=True)
            ]
            # Every replica's client retrieves race each other and three trackers to the end.
            watchers = [
                (clients[(gateway.name, team)], video_id)
                for team, video_id in ids
                for gateway in rig.gateways
            ]
            with ThreadPoolExecutor(len(watchers)) as pool:
                finals += list(pool.map(lambda w: settle(*w), watchers))
            created += [video_id for _, video_id in ids]
        wait_until(lambda: rig.holders() == 0, 5, "every slot freed")

        def counted() -> dict[tuple[str, str, str], float]:
            now = rig.jobs_ended()
            return {
                key: now[key] - before.get(key, 0) for key in now if now[key] != before.get(key)
            }

        wait_until(lambda: sum(counted().values()) >= len(jobs), 5, "every end counted")
        expected = {
            ("alpha", "create", "completed"): 2,
            ("beta", "create", "failed"): 1,
            ("gamma", "create", "cancelled"): 1,
        }
        assert counted() == expected
        # More retrieves of the ended jobs, on every replica: nothing is counted twice.
        for (_, team), client in clients.items():
            for (owner, _), video_id in zip(jobs, created, strict=True):
                if owner == team:
                    assert client.get(f"/v1/videos/{video_id}").status_code == 200
        assert counted() == expected
    finally:
        for client in clients.values():
            client.close()
    assert sorted(set(finals)) == ["cancelled", "completed", "failed"]


# -- dashboard and alerts against Prometheus ------------------------------------------------------


def drive_every_series(rig: Replicas) -> None:
    """A workload after which every dashboard series exists on some replica."""
    multi, single = rig.gateways
    with (
        rig.client("alpha", multi) as alpha_m,
        rig.client("alpha", single) as alpha_s,
        rig.client("beta", single) as beta_s,
        rig.client("gamma", multi) as gamma_m,
    ):
        # Creates that complete (and one that fails), each retrieved on the other replica.
        done = create(alpha_m, "a lighthouse at dusk")
        flop = create(alpha_s, "a storm #fail")
        assert settle(alpha_s, done) == "completed"
        assert settle(alpha_m, flop) == "failed"
        download = alpha_s.get(f"/v1/videos/{done}/content")
        assert download.status_code == 200
        assert download.content
        remix = alpha_m.post(f"/v1/videos/{done}/remix", json={"prompt": "the same, at night"})
        assert remix.status_code == 200, remix.text
        assert settle(alpha_s, remix.json()["id"]) == "completed"
        unknown = alpha_m.post("/v1/videos/video_0000unknown/remix", json={"prompt": "again"})
        assert error_code(unknown, 400) == "invalid_video_id"

        # Two long jobs fill both slots; gamma (capped at 1) holds one of them.
        rig.sim("POST", "/_sim/config", json={"run_s": LONG_RUN_S})
        try:
            running = create(beta_s, "a long tracking shot")
            capped = create(gamma_m, "another long tracking shot")
        finally:
            rig.sim("POST", "/_sim/config", json={"run_s": RUN_S})
        busy = beta_s.post(f"/v1/videos/{running}/remix", json={"prompt": "too early"})
        assert error_code(busy, 400) == "video_not_completed"
        full = alpha_m.post("/v1/videos", json={"prompt": PROMPT})
        assert error_code(full, 429) == "concurrency_limit_exceeded"
        capped_out = gamma_m.post("/v1/videos", json={"prompt": PROMPT})
        assert error_code(capped_out, 429) == "team_concurrency_limit_exceeded"
        assert beta_s.delete(f"/v1/videos/{running}").status_code == 200
        assert gamma_m.delete(f"/v1/videos/{capped}").status_code == 200
        wait_until(lambda: rig.holders() == 0, 5, "the deleted jobs' slots freed")

        # Upstream's own 429 on a create, then a 5xx on a retrieve. No slot is held, so no
        # tracker talks to upstream and the fault hits the request it is meant for.
        rig.faults(rate_limit_next=1)
        limited = alpha_s.post("/v1/videos", json={"prompt": PROMPT})
        assert error_code(limited, 429) == "upstream_rate_limited"
        assert rig.holders() == 0
        rig.faults(fail_next=1)
        assert error_code(alpha_m.get(f"/v1/videos/{done}"), 502) == "upstream_error"
        assert alpha_s.get("/v1/videos").status_code == 200


@pytest.fixture(scope="module")
def prometheus(rig: Replicas) -> Prometheus:
    """Prometheus, once the workload ran and both replicas are scraped."""
    if rig.prometheus is None:
        pytest.skip(MISSING.format("prometheus"))
    drive_every_series(rig)
    prometheus = rig.prometheus

    def both_up() -> bool:
        targets = prometheus.api("targets")["data"]["activeTargets"]
        return len(targets) == 2 and all(t["health"] == "up" for t in targets)

    wait_until(both_up, 15, "prometheus scraped both replicas", 0.2)
    return prometheus


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])  # a collapsed row keeps its panels inside


def dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [
        target["expr"]
        for panel in panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


def as_grafana_would(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable the test does not know: {expr}"
    return expr


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_dashboard_expression_returns_data(prometheus: Prometheus) -> None:
    pending = {expr: as_grafana_would(expr) for expr in dashboard_expressions()}
    assert len(pending) >= 20
    deadline = time.monotonic() + 30
    while pending:
        for expr, query in list(pending.items()):
            answer = prometheus.query(query)
            assert answer["status"] == "success", (expr, answer)
            if answer["data"]["result"]:
                del pending[expr]
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert not pending, "no data for:\n" + "\n".join(pending)

    teams = prometheus.api("label/team/values", **{"match[]": "sora_gateway_requests_total"})
    assert {"alpha", "beta", "gamma"} <= set(teams["data"]), teams
    # Aggregating across workers must not look like counter resets to Prometheus.
    resets = prometheus.query("sum(resets(sora_gateway_requests_total[5m]))")
    assert float(resets["data"]["result"][0]["value"][1]) == 0, resets


def test_every_alert_expression_parses_and_prometheus_evaluates_it(
    prometheus: Prometheus,
) -> None:
    rules = alert_rules()
    names = {rule["alert"] for rule in rules}
    for rule in rules:
        answer = prometheus.query(rule["expr"])
        assert answer["status"] == "success", (rule["alert"], answer)

    def evaluated() -> list[dict[str, Any]]:
        groups = prometheus.api("rules")["data"]["groups"]
        loaded = [rule for group in groups for rule in group["rules"]]
        if {rule["name"] for rule in loaded} != names:
            return []
        if any(rule.get("lastEvaluation", "").startswith("0001") for rule in loaded):
            return []
        return loaded

    loaded = wait_until(evaluated, 10, "prometheus loaded and evaluated every rule", 0.2)
    assert [
        (r["name"], r["health"], r.get("lastError")) for r in loaded if r["health"] != "ok"
    ] == []

    # The workload's one upstream 429 is exactly what the rate-limit alert is for.
    def firing() -> set[str]:
        return {
            alert["labels"]["alertname"] for alert in prometheus.api("alerts")["data"]["alerts"]
        }

    wait_until(lambda: "SoraGatewayUpstreamRateLimited" in firing(), 10, "the 429 alert", 0.2)
    # The store is fine: its alert is neither pending nor firing.
    assert "SoraGatewayStoreUnreachable" not in firing()


# -- the shipped files on their own ---------------------------------------------------------------


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    if PROMTOOL is None:
        pytest.skip(MISSING.format("promtool"))
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_shipped_config_and_rules() -> None:
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert config.returncode == 0, config.stdout + config.stderr
    shipped = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    assert shipped["rule_files"] == ["alerts.yml"]
    (job,) = shipped["scrape_configs"]
    assert job["job_name"] == JOB
    assert job["static_configs"][0]["targets"] == ["gateway-1:8080", "gateway-2:8080"]
    for rule in alert_rules():
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["runbook"].strip(), rule["alert"]


def alert_case(
    name: str, series: dict[str, str], at: str, labels: dict[str, str] | None, **context: str
) -> dict[str, Any]:
    """A promtool test: `name` fires at `at` with `labels` (or not at all when None)."""
    rule = next(r for r in alert_rules() if r["alert"] == name)
    expected = []
    if labels is not None:
        annotations = {}
        for key, text in rule["annotations"].items():
            for variable, value in context.items():
                text = text.replace("{{ $labels." + variable + " }}", value)
            annotations[key] = text
        expected = [{"exp_labels": {**rule["labels"], **labels}, "exp_annotations": annotations}]
    return {
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series.items()],
        "alert_rule_test": [{"eval_time": at, "alertname": name, "exp_alerts": expected}],
    }


def test_each_alert_fires_in_its_situation(tmp_path: Path) -> None:
    g1 = 'instance="gateway-1:8080", job="sora-gateway"'
    g2 = 'instance="gateway-2:8080", job="sora-gateway"'
    one, two = {"instance": "gateway-1:8080"}, {"instance": "gateway-2:8080"}
    answers = f'sora_gateway_upstream_request_duration_seconds_count{{{g1}, status="200"}}'
    errors = f'sora_gateway_upstream_errors_total{{{g1}, kind="error"}}'
    limited = f'sora_gateway_upstream_errors_total{{{g1}, kind="rate_limited"}}'
    rejected = f'sora_gateway_quota_rejections_total{{{g1}, team="a", reason="upstream_429"}}'
    starved = f'sora_gateway_upstream_pool_starved_total{{{g1}, pool="api"}}'
    tests = [
        alert_case(
            "SoraGatewayDown",
            {f"up{{{g1}}}": "1 1 0 0 0 0", f"up{{{g2}}}": "1x6"},
            "5m",
            {**one, "job": JOB},
            instance="gateway-1:8080",
        ),
        alert_case("SoraGatewayTargetsMissing", {"unrelated": "1x10"}, "8m", {"job": JOB}),
        # Redis gone for gateway-2: its /metrics still answers but without the quota gauges.
        alert_case(
            "SoraGatewayStoreUnreachable",
            {
                f"up{{{g1}}}": "1x6",
                f"up{{{g2}}}": "1x6",
                f"sora_gateway_slots_limit{{{g1}}}": "2x6",
                f"sora_gateway_slots_limit{{{g2}}}": "2 2 stale",
                f"sora_gateway_store_errors_total{{{g1}}}": "0x6",
                f"sora_gateway_store_errors_total{{{g2}}}": "0x6",
            },
            "5m",
            {**two, "job": JOB},
            instance="gateway-2:8080",
        ),
        # ... or its operations fail between scrapes.
        alert_case(
            "SoraGatewayStoreUnreachable",
            {
                f"up{{{g1}}}": "1x6",
                f"sora_gateway_slots_limit{{{g1}}}": "2x6",
                f"sora_gateway_store_errors_total{{{g1}}}": "0 0 1 2 3 4",
            },
            "5m",
            {**one, "job": JOB},
            instance="gateway-1:8080",
        ),
        alert_case(
            "SoraGatewayStoreUnreachable",
            {f"up{{{g1}}}": "1x6", f"sora_gateway_slots_limit{{{g1}}}": "2x6"},
            "5m",
            None,
        ),
        # Half of the upstream calls fail with 5xx; no timeout series exists at all.
        alert_case(
            "SoraGatewayUpstreamErrorRatioHigh",
            {
                answers: "0+10x20",
                errors: "0+10x20",
            },
            "15m",
            {},
        ),
        alert_case(
            "SoraGatewayUpstreamErrorRatioHigh",
            {
                answers: "0+100x20",
                errors: "0+1x20",
            },
            "15m",
            None,
        ),
        # Calls wait for api connections for ten minutes; a single wait does not page.
        alert_case(
            "SoraGatewayUpstreamPoolStarved",
            {
                starved: "0 0+3x15",
                f'sora_gateway_upstream_pool_starved_total{{{g1}, pool="tracker"}}': "0x16",
            },
            "12m",
            {**one, "job": JOB, "pool": "api"},
            instance="gateway-1:8080",
            pool="api",
        ),
        alert_case("SoraGatewayUpstreamPoolStarved", {starved: "0 1 1x14"}, "12m", None),
        alert_case(
            "SoraGatewayQuotaSaturated",
            {
                f"sora_gateway_slots_in_use{{{g1}}}": "2x40",
                f"sora_gateway_slots_limit{{{g1}}}": "2x40",
                f"sora_gateway_slot_queue_length{{{g1}}}": "0+1x40",
            },
            "30m",
            {},
        ),
        alert_case(
            "SoraGatewayQuotaSaturated",
            {
                f"sora_gateway_slots_in_use{{{g1}}}": "1x40",
                f"sora_gateway_slots_limit{{{g1}}}": "2x40",
                f"sora_gateway_slot_queue_length{{{g1}}}": "0+1x40",
            },
            "30m",
            None,
        ),
        # Jobs queued, a slot free, and no start for minutes: the dispatcher is stuck.
        # Both replicas report the same store-read depth; they are not added up.
        alert_case(
            "SoraGatewayQueueStalled",
            {
                f'sora_gateway_queue_depth{{{g1}, team="a"}}': "3x10",
                f'sora_gateway_queue_depth{{{g2}, team="a"}}': "3x10",
                f"sora_gateway_slots_in_use{{{g1}}}": "1x10",
                f"sora_gateway_slots_limit{{{g1}}}": "2x10",
                f'sora_gateway_queue_seconds_count{{{g1}, team="a"}}': "5x10",
                f'sora_gateway_queue_seconds_count{{{g2}, team="a"}}': "0x10",
            },
            "6m",
            {},
        ),
        # Jobs keep starting (a slot is free between two starts): not stalled.
        alert_case(
            "SoraGatewayQueueStalled",
            {
                f'sora_gateway_queue_depth{{{g1}, team="a"}}': "3x10",
                f"sora_gateway_slots_in_use{{{g1}}}": "1x10",
                f"sora_gateway_slots_limit{{{g1}}}": "2x10",
                f'sora_gateway_queue_seconds_count{{{g1}, team="a"}}': "0+1x10",
            },
            "6m",
            None,
        ),
        # Every slot busy: the queue waits, as it should.
        alert_case(
            "SoraGatewayQueueStalled",
            {
                f'sora_gateway_queue_depth{{{g1}, team="a"}}': "3x10",
                f"sora_gateway_slots_in_use{{{g1}}}": "2x10",
                f"sora_gateway_slots_limit{{{g1}}}": "2x10",
                f'sora_gateway_queue_seconds_count{{{g1}, team="a"}}': "5x10",
            },
            "6m",
            None,
        ),
        # Nothing queued: idle slots are no stall.
        alert_case(
            "SoraGatewayQueueStalled",
            {
                f'sora_gateway_queue_depth{{{g1}, team="a"}}': "0x10",
                f"sora_gateway_slots_in_use{{{g1}}}": "0x10",
                f"sora_gateway_slots_limit{{{g1}}}": "2x10",
                f'sora_gateway_queue_seconds_count{{{g1}, team="a"}}': "5x10",
            },
            "6m",
            None,
        ),
        # No start from 2m on: the condition holds from 4m, so at 5m it is still pending.
        alert_case(
            "SoraGatewayQueueStalled",
            {
                f'sora_gateway_queue_depth{{{g1}, team="a"}}': "3x10",
                f"sora_gateway_slots_in_use{{{g1}}}": "1x10",
                f"sora_gateway_slots_limit{{{g1}}}": "2x10",
                f'sora_gateway_queue_seconds_count{{{g1}, team="a"}}': "0 1 2x9",
            },
            "5m",
            None,
        ),
        alert_case(
            "SoraGatewayQueueStalled",
            {
                f'sora_gateway_queue_depth{{{g1}, team="a"}}': "3x10",
                f"sora_gateway_slots_in_use{{{g1}}}": "1x10",
                f"sora_gateway_slots_limit{{{g1}}}": "2x10",
                f'sora_gateway_queue_seconds_count{{{g1}, team="a"}}': "0 1 2x9",
            },
            "6m",
            {},
        ),
        # A team past 90 % of its budget for 5 minutes; both replicas read the same ratio
        # from the store, and a team under 90 % stays quiet.
        alert_case(
            "SoraGatewayBudgetNearlySpent",
            {
                f'sora_gateway_budget_used_ratio{{{g1}, team="a"}}': "0.5 0.95x10",
                f'sora_gateway_budget_used_ratio{{{g2}, team="a"}}': "0.5 0.95x10",
                f'sora_gateway_budget_used_ratio{{{g1}, team="b"}}': "0.85x11",
            },
            "6m",
            {"team": "a"},
            team="a",
        ),
        # Still pending after 4 minutes above 90 %.
        alert_case(
            "SoraGatewayBudgetNearlySpent",
            {f'sora_gateway_budget_used_ratio{{{g1}, team="a"}}': "0.5 0.95x10"},
            "4m",
            None,
        ),
        # Two replicas at 0.5 each are one team at 50 %, not 100 %.
        alert_case(
            "SoraGatewayBudgetNearlySpent",
            {
                f'sora_gateway_budget_used_ratio{{{g1}, team="a"}}': "0.5x10",
                f'sora_gateway_budget_used_ratio{{{g2}, team="a"}}': "0.5x10",
            },
            "8m",
            None,
        ),
        # A day's rollover frees the budget: the alert resolves.
        alert_case(
            "SoraGatewayBudgetNearlySpent",
            {f'sora_gateway_budget_used_ratio{{{g1}, team="a"}}': "0.95x10 0.1x5"},
            "13m",
            None,
        ),
        alert_case(
            "SoraGatewayLeaseExpired",
            {f"sora_gateway_lease_expiries_total{{{g1}}}": "0 0 0 1 1 1"},
            "5m",
            {},
        ),
        # The first 429 ever: the series appears at 1, which increase() cannot see.
        alert_case(
            "SoraGatewayUpstreamRateLimited",
            {rejected: "0 0 0 1 1"},
            "4m",
            {},
        ),
        # A 429 on a read (a tracker poll) says nothing about the job count.
        alert_case(
            "SoraGatewayUpstreamRateLimited",
            {limited: "0 0 0 1 1"},
            "4m",
            None,
        ),
        alert_case(
            "SoraGatewayUpstreamRateLimited",
            {rejected: "0x5 1x30"},
            "30m",
            None,
        ),
    ]
    names = {case["alert_rule_test"][0]["alertname"] for case in tests}
    assert names == {rule["alert"] for rule in alert_rules()}
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(
        yaml.safe_dump({"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": tests})
    )
    result = promtool("test", "rules", str(spec))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_provisionable_grafana_10_json() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 38
    assert dashboard["uid"]
    assert dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["DS_PROMETHEUS"]
    assert source["type"] == "datasource"
    assert source["query"] == "prometheus"
    team = variables["team"]
    assert team["type"] == "query"
    assert team["multi"]
    assert team["includeAll"]
    query = "label_values(sora_gateway_requests_total, team)"
    assert team["query"] == team["definition"] == query
    expected_source = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
    assert team["datasource"] == expected_source

    # The provisioned datasource is the variable's default: the dashboard needs no clicks.
    (provisioned,) = yaml.safe_load(DATASOURCES.read_text())["datasources"]
    assert provisioned["type"] == "prometheus"
    assert source["current"]["value"] == provisioned["uid"]
    (provider,) = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"]

    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == [
        "Overview",
        "Traffic",
        "Quota",
        "Queue",
        "Jobs",
        "Spend",
        "Refusals and errors",
    ]
    ids, cells = set(), set()
    for panel in panels(dashboard):
        assert panel["id"] not in ids
        ids.add(panel["id"])
        pos = panel["gridPos"]
        assert pos["x"] >= 0, panel["title"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        assert pos["h"] > 0, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel"
                cells.add((x, y))
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "bargauge", "gauge", "table"}
        assert panel["datasource"] == expected_source, panel["title"]
        refs = [target["refId"] for target in panel["targets"]]
        assert refs, panel["title"]
        assert len(refs) == len(set(refs)), panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected_source, panel["title"]
            names = set(re.findall(r"sora_gateway_\w+", target["expr"]))
            bases = {re.sub(r"_(bucket|sum|count)$", "", name) for name in names}
            assert bases <= METRICS, (panel["title"], bases - METRICS)
