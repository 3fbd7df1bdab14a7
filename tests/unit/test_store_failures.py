"""Every store failure has one meaning: its answer, its counter, and a log that a flood
cannot fill.

The app handler answered StoreBusy as 503 `store_busy`, but a job or character whose
record failed was answered `store_unavailable` whatever the cause and counted in
neither metric, and the busy warning was written once per request.
"""

from __future__ import annotations

import logging

import pytest
import redis.exceptions

from gateway.metrics import GatewayMetrics
from gateway.store import StoreBusy, StoreUnavailable
from gateway.store_failures import StoreFailures


def counted(metrics: GatewayMetrics, name: str) -> float:
    return metrics.registry.get_sample_value(f"sora_gateway_{name}_total") or 0.0


@pytest.mark.parametrize(
    ("failure", "code", "metric", "other"),
    [
        (StoreBusy("no connection"), "store_busy", "store_busy", "store_errors"),
        (
            redis.exceptions.ConnectionError("refused"),
            "store_unavailable",
            "store_errors",
            "store_busy",
        ),
        (redis.exceptions.TimeoutError("slow"), "store_unavailable", "store_errors", "store_busy"),
        (StoreUnavailable("refused"), "store_unavailable", "store_errors", "store_busy"),
    ],
)
def test_a_failure_is_answered_and_counted_by_its_cause(
    failure: Exception, code: str, metric: str, other: str
) -> None:
    metrics = GatewayMetrics(["alpha"])
    error = StoreFailures(metrics).error(
        failure,
        message="Job video_1 was started but not yet recorded; do not retry it.",
        no_retry=True,
    )
    envelope = error.envelope()["error"]
    assert (error.status, envelope["code"], envelope["type"]) == (503, code, "server_error")
    assert envelope["message"] == "Job video_1 was started but not yet recorded; do not retry it."
    assert error.headers == {"retry-after": "1", "x-should-retry": "false"}
    assert (counted(metrics, metric), counted(metrics, other)) == (1.0, 0.0)


def test_a_flood_of_failures_is_counted_each_time_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics = GatewayMetrics(["alpha"])
    failures = StoreFailures(metrics)
    with caplog.at_level(logging.WARNING, logger="gateway.store"):
        for _ in range(500):
            failures.error(StoreBusy("no connection"))
            failures.count(redis.exceptions.ConnectionError("refused"), "a tracker tick")
    assert counted(metrics, "store_busy") == 500
    assert counted(metrics, "store_errors") == 500
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) == 2, lines  # one per cause until WARN_EVERY_S has passed
