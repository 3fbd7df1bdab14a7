"""Downloads through the gateway: streamed without buffering, byte-exact, Range, privacy."""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import httpx
import psutil
import pytest

from gateway.simulator import fingerprint
from support.processes import wait_until

MiB = 1 << 20
BIG_VIDEO_BYTES = 200 * MiB
RSS_GROWTH_LIMIT = 50 * MiB


def create_completed(stack: Any, team: str = "alpha") -> str:
    """A video of `team`, created through the gateway and polled there until completed.

    The simulator's jobs are made to finish at once: these tests are about content, and
    the `stack` fixture restores the timings for the next test.
    """
    with stack.sim() as sim:
        sim.post("/_sim/config", json={"queue_s": 0, "run_s": 0}).raise_for_status()
    with stack.client(team) as client:
        created = client.post("/v1/videos", json={"prompt": "a lighthouse in a storm"})
        assert created.status_code == 200, created.text
        video_id = created.json()["id"]

        def completed() -> bool:
            reply = client.get(f"/v1/videos/{video_id}")
            assert reply.status_code == 200, reply.text
            return reply.json()["status"] == "completed"

        wait_until(completed, 15, f"{video_id} completed")
    return video_id


def direct(stack: Any) -> httpx.Client:
    """The simulator's /v1, asked with the real token: the reference answer."""
    return httpx.Client(
        base_url=stack.simulator.url + "/v1",
        headers={"authorization": f"Bearer {stack.token}"},
        timeout=60.0,
    )


def assert_error(reply: httpx.Response, status: int, code: str, param: str | None = None) -> None:
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] == param
    assert reply.headers.get("x-request-id")


def content_requests(stack: Any) -> list[dict[str, Any]]:
    return [r for r in stack.sim_requests() if r["path"].endswith("/content")]


class PeakRss:
    """Samples a process's RSS in a background thread until stopped; keeps the peak."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak = self.process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.sample()

    def sample(self) -> None:
        self.peak = max(self.peak, self.process.memory_info().rss)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()


def test_a_200_mib_video_streams_through_with_flat_memory_and_exact_bytes(stack):
    with stack.sim() as sim:
        sim.post("/_sim/config", json={"content_bytes": BIG_VIDEO_BYTES}).raise_for_status()
    try:
        video_id = create_completed(stack)
        path = f"/videos/{video_id}/content"

        expected = hashlib.sha256()
        with direct(stack) as upstream, upstream.stream("GET", path) as reply:
            assert reply.status_code == 200
            for chunk in reply.iter_raw():
                expected.update(chunk)

        gateway = psutil.Process(stack.gateway.pid())
        baseline = gateway.memory_info().rss
        received = 0
        digest = hashlib.sha256()
        with (
            PeakRss(stack.gateway.pid()) as rss,
            stack.client() as client,
            client.stream("GET", "/v1" + path) as reply,
        ):
            assert reply.status_code == 200
            assert reply.headers["content-type"] == "video/mp4"
            assert "content-encoding" not in reply.headers
            for chunk in reply.iter_raw():
                digest.update(chunk)
                received += len(chunk)
                if received % (8 * MiB) < len(chunk):
                    rss.sample()

        assert received == BIG_VIDEO_BYTES
        assert digest.hexdigest() == expected.hexdigest()
        growth = rss.peak - baseline
        print(f"gateway RSS: baseline {baseline / MiB:.1f} MiB, growth {growth / MiB:.1f} MiB")
        assert growth < RSS_GROWTH_LIMIT, f"gateway RSS grew by {growth / MiB:.1f} MiB"
    finally:
        with stack.sim() as sim:
            sim.post("/_sim/config", json={"content_bytes": None}).raise_for_status()


@pytest.mark.parametrize("variant", ["video", "thumbnail", "spritesheet"])
def test_every_variant_is_relayed_byte_for_byte(stack, variant):
    video_id = create_completed(stack)
    path = f"/videos/{video_id}/content"
    with direct(stack) as upstream:
        want = upstream.get(path, params={"variant": variant})
    assert want.status_code == 200
    assert want.content
    with stack.client() as client:
        got = client.get("/v1" + path, params={"variant": variant})
    assert got.status_code == 200
    assert got.content == want.content
    assert got.headers["content-type"] == want.headers["content-type"]
    assert got.headers.get("x-request-id")
    # The gateway asked upstream for the same variant, with the real token, not the team key.
    sent = content_requests(stack)[-1]
    assert f"variant={variant}" in sent["query"]
    assert sent["headers"]["authorization"] == f"Bearer {fingerprint(stack.token)}"


@pytest.mark.parametrize(
    ("range_header", "start", "stop"),
    [
        ("bytes=100-199", 100, 200),
        ("bytes=100-", 100, None),
        ("bytes=-50", -50, None),
        ("bytes=0-0", 0, 1),
    ],
)
def test_range_requests_are_passed_through(stack, range_header, start, stop):
    video_id = create_completed(stack)
    path = f"/videos/{video_id}/content"
    with direct(stack) as upstream:
        whole = upstream.get(path).content
        want = upstream.get(path, headers={"range": range_header})
    length = len(whole)
    expected = whole[start:stop]
    first = start % length
    # The reference is sane.
    assert want.status_code == 206
    assert want.content == expected

    with stack.client() as client:
        got = client.get("/v1" + path, headers={"range": range_header})
    assert got.status_code == 206, got.text
    assert got.content == expected
    assert got.content == want.content
    assert got.headers["content-range"] == f"bytes {first}-{first + len(expected) - 1}/{length}"
    assert got.headers["content-range"] == want.headers["content-range"]
    assert int(got.headers["content-length"]) == len(expected)
    assert content_requests(stack)[-1]["headers"]["range"] == range_header


def test_unsatisfiable_range_is_upstreams_416_in_the_envelope(stack):
    video_id = create_completed(stack)
    with stack.client() as client:
        reply = client.get(f"/v1/videos/{video_id}/content", headers={"range": "bytes=999999999-"})
    assert_error(reply, 416, "range_not_satisfiable", "range")


def test_content_of_another_teams_video_is_not_found_and_not_fetched(stack):
    video_id = create_completed(stack, "alpha")
    with stack.client("beta") as beta:
        theirs = beta.get(f"/v1/videos/{video_id}/content")
        unknown = beta.get("/v1/videos/video_doesnotexist/content")
    assert_error(theirs, 404, "video_not_found")
    assert_error(unknown, 404, "video_not_found")
    # Indistinguishable: the same answer for "someone else's" and "does not exist".
    assert theirs.json() == unknown.json()
    assert content_requests(stack) == []
    # The owner still gets it.
    with stack.client("alpha") as alpha:
        assert alpha.get(f"/v1/videos/{video_id}/content").status_code == 200


@pytest.mark.parametrize("variant", ["poster", "", "VIDEO"])
def test_bad_variant_is_refused_before_anything_is_sent(stack, variant):
    video_id = create_completed(stack)
    with stack.client() as client:
        reply = client.get(f"/v1/videos/{video_id}/content", params={"variant": variant})
    assert_error(reply, 400, "invalid_request", "variant")
    assert content_requests(stack) == []


def test_bad_video_id_syntax_is_refused(stack):
    with stack.client() as client:
        reply = client.get("/v1/videos/video.1/content")
    assert_error(reply, 400, "invalid_request", "video_id")
    assert content_requests(stack) == []
