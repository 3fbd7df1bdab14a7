"""What a client can make the gateway hold, and for how long: request bodies, slow
uploads, slow readers, and clients that go away mid-request.

- `limits.max_body_bytes` applies while the body streams: a chunked upload bigger than
  the cap is refused with 413 while its client is still sending (CONTRACT §2, §7).
- `limits.body_timeout_s`: a body that has not fully arrived by then is 408
  `request_timeout`, however it trickles, and it never waits for nor takes a slot.
- A slow reader of a download: the gateway reads upstream only as fast as the client
  reads (constant memory: the unread bytes wait in socket buffers), and
  `upstream.timeout_s` (the longest wait between two reads from upstream) is suspended
  while the gateway is not reading, so a slow but moving reader is never cut. The same
  suspension means that nothing in the gateway bounds a reader that stops reading
  altogether: it holds its request, its socket and an upstream connection until it
  closes (or upstream gives up on its side). The expected failure below pins that gap.
- A client that disconnects while waiting for a slot leaves the queue; one that
  disconnects after its create reached upstream leaves its slot held until the job ends
  (§3: the job runs and counts), then freed by the tracker; one that disconnects mid-
  download leaves nothing. In every case no connection or file descriptor of the gateway
  process outlives the client (counted with psutil against a baseline after warm-up).

The module has its own store, simulator and gateway; raw sockets stand in for clients
whose timing matters. Every wait polls with a deadline.
"""

from __future__ import annotations

import json
import secrets
import select
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from gateway.store import SLOTS
from support.processes import wait_until
from support.raw_http import read_head
from support.stack import Rig

LIMIT = 2
MAX_BODY = 64 * 1024
BODY_TIMEOUT_S = 1.0
TIMEOUT_S = 2.0  # upstream.timeout_s
CLIENT_IDLE_S = 1.75 * TIMEOUT_S  # limits.client_idle_timeout_s
CONTENT_BYTES = 48 * 1024 * 1024  # far more than every socket buffer on the way
CLIENT_RCVBUF = 64 * 1024  # a fixed receive buffer: no autotuning hides a stalled reader
SETTLE_S = 15.0
CLOSE_S = 10.0  # a closed client's sockets are gone from the gateway by then
STALL_BOUND_S = 2 * TIMEOUT_S + 2.0
GATEWAY_HOLDS = 1 << 20  # a held-back download's bytes in the gateway's own buffers, at most


# -- the rig ---------------------------------------------------------------------------------


def posts(rig: Rig) -> int:
    return sum(1 for r in rig.upstream_requests() if r["method"] == "POST")


def upstream_ports(rig: Rig) -> set[int]:
    """The local ports of the gateway's connections to upstream, in any state."""
    process = psutil.Process(rig.gateway.pid())
    return {
        c.laddr.port
        for c in process.net_connections(kind="tcp")
        if c.raddr and c.raddr.port == rig.simulator.port
    }


@dataclass(frozen=True)
class Footprint:
    """The gateway process's open file descriptors and TCP sockets, by kind."""

    fds: int
    clients: int  # accepted client connections (the gateway's own port, not listening)
    to_upstream: int
    to_store: int
    close_wait: int  # the peer closed and the gateway did not: a leak if it stays

    @classmethod
    def of(cls, rig: Rig) -> Footprint:
        process = psutil.Process(rig.gateway.pid())
        sockets = [c for c in process.net_connections(kind="tcp") if c.status != "LISTEN"]

        def remote(port: int) -> int:
            return sum(1 for c in sockets if c.raddr and c.raddr.port == port)

        return cls(
            fds=process.num_fds(),
            clients=sum(1 for c in sockets if c.laddr.port == rig.gateway.port),
            to_upstream=remote(rig.simulator.port),
            to_store=remote(rig.store.port),
            close_wait=sum(1 for c in sockets if c.status == "CLOSE_WAIT"),
        )

    def within(self, baseline: Footprint, pools: int = 3) -> bool:
        """Nothing a client caused is left: the pools to upstream and the store may have
        grown a little (idle keep-alive connections), nothing else may."""
        return (
            self.clients == 0
            and self.close_wait == 0
            and self.to_upstream <= baseline.to_upstream + pools
            and self.to_store <= baseline.to_store + pools
            and self.fds <= baseline.fds + 2 * pools
        )


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("resource-limits")
    with Rig.open(
        workdir, client_timeout=20.0, queue_s=0.2, run_s=0.8, content_bytes=CONTENT_BYTES
    ) as rig:
        rig.start_gateway(
            upstream={"timeout_s": TIMEOUT_S},
            tracker={"poll_interval_s": 0.3, "lease_s": 2},
            quota={"when_full": "wait", "max_in_flight": LIMIT, "wait_s": 20},
            limits={
                "max_body_bytes": MAX_BODY,
                "body_timeout_s": BODY_TIMEOUT_S,
                # Longer than the slow reader's pauses, shorter than the stopped one's wait.
                "client_idle_timeout_s": CLIENT_IDLE_S,
            },
        )
        yield rig


