"""Fixtures of the integration layer: real servers, each test module with its own."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from gateway.embedded_store import EmbeddedRedis


@pytest.fixture(scope="module")
def private_store() -> Iterator[EmbeddedRedis]:
    """A Redis-compatible server for this module alone: no gateway's tracker can adopt
    its slots, and its command counts are this module's own."""
    with EmbeddedRedis(persistent=False) as server:
        yield server
