"""Prometheus metrics: the contract's names, bounded labels, right across processes.

Counters and histograms live in one `GatewayMetrics` per app (its own registry, so
several apps in one process never collide). Under several worker processes
`PROMETHEUS_MULTIPROC_DIR` makes prometheus-client keep them in files that
`/metrics` merges. The shared quota's gauges are not process state at all: they are
read from the store once per scrape, so every replica and worker reports the same
number, the ledger's.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
    multiprocess,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "sora_gateway_"
# CONTRACT §7, and §8's: `refused` (upstream 4xx when a queued job starts),
# `queue_timeout` (queued past quota.max_queue_s), `never_started` (a lost create that
# never appeared upstream).
JOB_OUTCOMES = frozenset(
    {
        "completed",
        "failed",
        "cancelled",
        "deleted",
        "vanished",
        "lease_expired",
        "refused",
        "queue_timeout",
        "never_started",
    }
)
# Ended without ever holding a slot: nothing to observe in job_duration_seconds.
_SLOTLESS_OUTCOMES = frozenset({"queue_timeout"})
QUEUE_REJECTION_REASONS = ("queue_full", "team_queue_full")
# CONTRACT §9: the refusals of policy_rejections_total's `code` (policy and budget).
POLICY_CODES = ("model_not_allowed", "size_not_allowed", "seconds_not_allowed", "budget_exceeded")
ANONYMOUS = "anonymous"
# The `model` label of any model the config does not name (a request may name any).
OTHER_MODEL = "other"
# Video jobs take minutes; HTTP requests take milliseconds (or a long download).
JOB_BUCKETS = (5, 10, 20, 30, 60, 120, 180, 300, 600, 900, 1800, 3600)
WAIT_BUCKETS = (0.005, 0.05, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
# A queued job starts at the next free slot (well under a second) or after hours behind
# a busy team; quota.max_queue_s is a day by default.
QUEUE_BUCKETS = (
    0.1, 0.5, 1, 5, 10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 43200, 86400,
)  # fmt: skip


class GatewayMetrics:
    """Every series of the contract, in one registry per app, with a method per event."""

    def __init__(self, team_names: Iterable[str], models: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._declare_traffic(self.registry)
        self._declare_jobs(self.registry)
        self._declare_spend(self.registry)
        self._declare_failures(self.registry)
        # Labelled children by label values: `labels()` costs more than the increment, and
        # these are touched on every request (the label sets are bounded).
        self._children: dict[tuple[Any, ...], Any] = {}
        self.models: frozenset[str] = frozenset(models)
        self.set_teams(team_names)

    def _declare_traffic(self, r: CollectorRegistry) -> None:
        """Requests and upstream calls."""
        self.requests = Counter(
            PREFIX + "requests_total",
            "Requests answered, by route template, method, status and team.",
            ["route", "method", "status", "team"],
            registry=r,
        )
        self.request_duration = Histogram(
            PREFIX + "request_duration_seconds",
            "Time to answer a request (to the end of its body).",
            ["route", "method"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            PREFIX + "upstream_request_duration_seconds",
            "Time upstream took to answer (headers), by upstream route template and status.",
            ["route", "status"],
            registry=r,
        )

    def _declare_jobs(self, r: CollectorRegistry) -> None:
        """Slots, jobs and the sources refused before a job."""
        self.slot_wait = Histogram(
            PREFIX + "slot_wait_seconds",
            "Time a job-creating request waited for a shared slot.",
            ["team"],
            buckets=WAIT_BUCKETS,
            registry=r,
        )
        self.quota_rejections = Counter(
            PREFIX + "quota_rejections_total",
            "Job-creating requests refused for lack of a slot, by team and reason.",
            ["team", "reason"],
            registry=r,
        )
        self.queue_seconds = Histogram(
            PREFIX + "queue_seconds",
            "Time a queued job waited, from its acceptance to its start upstream.",
            ["team"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.queue_rejections = Counter(
            PREFIX + "queue_rejections_total",
            "Job-creating requests refused because the queue was full, by team and reason "
            "(queue_full: quota.max_queued; team_queue_full: the team's max_queued).",
            ["team", "reason"],
            registry=r,
        )
        self.jobs = Counter(
            PREFIX + "jobs_total",
            "Video jobs seen to end, counted once each, by team, kind and outcome.",
            ["team", "kind", "outcome"],
            registry=r,
        )
        self.job_duration = Histogram(
            PREFIX + "job_duration_seconds",
            "How long a job held its slot, from admission to its end.",
            ["kind"],
            buckets=JOB_BUCKETS,
            registry=r,
        )
        self.remix_rejections = Counter(
            PREFIX + "remix_rejections_total",
            "Remix, edit and extension sources refused before anything was spent.",
            ["code"],
            registry=r,
        )
        self.lease_expiries = Counter(
            PREFIX + "lease_expiries_total",
            "Jobs released by quota.max_job_s because they were never seen to end.",
            registry=r,
        )

    def _declare_spend(self, r: CollectorRegistry) -> None:
        """Policy's refusals and what settled jobs cost (CONTRACT §9)."""
        self.policy_rejections = Counter(
            PREFIX + "policy_rejections_total",
            "Job-creating requests refused by the team's policy or budget, by team and code.",
            ["team", "code"],
            registry=r,
        )
        self.video_seconds = Counter(
            PREFIX + "video_seconds_total",
            "Seconds of video charged at settlement, by team and model ('other': a model "
            "the config does not name).",
            ["team", "model"],
            registry=r,
        )
        self.cost_usd = Counter(
            PREFIX + "cost_usd_total",
            "USD charged at settlement, by team and model ('other': a model the config "
            "does not name).",
            ["team", "model"],
            registry=r,
        )

    def _declare_failures(self, r: CollectorRegistry) -> None:
        """The store's and upstream's failures."""
        self.store_errors = Counter(
            PREFIX + "store_errors_total", "Operations that failed to reach the store.", registry=r
        )
        self.store_busy = Counter(
            PREFIX + "store_busy_total",
            "Operations given up because no pooled store connection came free in time.",
            registry=r,
        )
        self.upstream_errors = Counter(
            PREFIX + "upstream_errors_total",
            "Upstream failures: timeout, unavailable, error (reset or 5xx), rate_limited.",
            ["kind"],
            registry=r,
        )
        self.upstream_pool_starved = Counter(
            PREFIX + "upstream_pool_starved_total",
            "Upstream calls that waited over a second for a pooled connection, by pool "
            "(api, tracker, download): the replica's upstream calls are starved.",
            ["pool"],
            registry=r,
        )
        for pool in ("api", "tracker", "download"):
            self.upstream_pool_starved.labels(pool)

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, *values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def request_done(
        self, route: str, method: str, status: int, team: str | None, elapsed: float
    ) -> None:
        """Count an answered request and observe its duration."""
        self._child(self.requests, route, method, str(status), self.team(team)).inc()
        self._child(self.request_duration, route, method).observe(elapsed)

    def upstream_answered(self, route: str, status: int, elapsed: float) -> None:
        """Observe how long upstream took to answer a request's headers."""
        self._child(self.upstream_duration, route, str(status)).observe(elapsed)

    def upstream_failed(self, kind: str) -> None:
        """An upstream failure: timeout, unavailable, error (reset or 5xx), rate_limited."""
        self._child(self.upstream_errors, kind).inc()

    def quota_rejected(self, team: str, reason: str) -> None:
        """A job-creating request refused for lack of a slot (or of the store)."""
        self._child(self.quota_rejections, self.team(team), reason).inc()

    def slot_waited(self, team: str, seconds: float) -> None:
        self._child(self.slot_wait, self.team(team)).observe(seconds)

    def queue_started(self, team: str, waited_s: float) -> None:
        """A queued job was sent upstream after waiting `waited_s` since its acceptance."""
        self._child(self.queue_seconds, self.team(team)).observe(waited_s)

    def queue_rejected(self, team: str, reason: str) -> None:
        """A job refused for a full queue; `reason` is queue_full or team_queue_full."""
        if reason in QUEUE_REJECTION_REASONS:  # the label takes only the contract's values
            self._child(self.queue_rejections, self.team(team), reason).inc()

    def source_refused(self, code: str) -> None:
        """A remix, edit or extension source refused before anything was spent."""
        self._child(self.remix_rejections, code).inc()

    def policy_rejected(self, team: str, code: str) -> None:
        """A job refused by policy (model, size, seconds) or by the team's budget."""
        if code in POLICY_CODES:  # the label takes only the contract's codes
            self._child(self.policy_rejections, self.team(team), code).inc()

    def settled(self, team: str, model: str | None, seconds: float, cost_usd: float) -> None:
        """A job's charge, counted once, when its settlement is first seen (a refund
        is a charge of 0: counters only go up)."""
        labels = (self.team(team), self.model(model))
        if seconds > 0:
            self._child(self.video_seconds, *labels).inc(seconds)
        if cost_usd > 0:
            self._child(self.cost_usd, *labels).inc(cost_usd)

    def model(self, name: str | None) -> str:
        """A label value that can only be a model the config names, or `other`."""
        return name if name is not None and name in self.models else OTHER_MODEL

    def set_models(self, names: Iterable[str]) -> None:
        """The models the `model` label may name: those in `pricing` and the defaults."""
        self.models = frozenset(names)
        self._spend_series()

    def _spend_series(self) -> None:
        for team in self.teams:  # only a recognised team's job is ever checked or charged
            for code in POLICY_CODES:
                self.policy_rejections.labels(team, code)
            for model in self.models | {OTHER_MODEL}:
                self.video_seconds.labels(team, model)
                self.cost_usd.labels(team, model)

    def set_teams(self, team_names: Iterable[str]) -> None:
        """The teams label values may take; their series exist from the start at zero,
        so the first event is an increase Prometheus can see, not a new series."""
        self.teams = frozenset(team_names)
        self._spend_series()
        for kind in ("timeout", "unavailable", "error", "rate_limited"):
            self.upstream_errors.labels(kind)
        for code in ("invalid_video_id", "video_not_completed", "video_expired"):
            self.remix_rejections.labels(code)
        for team in self.teams | {ANONYMOUS}:
            for reason in ("global_limit", "team_limit", "upstream_429", "store_unavailable"):
                self.quota_rejections.labels(team, reason)
        for team in self.teams:  # only a recognised team's job is ever queued
            self.queue_seconds.labels(team)
            for reason in QUEUE_REJECTION_REASONS:
                self.queue_rejections.labels(team, reason)

    def team(self, name: str | None) -> str:
        """A label value that can only be a configured team name or `anonymous`."""
        return name if name in self.teams else ANONYMOUS

    def job_ended(self, team: str, kind: str, outcome: str, held_s: float) -> None:
        if outcome not in JOB_OUTCOMES:
            return
        self.jobs.labels(self.team(team), kind, outcome).inc()
        if outcome not in _SLOTLESS_OUTCOMES:
            self.job_duration.labels(kind).observe(held_s)
        if outcome == "lease_expired":
            self.lease_expiries.inc()

    def exposition(self, quota: QuotaGauges | None) -> bytes:
        """The whole text format: this process's (or all workers') series plus the quota's.

        Without the store the quota gauges are left out rather than guessed.
        """
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            merged = CollectorRegistry()
            multiprocess.MultiProcessCollector(merged)
            own = generate_latest(merged)
        else:
            own = generate_latest(self.registry)
        if quota is None:
            return own
        scrape = CollectorRegistry()
        scrape.register(quota if quota.teams is not None else quota.for_teams(self.teams))
        return own + generate_latest(scrape)


