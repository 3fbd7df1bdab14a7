"""The simulated upstream's HTTP face: the /v1 Videos API routes and the app factory."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .bodies import Body, read_body
from .control import control_routes
from .creates import CreateRecord
from .gate import V1Gate, error_response
from .jobs import (
    DEFAULT_SECONDS,
    DEFAULT_SIZE,
    EXTENSION_SECONDS,
    VIDEO_SECONDS,
    VIDEO_SIZES,
    Job,
    JobSpec,
    SimError,
    SimulatorSettings,
)
from .media import VARIANTS, ByteRange, Content, RangeNotSatisfiable, parse_range
from .state import SimulatorState
from .traffic import Traffic

Endpoint = Callable[[Request], Awaitable[Response]]
JobEndpoint = Callable[[Request, CreateRecord], Awaitable[Response]]


def create_simulator_app(
    settings: SimulatorSettings, *, clock: Callable[[], float] = time.time
) -> Starlette:
    """A fresh simulated upstream; its state lives on `app.state.sim` (a SimulatorState)."""
    sim = SimulatorState(settings, clock)
    app = Starlette(
        routes=[*_v1_routes(), *control_routes()],
        middleware=[Middleware(V1Gate, sim=sim)],
        exception_handlers={SimError: _sim_error, HTTPException: _http_error},
    )
    app.state.sim = sim
    return app


def _v1_routes() -> list[Route]:
    return [
        _route("/v1/videos", GET=list_videos, POST=_logged("create", create_video)),
        Route("/v1/videos/remix", _logged("remix", remix_by_body), methods=["POST"]),
        Route("/v1/videos/edits", _logged("edit", edit_video), methods=["POST"]),
        Route("/v1/videos/extensions", _logged("extension", extend_video), methods=["POST"]),
        Route("/v1/videos/characters", create_character, methods=["POST"]),
        Route("/v1/videos/characters/{character_id}", get_character, methods=["GET"]),
        _route("/v1/videos/{video_id}", GET=retrieve_video, DELETE=delete_video),
        Route("/v1/videos/{video_id}/remix", _logged("remix", remix_by_path), methods=["POST"]),
        Route("/v1/videos/{video_id}/content", download_content, methods=["GET"]),
    ]


def _route(path: str, **handlers: Endpoint) -> Route:
    """One route per path, so a 405 names every method the path serves in `Allow`."""

    async def dispatch(request: Request) -> Response:
        method = "GET" if request.method == "HEAD" else request.method
        return await handlers[method](request)

    return Route(path, dispatch, methods=list(handlers))


def _logged(kind: str, endpoint: JobEndpoint) -> Endpoint:
    """A job-creating route that leaves a record in the create log, whatever it answers."""

    async def logged(request: Request) -> Response:
        sim = _sim(request)
        record = sim.creates.open(kind, request.url.path, sim.jobs.now())
        try:
            response = await endpoint(request, record)
        except SimError as exc:
            record.answered(exc.status, exc.code)
            raise
        except HTTPException as exc:
            record.answered(exc.status_code, None)
            raise
        record.answered(response.status_code, None)
        return response

    return logged


def _sim(request: Request) -> SimulatorState:
    return request.app.state.sim


async def _sim_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SimError)
    return error_response(exc)


async def _http_error(request: Request, exc: Exception) -> Response:
    """Router 404/405 and malformed multipart, in the envelope like everything else."""
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        message = f"Invalid URL ({request.method} {request.url.path})"
        code = None
    elif exc.status_code == 405:
        message = f"Method {request.method} is not allowed on {request.url.path}"
        code = "method_not_allowed"
    else:
        message, code = str(exc.detail), None
    error = SimError(exc.status_code, code, message, headers=exc.headers)
    return error_response(error)


def _video_response(sim: SimulatorState, job: Job) -> JSONResponse:
    headers = {}
    if sim.settings.poll_after_ms is not None:
        headers["openai-poll-after-ms"] = str(sim.settings.poll_after_ms)
    return JSONResponse(job.to_dict(sim.jobs.now()), headers=headers)


async def _start(sim: SimulatorState, record: CreateRecord, spec: JobSpec) -> Response:
    """Admit a validated job, with the job-creating fault knobs applied around it.

    No await between the fault check, the limit check and the insert: concurrent
    requests can never both take the last free place.
    """
    record.saw_prompt(spec.prompt)
    if sim.faults.take("rate_limit_next"):
        raise SimError(
            429,
            "rate_limit_exceeded",
            "Rate limit reached for requests (simulated).",
            type="rate_limit_error",
            headers={"retry-after": "1"},
        )
    job = sim.jobs.admit(spec)
    sim.creates.created(record, job)
    if sim.faults.take("create_then_500_next"):
        raise SimError(
            500, "internal_error", "Job created, then failed (simulated).", type="server_error"
        )
    if sim.faults.take("create_then_hang_next"):
        await sim.faults.hang()
        raise SimError(
            500, "internal_error", "Job created, hang released (simulated).", type="server_error"
        )
    return _video_response(sim, job)


async def create_video(request: Request, record: CreateRecord) -> Response:
    body = await read_body(request)
    spec = JobSpec(
        prompt=body.prompt(),
        model=body.model(),
        seconds=body.choice("seconds", VIDEO_SECONDS, DEFAULT_SECONDS),
        size=body.choice("size", VIDEO_SIZES, DEFAULT_SIZE),
    )
    return await _start(_sim(request), record, spec)


async def list_videos(request: Request) -> Response:
    sim = _sim(request)
    query = request.query_params
    limit_text = query.get("limit", "20")
    if not limit_text.isascii() or not limit_text.isdigit() or not 1 <= int(limit_text) <= 100:
        raise SimError(400, "invalid_value", "'limit' must be an integer 1..100.", param="limit")
    order = query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise SimError(400, "invalid_value", "'order' must be 'asc' or 'desc'.", param="order")
    jobs, has_more = sim.jobs.page(query.get("after") or None, int(limit_text), order)
    now = sim.jobs.now()
    data = [job.to_dict(now) for job in jobs]
    return JSONResponse(
        {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": has_more,
        }
    )


async def retrieve_video(request: Request) -> Response:
    sim = _sim(request)
    job = sim.jobs.get(request.path_params["video_id"])
    if sim.faults.take("other_id_next"):
        video = job.to_dict(sim.jobs.now())
        video["id"] = sim.jobs.other_id(job.id)
        return JSONResponse(video)
    return _video_response(sim, job)


async def delete_video(request: Request) -> Response:
    sim = _sim(request)
    video_id = request.path_params["video_id"]
    sim.jobs.delete(video_id)
    sim.creates.deleted(video_id, sim.jobs.now())
    return JSONResponse({"id": video_id, "object": "video.deleted", "deleted": True})


def _remix_spec(source: Job, prompt: str) -> JobSpec:
    return JobSpec(
        prompt=prompt,
        model=source.spec.model,
        seconds=source.spec.seconds,
        size=source.spec.size,
        remixed_from=source.id,
    )


async def remix_by_path(request: Request, record: CreateRecord) -> Response:
    sim = _sim(request)
    body = await read_body(request)
    prompt = body.prompt()
    source = sim.jobs.source(request.path_params["video_id"], "video_id")
    return await _start(sim, record, _remix_spec(source, prompt))


async def remix_by_body(request: Request, record: CreateRecord) -> Response:
    """The seed's form: POST /v1/videos/remix with {"video_id", "prompt"}."""
    sim = _sim(request)
    body = await read_body(request)
    video_id = body.required("video_id")
    prompt = body.prompt()
    source = sim.jobs.source(video_id, "video_id")
    return await _start(sim, record, _remix_spec(source, prompt))


