"""`python -m gateway demo`: the snippet it prints works as printed, and Ctrl+C stops it.

The demo's simulator listens on the port fixed in config/demo.yaml (8081), so this test
cannot run twice at once on one host.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from processes import wait_until

from gateway.store import free_port

REPO = Path(__file__).resolve().parents[2]
DEMO_SIMULATOR_PORT = 8081  # config/demo.yaml
SNIPPET_FIRST = "from openai import OpenAI"
SNIPPET_LAST = 'print("saved remix.mp4")'
BANNER_END = "Press Ctrl+C to stop."


class Demo:
    """The demo process, with its stdout collected line by line by a reader thread."""

    def __init__(self, port: int, log: Path) -> None:
        self.port = port
        self.lines: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._stderr = log.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "gateway", "demo", "--port", str(port)],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
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

    def interrupt(self, timeout: float = 15) -> int:
        """Ctrl+C, as a user stops it; the exit status, or a failure after `timeout`."""
        self.popen.send_signal(signal.SIGINT)
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the demo did not exit within {timeout} s of SIGINT")

    def stderr(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._stderr.close()


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
    if port_in_use(DEMO_SIMULATOR_PORT):
        pytest.fail(f"port {DEMO_SIMULATOR_PORT}, the demo simulator's, is already in use")
    process = Demo(free_port(), tmp_path / "demo.stderr")
    try:
        yield process
    finally:
        process.kill()


def test_the_demo_snippet_runs_as_printed_and_ctrl_c_stops_the_demo(demo, tmp_path):
    wait_until(demo.banner_printed, 30, "the demo's banner")
    output = "\n".join(demo.output())
    base_url = f"http://127.0.0.1:{demo.port}/v1"
    assert base_url in output
    snippet = demo.snippet()
    assert f'base_url="{base_url}"' in snippet
    key_lines = [line.strip() for line in demo.output() if line.strip().startswith("sgw-")]
    assert len(key_lines) == 1, output
    assert f'api_key="{key_lines[0]}"' in snippet

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
    assert printed[0].startswith("created video_") and printed[0].endswith(" completed")
    assert printed[1].startswith("remixed video_") and " completed from video_" in printed[1]
    video = (workdir / "remix.mp4").read_bytes()
    assert len(video) > 8 and video[4:8] == b"ftyp", video[:16]

    children = psutil.Process(demo.popen.pid).children(recursive=True)
    demo.interrupt()
    # Its embedded store went with it, and its ports are free again.
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [], f"left running after the demo exited: {alive}"
    assert not port_in_use(demo.port)
    assert not port_in_use(DEMO_SIMULATOR_PORT)


def test_ctrl_c_stops_the_demo_without_a_traceback(demo):
    wait_until(demo.banner_printed, 30, "the demo's banner")
    demo.interrupt()
    assert "Traceback" not in demo.stderr(), demo.stderr()[-3000:]
