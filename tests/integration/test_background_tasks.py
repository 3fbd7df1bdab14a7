"""Background tasks cannot die unseen.

The readiness task used to end at the first exception that was not a store error:
`/readyz` then stayed 503 for good and nothing said why, since the lifespan looks at
its tasks only at shutdown. Here a real client configured with an unknown encoding,
whose first command fails with a LookupError, stands for any unexpected failure.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from redis.asyncio import Redis

from gateway import readiness as readiness_module
from gateway.background import start
from gateway.embedded_store import EmbeddedRedis
from gateway.readiness import Readiness
from gateway.registry import StoreProbe
from support.processes import wait_until_async


def messages(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [record for record in caplog.records if text in record.getMessage()]


async def test_an_unexpected_check_failure_is_logged_and_the_checks_go_on(
    store_server: EmbeddedRedis, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readiness_module, "CHECK_EVERY_S", 0.02)
    # Its first command fails (the connection's setup cannot encode), later ones work.
    store = Redis.from_url(store_server.url, encoding="no-such-codec")
    readiness = Readiness(StoreProbe(store))
    task = asyncio.create_task(readiness.run())
    try:
        await wait_until_async(
            lambda: readiness.ready() or task.done(), 10, "ready after the failed check"
        )
        assert not task.done(), "the readiness task ended"
        [failure] = messages(caplog, "readiness check failed unexpectedly")
        assert failure.exc_info is not None
        assert failure.exc_info[0] is LookupError
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await store.aclose()


async def test_a_background_task_that_dies_is_logged_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken() -> None:
        raise RuntimeError("a bug")

    task = start(broken(), "tracker")
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)  # done-callbacks run one loop step after the task ends
    [death] = messages(caplog, "background task tracker died")
    assert death.levelno == logging.ERROR
    assert death.exc_info is not None
    assert death.exc_info[0] is RuntimeError


async def test_a_cancelled_background_task_is_a_normal_end(
    caplog: pytest.LogCaptureFixture,
) -> None:
    task = start(asyncio.Event().wait(), "readiness")
    await asyncio.sleep(0)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await asyncio.sleep(0)
    assert not messages(caplog, "background task")
