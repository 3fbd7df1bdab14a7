"""Real processes for the tests: the simulator and gateway replicas, each on a free port.

Started as `python -m gateway ...` exactly as an operator would, with their output
captured to a file so tests can read every log line a process wrote.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from gateway.embedded_store import free_port

STARTUP_TIMEOUT_S = 20.0


def wait_until(predicate: Any, timeout: float, message: str, interval: float = 0.05) -> Any:
    """Poll `predicate` until it returns something truthy; fail with `message` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        time.sleep(interval)


async def wait_until_async(
    predicate: Any,
    timeout: float,  # noqa: ASYNC109  a poll's deadline, named in its failure as wait_until's
    message: str,
    interval: float = 0.02,
) -> Any:
    """`wait_until` for tests whose subject runs on the test's own event loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s: {message}")
        await asyncio.sleep(interval)


@dataclass
class Process:
    """A child process serving HTTP on `port`, logging to `log_path`."""

    name: str
    args: list[str]
    port: int
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_path: str) -> Process:
        log = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "gateway", *self.args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **self.env},
        )
        log.close()
        wait_until(lambda: self._ready(ready_path), STARTUP_TIMEOUT_S, f"{self.name} ready")
        return self

    def _ready(self, path: str) -> bool:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited at startup:\n{self.log()[-3000:]}")
        try:
            return httpx.get(self.url + path, timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        code = self.popen.returncode
        self.popen = None
        return code

    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid


def start_simulator(tmp: Path, token: str, **options: Any) -> Process:
    port = free_port()
    args = ["simulate", "--port", str(port), "--token", token]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    return Process("simulator", args, port, tmp / f"simulator-{port}.log").start("/healthz")


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_gateway(
    tmp: Path,
    config: dict[str, Any],
    env: dict[str, str] | None = None,
    extra_args: tuple[str, ...] = (),
    name: str = "gateway",
) -> Process:
    """A gateway replica; `extra_args` are more `serve` options (e.g. `--loop asyncio`)."""
    port = free_port()
    config_path = write_config(tmp / f"gateway-{port}.yaml", config)
    args = ["serve", "--config", str(config_path), "--port", str(port), *extra_args]
    return Process(name, args, port, tmp / f"gateway-{port}.log", env=env or {}).start("/readyz")
