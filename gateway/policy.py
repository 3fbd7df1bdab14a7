"""What a team may ask for and what a job costs (CONTRACT §9), as pure functions.

The checks run after the body's syntax (`params.check_job_params`) and the source
check, before anything waits or is sent: a job the team may not run must never hold a
slot or a queue entry. They judge the job upstream will make, so each field is taken
where upstream takes it from (`job_terms`): a field left out is the source's (a remix,
edit or extension of a video by id) or `upstream.defaults`. A field the gateway cannot
know (left out, with no source and no default) is refused wherever the policy needs
it, since upstream's own choice might be a model, size or length the team may not
use, or one no price covers.

Money is integer micro-dollars (µUSD) everywhere past the config: sums of floats drift.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .config import ANY_SIZE, TeamSettings, UpstreamDefaults
from .errors import GatewayError, model_not_allowed, seconds_not_allowed, size_not_allowed
from .params import SECONDS_TEXT

MICRO = 1_000_000  # µUSD per USD
Pricing = Mapping[str, Mapping[str, float]]
# The job fields each kind's body gives upstream (as `matching._TAKES`, and an
# extension's `seconds`, the length it adds). A field a kind does not take is the
# source's when the job has one: upstream makes a remix, edit or extension from its
# source's model and size, whatever else the body says.
_TAKES: dict[str, frozenset[str]] = {
    "create": frozenset({"model", "size", "seconds"}),
    "remix": frozenset(),
    "edit": frozenset({"seconds"}),
    "extension": frozenset({"seconds"}),
}
_PERIOD_WORDS = {"day": "daily", "month": "monthly"}


@dataclass(frozen=True)
class Terms:
    """The model, size and length of the job upstream will make; None: not known."""

    model: str | None
    size: str | None
    seconds: int | None


def job_terms(
    kind: str,
    fields: Mapping[str, Any],
    source: Mapping[str, Any] | None,
    defaults: UpstreamDefaults,
) -> Terms:
    """The job's terms: the request's field, else the source's, else `defaults`.

    A field the kind does not take (a remix's every field; an edit's or extension's
    model and size) is the source's first. An extension's `seconds` is the length it
    adds: the request's, else the default, never the source's.
    """
    takes = _TAKES.get(kind, _TAKES["create"])
    origin = source if source is not None else {}

    def term(name: str, read: Callable[[Any], Any]) -> Any:
        own, inherited = fields.get(name), origin.get(name)
        if kind == "extension" and name == "seconds":
            inherited = None
        first, second = (own, inherited) if name in takes else (inherited, own)
        # A value that does not read (empty, or an odd one in a source) is not given.
        readable = (read(v) for v in (first, second, getattr(defaults, name)))
        return next((v for v in readable if v is not None), None)

    return Terms(term("model", _text), term("size", _text), term("seconds", _whole))


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _whole(value: Any) -> int | None:
    """`"8"` or `8` as 8; anything else (from an unchecked source) as unknown."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 1 else None
    if isinstance(value, str) and SECONDS_TEXT.fullmatch(value):
        return int(value) or None
    return None


def allowed_models(team: TeamSettings, pricing: Pricing) -> tuple[str, ...] | None:
    """The models the team may use; None: any. By default every model priced."""
    if team.models is not None:
        return team.models
    return tuple(pricing) if pricing else None


def policy_refusal(terms: Terms, team: TeamSettings, pricing: Pricing) -> GatewayError | None:
    """The first of CONTRACT §9's refusals that applies (model, size, seconds), or None.

    With prices configured every job must have one: a model and size the prices
    cover, and a known length (its cost is reserved before it starts).
    """
    return (
        _model_refusal(terms.model, team, pricing)
        or _size_refusal(terms, team, pricing)
        or _seconds_refusal(terms.seconds, team, pricing)
    )