@pytest.fixture(scope="module")
def completed(rig: Rig) -> str:
    """A completed video of team alpha, with every path of the gateway warmed up once:
    create, retrieve, list, a whole download, and /readyz and /metrics."""
    with rig.client() as client:
        created = client.post("/v1/videos", json={"prompt": "the module's video"})
        assert created.status_code == 200, created.text
        video_id = created.json()["id"]
        wait_until(
            lambda: client.get(f"/v1/videos/{video_id}").json()["status"] == "completed",
            SETTLE_S,
            "the module's video completed",
        )
        assert client.get("/v1/videos").status_code == 200
        total = 0
        with client.stream("GET", f"/v1/videos/{video_id}/content") as reply:
            for chunk in reply.iter_raw():
                total += len(chunk)
        assert total == CONTENT_BYTES
    for path in ("/readyz", "/metrics"):
        assert httpx.get(rig.gateway.url + path, timeout=5.0).status_code == 200
    wait_until(lambda: rig.ledger()["holders"] == 0, SETTLE_S, "the warm-up slot freed")
    return video_id


@pytest.fixture(scope="module")
def baseline(rig: Rig, completed: str) -> Footprint:
    """The footprint once warm and idle, every client gone."""
    return wait_until(
        lambda: (lambda f: f if f.clients == 0 and f.close_wait == 0 else None)(Footprint.of(rig)),
        CLOSE_S,
        "the warm-up clients' sockets closed",
    )


@pytest.fixture
def fresh(rig: Rig, baseline: Footprint) -> Iterator[Rig]:
    """No slot held, no waiter, simulator faults and settings back to the start."""
    wait_until(lambda: rig.ledger()["holders"] == 0, SETTLE_S, "no slot held before")
    rig.sim("POST", "/_sim/faults", json={"latency_ms": 0})
    rig.sim("POST", "/_sim/config", json={"run_s": 0.8})
    yield rig
    rig.sim("POST", "/_sim/faults", json={"latency_ms": 0})


def upstream_backlog(rig: Rig) -> int:
    """Bytes upstream sent that the gateway has not read yet: above 0 while a download
    is held back by its reader."""
    return sum(unread_from(rig.simulator.port).values())


def unread_from(port: int) -> dict[int, int]:
    """Unread bytes in the receive queue of each local TCP socket whose peer is `port`
    (from /proc/net/tcp), by local port.

    Counted in every state, not only ESTABLISHED: the simulator (uvicorn) closes a
    connection 5 s after it has handed over a whole answer, read or not, so a download
    held back that long sits in CLOSE_WAIT with its unread bytes still queued.
    """
    unread: dict[int, int] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[2].split(":")[1], 16) == port:
            local_port = int(fields[1].split(":")[1], 16)
            unread[local_port] = unread.get(local_port, 0) + int(fields[4].split(":")[1], 16)
    return unread


def downstream_room() -> int:
    """The most of a download that can wait beyond the gateway's upstream socket, so
    that upstream is not held back yet: the client's receive buffer, the gateway's send
    buffer to it (uvicorn sets none, so the kernel grows it up to tcp_wmem's maximum,
    4 MiB here) and what the gateway holds in between (0.8 MiB measured; 1 MiB allowed).
    """
    send_buffer_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    return 2 * CLIENT_RCVBUF + send_buffer_max + GATEWAY_HOLDS  # the kernel doubles SO_RCVBUF


def assert_no_leak(rig: Rig, baseline: Footprint) -> None:
    seen: list[Footprint] = []

    def back() -> bool:
        seen.append(Footprint.of(rig))
        return seen[-1].within(baseline)

    wait_until(back, CLOSE_S, f"back to the baseline {baseline} (last {seen[-1:]})", 0.1)
    # No upstream connection kept with a download's unread bytes in it (nor pooled so).
    wait_until(lambda: upstream_backlog(rig) == 0, CLOSE_S, "no unread upstream bytes")


