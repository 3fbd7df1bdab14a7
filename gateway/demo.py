"""`sora-gateway demo`: the simulator, an embedded store and the gateway in one process.

Each run makes a fresh team key and a fresh simulator token, so the demo never ships a
credential, and prints a snippet with the official SDK that works as printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import tempfile
from urllib.parse import urlsplit

import uvicorn

from .app import create_app
from .auth import key_digest, new_key
from .config import ConfigError, load_settings
from .simulator import SimulatorSettings, create_simulator_app
from .store import EmbeddedRedis

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


def run_demo(config_path: str, port: int | None) -> int:
    key = new_key()
    os.environ["SORA_UPSTREAM_TOKEN"] = "sim-" + secrets.token_urlsafe(24)
    os.environ["SORA_DEMO_KEY_SHA256"] = key_digest(key)
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 1
    upstream = urlsplit(settings.upstream.base_url)
    sim_port = upstream.port or 80
    gateway_port = port or 8080
    with EmbeddedRedis(tempfile.mkdtemp(prefix="sgw-demo-")) as store:
        simulator = uvicorn.Server(
            uvicorn.Config(
                create_simulator_app(
                    SimulatorSettings(token=settings.upstream.token, queue_s=1.0, run_s=4.0)
                ),
                host=upstream.hostname or "127.0.0.1",
                port=sim_port,
                log_level="warning",
            )
        )
        gateway = uvicorn.Server(
            uvicorn.Config(
                create_app(settings, redis_url=store.url),
                host="127.0.0.1",
                port=gateway_port,
                log_level="warning",
            )
        )
        base_url = f"http://127.0.0.1:{gateway_port}/v1"
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_both(simulator, gateway, base_url, key))
    return 0


async def _serve_both(
    simulator: uvicorn.Server, gateway: uvicorn.Server, base_url: str, key: str
) -> None:
    tasks = [asyncio.create_task(simulator.serve()), asyncio.create_task(gateway.serve())]
    while not (simulator.started and gateway.started):
        if any(task.done() for task in tasks):
            simulator.should_exit = gateway.should_exit = True
            await asyncio.gather(*tasks, return_exceptions=True)
            raise SystemExit("the demo could not start: is one of its ports in use?")
        await asyncio.sleep(0.05)
    print(
        f"\nsora-gateway demo is running at {base_url} (upstream: the bundled simulator)\n"
        f"\nTeam key (team 'demo', made for this run):\n  {key}\n"
        f"\nTry it with the official SDK (pip install openai):\n\n"
        + SNIPPET.format(base_url=base_url, key=key)
        + "\nPress Ctrl+C to stop.\n",
        flush=True,
    )
    await asyncio.gather(*tasks)
