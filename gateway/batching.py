"""Commands that many requests send in one pass of the event loop, sent as one pipeline.

Under load dozens of retrieves want their video's record at the same moment. Sent one
by one, each command costs a pool checkout, a write and a read of its own, and that
made the Redis client the largest single cost of a retrieve (README, Performance).
Here the commands asked for during one pass of the loop leave together at the end of
it, as one pipeline on one connection, and each caller gets its own reply or its own
error. A command asked alone is sent alone.

The pipeline is not a transaction, and two batches may run on two connections in
either order: only for commands that stand alone (a read, or one atomic script).
"""

from __future__ import annotations

import asyncio
import copy
import functools
from typing import Any

from redis.asyncio import Redis

Batch = list[tuple[tuple[Any, ...], "asyncio.Future[Any]"]]


class CommandBatcher:
    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._batch: Batch = []
        self._batch_loop: asyncio.AbstractEventLoop | None = None
        # Strong references: the loop keeps only weak ones to running tasks.
        self._running: set[asyncio.Task[None]] = set()

    async def execute(self, *args: Any) -> Any:
        """One command, e.g. `execute("HMGET", key, *fields)`; its parsed reply."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        # A batch left by a loop that stopped before sending it is dropped, not joined:
        # its send will never run, and its callers are gone with their loop.
        if not self._batch or self._batch_loop is not loop:
            self._batch = []
            self._batch_loop = loop
            loop.call_soon(self._send)
        self._batch.append((args, future))
        return await future

    def _send(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.get_running_loop().create_task(self._run(batch))
        self._running.add(task)
        task.add_done_callback(functools.partial(self._settle, batch))

    async def _run(self, batch: Batch) -> None:
        try:
            if len(batch) == 1:
                replies = [await self._redis.execute_command(*batch[0][0])]
            else:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for args, _ in batch:
                        pipe.execute_command(*args)
                    replies = await pipe.execute(raise_on_error=False)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(_own_copy(exc))
            return
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def _settle(self, batch: Batch, task: asyncio.Task[None]) -> None:
        """However the send ended (even cancelled before it began), no caller waits on."""
        self._running.discard(task)
        for _, future in batch:
            if future.done():
                continue
            if task.cancelled():  # the gateway is stopping
                future.cancel()
            else:
                failure = task.exception() or RuntimeError("the batch ended without a reply")
                future.set_exception(_own_copy(failure))


def _own_copy(exc: BaseException) -> BaseException:
    """Each caller raises its own copy: one object raised in many tasks would collect
    all their tracebacks. An exception that cannot be copied is shared."""
    try:
        return copy.copy(exc)
    except Exception:
        return exc
