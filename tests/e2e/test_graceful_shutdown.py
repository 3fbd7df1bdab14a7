"""A replica told to stop (SIGTERM, what Kubernetes and compose send) stops gracefully.

`gateway/serve.py` runs uvicorn with `timeout_graceful_shutdown`: on SIGTERM the replica
closes its listener at once, lets the requests in flight finish (a 100 MiB download
among them), then stops. Its running jobs are not its to free: CONTRACT §3 keeps them
counted (the upstream still runs them), and §7 has another replica take them over
within `tracker.lease_s` + `tracker.poll_interval_s` and free each slot when its job
ends, with no client polling.

The module runs its own store, simulator and gateways (a `Rig`): nothing is
shared with the session stack, whose gateway would otherwise adopt these slots. Every
wait polls with a deadline; the only sleeps pace the download's reader (they slow the
client down, they synchronise nothing).
"""

from __future__ import annotations

import hashlib
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from gateway.serve import GRACEFUL_SHUTDOWN_S
from support.processes import Process, wait_until
from support.stack import Rig

TRACKER = {"poll_interval_s": 0.3, "lease_s": 2}
LIMIT = 2
QUEUE_S = 0.2
SHORT_RUN_S = 0.5  # the job whose video is downloaded
LONG_RUN_S = 12.0  # the jobs A owns: they outlast the download, A's exit and the adoption
CONTENT_BYTES = 100 * 1024 * 1024
READ_CHUNK = 1024 * 1024
READ_PAUSE_S = 0.04  # per MiB read: the download takes a few seconds, A is still serving it
SLACK_S = 3.0  # scheduling slack on a busy machine; far below any failure mode's delay
# §7: a dead replica's jobs are taken over within lease + poll interval.
ADOPT_S = TRACKER["lease_s"] + TRACKER["poll_interval_s"] + SLACK_S
# §7: a slot is free within 2 x poll_interval of its job ending.
RELEASE_S = 2 * TRACKER["poll_interval_s"] + SLACK_S
EXIT_AFTER_DRAIN_S = 10.0  # from the last response to the process gone


# -- module fixtures: one rig (store, simulator), two gateways a test -----------------------


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    workdir = tmp_path_factory.mktemp("graceful")
    with Rig.open(workdir, teams=("alpha",), queue_s=QUEUE_S, run_s=SHORT_RUN_S) as rig:
        yield rig


@pytest.fixture
def replicas(rig: Rig) -> Iterator[tuple[Process, Process]]:
    """Gateways A and B on the module's store; whatever the test left running is killed."""
    try:
        a, b = rig.start_gateways(2, tracker=TRACKER, quota={"max_in_flight": LIMIT, "wait_s": 1.0})
        yield a, b
    finally:
        rig.stop_gateways(signal.SIGKILL)


# -- helpers ---------------------------------------------------------------------------------


def _owner_prefix(gateway: Process) -> str:
    """The start of the ledger `owner` of a replica (`gateway.app.replica_id`)."""
    return f"{socket.gethostname()}:{gateway.pid()}:"


def _assert_account_never_over(rig: Rig) -> None:
    stats = rig.stats()
    assert stats["limit_hits"] == 0, stats
    assert stats["max_concurrency"] <= LIMIT, stats