def test_unread_bytes_still_count_once_their_sender_has_closed() -> None:
    """The measure behind "held back": a peer that sent bytes and then closed (as the
    simulator does 5 s after handing over a whole answer) leaves them unread in the
    reader's socket, now in CLOSE_WAIT, and they still count."""
    sent = 100_000
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as reader:
            peer, _ = server.accept()
            with peer:
                peer.sendall(b"x" * sent)
            here = reader.getsockname()

            def closed_by_peer() -> bool:
                return any(
                    c.laddr == here and c.status == "CLOSE_WAIT"
                    for c in psutil.Process().net_connections(kind="tcp")
                )

            wait_until(closed_by_peer, CLOSE_S, "the sender's close reached the reader")
            # (In CLOSE_WAIT the kernel's count includes the FIN's sequence number.)
            assert unread_from(port).get(here[1], 0) >= sent


# -- raw HTTP on a socket --------------------------------------------------------------------


def connect(rig: Rig, rcvbuf: int | None = None) -> socket.socket:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", rig.gateway.port))
    return sock


def head(rig: Rig, method: str, path: str, team: str = "alpha", **headers: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"host: 127.0.0.1:{rig.gateway.port}",
        f"authorization: Bearer {rig.keys[team]}",
        *(f"{name.replace('_', '-')}: {value}" for name, value in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], dict[str, Any]]:
    """A whole JSON answer (status, headers, body)."""
    status, headers, body = read_head(sock)
    length = int(headers["content-length"])
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-answer"
        body += chunk
    return status, headers, json.loads(body)


def assert_envelope(status: int, body: dict[str, Any], expected: int, code: str) -> None:
    assert status == expected, body
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code, body


# -- bodies ----------------------------------------------------------------------------------


