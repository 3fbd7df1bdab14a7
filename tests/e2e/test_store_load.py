"""Admission does not depend on what anyone else does to the store connection.

- A flood of unauthenticated `/readyz` (300 keep-alive connections from one client)
  used to hold every pooled store connection: another team's creates answered 503
  `store_unavailable`, the probe itself failed and the tracker's ticks failed. Now
  readiness is answered from a background check on a connection of its own; during the
  flood another team creates, retrieves and downloads with nothing but 200s, the probe
  stays 200, and the tracker frees each slot within 2 x `tracker.poll_interval_s` of
  its job ending upstream (CONTRACT §7).
- 300 requests waiting for a slot at once (wait mode) used to empty the pool at every
  release: each waiter is answered 200 or the contract's 429, never 503.

The module has its own store, simulator and gateway. Every wait polls with a deadline.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.store import JOBS
from support.api import create, ok
from support.processes import wait_until
from support.stack import Rig

TEAMS = ("alpha", "beta")
LIMIT = 2
POLL_S = 0.5
FLOOD_CONNECTIONS = 300
BURST_EVERY_S = 0.2  # the flood's connections all send at each multiple of this
WAITERS = 300
WAIT_S = 3.0
FLOOD_MAX_S = 60.0  # the flood stops by itself even if the test body fails
MARGIN_S = 0.5  # scheduling slack for the loaded machine the flood makes
JOB_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("store-load")
    with Rig.open(workdir, teams=TEAMS, queue_s=0.2, run_s=1.0) as rig:
        rig.start_gateway(
            tracker={"poll_interval_s": POLL_S, "lease_s": 5},
            quota={"when_full": "wait", "max_in_flight": LIMIT, "wait_s": WAIT_S},
        )
        yield rig


def holds(rig: Rig, video_id: str) -> bool:
    return rig.redis.hget(JOBS, video_id) is not None


class ReadyzFlood:
    """Keep-alive connections on loopback, all sending `GET /readyz` in bursts at once.

    In a process of its own, so the flood's client work does not slow the test's own
    polling (one interpreter lock) and distort what it measures."""

    def __init__(self, port: int, connections: int) -> None:
        context = multiprocessing.get_context("spawn")
        self.open = context.Value("i", 0)
        self.answers = context.Value("i", 0)
        self.failures = context.Value("i", 0)  # answers other than 200
        self.stopping = context.Event()
        self.process = context.Process(
            target=_flood,
            args=(port, connections, self.open, self.answers, self.failures, self.stopping),
            daemon=True,
        )

    def start(self) -> None:
        self.process.start()

    def stop(self) -> tuple[int, int]:
        """(answers, answers that were not 200)."""
        self.stopping.set()
        self.process.join(30)
        if self.process.is_alive():
            self.process.kill()
        return self.answers.value, self.failures.value


def _flood(port: int, connections: int, *shared: Any) -> None:
    asyncio.run(_flood_all(port, connections, *shared))


async def _flood_all(port: int, connections: int, *shared: Any) -> None:
    deadline = time.monotonic() + FLOOD_MAX_S
    await asyncio.gather(*(_flood_one(port, deadline, *shared) for _ in range(connections)))


async def _flood_one(
    port: int, deadline: float, opened: Any, answers: Any, failures: Any, stopping: Any
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    with opened.get_lock():
        opened.value += 1
    try:
        while not stopping.is_set() and time.monotonic() < deadline:
            # Every connection sends at the same instant: 300 probes in flight at once,
            # as many as emptied the old shared pool, but in bursts, so the flood does
            # not also saturate the gateway's event loop (a closed loop of back-to-back
            # probes would, and no single loop can keep a timing promise under that).
            now = time.monotonic()
            await asyncio.sleep(BURST_EVERY_S - now % BURST_EVERY_S)
            writer.write(b"GET /readyz HTTP/1.1\r\nhost: flood\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            )
            await reader.readexactly(length)
            with answers.get_lock():
                answers.value += 1
            if head.split(b" ", 2)[1] != b"200":
                with failures.get_lock():
                    failures.value += 1
    finally:
        writer.close()


@pytest.fixture
def flood(rig: Rig) -> Iterator[ReadyzFlood]:
    flooder = ReadyzFlood(rig.gateway.port, FLOOD_CONNECTIONS)
    flooder.start()
    try:
        wait_until(
            lambda: (
                flooder.open.value == FLOOD_CONNECTIONS
                and flooder.answers.value > 3 * FLOOD_CONNECTIONS
            ),
            30,
            "every flood connection open and the flood under way",
        )
        yield flooder
    finally:
        flooder.stop()


def completed_upstream(rig: Rig, video_id: str) -> float:
    """When the job was first seen completed, asking upstream directly: no retrieve
    through the gateway, which would free the slot itself."""
    wait_until(
        lambda: rig.upstream_video(video_id)["status"] == "completed",
        JOB_TIMEOUT_S,
        f"{video_id} completed upstream",
        interval=0.02,
    )
    return time.monotonic()


def test_a_readyz_flood_starves_neither_admission_nor_the_tracker(
    rig: Rig, flood: ReadyzFlood
) -> None:
    with rig.client("alpha") as alpha:
        videos = [create(alpha, f"a heron at dawn {n}") for n in range(LIMIT)]
        for video in videos:
            ended_at = completed_upstream(rig, video["id"])
            wait_until(
                lambda video_id=video["id"]: not holds(rig, video_id),
                2 * POLL_S + MARGIN_S - (time.monotonic() - ended_at),
                f"the tracker freed {video['id']}'s slot within 2 x poll_interval_s",
                interval=0.02,
            )
            assert ok(alpha.get(f"/v1/videos/{video['id']}"))["status"] == "completed"
            content = alpha.get(f"/v1/videos/{video['id']}/content")
            assert content.status_code == 200, content.text
            assert content.content
        listed = ok(alpha.get("/v1/videos"))
        assert {v["id"] for v in listed["data"]} == {v["id"] for v in videos}
    answers, failures = flood.stop()
    assert failures == 0, f"the readiness probe failed {failures} times in {answers} answers"


def test_300_waiters_are_answered_200_or_429_never_503(rig: Rig) -> None:
    async def wait_all() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=WAITERS, max_keepalive_connections=WAITERS)
        async with httpx.AsyncClient(
            base_url=rig.gateway.url,
            headers={"authorization": f"Bearer {rig.keys['beta']}"},
            limits=limits,
            timeout=60.0,
        ) as client:
            return await asyncio.gather(
                *(client.post("/v1/videos", json={"prompt": f"waiter {n}"}) for n in range(WAITERS))
            )

    answers = asyncio.run(wait_all())
    codes = Counter(
        (a.status_code, a.json()["error"]["code"] if a.status_code != 200 else None)
        for a in answers
    )
    assert set(codes) <= {(200, None), (429, "concurrency_limit_exceeded")}, codes
    assert codes[(200, None)] >= LIMIT, codes