def _refuses_connections(gateway: Process) -> bool:
    """A fresh connection to the replica's port is refused: its listener is closed."""
    try:
        with socket.create_connection(("127.0.0.1", gateway.port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True
    except OSError:
        return False


@dataclass
class Download:
    """GET .../content read in a thread, hashed as it arrives, at a reader's pace."""

    url: str
    headers: dict[str, str]
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    received: int = 0
    status: int | None = None
    content_length: str | None = None
    sha256: str = ""
    error: BaseException | None = None
    finished_at: float = 0.0

    def run(self) -> None:
        digest = hashlib.sha256()
        try:
            with (
                httpx.Client(timeout=30.0) as client,
                client.stream("GET", self.url, headers=self.headers) as reply,
            ):
                self.status = reply.status_code
                self.content_length = reply.headers.get("content-length")
                for chunk in reply.iter_bytes(READ_CHUNK):
                    digest.update(chunk)
                    self.received += len(chunk)
                    self.started.set()
                    time.sleep(READ_PAUSE_S)
        except BaseException as exc:  # reported by the test, not lost in the thread
            self.error = exc
        finally:
            self.sha256 = digest.hexdigest()
            self.finished_at = time.monotonic()
            self.started.set()
            self.done.set()


def _direct_sha256(rig: Rig, video_id: str) -> tuple[int, str]:
    """Length and digest of the video as upstream serves it, read with the real token."""
    digest = hashlib.sha256()
    size = 0
    with httpx.stream(
        "GET",
        f"{rig.simulator.url}/v1/videos/{video_id}/content",
        headers={"authorization": f"Bearer {rig.token}"},
        timeout=30.0,
    ) as reply:
        assert reply.status_code == 200, reply.read()
        for chunk in reply.iter_bytes(READ_CHUNK):
            digest.update(chunk)
            size += len(chunk)
    return size, digest.hexdigest()


# -- the test ------------------------------------------------------------------------------------


def test_sigterm_drains_the_download_and_hands_the_running_jobs_to_the_other_replica(  # noqa: PLR0915  one shutdown, told in order: the download, the hand-over, the counts
    replicas: tuple[Process, Process], rig: Rig
) -> None:
    a, b = replicas
    auth = {"authorization": f"Bearer {rig.keys['alpha']}"}
    rig.sim("POST", "/_sim/config", json={"content_bytes": CONTENT_BYTES})

    # A finished video, created and polled through A (the retrieve frees its slot).
    with rig.client("alpha", a, timeout=20.0) as client:
        reply = client.post("/v1/videos", json={"prompt": "a harbour at dawn"})
        assert reply.status_code == 200, reply.text
        finished = reply.json()["id"]
        wait_until(
            lambda: client.get(f"/v1/videos/{finished}").json()["status"] == "completed",
            QUEUE_S + SHORT_RUN_S + 10.0,
            "the first job completed",
            interval=0.1,
        )
    wait_until(lambda: rig.holders() == 0, RELEASE_S, "the completed job's slot freed")
    expected_size, expected_sha = _direct_sha256(rig, finished)
    assert expected_size == CONTENT_BYTES

    # Two long jobs through A: A owns both slots.
    rig.sim("POST", "/_sim/config", json={"run_s": LONG_RUN_S})
    running = []
    with rig.client("alpha", a, timeout=20.0) as client:
        for n in range(LIMIT):
            reply = client.post("/v1/videos", json={"prompt": f"a long voyage {n}"})
            assert reply.status_code == 200, reply.text
            running.append(reply.json()["id"])
    jobs_end_at = time.monotonic() + QUEUE_S + LONG_RUN_S
    held = rig.held_slots()
    assert sorted(r["video"] for r in held) == sorted(running)
    assert all(r["owner"].startswith(_owner_prefix(a)) for r in held), held
    a_pid, b_prefix = a.pid(), _owner_prefix(b)

    # The download through A is under way when A is told to stop.
    download = Download(f"{a.url}/v1/videos/{finished}/content", auth)
    reader = threading.Thread(target=download.run, daemon=True)
    reader.start()
    assert download.started.wait(15.0), "no byte of the download arrived"
    assert download.error is None, download.error
    assert 0 < download.received < CONTENT_BYTES, "the download finished before SIGTERM"
    assert a.popen is not None
    a.popen.send_signal(signal.SIGTERM)

    # A closes its listener at once, while the download is still being served.
    wait_until(
        lambda: _refuses_connections(a) or download.done.is_set(),
        5.0,
        "A refusing new connections",
        interval=0.02,
    )
    assert not download.done.is_set(), (
        "the download ended before A's listener was seen closed: "
        f"{download.received} bytes, error {download.error!r}"
    )
    with pytest.raises(httpx.ConnectError):
        httpx.get(a.url + "/healthz", timeout=5.0)
    assert a.popen.poll() is None, "A exited with the download in flight"

    # The download completes, whole and intact.
    assert download.done.wait(GRACEFUL_SHUTDOWN_S), "the download did not finish"
    reader.join(5.0)
    assert download.error is None, repr(download.error)
    assert download.status == 200
    assert download.content_length in (None, str(CONTENT_BYTES))
    assert download.received == CONTENT_BYTES
    assert download.sha256 == expected_sha
    # While it drained, A still looked after its jobs: nobody adopted them early.
    held = rig.held_slots()
    assert len(held) == LIMIT, held
    assert all(not r["owner"].startswith(b_prefix) for r in held), held

    # Then A exits on its own, without being killed.
    try:
        code = a.popen.wait(timeout=EXIT_AFTER_DRAIN_S)
    except subprocess.TimeoutExpired:
        pytest.fail(f"A still running {EXIT_AFTER_DRAIN_S}s after its last response")
    exited_at = time.monotonic()
    log = a.log()
    assert "Application shutdown complete" in log, log[-3000:]
    assert code == 0, f"exit code {code}\n{log[-3000:]}"
    assert not psutil.pid_exists(a_pid) or psutil.Process(a_pid).status() == "zombie"

    # A's jobs stay counted, then B adopts them, while they still run upstream.
    assert sorted(r["video"] for r in rig.held_slots()) == sorted(running)

    def adopted() -> bool:
        now = rig.held_slots()
        assert sorted(r["video"] for r in now) == sorted(running), now
        return all(r["owner"].startswith(b_prefix) for r in now)

    wait_until(adopted, ADOPT_S, "B adopted A's running jobs", interval=0.05)
    assert time.monotonic() < jobs_end_at, "the jobs ended before the adoption was seen"
    assert rig.stats()["running"] == LIMIT

    # B frees them when they end: nobody polls them but B's tracker.
    wait_until(
        lambda: rig.holders() == 0,
        max(0.0, jobs_end_at - time.monotonic()) + RELEASE_S,
        "B freed the jobs' slots once they ended",
    )
    for video_id in running:
        status = rig.upstream_video(video_id)["status"]
        assert status == "completed", (video_id, status)
    _assert_account_never_over(rig)
    # B admits again.
    with rig.client("alpha", b, timeout=20.0) as client:
        reply = client.post("/v1/videos", json={"prompt": "after the handover"})
    assert reply.status_code == 200, reply.text
    assert time.monotonic() - exited_at < LONG_RUN_S + ADOPT_S + RELEASE_S


def test_sigterm_exits_0_and_stops_the_embedded_store(rig: Rig) -> None:
    gateway = rig.start_gateway(
        store={"data_dir": str(rig.workdir / "embedded")},  # no URL: serve() starts one
        tracker=TRACKER,
    )
    children: list[psutil.Process] = []
    try:
        children = psutil.Process(gateway.pid()).children(recursive=True)
        assert children, "no embedded store process"
        assert gateway.popen is not None
        gateway.popen.send_signal(signal.SIGTERM)
        code = gateway.popen.wait(timeout=GRACEFUL_SHUTDOWN_S)
        _, alive = psutil.wait_procs(children, timeout=5.0)
        # Both at once: the exit code, and the embedded store stopped with the gateway.
        assert (code, [p.cmdline() for p in alive]) == (0, [])
    finally:
        gateway.stop(signal.SIGKILL)
        for child in children:
            if child.is_running():
                child.kill()
