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
from collections.abc import Iterable, Iterator
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
JOB_OUTCOMES = frozenset(
    {"completed", "failed", "cancelled", "deleted", "vanished", "lease_expired"}
)
ANONYMOUS = "anonymous"
# Video jobs take minutes; HTTP requests take milliseconds (or a long download).
JOB_BUCKETS = (5, 10, 20, 30, 60, 120, 180, 300, 600, 900, 1800, 3600)
WAIT_BUCKETS = (0.005, 0.05, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)


class GatewayMetrics:
    """Every series of the contract, in one registry per app, with a method per event."""

    def __init__(self, team_names: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._declare_traffic(self.registry)
        self._declare_jobs(self.registry)
        self._declare_failures(self.registry)
        # Labelled children by label values: `labels()` costs more than the increment, and
        # these are touched on every request (the label sets are bounded).
        self._children: dict[tuple[Any, ...], Any] = {}
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

    def source_refused(self, code: str) -> None:
        """A remix, edit or extension source refused before anything was spent."""
        self._child(self.remix_rejections, code).inc()

    def set_teams(self, team_names: Iterable[str]) -> None:
        """The teams label values may take; their series exist from the start at zero,
        so the first event is an increase Prometheus can see, not a new series."""
        self.teams = frozenset(team_names)
        for kind in ("timeout", "unavailable", "error", "rate_limited"):
            self.upstream_errors.labels(kind)
        for code in ("invalid_video_id", "video_not_completed", "video_expired"):
            self.remix_rejections.labels(code)
        for team in self.teams | {ANONYMOUS}:
            for reason in ("global_limit", "team_limit", "upstream_429", "store_unavailable"):
                self.quota_rejections.labels(team, reason)

    def team(self, name: str | None) -> str:
        """A label value that can only be a configured team name or `anonymous`."""
        return name if name in self.teams else ANONYMOUS

    def job_ended(self, team: str, kind: str, outcome: str, held_s: float) -> None:
        if outcome not in JOB_OUTCOMES:
            return
        self.jobs.labels(self.team(team), kind, outcome).inc()
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
        scrape.register(quota)
        return own + generate_latest(scrape)


class QuotaGauges(Collector):
    """The ledger's numbers as read for one scrape."""

    def __init__(self, in_use: int, limit: int, waiting: int) -> None:
        self.values = (in_use, limit, waiting)

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
