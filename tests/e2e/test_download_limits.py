"""What downloads may take from a replica: connections, memory, and upstream's bytes.

- Downloads claim from a budget per replica (`limits.max_downloads`) and per team on a
  replica (`limits.max_team_downloads`), beyond which they are 429 with retry-after;
  they use an upstream pool of their own, so stalled downloads never starve the JSON
  routes or the tracker.
- A stalled download holds at most the README's figure of memory in the gateway.
- A download whose client has gone stops pulling from upstream, whatever the server's
  event loop and HTTP parser.

Raw sockets stand in for clients that stop reading; every wait polls with a deadline.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterator

import httpx
import psutil
import pytest

from support.processes import wait_until
from support.raw_http import read_head
from support.stack import Rig

MAX_DOWNLOADS = 104
MAX_TEAM_DOWNLOADS = 100
STALLED = 100
CONTENT_BYTES = 1 << 30  # never read to the end by a stalled client
CLIENT_RCVBUF = 64 * 1024  # fixed: no autotuning hides a stalled reader
# The README's figure (Production notes): what one stalled download holds at most.
PER_STALLED_DOWNLOAD_BYTES = 576 * 1024
# Bytes a download may move after its client closed: what sits in the socket buffers
# on the way (loopback's can be several MiB each), far less than the file.
GONE_SLACK_BYTES = 32 * 1024 * 1024
SETTLE_S = 15.0


GATEWAY = {
    "upstream": {"timeout_s": 2.0},
    "tracker": {"poll_interval_s": 0.3, "lease_s": 2},
    "limits": {
        "client_idle_timeout_s": 60,  # the stalled clients stay for the whole test
        "max_downloads": MAX_DOWNLOADS,
        "max_team_downloads": MAX_TEAM_DOWNLOADS,
    },
}


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("download-limits")
    with Rig.open(
        workdir, client_timeout=20.0, queue_s=0.2, run_s=1.0, content_bytes=CONTENT_BYTES
    ) as rig:
        rig.start_gateway(**GATEWAY)
        yield rig


def sent(rig: Rig) -> int:
    """Content bytes the simulated upstream has sent so far."""
    return rig.stats()["content_bytes_sent"]


def rss(rig: Rig) -> int:
    return psutil.Process(rig.gateway.pid()).memory_info().rss


def open_download(rig: Rig, team: str, video_id: str, port: int | None = None) -> socket.socket:
    """A download request on a raw socket with a small fixed receive buffer."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", port or rig.gateway.port))
    sock.sendall(
        f"GET /v1/videos/{video_id}/content HTTP/1.1\r\nhost: gateway\r\n"
        f"authorization: Bearer {rig.keys[team]}\r\n\r\n".encode()
    )
    return sock


def stall(rig: Rig, team: str, video_id: str, count: int) -> list[socket.socket]:
    """`count` downloads whose clients read their headers and then nothing more."""
    held = []
    for _ in range(count):
        sock = open_download(rig, team, video_id)
        held.append(sock)
        status, _, _ = read_head(sock)
        assert status == 200, status
    return held


def upstream_settled(rig: Rig) -> int:
    """Upstream's content bytes sent, once they have stopped moving for half a second."""
    last = [-1]

    def still() -> bool:
        now = sent(rig)
        unchanged, last[0] = now == last[0], now
        return unchanged

    wait_until(still, SETTLE_S, "upstream's bytes stopped moving", interval=0.5)
    return last[0]


def a_range_is_served(client: httpx.Client, video_id: str) -> bool:
    """Whether a small download is admitted now (206 for its first KiB)."""
    reply = client.get(f"/v1/videos/{video_id}/content", headers={"range": "bytes=0-1023"})
    return reply.status_code == 206


def assert_too_many(client: httpx.Client, video_id: str) -> None:
    """The download is refused; streamed, so a download let through is not read whole."""
    with client.stream("GET", f"/v1/videos/{video_id}/content") as reply:
        assert reply.status_code == 429, reply.status_code
        reply.read()
    assert reply.headers["retry-after"].isdigit()
    body = reply.json()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == "too_many_downloads", body


