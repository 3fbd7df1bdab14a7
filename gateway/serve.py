"""`sora-gateway serve`: the gateway under uvicorn, with one or several worker processes.

With several workers each process is a full replica (its own tracker and release
listener) sharing the store, and prometheus-client's multiprocess mode lets any
worker's `/metrics` report all of them: the gateway makes and removes that directory
itself. Without `store.redis_url` an embedded store is started first, and stopped last.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import TypedDict

import uvicorn
from starlette.types import ASGIApp
from uvicorn.supervisors import Multiprocess

from . import logs
from .app import create_app
from .config import ConfigError, Settings, load_settings
from .embedded_store import EmbeddedRedis

CONFIG_ENV = "SORA_GATEWAY_CONFIG"
STORE_ENV = "SORA_GATEWAY_STORE_URL"
# Long enough to finish a download in flight; the orchestrator's grace must be longer.
GRACEFUL_SHUTDOWN_S = 30
KEEP_ALIVE_S = 75


class UvicornOptions(TypedDict, total=False):
    """The `uvicorn.Config` keywords the gateway sets, typed so each is checked."""

    loop: str
    http: str
    log_config: None
    log_level: str
    access_log: bool
    proxy_headers: bool
    server_header: bool
    timeout_graceful_shutdown: int
    timeout_keep_alive: int


def serve(
    config_path: str,
    host: str,
    port: int,
    workers: int = 1,
    loop: str = "auto",
    http: str = "auto",
) -> int:
    settings = settings_for_startup(config_path)
    if settings is None:
        return 1
    # uvicorn drains on SIGTERM, then re-raises it with the previous handler in place:
    # make that handler a clean exit, so the embedded store and temp dirs are cleaned up.
    signal.signal(signal.SIGTERM, _exit_cleanly)
    try:
        return _run(settings, config_path, host, port, workers, {"loop": loop, "http": http})
    except KeyboardInterrupt:
        return 0


def settings_for_startup(config_path: str) -> Settings | None:
    """The config, with logging set up from it; None once a bad config is reported.

    What `serve` and `demo` both do first: an operator sees the config's problems as
    the checker's report on stderr, not as a traceback.
    """
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return None
    logs.configure(settings.logging.level, settings.logging.format)
    return settings


def _exit_cleanly(signum: int, frame: object) -> None:
    raise SystemExit(0)


def _run(
    settings: Settings,
    config_path: str,
    host: str,
    port: int,
    workers: int,
    server: UvicornOptions,
) -> int:
    with ExitStack() as stack:
        url = settings.store.redis_url
        if settings.store.embedded:
            url = stack.enter_context(EmbeddedRedis(settings.store.data_dir)).url
        listener = stack.enter_context(listen(host, port, settings.limits.client_idle_timeout_s))
        options: UvicornOptions = {
            **server,
            "log_config": None,
            "access_log": False,
            # The gateway uses no client address, so it trusts no X-Forwarded-* header;
            # and it does not advertise its server software.
            "proxy_headers": False,
            "server_header": False,
            "timeout_graceful_shutdown": GRACEFUL_SHUTDOWN_S,
            # Longer than load balancers' idle timeouts (often 60 s), so the balancer,
            # not the gateway, closes an idle connection: no request lands on a closing one.
            "timeout_keep_alive": KEEP_ALIVE_S,
        }
        if workers <= 1:
            app = create_app(settings, redis_url=url, config_path=config_path)
            # Served on our socket, which uvicorn closes itself when it stops accepting.
            uvicorn.Server(uvicorn.Config(app, **options)).run(sockets=[listener])
            return 0
        metrics_dir = tempfile.mkdtemp(prefix="sgw-metrics-")
        stack.callback(shutil.rmtree, metrics_dir, ignore_errors=True)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
        os.environ[CONFIG_ENV] = str(Path(config_path).resolve())
        if url is not None:
            os.environ[STORE_ENV] = url
        config = uvicorn.Config(
            "gateway.serve:app_from_environment", factory=True, workers=workers, **options
        )
        Multiprocess(config, sockets=[listener]).run()
    return 0


def listen(host: str, port: int, idle_s: float) -> socket.socket:
    """The listening socket, made here so its connections carry TCP_USER_TIMEOUT.

    A client that stops reading a download keeps its socket's window shut; when the
    gateway gives up on it (limits.client_idle_timeout_s), the unsent bytes would keep
    the connection open until the client left. With this option the kernel aborts a
    connection whose data has not moved for that long, so nothing is held forever.
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if hasattr(socket, "TCP_USER_TIMEOUT"):  # Linux
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(idle_s * 1000))
    try:
        listener.bind(address)
    except OSError:
        listener.close()
        raise
    listener.listen(2048)
    listener.set_inheritable(True)  # the worker processes serve it too
    return listener


def app_from_environment() -> ASGIApp:
    """The app factory each worker process calls (uvicorn imports it by name)."""
    path = os.environ[CONFIG_ENV]
    settings = load_settings(path)
    logs.configure(settings.logging.level, settings.logging.format)
    return create_app(settings, redis_url=os.environ.get(STORE_ENV), config_path=path)