def _video_source(sim: SimulatorState, body: Body) -> Job | None:
    """The `video` of an edit or extension: an uploaded file (None) or a completed job."""
    if "video" in body.files:
        return None
    video_id = body.text("video[id]")
    if video_id:
        return sim.jobs.source(video_id, "video.id")
    if body.text("video") is not None:
        raise SimError(
            400, "invalid_type", "'video' must be a file or an object {\"id\"}.", param="video"
        )
    raise SimError(
        400, "missing_required_parameter", "Missing required parameter: 'video'.", param="video"
    )


async def edit_video(request: Request, record: CreateRecord) -> Response:
    """An edit keeps its source's model and size, and its length unless it asks another."""
    sim = _sim(request)
    body = await read_body(request)
    prompt = body.prompt()
    source = _video_source(sim, body)
    spec = JobSpec(
        prompt=prompt,
        model=source.spec.model if source else body.model(),
        seconds=body.choice(
            "seconds", VIDEO_SECONDS, source.spec.seconds if source else DEFAULT_SECONDS
        ),
        size=source.spec.size if source else DEFAULT_SIZE,
    )
    return await _start(sim, record, spec)


async def extend_video(request: Request, record: CreateRecord) -> Response:
    """An extension's `seconds` is the new segment; the job reports the stitched total."""
    sim = _sim(request)
    body = await read_body(request)
    prompt = body.prompt()
    extra = body.choice("seconds", EXTENSION_SECONDS, DEFAULT_SECONDS)
    source = _video_source(sim, body)
    spec = JobSpec(
        prompt=prompt,
        model=source.spec.model if source else body.model(),
        seconds=str(int(source.spec.seconds) + int(extra)) if source else extra,
        size=source.spec.size if source else DEFAULT_SIZE,
    )
    return await _start(sim, record, spec)


