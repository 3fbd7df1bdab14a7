"""Session fixtures: a real Redis-compatible server, the simulator, real gateway processes.

Only fixtures live here; what they are built from is in `support` (see its docstring).
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from gateway.auth import new_key
from gateway.embedded_store import EmbeddedRedis
from support.processes import start_gateway, start_simulator
from support.stack import TEAMS, Stack, gateway_config


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="session")
def store_server(workdir: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(workdir / "store", persistent=False).start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def team_keys() -> dict[str, str]:
    return {team: new_key() for team in TEAMS}


@pytest.fixture(scope="session")
def upstream_token() -> str:
    return "upstream-" + secrets.token_urlsafe(24)


@pytest.fixture(scope="session")
def session_stack(
    workdir: Path, store_server: EmbeddedRedis, team_keys: dict[str, str], upstream_token: str
) -> Iterator[Stack]:
    simulator = start_simulator(workdir, upstream_token, queue_s=0.2, run_s=0.6)
    try:
        gateway = start_gateway(
            workdir, gateway_config(simulator.url, store_server.url, upstream_token, team_keys)
        )
    except BaseException:
        simulator.stop()
        raise
    yield Stack(gateway, simulator, store_server, team_keys, upstream_token)
    gateway.stop()
    simulator.stop()


@pytest.fixture
def stack(session_stack: Stack) -> Stack:
    """The shared stack, with an empty store and a fresh simulator for each test."""
    redis.Redis.from_url(session_stack.store.url).flushall()
    with session_stack.sim() as sim:
        sim.post("/_sim/reset").raise_for_status()
    return session_stack
