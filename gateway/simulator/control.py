"""Control routes outside /v1 (no auth): faults, config, stats, the request log, the
create log, reset.

Tests drive the simulator through these while the gateway talks to /v1. `/_sim/requests`
is the last 1000 /v1 requests of any kind; `/_sim/creates` the last 10,000 job-creating
requests with the job each made (see `creates`), which polls cannot push out.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .creates import CREATES_CAPACITY
from .jobs import SimError
from .traffic import LOG_CAPACITY

if TYPE_CHECKING:
    from .state import SimulatorState


def control_routes() -> list[Route]:
    return [
        Route("/healthz", healthz, methods=["GET"]),
        Route("/_sim/faults", get_faults, methods=["GET"]),
        Route("/_sim/faults", set_faults, methods=["POST"]),
        Route("/_sim/config", get_config, methods=["GET"]),
        Route("/_sim/config", set_config, methods=["POST"]),
        Route("/_sim/reset", reset, methods=["POST"]),
        Route("/_sim/stats", stats, methods=["GET"]),
        Route("/_sim/requests", recent_requests, methods=["GET"]),
        Route("/_sim/creates", recent_creates, methods=["GET"]),
    ]


def _sim(request: Request) -> SimulatorState:
    return request.app.state.sim


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        data = json.loads(raw) if raw.strip() else {}
    except ValueError as exc:
        raise SimError(400, "invalid_json", "The body must be a JSON object.") from exc
    if not isinstance(data, dict):
        raise SimError(400, "invalid_json", "The body must be a JSON object.")
    return data


def _refused(exc: ValueError) -> SimError:
    name, reason = exc.args
    return SimError(400, "invalid_value", f"'{name}' {reason}.", param=name)


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def get_faults(request: Request) -> Response:
    return JSONResponse(_sim(request).faults.snapshot())


async def set_faults(request: Request) -> Response:
    """Set knobs (see `Faults`): latency_ms, fail_next, flap, rate_limit_next,
    create_then_{500,hang}_next, truncate_next, stall_next, {truncate,garble}_json_next,
    other_id_next."""
    sim = _sim(request)
    try:
        sim.faults.update(await _json_object(request))
    except ValueError as exc:
        raise _refused(exc) from exc
    return JSONResponse(sim.faults.snapshot())


def _config(sim: SimulatorState) -> dict[str, Any]:
    """The live settings; the token itself is never shown, only whether one is set."""
    config = asdict(sim.settings)
    del config["token"]
    config["token_set"] = sim.settings.token is not None
    return config


async def get_config(request: Request) -> Response:
    return JSONResponse(_config(_sim(request)))


async def set_config(request: Request) -> Response:
    sim = _sim(request)
    try:
        sim.configure(await _json_object(request))
    except ValueError as exc:
        raise _refused(exc) from exc
    return JSONResponse(_config(sim))


async def reset(request: Request) -> Response:
    _sim(request).reset()
    return JSONResponse({"reset": True})


async def stats(request: Request) -> Response:
    return JSONResponse(_sim(request).stats())


def _limit(request: Request, default: int) -> int:
    text = request.query_params.get("limit", str(default))
    if not text.isascii() or not text.isdigit():
        raise SimError(
            400, "invalid_value", "'limit' must be a non-negative integer.", param="limit"
        )
    return int(text)


async def recent_requests(request: Request) -> Response:
    """The last `limit` /v1 requests received (default: all kept), oldest first."""
    return JSONResponse(_sim(request).traffic.recent(_limit(request, LOG_CAPACITY)))


async def recent_creates(request: Request) -> Response:
    """The last `limit` job-creating requests and their jobs (default: all kept)."""
    return JSONResponse(_sim(request).creates.recent(_limit(request, CREATES_CAPACITY)))
