"""The log handler: access lines leave together at the end of a loop pass, others at once."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from gateway.logs import FIELDS, JsonFormatter, LoopBatchingHandler, access_log


@pytest.fixture
def written() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = LoopBatchingHandler(stream)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    try:
        yield stream
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


async def test_access_lines_of_one_pass_leave_together_at_its_end(written):
    access_log.info("request", extra={FIELDS: {"status": 200}})
    access_log.info("request", extra={FIELDS: {"status": 404}})
    assert written.getvalue() == ""  # still this pass

    await asyncio.sleep(0)  # the pass ends

    assert [line["status"] for line in lines(written)] == [200, 404]


async def test_any_other_line_is_written_at_once_after_the_access_lines_before_it(written):
    """A worker killed by SIGTERM right after logging its shutdown loses no line."""
    access_log.info("request", extra={FIELDS: {"status": 200}})
    logging.getLogger("uvicorn.error").info("Finished server process")

    assert [line["message"] for line in lines(written)] == ["request", "Finished server process"]


def test_outside_a_loop_every_line_is_written_at_once(written):
    access_log.info("request", extra={FIELDS: {"status": 200}})
    assert lines(written)[0]["status"] == 200
