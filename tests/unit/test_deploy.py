"""The shipped deployment files: compose stack, Kubernetes manifests, Dockerfile.

No engine runs here, so the checks are the ones that need none: `docker compose config`
(or `docker-compose config`) where a client has it, offline schema validation of the
manifests, and cross-checks that the files agree with each other and with the config
the gateway will load from them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway.config import load_settings, parse_settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"
COMPOSE_ENV = {"SORA_SIMULATOR_TOKEN": "compose-test-token", "SORA_TEAM_KEY_SHA256": "a" * 64}


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def manifests() -> dict[str, dict[str, Any]]:
    kustomization = load(K8S / "kustomization.yaml")
    found = {}
    for name in kustomization["resources"]:
        resource = load(K8S / name)
        found[resource["kind"]] = resource
    return found


# -- docker compose --------------------------------------------------------------------------


def compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0
    ):
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


def test_docker_compose_accepts_the_stack() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client here; the structural checks below still run")
    result = subprocess.run(
        [*command, "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env={**os.environ, **COMPOSE_ENV},
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    rendered = yaml.safe_load(result.stdout)
    assert set(rendered["services"]) >= {"redis", "simulator", "gateway-1", "gateway-2"}


def test_compose_refuses_to_start_without_the_secrets() -> None:
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client here")
    env = {k: v for k, v in os.environ.items() if k not in COMPOSE_ENV}
    result = subprocess.run(
        [*command, "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
    )
    assert result.returncode != 0
    assert "SORA_SIMULATOR_TOKEN" in result.stderr + result.stdout


def test_docker_compose_gives_the_real_token_to_the_gateways_only() -> None:
    """Switched to the real API (SORA_UPSTREAM_TOKEN set), the simulator still gets only
    its own token: `/_sim/*` is open, and a simulator is no place for a real credential."""
    command = compose_command()
    if command is None:
        pytest.skip("no docker compose client here; the structural check below still runs")
    real = {**COMPOSE_ENV, "SORA_UPSTREAM_TOKEN": "the-real-token"}
    result = subprocess.run(
        [*command, "-f", str(REPO / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        env={**os.environ, **real},
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert "the-real-token" not in repr(services["simulator"])
    assert "compose-test-token" in repr(services["simulator"])
    assert services["gateway-1"]["environment"]["SORA_UPSTREAM_TOKEN"] == "the-real-token"


def test_the_simulator_has_its_own_token_variable() -> None:
    services = load(REPO / "docker-compose.yml")["services"]
    simulator = repr(services["simulator"])
    assert "SORA_UPSTREAM_TOKEN" not in simulator
    assert "SORA_SIMULATOR_TOKEN" in simulator
    # The gateways get both; their config names the one it uses (the simulator's).
    gateway_env = services["gateway-1"]["environment"]
    assert {"SORA_UPSTREAM_TOKEN", "SORA_SIMULATOR_TOKEN"} <= set(gateway_env)
    config = load(REPO / "deploy/compose/gateway.yaml")
    assert config["upstream"]["token"] == "${SORA_SIMULATOR_TOKEN}"


def test_compose_services_ports_and_volumes_agree_with_the_config_files() -> None:
    compose = load(REPO / "docker-compose.yml")
    services = compose["services"]
    assert set(services) == {
        "redis",
        "simulator",
        "gateway-1",
        "gateway-2",
        "prometheus",
        "grafana",
    }
    assert "--appendonly" in services["redis"]["command"]
    assert services["redis"]["command"][services["redis"]["command"].index("--appendonly") + 1] == (
        "yes"
    )
    for name in ("gateway-1", "gateway-2", "prometheus", "grafana"):
        for volume in services[name].get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts a missing {source}"

    # The gateway config the replicas mount loads, and points at the stack's services.
    mounted = services["gateway-1"]["volumes"][0].split(":")
    assert mounted[1] == "/etc/sora-gateway/gateway.yaml"
    assert mounted[2] == "ro"
    # Without SORA_UPSTREAM_TOKEN the replicas get the simulator's token under that name.
    replica_env = {"SORA_UPSTREAM_TOKEN": COMPOSE_ENV["SORA_SIMULATOR_TOKEN"]}
    settings = parse_settings(
        (REPO / mounted[0]).read_text(), environ={**os.environ, **COMPOSE_ENV, **replica_env}
    )
    simulator_port = services["simulator"]["command"][
        services["simulator"]["command"].index("--port") + 1
    ]
    assert settings.upstream.base_url == f"http://simulator:{simulator_port}/v1"
    assert settings.store.redis_url == "redis://redis:6379/0"

    # Prometheus scrapes exactly the two replicas, on the port their image serves.
    prometheus = load(DEPLOY / "prometheus" / "prometheus.yml")
    targets = prometheus["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == ["gateway-1:8080", "gateway-2:8080"]
    for rules in prometheus["rule_files"]:
        assert (DEPLOY / "prometheus" / rules).exists()

    # Grafana finds the dashboard where its provisioning says it lives.
    provider = load(DEPLOY / "grafana" / "provisioning" / "dashboards" / "dashboards.yml")
    dashboards_path = provider["providers"][0]["options"]["path"]
    grafana_mounts = dict(v.split(":")[1::-1] for v in services["grafana"]["volumes"])
    assert grafana_mounts[dashboards_path] == "./deploy/grafana/dashboards"


# -- Kubernetes --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", load(K8S / "kustomization.yaml")["resources"])
def test_each_manifest_validates_against_the_kubernetes_schema(name: str) -> None:
    resource = load(K8S / name)
    kubernetes_validate.validate(resource, kubernetes_validate.latest_version(), strict=True)


def test_the_deployment_is_production_shaped() -> None:
    found = manifests()
    deployment = found["Deployment"]
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    assert spec["replicas"] == 3
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"]
    assert container["resources"]["limits"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Long enough for the gateway's own 30 s graceful shutdown plus the preStop pause.
    assert pod["terminationGracePeriodSeconds"] >= 35
    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"

    labels = spec["template"]["metadata"]["labels"]
    for kind in ("Service", "PodDisruptionBudget"):
        selector = found[kind]["spec"]["selector"]
        selector = selector.get("matchLabels", selector)
        assert selector.items() <= labels.items(), f"the {kind} does not select the pods"
    assert found["PodDisruptionBudget"]["spec"]["minAvailable"] < spec["replicas"]


def test_the_configmap_is_a_config_the_gateway_loads_with_the_mounted_secret(
    tmp_path: Path,
) -> None:
    found = manifests()
    pod = found["Deployment"]["spec"]["template"]["spec"]
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    config_text = found["ConfigMap"]["data"]["gateway.yaml"]
    token_file = yaml.safe_load(config_text)["upstream"]["token_file"]
    secret_volume = next(name for name, v in volumes.items() if "secret" in v)
    assert volumes[secret_volume]["secret"]["secretName"] == found["Secret"]["metadata"]["name"]
    secret_dir, secret_key = token_file.rsplit("/", 1)
    assert mounts[secret_volume] == secret_dir
    assert secret_key in found["Secret"]["stringData"]

    # Load it as the pod would, with the secret mounted somewhere local.
    (tmp_path / secret_key).write_text("token-from-the-secret\n")
    local = config_text.replace(secret_dir, str(tmp_path))
    (tmp_path / "gateway.yaml").write_text(local)
    settings = load_settings(tmp_path / "gateway.yaml")
    assert settings.upstream.token == "token-from-the-secret"
    args = pod["containers"][0]["args"]
    assert args[args.index("--config") + 1] == mounts["config"] + "/gateway.yaml"


# -- the image ------------------------------------------------------------------------------


def test_the_dockerfile_is_multi_stage_slim_non_root_with_a_healthcheck() -> None:
    lines = [line.strip() for line in (DEPLOY / "Dockerfile").read_text().splitlines()]
    stages = [line for line in lines if line.startswith("FROM ")]
    assert len(stages) >= 2
    assert all("python:3.11-slim" in line for line in stages)
    user = [line for line in lines if line.startswith("USER ")]
    assert user
    assert user[-1] not in ("USER root", "USER 0")
    assert any(line.startswith("HEALTHCHECK") for line in lines)
    assert any("/healthz" in line for line in lines)


# -- the queue on the dashboard and in the alerts (CONTRACT §8) -------------------------------

DASHBOARD = DEPLOY / "grafana" / "dashboards" / "sora-gateway.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
# Read from the store at scrape: every replica reports the same number.
STORE_GAUGES = (
    "queue_depth",
    "slots_in_use",
    "slots_limit",
    "slot_queue_length",
    "budget_used_ratio",
)


def row_panels(title: str) -> list[dict[str, Any]]:
    """The panels under the dashboard row `title`, up to the next row."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    start = next(i for i, p in enumerate(panels) if p["type"] == "row" and p["title"] == title)
    found = []
    for panel in panels[start + 1 :]:
        if panel["type"] == "row":
            break
        found.append(panel)
    return found


