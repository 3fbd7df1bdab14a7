"""Fixtures of the integration layer: real servers, each test module with its own."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest
from redis.asyncio import Redis

from gateway.embedded_store import EmbeddedRedis
from gateway.store_clients import connect


@pytest.fixture(scope="module")
def private_store() -> Iterator[EmbeddedRedis]:
    """A Redis-compatible server for this module alone: no gateway's tracker can adopt
    its slots, and its command counts are this module's own."""
    with EmbeddedRedis(persistent=False) as server:
        yield server


@pytest.fixture
async def client(private_store: EmbeddedRedis) -> AsyncIterator[Redis]:
    """A client of the module's server, emptied for each test."""
    redis = connect(private_store.url)
    await redis.flushall()
    yield redis
    await redis.aclose()