class QuotaGauges(Collector):
    """The ledger's, the queue's and the budgets' numbers as read for one scrape.

    `queued` is the store's count of queued jobs by team. `queue_depth` has one series
    per configured team (`teams`; None: the exposing GatewayMetrics' teams), 0 for a
    team with none queued; any other name in `queued` (a team since removed from the
    config) is dropped, so the label takes only configured names. `budgets` is each
    budgeted team's (spent + reserved) / limit of its tighter period: a team without a
    budget has no ratio (none is given for it), and no series.
    """

    def __init__(
        self,
        in_use: int,
        limit: int,
        waiting: int,
        queued: Mapping[str, int] | None = None,
        *,
        teams: Iterable[str] | None = None,
        budgets: Mapping[str, float] | None = None,
    ) -> None:
        self.values = (in_use, limit, waiting)
        self.queued = dict(queued or {})
        self.teams = None if teams is None else tuple(sorted(set(teams)))
        self.budgets = dict(budgets or {})

    def for_teams(self, teams: Iterable[str]) -> QuotaGauges:
        """The same reading, its queue depth and budgets exported for `teams`."""
        return QuotaGauges(*self.values, self.queued, teams=teams, budgets=self.budgets)

    def collect(self) -> Iterator[Metric]:
        in_use, limit, waiting = self.values
        yield GaugeMetricFamily(
            PREFIX + "slots_in_use", "Shared job slots held, read from the store.", value=in_use
        )
        yield GaugeMetricFamily(
            PREFIX + "slots_limit", "The shared limit (quota.max_in_flight).", value=limit
        )
        yield GaugeMetricFamily(
            PREFIX + "slot_queue_length",
            "Requests waiting for a shared slot, over all replicas.",
            value=waiting,
        )
        depth = GaugeMetricFamily(
            PREFIX + "queue_depth",
            "Jobs queued for a shared slot, by team, read from the store.",
            labels=["team"],
        )
        for team in self.teams or ():
            depth.add_metric([team], self.queued.get(team, 0))
        yield depth
        used = GaugeMetricFamily(
            PREFIX + "budget_used_ratio",
            "(spent + reserved) / limit of the team's tighter budget period, read from the "
            "store; only teams with a budget.",
            labels=["team"],
        )
        for team in self.teams or ():
            if team in self.budgets:
                used.add_metric([team], self.budgets[team])
        yield used