def _model_refusal(model: str | None, team: TeamSettings, pricing: Pricing) -> GatewayError | None:
    allowed = allowed_models(team, pricing)
    if model is None:
        if allowed is None and not pricing:
            return None
        return model_not_allowed(
            "This request names no model and the gateway has no default model "
            f"(upstream.defaults.model); name one of: {_listed(allowed or tuple(pricing))}."
        )
    if allowed is not None and model not in allowed:
        return model_not_allowed(
            f"Model '{model}' is not allowed for team {team.name}; allowed: {_listed(allowed)}."
        )
    if pricing and model not in pricing:
        return model_not_allowed(
            f"Model '{model}' has no price configured, so it cannot be charged; "
            f"priced models: {_listed(tuple(pricing))}."
        )
    return None


def _size_refusal(terms: Terms, team: TeamSettings, pricing: Pricing) -> GatewayError | None:
    size, model = terms.size, terms.model
    priced = pricing.get(model, {}) if model is not None else {}
    if size is None:
        if team.sizes is None and (not pricing or ANY_SIZE in priced):
            return None
        choices = team.sizes or tuple(priced)
        return size_not_allowed(
            "This request gives no size and the gateway has no default size "
            f"(upstream.defaults.size); give one of: {_listed(choices)}."
        )
    if team.sizes is not None and size not in team.sizes:
        return size_not_allowed(
            f"Size '{size}' is not allowed for team {team.name}; allowed: {_listed(team.sizes)}."
        )
    if pricing and price_micro_per_s(pricing, model, size) is None:
        return size_not_allowed(
            f"Size '{size}' has no price configured for model '{model}', so it cannot be "
            f"charged; priced sizes: {_listed(tuple(priced))}."
        )
    return None


def _seconds_refusal(
    seconds: int | None, team: TeamSettings, pricing: Pricing
) -> GatewayError | None:
    limit = team.max_seconds
    if seconds is None:
        if limit is None and not pricing:
            return None
        most = f" (at most {limit})" if limit is not None else ""
        return seconds_not_allowed(
            "This request gives no seconds and the gateway has no default length "
            f"(upstream.defaults.seconds); give seconds{most}."
        )
    if limit is not None and seconds > limit:
        return seconds_not_allowed(
            f"{seconds} seconds is longer than team {team.name} may ask for; "
            f"at most {limit} seconds."
        )
    return None


def _listed(names: tuple[str, ...] | None) -> str:
    return ", ".join(names) if names else "none"


def price_micro_per_s(pricing: Pricing, model: str | None, size: str | None) -> int | None:
    """The price of one second of video in µUSD: the size's entry, else "*", else None."""
    prices = pricing.get(model) if model is not None else None
    if prices is None:
        return None
    price = prices.get(size) if size is not None else None
    if price is None:
        price = prices.get(ANY_SIZE)
    return None if price is None else round(price * MICRO)


def budget_message(
    period: str,
    limit_usd: float,
    spent_usd: float,
    reserved_usd: float,
    cost_usd: float,
    resets_at: int,
    *,
    team: str | None = None,
) -> str:
    """What a refused job costs, what the budget it would pass has left, and when it
    resets: enough to decide between a shorter job, waiting, and asking for more."""
    who = f"team {team}" if team else "your team"
    used = spent_usd + reserved_usd
    reset = dt.datetime.fromtimestamp(resets_at, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return (
        f"This job costs {_usd(cost_usd)}; {who} has {_usd(used)} of its "
        f"{_usd(limit_usd)} {_PERIOD_WORDS.get(period, period)} budget spent or reserved "
        f"({_usd(spent_usd)} spent, {_usd(reserved_usd)} reserved by jobs not yet ended), "
        f"so {_usd(max(limit_usd - used, 0.0))} is left; it resets at {reset}. "
        "Ask for a shorter or cheaper job, wait for the reset, or ask an admin for a "
        "larger budget."
    )


def _usd(amount: float) -> str:
    """Dollars with cents, and with the fractions of a cent a per-second price has."""
    text = f"{amount:.6f}".rstrip("0")
    whole, _, cents = text.partition(".")
    return f"${whole}.{cents.ljust(2, '0')}"