def expressions(panels: list[dict[str, Any]]) -> list[str]:
    return [target["expr"] for panel in panels for target in panel.get("targets", [])]


def alert(name: str) -> dict[str, Any]:
    rules = [rule for group in load(ALERTS)["groups"] for rule in group["rules"]]
    return next(rule for rule in rules if rule.get("alert") == name)


def flat(expr: str) -> str:
    return " ".join(expr.split())


def test_the_dashboard_s_queue_row_shows_depth_time_in_queue_and_starts() -> None:
    exprs = [flat(expr) for expr in expressions(row_panels("Queue"))]
    assert any(
        re.fullmatch(r"max by \(team\) \(sora_gateway_queue_depth\{.*\}\)", e) for e in exprs
    )
    for quantile in ("0.5", "0.99"):
        assert any(
            e.startswith(f"histogram_quantile({quantile}, sum by (le, team) (rate(")
            and "sora_gateway_queue_seconds_bucket" in e
            for e in exprs
        ), quantile
    assert any(
        e.startswith("60 * sum by (team) (rate(sora_gateway_queue_seconds_count") for e in exprs
    )
    assert any("sora_gateway_queue_rejections_total" in e for e in exprs)
    # Every panel of the row follows the team selector.
    assert all('team=~"$team"' in e for e in exprs)


