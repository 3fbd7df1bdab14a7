"""A faithful stand-in for the upstream Videos API ("Sora 2"), bundled for tests and demos.

Jobs move through their states by the clock alone, the account enforces its own running
job limit, and fault knobs under /_sim let tests break it on purpose.
"""

from __future__ import annotations

import socket

import uvicorn
from starlette.applications import Starlette

from .app import create_simulator_app
from .jobs import SimulatorSettings
from .state import SimulatorState
from .traffic import fingerprint

__all__ = ["SimulatorSettings", "SimulatorState", "create_simulator_app", "fingerprint", "run"]


class _Server(uvicorn.Server):
    """Wakes hung requests first on shutdown, so they do not hold the exit back."""

    def __init__(self, config: uvicorn.Config, sim: SimulatorState) -> None:
        super().__init__(config)
        self._sim = sim

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._sim.faults.release_hangs()
        await super().shutdown(sockets)


def run(host: str, port: int, settings: SimulatorSettings) -> None:
    """Serve the simulator until interrupted."""
    app: Starlette = create_simulator_app(settings)
    config = uvicorn.Config(
        app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=5
    )
    _Server(config, app.state.sim).run()
