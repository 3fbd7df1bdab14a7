"""The queue's (CONTRACT §8) and spend's (§9) metrics as a scrape shows them."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import JOB_OUTCOMES, POLICY_CODES, GatewayMetrics, QuotaGauges

TEAMS = ("alpha", "beta")
Samples = dict[str, list[tuple[dict[str, str], float]]]


def scraped(metrics: GatewayMetrics, quota: QuotaGauges | None = None) -> Samples:
    """Every sample of one /metrics page, by sample name, as Prometheus parses it."""
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics.exposition(quota).decode()):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    found = [v for got, v in samples.get(name, []) if got.items() >= labels.items()]
    assert len(found) <= 1, (name, labels, found)
    return found[0] if found else None


def gateway_metrics() -> GatewayMetrics:
    return GatewayMetrics(TEAMS)


# -- queue_seconds and queue_rejections_total: every team's series from the start --------------


def test_each_team_s_queue_series_exist_at_zero_before_any_event():
    samples = scraped(gateway_metrics())
    for team in TEAMS:
        assert value(samples, "sora_gateway_queue_seconds_count", team=team) == 0
        assert value(samples, "sora_gateway_queue_seconds_bucket", team=team, le="+Inf") == 0
        for reason in ("queue_full", "team_queue_full"):
            assert (
                value(samples, "sora_gateway_queue_rejections_total", team=team, reason=reason) == 0
            )
    labelled = {labels["team"] for labels, _ in samples["sora_gateway_queue_rejections_total"]}
    assert labelled == set(TEAMS)  # nothing is queued before a key is recognised


def test_queue_started_observes_the_wait_by_team():
    metrics = gateway_metrics()
    metrics.queue_started("alpha", 0.05)
    metrics.queue_started("alpha", 4000.0)
    metrics.queue_started("nobody", 2.0)  # not a configured team: never its own label
    samples = scraped(metrics)
    count = "sora_gateway_queue_seconds_count"
    assert value(samples, count, team="alpha") == 2
    assert value(samples, count, team="beta") == 0
    assert value(samples, count, team="anonymous") == 1
    assert value(samples, "sora_gateway_queue_seconds_sum", team="alpha") == pytest.approx(4000.05)
    bucket = "sora_gateway_queue_seconds_bucket"
    assert value(samples, bucket, team="alpha", le="0.1") == 1
    assert value(samples, bucket, team="alpha", le="3600.0") == 1
    assert value(samples, bucket, team="alpha", le="7200.0") == 2
    assert "nobody" not in {labels.get("team") for labels, _ in samples[bucket]}


def test_queue_buckets_span_a_tenth_of_a_second_to_a_day():
    samples = scraped(gateway_metrics())
    edges = [
        labels["le"]
        for labels, _ in samples["sora_gateway_queue_seconds_bucket"]
        if labels["team"] == "alpha"
    ]
    finite = [float(edge) for edge in edges if edge != "+Inf"]
    assert finite == sorted(finite)
    assert (finite[0], finite[-1]) == (0.1, 86400.0)
    assert len(finite) >= 10  # p50/p99 resolve at every scale between


def test_queue_rejected_counts_by_team_and_reason_and_only_the_contract_s_reasons():
    metrics = gateway_metrics()
    metrics.queue_rejected("alpha", "queue_full")
    metrics.queue_rejected("alpha", "queue_full")
    metrics.queue_rejected("beta", "team_queue_full")
    metrics.queue_rejected("beta", "something_else")
    samples = scraped(metrics)
    rejected = "sora_gateway_queue_rejections_total"
    assert value(samples, rejected, team="alpha", reason="queue_full") == 2
    assert value(samples, rejected, team="alpha", reason="team_queue_full") == 0
    assert value(samples, rejected, team="beta", reason="team_queue_full") == 1
    assert {labels["reason"] for labels, _ in samples[rejected]} == {
        "queue_full",
        "team_queue_full",
    }


def test_a_team_added_by_a_reload_gets_its_queue_series():
    metrics = gateway_metrics()
    metrics.set_teams([*TEAMS, "gamma"])
    samples = scraped(metrics)
    assert value(samples, "sora_gateway_queue_seconds_count", team="gamma") == 0
    assert (
        value(samples, "sora_gateway_queue_rejections_total", team="gamma", reason="queue_full")
        == 0
    )


# -- jobs_total's new outcomes ------------------------------------------------------------------


@pytest.mark.parametrize("outcome", ["refused", "queue_timeout", "never_started"])
def test_the_queue_s_outcomes_are_counted(outcome):
    metrics = gateway_metrics()
    metrics.job_ended("alpha", "create", outcome, 3.0)
    samples = scraped(metrics)
    jobs = "sora_gateway_jobs_total"
    assert value(samples, jobs, team="alpha", kind="create", outcome=outcome) == 1


def test_a_job_that_timed_out_in_the_queue_held_no_slot_to_time():
    metrics = gateway_metrics()
    metrics.job_ended("alpha", "create", "queue_timeout", 0.0)
    metrics.job_ended("alpha", "remix", "refused", 0.2)
    samples = scraped(metrics)
    durations = "sora_gateway_job_duration_seconds_count"
    assert value(samples, durations, kind="create") is None
    assert value(samples, durations, kind="remix") == 1


def test_an_outcome_outside_the_contract_is_not_a_label():
    metrics = gateway_metrics()
    metrics.job_ended("alpha", "create", "exploded", 1.0)
    assert "sora_gateway_jobs_total" not in scraped(metrics)
    assert {"refused", "queue_timeout", "never_started"} <= JOB_OUTCOMES


# -- queue_depth, read from the store at scrape -----------------------------------------------


def test_queue_depth_has_one_series_per_configured_team_and_drops_other_names():
    metrics = gateway_metrics()
    quota = QuotaGauges(2, 2, 0, {"alpha": 7, "removed-team": 3, "anonymous": 1})
    samples = scraped(metrics, quota)
    depth = samples["sora_gateway_queue_depth"]
    assert sorted((labels["team"], v) for labels, v in depth) == [("alpha", 7.0), ("beta", 0.0)]
    # The ledger's gauges are there as before.
    assert value(samples, "sora_gateway_slots_in_use") == 2
    assert value(samples, "sora_gateway_slots_limit") == 2
    assert value(samples, "sora_gateway_slot_queue_length") == 0


def test_queue_depth_follows_a_reload_s_teams():
    metrics = gateway_metrics()
    metrics.set_teams(["beta", "gamma"])
    samples = scraped(metrics, QuotaGauges(0, 2, 0, {"alpha": 4, "gamma": 2}))
    depth = sorted((labels["team"], v) for labels, v in samples["sora_gateway_queue_depth"])
    assert depth == [("beta", 0.0), ("gamma", 2.0)]


def test_queue_depth_for_explicit_teams_and_without_a_queue_reading():
    quota = QuotaGauges(1, 2, 3, teams=["alpha"])
    (family,) = [f for f in quota.collect() if f.name == "sora_gateway_queue_depth"]
    assert [(s.labels, s.value) for s in family.samples] == [({"team": "alpha"}, 0)]


def test_without_the_store_no_queue_depth_is_guessed():
    samples = scraped(gateway_metrics(), None)
    assert "sora_gateway_queue_depth" not in samples
    assert "sora_gateway_slots_in_use" not in samples
    assert value(samples, "sora_gateway_queue_seconds_count", team="alpha") == 0


# -- CONTRACT §9: policy refusals, what settled jobs cost, budgets used -----------------------

MODELS = ("sora-2", "sora-2-pro")


def spend_metrics() -> GatewayMetrics:
    return GatewayMetrics(TEAMS, models=MODELS)


def test_each_team_s_policy_and_spend_series_exist_at_zero_before_any_event():
    samples = scraped(spend_metrics())
    for team in TEAMS:
        for code in POLICY_CODES:
            assert value(samples, "sora_gateway_policy_rejections_total", team=team, code=code) == 0
        for model in (*MODELS, "other"):
            assert value(samples, "sora_gateway_video_seconds_total", team=team, model=model) == 0
            assert value(samples, "sora_gateway_cost_usd_total", team=team, model=model) == 0
    # A request is checked only once its key named a team.
    teams = {labels["team"] for labels, _ in samples["sora_gateway_policy_rejections_total"]}
    assert teams == set(TEAMS)


def test_policy_rejected_counts_by_team_and_code_and_only_the_contract_s_codes():
    metrics = spend_metrics()
    metrics.policy_rejected("alpha", "model_not_allowed")
    metrics.policy_rejected("alpha", "model_not_allowed")
    metrics.policy_rejected("beta", "budget_exceeded")
    metrics.policy_rejected("beta", "invalid_request")  # not a policy code: never a label
    samples = scraped(metrics)
    rejected = "sora_gateway_policy_rejections_total"
    assert value(samples, rejected, team="alpha", code="model_not_allowed") == 2
    assert value(samples, rejected, team="alpha", code="budget_exceeded") == 0
    assert value(samples, rejected, team="beta", code="budget_exceeded") == 1
    assert {labels["code"] for labels, _ in samples[rejected]} == set(POLICY_CODES)
    assert set(POLICY_CODES) == {
        "model_not_allowed",
        "size_not_allowed",
        "seconds_not_allowed",
        "budget_exceeded",
    }


def test_settled_adds_seconds_and_dollars_by_team_and_model():
    metrics = spend_metrics()
    metrics.settled("alpha", "sora-2", 8, 0.8)
    metrics.settled("alpha", "sora-2", 4, 0.4)
    metrics.settled("alpha", "sora-2-pro", 12, 3.6)
    metrics.settled("beta", "sora-2", 0, 0.0)  # a refund: nothing charged
    samples = scraped(metrics)
    seconds, cost = "sora_gateway_video_seconds_total", "sora_gateway_cost_usd_total"
    assert value(samples, seconds, team="alpha", model="sora-2") == 12
    assert value(samples, cost, team="alpha", model="sora-2") == pytest.approx(1.2)
    assert value(samples, seconds, team="alpha", model="sora-2-pro") == 12
    assert value(samples, cost, team="alpha", model="sora-2-pro") == pytest.approx(3.6)
    assert value(samples, seconds, team="beta", model="sora-2") == 0
    assert value(samples, cost, team="beta", model="sora-2") == 0


def test_a_model_the_config_does_not_name_is_other_so_the_labels_stay_bounded():
    metrics = spend_metrics()
    for i in range(50):
        metrics.settled("alpha", f"client-made-up-{i}", 1, 0.1)
    metrics.settled("alpha", None, 2, 0.2)  # no model known
    samples = scraped(metrics)
    seconds = "sora_gateway_video_seconds_total"
    assert value(samples, seconds, team="alpha", model="other") == 52
    assert {labels["model"] for labels, _ in samples[seconds]} == {*MODELS, "other"}


def test_set_models_and_set_teams_give_the_new_names_their_series():
    metrics = spend_metrics()
    metrics.set_models(["sora-3"])
    metrics.set_teams([*TEAMS, "gamma"])
    metrics.settled("gamma", "sora-3", 5, 1.5)
    metrics.settled("gamma", "sora-2", 5, 0.5)  # no longer named: other
    samples = scraped(metrics)
    cost = "sora_gateway_cost_usd_total"
    assert value(samples, cost, team="gamma", model="sora-3") == pytest.approx(1.5)
    assert value(samples, cost, team="gamma", model="other") == pytest.approx(0.5)
    assert value(samples, cost, team="alpha", model="sora-3") == 0
    assert (
        value(
            samples, "sora_gateway_policy_rejections_total", team="gamma", code="size_not_allowed"
        )
        == 0
    )


def test_a_team_with_no_configured_name_is_charged_as_anonymous_never_as_itself():
    metrics = spend_metrics()
    metrics.settled("removed-team", "sora-2", 4, 0.4)
    samples = scraped(metrics)
    cost = "sora_gateway_cost_usd_total"
    assert value(samples, cost, team="anonymous", model="sora-2") == pytest.approx(0.4)
    assert "removed-team" not in {labels["team"] for labels, _ in samples[cost]}


def test_budget_used_ratio_only_for_configured_teams_with_a_budget():
    metrics = gateway_metrics()
    budgets = {"alpha": 0.95, "removed-team": 0.5}  # beta has no budget: no ratio given
    samples = scraped(metrics, QuotaGauges(0, 2, 0, {}, budgets=budgets))
    used = samples["sora_gateway_budget_used_ratio"]
    assert [(labels["team"], v) for labels, v in used] == [("alpha", 0.95)]


def test_budget_used_ratio_follows_a_reload_s_teams_and_explicit_teams():
    metrics = gateway_metrics()
    metrics.set_teams(["beta"])
    reading = QuotaGauges(0, 2, 0, budgets={"alpha": 0.2, "beta": 1.1})
    samples = scraped(metrics, reading)
    used = samples["sora_gateway_budget_used_ratio"]
    assert [(labels["team"], v) for labels, v in used] == [("beta", 1.1)]
    explicit = QuotaGauges(0, 2, 0, teams=["alpha"], budgets={"alpha": 0.2})
    (family,) = [f for f in explicit.collect() if f.name == "sora_gateway_budget_used_ratio"]
    assert [(s.labels, s.value) for s in family.samples] == [({"team": "alpha"}, 0.2)]


def test_without_the_store_no_budget_ratio_is_guessed():
    assert "sora_gateway_budget_used_ratio" not in scraped(spend_metrics(), None)
