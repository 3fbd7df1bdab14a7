"""A gateway's /metrics page, read the way Prometheus reads it."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from support.processes import Process

Samples = dict[str, list[tuple[dict[str, str], float]]]


def scrape(gateway: Process) -> Samples:
    """One /metrics page, on a new connection (so a replica's workers take turns): every
    sample's labels and value, by sample name."""
    reply = httpx.get(gateway.url + "/metrics", timeout=10.0)
    assert reply.status_code == 200, reply.text
    samples: Samples = {}
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples
