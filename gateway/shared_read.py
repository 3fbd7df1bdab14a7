"""One read shared by every caller that asks while it runs.

Prometheus servers, dashboards and curious people may scrape `/metrics` at once; each
scrape reads the quota from the store. Callers that arrive while a read is running
wait for that read's result instead of sending their own, so concurrent scrapes cost
one store round trip and one connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class SharedRead(Generic[T]):
    def __init__(self, read: Callable[[], Awaitable[T]]) -> None:
        self._read = read
        self._running: asyncio.Future[T] | None = None

    async def __call__(self) -> T:
        running = self._running
        if running is None or running.done():
            running = self._running = asyncio.ensure_future(self._read())
            running.add_done_callback(_retrieve)
        # Shielded: one caller that goes away does not cancel the read for the others.
        return await asyncio.shield(running)


def _retrieve(future: asyncio.Future[T]) -> None:
    """Mark the outcome seen even when every caller went away before it arrived."""
    if not future.cancelled():
        future.exception()