async def create_character(request: Request) -> Response:
    sim = _sim(request)
    body = await read_body(request)
    name = body.required("name")
    if "video" not in body.files:
        raise SimError(
            400, "missing_required_parameter", "Missing required file: 'video'.", param="video"
        )
    return JSONResponse(sim.jobs.add_character(name))


async def get_character(request: Request) -> Response:
    return JSONResponse(_sim(request).jobs.get_character(request.path_params["character_id"]))


async def download_content(request: Request) -> Response:
    sim = _sim(request)
    variant = request.query_params.get("variant", "video")
    if variant not in VARIANTS:
        raise SimError(
            400,
            "invalid_value",
            f"Invalid 'variant': {variant!r}; expected video, thumbnail or spritesheet.",
            param="variant",
        )
    job = sim.jobs.get(request.path_params["video_id"])
    now = sim.jobs.now()
    if job.status(now) != "completed":
        raise SimError(
            400, "video_not_completed", f"Video '{job.id}' is {job.status(now)}; no content yet."
        )
    if job.is_expired(now):
        raise SimError(400, "video_expired", f"Video '{job.id}' has expired.")
    content = sim.media.content(job.id, variant, sim.settings.content_bytes)
    return _content_response(
        content, VARIANTS[variant][1], request.headers.get("range"), sim.traffic
    )


def _content_response(
    content: Content, media_type: str, range_header: str | None, traffic: Traffic
) -> Response:
    length = content.length
    try:
        wanted = parse_range(range_header, length)
    except RangeNotSatisfiable:
        error = SimError(
            416,
            "range_not_satisfiable",
            f"Range {range_header!r} is outside the {length} bytes of the content.",
            param="range",
            headers={"content-range": f"bytes */{length}", "accept-ranges": "bytes"},
        )
        return error_response(error)
    headers = {"accept-ranges": "bytes"}
    status = 200
    if wanted is None:
        wanted = ByteRange(0, length)
    else:
        status = 206
        headers["content-range"] = wanted.content_range(length)
    headers["content-length"] = str(wanted.stop - wanted.start)
    return StreamingResponse(
        _stream(content.chunks(wanted.start, wanted.stop), traffic),
        status_code=status,
        media_type=media_type,
        headers=headers,
    )


async def _stream(chunks: Iterator[bytes], traffic: Traffic) -> AsyncIterator[bytes]:
    """Chunks are made one at a time as the client takes them: memory stays flat.

    Each is counted once handed to the server, so a test can tell how much of a body
    upstream sent before its reader went away. Making a chunk never waits, and the
    server drops what is sent after a disconnect without waiting either: the pause
    after each chunk lets Starlette's disconnect watcher run and end the stream.
    """
    for chunk in chunks:
        yield chunk
        traffic.content_bytes_sent += len(chunk)
        await asyncio.sleep(0)