def test_a_chunked_upload_over_the_cap_is_refused_while_the_client_still_sends(
    fresh: Rig, baseline: Footprint
) -> None:
    rig = fresh
    posts_before = posts(rig)
    total = 16 * MAX_BODY
    piece = 8 * 1024
    sent = 0
    with connect(rig) as sock:
        sock.sendall(
            head(
                rig,
                "POST",
                "/v1/videos",
                content_type="application/json",
                transfer_encoding="chunked",
            )
        )
        prefix = b'{"prompt": "'
        sock.sendall(b"%x\r\n" % len(prefix) + prefix + b"\r\n")
        sent = len(prefix)
        answered = False
        for _ in range(total // piece):
            readable, _, _ = select.select([sock], [], [], 0.02)  # also paces the upload
            if readable:
                answered = True
                break
            sock.sendall(b"%x\r\n" % piece + b"x" * piece + b"\r\n")
            sent += piece
        assert answered, "no answer while the whole oversized body was sent"
        status, headers, body = read_answer(sock)
    assert_envelope(status, body, 413, "request_too_large")
    assert headers.get("x-request-id")
    assert MAX_BODY < sent < total  # refused past the cap, long before the end
    # Declared too large: refused from the headers alone, before any body byte.
    with connect(rig) as sock:
        sock.sendall(
            head(
                rig,
                "POST",
                "/v1/videos",
                content_type="application/json",
                content_length=str(total),
            )
        )
        status, _, body = read_answer(sock)
    assert_envelope(status, body, 413, "request_too_large")
    assert posts(rig) == posts_before
    assert rig.ledger()["holders"] == 0
    assert_no_leak(rig, baseline)


@pytest.mark.parametrize("pace", ["stalled", "trickling"])
def test_a_slow_upload_is_408_and_takes_no_slot(fresh: Rig, baseline: Footprint, pace: str) -> None:
    """`limits.body_timeout_s` bounds the whole body, not the gap between two bytes: a
    body that keeps trickling in is cut off as surely as one that stopped."""
    rig = fresh
    jobs_before = rig.stats()["jobs_created"]
    posts_before = posts(rig)
    body = json.dumps({"prompt": "a slow upload"}).encode()
    with connect(rig) as sock:
        sock.sendall(
            head(
                rig,
                "POST",
                "/v1/videos",
                content_type="application/json",
                content_length=str(len(body)),
            )
        )
        started = time.monotonic()
        sock.sendall(body[:5])
        sent = 5
        answered = False
        # The body is on its way: nothing waits for a slot or holds one.
        while time.monotonic() - started < BODY_TIMEOUT_S + 3:
            ledger = rig.ledger()
            assert ledger["holders"] == 0, ledger
            assert ledger["queue"] == 0, ledger
            readable, _, _ = select.select([sock], [], [], 0.1)
            if readable:
                answered = True
                break
            if pace == "trickling" and sent < len(body) - 1:
                sock.sendall(body[sent : sent + 1])  # never the last byte
                sent += 1
        elapsed = time.monotonic() - started
        assert answered, "no answer to a body that never completed"
        status, _, answer = read_answer(sock)
    assert_envelope(status, answer, 408, "request_timeout")
    assert BODY_TIMEOUT_S * 0.9 <= elapsed <= BODY_TIMEOUT_S + 2.0, elapsed
    assert rig.stats()["jobs_created"] == jobs_before
    assert posts(rig) == posts_before
    assert rig.ledger()["holders"] == 0
    assert_no_leak(rig, baseline)


# -- slow readers ----------------------------------------------------------------------------


def download_socket(rig: Rig, video_id: str, **headers: str) -> tuple[socket.socket, int, int]:
    """A download started on a raw socket with a small fixed receive buffer: the socket,
    the announced length, and the body bytes already read with the headers."""
    sock = connect(rig, rcvbuf=CLIENT_RCVBUF)
    sock.sendall(head(rig, "GET", f"/v1/videos/{video_id}/content", **headers))
    status, answer_headers, first = read_head(sock)
    assert status in (200, 206), (status, first[:300])
    return sock, int(answer_headers["content-length"]), len(first)


def test_a_slow_reader_is_served_to_the_end_past_the_upstream_timeout(
    fresh: Rig, baseline: Footprint, completed: str
) -> None:
    """The reader pauses longer than `upstream.timeout_s` with every buffer full: the
    gateway stops reading upstream meanwhile, and the timeout does not count that wait."""
    rig = fresh
    # Past each pause more is left than can wait beyond the gateway's upstream socket,
    # or upstream is never held back: a fixed 12 MiB left 6 MiB after the second pause,
    # against 5 MiB of room here and more wherever tcp_wmem allows a larger send buffer.
    wanted = 4 * downstream_room()
    assert wanted <= CONTENT_BYTES, (wanted, CONTENT_BYTES)
    sock, length, got = download_socket(rig, completed, range=f"bytes=0-{wanted - 1}")
    with sock:
        assert length == wanted
        pauses = 0
        while got < length:
            chunk = sock.recv(1 << 20)
            assert chunk, f"cut after {got} of {length} bytes"
            got += len(chunk)
            if pauses < 2 and got >= (pauses + 1) * length // 4:
                pauses += 1
                assert length - got > downstream_room()
                # The reader stops until the gateway has stopped reading upstream, then
                # stays away longer than the upstream timeout: the slow reader itself.
                wait_until(lambda: upstream_backlog(rig) > 0, CLOSE_S, "the download held back")
                time.sleep(1.25 * TIMEOUT_S)
    assert got == length
    assert_no_leak(rig, baseline)


def test_a_reader_that_stops_reading_is_let_go_within_a_bound(
    fresh: Rig, baseline: Footprint, completed: str
) -> None:
    """A reader that takes no byte for `limits.client_idle_timeout_s` is let go: its
    request ends, the upstream connection is released, and the client connection is
    closed (the listening socket's TCP_USER_TIMEOUT aborts it despite the unsent bytes)."""
    rig = fresh
    # Meanwhile the replica has other upstream work: the tracker polls a running job.
    rig.sim("POST", "/_sim/config", json={"run_s": 30})
    with rig.client("beta") as client:
        running = client.post("/v1/videos", json={"prompt": "a job polled meanwhile"})
    assert running.status_code == 200, running.text
    try:
        sock, length, got = download_socket(rig, completed)
        with sock:
            assert length == CONTENT_BYTES
            got += len(sock.recv(1 << 16))
            # The reader stops: the gateway stops reading upstream (bytes wait in its socket).
            wait_until(lambda: upstream_backlog(rig) > 0, CLOSE_S, "the download held back")
            # Released means its own upstream connection, the one with the unread bytes,
            # is closed; the tracker's stays in use.
            held = {port for port, unread in unread_from(rig.simulator.port).items() if unread}
            let_go = False
            deadline = time.monotonic() + STALL_BOUND_S
            while time.monotonic() < deadline:  # the client reads nothing from here on
                if Footprint.of(rig).clients == 0 and not held & upstream_ports(rig):
                    let_go = True
                    break
                time.sleep(0.1)  # polling the gateway's sockets
            stalled = (Footprint.of(rig), upstream_backlog(rig))
        assert_no_leak(rig, baseline)  # closing the client frees everything at once
        assert let_go, f"still held {STALL_BOUND_S}s after the reader stopped: {stalled}"
        assert "cut off a download whose client stopped reading" in rig.gateway.log()
    finally:
        with rig.client("beta") as client:  # a delete ends the job at once
            assert client.delete(f"/v1/videos/{running.json()['id']}").status_code == 200


# -- clients that go away --------------------------------------------------------------------


def test_a_client_gone_while_waiting_for_a_slot_leaves_the_queue(
    fresh: Rig, baseline: Footprint
) -> None:
    rig = fresh
    jobs_before = rig.stats()["jobs_created"]
    rig.sim("POST", "/_sim/config", json={"run_s": 30})
    held: list[tuple[str, str]] = []
    for team in ("alpha", "beta"):
        with rig.client(team) as client:
            reply = client.post("/v1/videos", json={"prompt": f"a long job for {team}"})
        assert reply.status_code == 200, reply.text
        held.append((team, reply.json()["id"]))
    assert rig.ledger()["holders"] == LIMIT
    body = json.dumps({"prompt": "nobody waits for me"}).encode()
    with connect(rig) as sock:
        sock.sendall(
            head(
                rig,
                "POST",
                "/v1/videos",
                team="gamma",
                content_type="application/json",
                content_length=str(len(body)),
            )
            + body
        )
        wait_until(lambda: rig.ledger()["queue"] == 1, 5, "the create queued for a slot")
    wait_until(lambda: rig.ledger()["queue"] == 0, 3, "the abandoned waiter left the queue")
    ledger = rig.ledger()
    assert (ledger["beats"], ledger["waiter_team"], ledger["queued_teams"]) == (0, 0, 0), ledger
    assert ledger["holders"] == LIMIT, ledger
    for team, video_id in held:  # a delete ends a job at once
        with rig.client(team) as client:
            assert client.delete(f"/v1/videos/{video_id}").status_code == 200
    assert rig.ledger()["holders"] == 0
    assert rig.stats()["jobs_created"] == jobs_before + LIMIT  # these two, not the third
    assert_no_leak(rig, baseline)


def test_a_client_gone_mid_create_leaves_its_slot_to_the_job_then_nothing(
    fresh: Rig, baseline: Footprint
) -> None:
    """§3: the create reached upstream, so the job runs and counts whether anyone reads
    the answer or not; the slot is held until the job ends, and the job is the team's."""
    rig = fresh
    jobs_before = rig.stats()["jobs_created"]
    rig.sim("POST", "/_sim/config", json={"run_s": 3})
    rig.sim("POST", "/_sim/faults", json={"latency_ms": 0.7 * TIMEOUT_S * 1000})
    prompt = f"nobody reads my answer {secrets.token_hex(4)}"
    body = json.dumps({"prompt": prompt}).encode()
    with connect(rig) as sock:
        sock.sendall(
            head(
                rig,
                "POST",
                "/v1/videos",
                team="beta",
                content_type="application/json",
                content_length=str(len(body)),
            )
            + body
        )
        wait_until(
            lambda: rig.stats()["jobs_created"] == jobs_before + 1, 5, "the job made upstream"
        )
    (job,) = [j for j in rig.upstream_jobs() if j["prompt"] == prompt]
    wait_until(lambda: rig.owner(job["id"]) == "beta", 5, "the job recorded for its team")
    rig.sim("POST", "/_sim/faults", json={"latency_ms": 0})
    ledger = rig.ledger()
    assert (ledger["holders"], ledger["slots"], ledger["queue"]) == (1, 1, 0), ledger
    (raw,) = rig.redis.hgetall(SLOTS).values()
    slot = json.loads(raw)
    assert (slot["state"], slot["video"], slot["team"]) == ("bound", job["id"], "beta"), slot
    wait_until(lambda: rig.ledger()["holders"] == 0, SETTLE_S, "the slot freed at the job's end")
    assert rig.ledger()["slots"] == 0
    with rig.client("beta") as client:
        video = client.get(f"/v1/videos/{job['id']}")
    assert video.status_code == 200, video.text
    assert video.json()["status"] == "completed", video.text
    assert_no_leak(rig, baseline)


def test_a_client_gone_mid_download_leaves_nothing(
    fresh: Rig, baseline: Footprint, completed: str
) -> None:
    rig = fresh
    for how in ("close", "reset"):
        sock, length, got = download_socket(rig, completed)
        with sock:
            assert length == CONTENT_BYTES
            while got < 4 * CLIENT_RCVBUF:
                chunk = sock.recv(65536)
                assert chunk
                got += len(chunk)
            wait_until(lambda: upstream_backlog(rig) > 0, CLOSE_S, "the download held back")
            if how == "reset":  # RST instead of FIN
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        assert_no_leak(rig, baseline)
    assert rig.ledger()["holders"] == 0
    with rig.client() as client:  # and the next download is whole
        total = 0
        with client.stream("GET", f"/v1/videos/{completed}/content") as reply:
            for chunk in reply.iter_raw():
                total += len(chunk)
    assert total == CONTENT_BYTES
    assert_no_leak(rig, baseline)
