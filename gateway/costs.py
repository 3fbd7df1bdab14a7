"""What a job may ask for and what it will cost: the policy check and the job's charge,
made once per job-creating request, before it waits for a slot or is queued (CONTRACT
§9). The rules are `policy`'s pure functions; this holds what they read (the prices,
upstream's defaults, how long usage is kept) and the clock that names the day."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from .auth import Team
from .budgets import Charge, Limits, Spend, periods
from .config import UpstreamDefaults
from .matching import loads_object
from .metrics import GatewayMetrics
from .policy import job_terms, policy_refusal, price_micro_per_s


class JobCosts:
    def __init__(
        self,
        *,
        pricing: Mapping[str, Mapping[str, float]],
        defaults: UpstreamDefaults,
        retention_days: int,
        metrics: GatewayMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.pricing = pricing
        self.defaults = defaults
        self.keep_s = retention_days * 86400
        self.metrics = metrics
        self.clock = clock

    def reprice(
        self, pricing: Mapping[str, Mapping[str, float]], defaults: UpstreamDefaults
    ) -> None:
        """A reloaded config's prices and upstream defaults (jobs already reserved keep
        theirs)."""
        self.pricing = pricing
        self.defaults = defaults

    def spend(
        self, team: Team, kind: str, fields: Mapping[str, Any], source_body: str | None
    ) -> Spend:
        """The job's charge and its team's budgets; raises the policy's 400 (counted)
        for a model, size or length the team may not ask for."""
        source = loads_object(source_body) if source_body is not None else None
        terms = job_terms(kind, fields, source, self.defaults)
        settings = team.settings
        if settings is not None:
            refusal = policy_refusal(terms, settings, self.pricing)
            if refusal is not None:
                self.metrics.policy_rejected(team.name, str(refusal.code))
                raise refusal
        price = price_micro_per_s(self.pricing, terms.model, terms.size) or 0
        day, month = periods(self.clock())
        charge = Charge(terms.model, terms.size, terms.seconds or 0, price, day, month, self.keep_s)
        limits = None
        if settings is not None:
            limits = Limits.of(settings.budget_usd_per_day, settings.budget_usd_per_month)
        return Spend(charge, limits)
