"""Background tasks that cannot die unseen.

The lifespan gathers its tasks only at shutdown, so a task that ended early (a bug, an
exception nobody expected) would go unnoticed until then while what it keeps fresh
(readiness, slot tracking, wake-ups) silently stops. Every background task is started
here with a done-callback that logs its end at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any

log = logging.getLogger("gateway.background")


def start(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Run `work` as a named task whose end, other than by cancellation, is logged."""
    task = asyncio.create_task(work, name=name)
    task.add_done_callback(_log_end)
    return task


def _log_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return  # the lifespan stopping it: the normal end
    error = task.exception()  # retrieved here, so asyncio never reports it "never retrieved"
    if error is not None:
        log.error("background task %s died", task.get_name(), exc_info=error)
    else:
        log.error("background task %s ended; it should run until shutdown", task.get_name())