def test_store_read_gauges_are_never_summed_over_replicas() -> None:
    """sum() over replicas would count one queue once per replica."""
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
    exprs = [
        *expressions(panels),
        alert("SoraGatewayQueueStalled")["expr"],
        alert("SoraGatewayBudgetNearlySpent")["expr"],
    ]
    for expr in map(flat, exprs):
        for gauge in STORE_GAUGES:
            used = len(re.findall(rf"sora_gateway_{gauge}\b", expr))
            taken_max = len(re.findall(rf"max(?: by \([^)]*\) )?\(sora_gateway_{gauge}\b", expr))
            assert used == taken_max, expr


def test_the_queue_stalled_alert_needs_queued_jobs_free_slots_and_no_start() -> None:
    rule = alert("SoraGatewayQueueStalled")
    expr = flat(rule["expr"])
    assert "sum(max by (team) (sora_gateway_queue_depth)) > 0" in expr
    assert "max(sora_gateway_slots_in_use) < max(sora_gateway_slots_limit)" in expr
    assert "sum(increase(sora_gateway_queue_seconds_count[2m])) == 0" in expr
    assert rule["for"] == "2m"
    assert rule["annotations"]["summary"].strip()
    assert "max_in_flight" in rule["annotations"]["runbook"]  # when it is no fault


# -- spend on the dashboard and in the alerts (CONTRACT §9) -----------------------------------


def test_the_dashboard_s_spend_row_shows_cost_budget_video_seconds_and_refusals() -> None:
    panels = row_panels("Spend")
    exprs = [flat(expr) for expr in expressions(panels)]
    # Cost per team over a day, and over the dashboard's range by team and model.
    assert any(
        re.fullmatch(r"sum by \(team\) \(increase\(sora_gateway_cost_usd_total\{.*\}\[1d\]\)\)", e)
        for e in exprs
    ), exprs
    assert any(
        re.fullmatch(
            r"sum by \(team, model\) \(increase\(sora_gateway_cost_usd_total\{.*\}"
            r"\[\$__range\]\)\)",
            e,
        )
        for e in exprs
    ), exprs
    # Video seconds by model, over a window of its own (settlements are sparse).
    assert any(
        re.fullmatch(
            r"sum by \(model\) \(increase\(sora_gateway_video_seconds_total\{.*\}\[1h\]\)\)", e
        )
        for e in exprs
    ), exprs
    assert any(
        e.startswith("sum by (team, code) (rate(sora_gateway_policy_rejections_total{")
        for e in exprs
    ), exprs
    assert all('team=~"$team"' in e for e in exprs)

    # Budget used: a gauge per team with the alert's 90 % and the refusal's 100 % marked.
    budget = [
        p
        for p in panels
        if any("sora_gateway_budget_used_ratio" in t["expr"] for t in p["targets"])
    ]
    assert {p["type"] for p in budget} >= {"bargauge"}
    for panel in budget:
        (target,) = panel["targets"]
        assert flat(target["expr"]) == (
            'max by (team) (sora_gateway_budget_used_ratio{team=~"$team"})'
        )
        defaults = panel["fieldConfig"]["defaults"]
        assert defaults["unit"] == "percentunit"
        steps = [(s["color"], s["value"]) for s in defaults["thresholds"]["steps"]]
        assert [value for _, value in steps] == [None, 0.9, 1.0], panel["title"]
        assert steps[1][0] != steps[0][0] != steps[2][0] != steps[1][0]
    gauge = next(p for p in budget if p["type"] == "bargauge")
    assert gauge["targets"][0]["instant"] is True
    # Money in dollars, time in seconds.
    for panel in panels:
        exprs_of = " ".join(t["expr"] for t in panel["targets"])
        unit = panel["fieldConfig"]["defaults"]["unit"]
        if "cost_usd_total" in exprs_of:
            assert unit == "currencyUSD", panel["title"]
        if "video_seconds_total" in exprs_of:
            assert unit == "s", panel["title"]


def test_the_budget_alert_fires_per_team_past_90_percent_for_5_minutes() -> None:
    rule = alert("SoraGatewayBudgetNearlySpent")
    assert flat(rule["expr"]) == "max by (team) (sora_gateway_budget_used_ratio) > 0.9"
    assert rule["for"] == "5m"
    assert rule["labels"]["severity"] == "warning"
    assert "{{ $labels.team }}" in rule["annotations"]["summary"]
    assert "budget_exceeded" in rule["annotations"]["summary"]
    runbook = rule["annotations"]["runbook"]
    for hint in ("/admin/usage", "budget_usd_per_day", "budget_usd_per_month", "UTC"):
        assert hint in runbook, hint