def test_stalled_downloads_of_one_team_take_nothing_the_others_need(rig: Rig) -> None:
    alpha_video, beta_video = rig.video("alpha"), rig.video("beta")
    gamma_video = rig.video("gamma")
    wait_until(lambda: rig.holders() == 0, SETTLE_S, "no slot held before")
    with contextlib.ExitStack() as stack:
        for sock in stall(rig, "alpha", alpha_video, MAX_TEAM_DOWNLOADS):
            stack.enter_context(sock)
        with rig.client("alpha") as alpha:  # over the team's budget
            assert_too_many(alpha, alpha_video)
        # Another team's work goes on: creates, retrieves, the tracker, a download.
        with rig.client("beta") as beta:
            for n in range(3):
                created = beta.post("/v1/videos", json={"prompt": f"beta goes on {n}"})
                assert created.status_code == 200, created.text
                video_id = created.json()["id"]
                # Nobody retrieves it: the tracker must free the slot when the job ends.
                wait_until(lambda: rig.holders() == 0, SETTLE_S, "the tracker freed the slot")
                retrieved = beta.get(f"/v1/videos/{video_id}")
                assert retrieved.status_code == 200, retrieved.text
                assert retrieved.json()["status"] == "completed"
            total = 0
            with beta.stream("GET", f"/v1/videos/{beta_video}/content") as reply:
                assert reply.status_code == 200
                for chunk in reply.iter_raw():
                    total += len(chunk)
                    if total >= 8 << 20:
                        break
        # The replica's budget: what is left of it, then 429 for everyone.
        for sock in stall(rig, "gamma", gamma_video, MAX_DOWNLOADS - MAX_TEAM_DOWNLOADS):
            stack.enter_context(sock)
        with rig.client("beta") as beta:
            assert_too_many(beta, beta_video)
            assert beta.get(f"/v1/videos/{beta_video}").status_code == 200
    # Their clients gone, the budget is whole again.
    with rig.client("alpha") as alpha:
        wait_until(
            lambda: a_range_is_served(alpha, alpha_video),
            SETTLE_S,
            "a download admitted again",
        )


def test_a_stalled_download_holds_no_more_memory_than_the_readme_says(rig: Rig) -> None:
    video_id = rig.video("alpha")
    # Warm every path once, so the baseline is a replica that has served downloads.
    with contextlib.ExitStack() as stack:
        for sock in stall(rig, "alpha", video_id, 4):
            stack.enter_context(sock)
    with rig.client("alpha") as alpha:
        wait_until(
            lambda: a_range_is_served(alpha, video_id),
            SETTLE_S,
            "the warm-up downloads ended",
        )
    before = rss(rig)
    with contextlib.ExitStack() as stack:
        for sock in stall(rig, "alpha", video_id, STALLED):
            stack.enter_context(sock)
        # Every download has filled what it can hold: upstream's bytes stop moving.
        upstream_settled(rig)
        grown = rss(rig) - before
    assert grown <= STALLED * PER_STALLED_DOWNLOAD_BYTES, (
        f"{STALLED} stalled downloads grew the replica by {grown / 2**20:.1f} MiB "
        f"({grown / STALLED / 1024:.0f} KiB each)"
    )


@pytest.mark.parametrize(
    "server", [("--loop", "asyncio", "--http", "h11"), ("--loop", "uvloop", "--http", "httptools")]
)
def test_a_download_whose_client_has_gone_stops_pulling_upstream(
    rig: Rig, server: tuple[str, ...]
) -> None:
    gateway = rig.start_gateway(extra_args=server, **GATEWAY)
    try:
        video_id = rig.video("beta")
        before = sent(rig)
        taken = 0
        clients = 5
        for _ in range(clients):
            with open_download(rig, "beta", video_id, gateway.port) as sock:
                status, _, first = read_head(sock)
                assert status == 200
                got = len(first)
                while got < 4 << 20:
                    got += len(sock.recv(1 << 20))
                taken += got
        # Once upstream's bytes stop moving, count what was sent past what was taken.
        pulled = upstream_settled(rig) - before
        assert pulled <= taken + clients * GONE_SLACK_BYTES, (
            f"upstream sent {pulled / 2**20:.0f} MiB for {taken / 2**20:.0f} MiB taken"
        )
    finally:
        gateway.stop()


def test_a_head_of_the_content_pulls_nothing_from_upstream(rig: Rig) -> None:
    """uvicorn drops a HEAD answer's body unsent, and a keep-alive client never leaves:
    relaying it would read the whole file from upstream into nowhere."""
    video_id = rig.video("alpha")
    before = upstream_settled(rig)
    with rig.client("alpha") as alpha:  # keep-alive: the connection stays open throughout
        for _ in range(3):
            head = alpha.head(f"/v1/videos/{video_id}/content")
            assert head.status_code == 200, head.text
            assert head.headers["content-length"] == str(CONTENT_BYTES)
            assert head.content == b""
        pulled = upstream_settled(rig) - before
        assert pulled <= 3 * GONE_SLACK_BYTES, f"upstream sent {pulled / 2**20:.0f} MiB"
