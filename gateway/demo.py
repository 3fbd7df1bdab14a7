"""`sora-gateway demo`: the simulator, an embedded store and the gateway in one process.

Each run makes a fresh team key and a fresh simulator token, so the demo never ships a
credential, and prints a snippet with the official SDK that works as printed. The
config ships in the package, so the demo runs from any directory.

The demo owns its process's signals: SIGINT (Ctrl+C) and SIGTERM stop both servers,
then the store and its temp directory go with the `ExitStack`, however the servers
ended; SIGHUP reloads the teams, as under `serve`. If the demo is killed outright the
store still stops (it dies with its parent, see `EmbeddedRedis`); only its temp
directory is then left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import signal
import socket
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from importlib.resources import as_file, files
from urllib.parse import urlsplit

import uvicorn

from .app import create_app
from .auth import key_digest, new_key
from .embedded_store import EmbeddedRedis
from .serve import UvicornOptions, listen, settings_for_startup
from .simulator import SimulatorSettings, create_simulator_app

DEFAULT_PORT = 8080
DEFAULT_SIM_PORT = 8081
# The shipped config names the simulator's port through this variable (--sim-port).
SIM_PORT_ENV = "SORA_DEMO_SIM_PORT"

SNIPPET = """\
from openai import OpenAI

client = OpenAI(base_url="{base_url}", api_key="{key}")
video = client.videos.create_and_poll(prompt="A cat on a windowsill watching the rain")
print("created", video.id, video.status)
remix = client.videos.remix(video.id, prompt="Make it a sunny afternoon")
remix = client.videos.poll(remix.id)
print("remixed", remix.id, remix.status, "from", remix.remixed_from_video_id)
client.videos.download_content(remix.id, variant="video").write_to_file("remix.mp4")
print("saved remix.mp4")
"""


class PortUnavailable(Exception):
    """A port the demo needs cannot be listened on; the message says how to pick another."""


class _Server(uvicorn.Server):
    """A uvicorn server that leaves the process's signals to the demo.

    uvicorn's own handling re-raises SIGTERM once it has shut down, with the default
    handler back in place, which kills the process before the store is stopped; and of
    two servers in one process, each would take the handlers from the other.
    """

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def run_demo(config_path: str | None, port: int, sim_port: int) -> int:
    key = new_key()
    os.environ["SORA_UPSTREAM_TOKEN"] = "sim-" + secrets.token_urlsafe(24)
    os.environ["SORA_DEMO_KEY_SHA256"] = key_digest(key)
    os.environ[SIM_PORT_ENV] = str(sim_port)
    with ExitStack() as stack:
        path = config_path or str(stack.enter_context(as_file(files("gateway") / "demo.yaml")))
        settings = settings_for_startup(path)
        if settings is None:
            return 1
        upstream = urlsplit(settings.upstream.base_url)
        if not _runs_on_the_simulator(upstream.scheme, upstream.hostname, settings.upstream.token):
            # The simulator is started with the config's token: a real one must never
            # reach it (its /_sim routes are open), nor a real base_url be bound here.
            print(f"sora-gateway demo: {NOT_A_DEMO_CONFIG}", file=sys.stderr)
            return 1
        idle_s = settings.limits.client_idle_timeout_s
        try:
            # Both ports are taken before anything starts, so a busy one is one line.
            sim_socket = stack.enter_context(
                _listen(upstream.hostname or "127.0.0.1", upstream.port or 80, idle_s, "--sim-port")
            )
            gateway_socket = stack.enter_context(_listen("127.0.0.1", port, idle_s, "--port"))
        except PortUnavailable as exc:
            print(f"sora-gateway demo: {exc}", file=sys.stderr)
            return 1
        store = stack.enter_context(EmbeddedRedis())
        options: UvicornOptions = {"log_config": None, "access_log": False, "log_level": "warning"}
        simulator = _Server(
            uvicorn.Config(
                create_simulator_app(
                    SimulatorSettings(token=settings.upstream.token, queue_s=1.0, run_s=4.0)
                ),
                **options,
            )
        )
        gateway = _Server(
            uvicorn.Config(
                create_app(settings, redis_url=store.url, config_path=path),
                **options,
            )
        )
        base_url = f"http://127.0.0.1:{port}/v1"
        servers = {simulator: sim_socket, gateway: gateway_socket}
        with contextlib.suppress(KeyboardInterrupt):  # a Ctrl+C before the handlers are in
            return asyncio.run(_serve_all(servers, base_url, key))
    return 0


NOT_A_DEMO_CONFIG = (
    "the demo's upstream is its own simulator: its config needs "
    "base_url: http://127.0.0.1:${SORA_DEMO_SIM_PORT}/v1 and token: ${SORA_UPSTREAM_TOKEN} "
    "(use `sora-gateway serve` for a real upstream)"
)


def _runs_on_the_simulator(scheme: str, host: str | None, token: str) -> bool:
    """Whether a config points at the demo's own simulator with the demo's own token."""
    local = host in ("127.0.0.1", "localhost", "::1")
    return scheme == "http" and local and token == os.environ["SORA_UPSTREAM_TOKEN"]


@contextlib.contextmanager
def _listen(host: str, port: int, idle_s: float, option: str) -> Iterator[socket.socket]:
    try:
        listener = listen(host, port, idle_s)
    except OSError as exc:
        why = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})"
        raise PortUnavailable(
            f"port {port} on {host} {why}; choose another with {option} PORT"
        ) from None
    with listener:
        yield listener


async def _serve_all(servers: dict[_Server, socket.socket], base_url: str, key: str) -> int:
    """Serve until a signal, or until one server ends on its own; 0, or 1 for the latter."""
    stopping = False

    def stop() -> None:
        nonlocal stopping
        stopping = True
        for server in servers:
            server.force_exit = server.should_exit  # a second Ctrl+C: stop now
            server.should_exit = True

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    tasks = [asyncio.create_task(server.serve([sock])) for server, sock in servers.items()]
    try:
        while not all(server.started for server in servers):
            if any(task.done() for task in tasks):
                break
            await asyncio.sleep(0.05)
        else:
            _print_banner(base_url, key)
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        ended_alone = not stopping
        for server in servers:
            server.should_exit = True
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if ended_alone:
        print(
            "sora-gateway demo: a server stopped unexpectedly; see the log above", file=sys.stderr
        )
        return 1
    return 0


def _print_banner(base_url: str, key: str) -> None:
    print(
        f"\nsora-gateway demo is running at {base_url} (upstream: the bundled simulator)\n"
        f"\nTeam key (team 'demo', made for this run):\n  {key}\n"
        f"\nTry it with the official SDK (pip install openai):\n\n"
        + SNIPPET.format(base_url=base_url, key=key)
        + "\nPress Ctrl+C to stop.\n",
        flush=True,
    )
