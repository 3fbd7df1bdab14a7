"""Policy and prices (CONTRACT §9): a job's terms, the refusals in order, money in µUSD."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from gateway.budgets import Limits
from gateway.config import TeamSettings, UpstreamDefaults
from gateway.errors import GatewayError
from gateway.policy import (
    Terms,
    allowed_models,
    budget_message,
    job_terms,
    policy_refusal,
    price_micro_per_s,
)

D1 = "a" * 64
# CONTRACT §9's example prices.
PRICING = {
    "sora-2": {"*": 0.10},
    "sora-2-pro": {"720x1280": 0.30, "1280x720": 0.30, "1024x1792": 0.50, "1792x1024": 0.50},
}
DEFAULTS = UpstreamDefaults("sora-2", "720x1280", "4")
NONE = UpstreamDefaults()
SOURCE = {"id": "video_src", "model": "sora-2-pro", "size": "1792x1024", "seconds": "12"}


def team(**fields: Any) -> TeamSettings:
    return TeamSettings("marketing", (D1,), **fields)


def refusal(terms: Terms, who: TeamSettings, pricing: Any = PRICING) -> tuple[int, str, str]:
    error = policy_refusal(terms, who, pricing)
    assert isinstance(error, GatewayError), "expected a refusal"
    assert error.param is not None
    return error.status, error.code or "", error.param


# -- job_terms: where upstream takes each field from -------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"prompt": "p"}, Terms("sora-2", "720x1280", 4)),
        (
            {"model": "sora-2-pro", "size": "1280x720", "seconds": "8"},
            Terms("sora-2-pro", "1280x720", 8),
        ),
        ({"seconds": 12}, Terms("sora-2", "720x1280", 12)),  # a JSON integer, as curl sends it
        ({"model": "", "size": "", "seconds": ""}, Terms("sora-2", "720x1280", 4)),  # form: empty
    ],
)
def test_a_create_takes_its_own_fields_else_the_defaults(fields, expected):
    assert job_terms("create", fields, None, DEFAULTS) == expected


def test_without_defaults_an_omitted_field_is_unknown():
    assert job_terms("create", {"prompt": "p"}, None, NONE) == Terms(None, None, None)
    assert job_terms("create", {"seconds": "8"}, None, NONE) == Terms(None, None, 8)


def test_a_remix_is_its_source_s_model_size_and_length_whatever_its_body_says():
    fields = {"prompt": "p", "model": "sora-2", "size": "720x1280", "seconds": "4"}
    assert job_terms("remix", fields, SOURCE, DEFAULTS) == Terms("sora-2-pro", "1792x1024", 12)
    # A source object missing a field: the body's, else the default.
    assert job_terms("remix", {"size": "1280x720"}, {"model": "sora-2-pro"}, DEFAULTS) == Terms(
        "sora-2-pro", "1280x720", 4
    )


def test_an_edit_keeps_its_source_s_model_and_size_and_may_ask_another_length():
    assert job_terms("edit", {"seconds": "8"}, SOURCE, DEFAULTS) == Terms(
        "sora-2-pro", "1792x1024", 8
    )
    assert job_terms("edit", {"model": "sora-2"}, SOURCE, DEFAULTS) == Terms(
        "sora-2-pro", "1792x1024", 12
    )


def test_an_extension_s_seconds_are_the_ones_it_adds_never_the_source_s():
    assert job_terms("extension", {"seconds": "8"}, SOURCE, DEFAULTS) == Terms(
        "sora-2-pro", "1792x1024", 8
    )
    assert job_terms("extension", {}, SOURCE, DEFAULTS).seconds == 4
    assert job_terms("extension", {}, SOURCE, NONE).seconds is None


def test_an_uploaded_source_is_no_source_the_request_s_fields_and_defaults_apply():
    fields = {"model": "sora-2-pro", "size": "1280x720"}
    assert job_terms("edit", fields, None, DEFAULTS) == Terms("sora-2-pro", "1280x720", 4)


@pytest.mark.parametrize("odd", ["eight", "4.5", 0, "0", True, 4.0, None, ["4"]])
def test_an_unreadable_source_length_is_not_taken(odd):
    source = {**SOURCE, "seconds": odd}
    assert job_terms("remix", {}, source, DEFAULTS).seconds == 4
    assert job_terms("remix", {}, source, NONE).seconds is None


# -- policy_refusal: CONTRACT §9's codes, in its order ----------------------------------------

MARKETING = team(models=("sora-2",), sizes=("1280x720",), max_seconds=8)


def test_the_acceptance_team_may_run_exactly_its_job():
    assert policy_refusal(Terms("sora-2", "1280x720", 8), MARKETING, PRICING) is None
    assert policy_refusal(Terms("sora-2", "1280x720", 1), MARKETING, PRICING) is None


@pytest.mark.parametrize(
    ("terms", "expected"),
    [
        (Terms("sora-2-pro", "1280x720", 8), (400, "model_not_allowed", "model")),
        (Terms("sora-2", "720x1280", 8), (400, "size_not_allowed", "size")),
        (Terms("sora-2", "1280x720", 9), (400, "seconds_not_allowed", "seconds")),
        # The order: model first, then size, then seconds.
        (Terms("sora-2-pro", "720x1280", 20), (400, "model_not_allowed", "model")),
        (Terms("sora-2", "720x1280", 20), (400, "size_not_allowed", "size")),
    ],
)
def test_each_refused_variant_gets_its_code_and_param(terms, expected):
    assert refusal(terms, MARKETING) == expected


def test_refusals_name_what_is_allowed():
    error = policy_refusal(Terms("sora-2-pro", "1280x720", 8), MARKETING, PRICING)
    assert error is not None
    assert "sora-2-pro" in error.message
    assert "allowed: sora-2." in error.message
    error = policy_refusal(Terms("sora-2", "720x1280", 8), MARKETING, PRICING)
    assert error is not None
    assert "allowed: 1280x720." in error.message
    error = policy_refusal(Terms("sora-2", "1280x720", 12), MARKETING, PRICING)
    assert error is not None
    assert "at most 8 seconds" in error.message


def test_a_team_s_models_default_to_every_priced_model():
    anyone = team()
    assert allowed_models(anyone, PRICING) == ("sora-2", "sora-2-pro")
    assert policy_refusal(Terms("sora-2-pro", "1280x720", 4), anyone, PRICING) is None
    assert refusal(Terms("sora-3", "1280x720", 4), anyone) == (400, "model_not_allowed", "model")


def test_without_pricing_any_model_size_and_length_is_allowed():
    anyone = team()
    assert allowed_models(anyone, {}) is None
    assert policy_refusal(Terms("anything", "99x99", 600), anyone, {}) is None
    assert policy_refusal(Terms(None, None, None), anyone, {}) is None


def test_a_listed_model_without_a_price_is_refused_when_prices_are_set():
    listed = team(models=("sora-2", "sora-3"))
    assert refusal(Terms("sora-3", "1280x720", 4), listed) == (400, "model_not_allowed", "model")
    error = policy_refusal(Terms("sora-3", "1280x720", 4), listed, PRICING)
    assert error is not None
    assert "no price" in error.message


def test_no_model_with_prices_set_is_refused_naming_the_fix():
    error = policy_refusal(Terms(None, "1280x720", 4), team(), PRICING)
    assert error is not None
    assert (error.code, error.param) == ("model_not_allowed", "model")
    assert "upstream.defaults.model" in error.message
    assert "sora-2, sora-2-pro" in error.message
    # A team with a list cannot be checked against upstream's own choice either.
    assert refusal(Terms(None, "1280x720", 4), MARKETING, {}) == (400, "model_not_allowed", "model")


def test_a_size_the_model_has_no_price_for_is_refused_and_star_prices_any_size():
    anyone = team()
    assert refusal(Terms("sora-2-pro", "480x480", 4), anyone) == (400, "size_not_allowed", "size")
    error = policy_refusal(Terms("sora-2-pro", "480x480", 4), anyone, PRICING)
    assert error is not None
    assert "1024x1792" in error.message
    assert policy_refusal(Terms("sora-2", "480x480", 4), anyone, PRICING) is None


def test_no_size_is_refused_where_the_size_matters():
    assert refusal(Terms("sora-2", None, 4), MARKETING) == (400, "size_not_allowed", "size")
    assert refusal(Terms("sora-2-pro", None, 4), team()) == (400, "size_not_allowed", "size")
    # "*" prices whatever size upstream picks.
    assert policy_refusal(Terms("sora-2", None, 4), team(), PRICING) is None


def test_no_length_is_refused_where_the_length_matters():
    bounded = team(max_seconds=8)
    assert refusal(Terms("any", "1x1", None), bounded, {}) == (
        400,
        "seconds_not_allowed",
        "seconds",
    )
    # With prices, a job's cost is reserved before it starts: its length must be known.
    error = policy_refusal(Terms("sora-2", "1280x720", None), team(), PRICING)
    assert error is not None
    assert (error.code, error.param) == ("seconds_not_allowed", "seconds")
    assert "upstream.defaults.seconds" in error.message


# -- money ----------------------------------------------------------------------------------------


def test_prices_are_whole_micro_dollars_per_second_the_size_s_entry_before_star():
    pricing = {"sora-2": {"*": 0.10, "1792x1024": 0.15}, "sora-2-pro": PRICING["sora-2-pro"]}
    assert price_micro_per_s(pricing, "sora-2", "1280x720") == 100_000
    assert price_micro_per_s(pricing, "sora-2", "1792x1024") == 150_000
    assert price_micro_per_s(pricing, "sora-2", None) == 100_000
    # 0.3 * 1e6 is 299999.99999999994 in floats: rounded, never truncated.
    assert price_micro_per_s(pricing, "sora-2-pro", "1280x720") == 300_000
    assert price_micro_per_s(pricing, "sora-2-pro", "480x480") is None
    assert price_micro_per_s(pricing, "sora-2-pro", None) is None
    assert price_micro_per_s(pricing, "sora-3", "1280x720") is None
    assert price_micro_per_s(pricing, None, "1280x720") is None
    assert price_micro_per_s({}, "sora-2", "1280x720") is None


def limits(settings: Any) -> Limits | None:
    return Limits.of(settings.budget_usd_per_day, settings.budget_usd_per_month)


def test_budget_limits_are_micro_dollars_and_none_without_a_budget():
    assert limits(team()) is None
    assert limits(team(budget_usd_per_day=2.0)) == Limits(2_000_000, None)
    assert limits(team(budget_usd_per_month=300.3)) == Limits(None, 300_300_000)
    both = team(budget_usd_per_day=0.1, budget_usd_per_month=50)
    assert limits(both) == Limits(100_000, 50_000_000)


RESETS = int(dt.datetime(2026, 12, 2, tzinfo=dt.UTC).timestamp())


def test_the_budget_message_says_cost_budget_used_and_reset():
    message = budget_message("day", 2.0, 1.2, 0.4, 0.4, RESETS, team="marketing")
    assert message.startswith(
        "This job costs $0.40; team marketing has $1.60 of its $2.00 daily budget spent or "
        "reserved ($1.20 spent, $0.40 reserved by jobs not yet ended), so $0.40 is left; "
        "it resets at 2026-12-02T00:00:00Z."
    )
    assert "shorter" in message  # what to do about it


def test_the_budget_message_keeps_fractions_of_a_cent_and_never_a_negative_rest():
    message = budget_message("month", 300.0, 299.9995, 0.5, 0.0125, RESETS)
    assert "costs $0.0125;" in message
    assert "your team has $300.4995 of its $300.00 monthly budget" in message
    assert "so $0.00 is left" in message
