"""The /v1 handlers: parse, check, forward, record; each one thin.

Every slot-taking route follows the contract's order: the team is known (middleware),
then the body and ids are checked, then a remix/edit/extension source is checked
against the registry, then `_start_job` checks the job's size and seconds, waits for a
shared slot, and only then sends anything upstream. Whatever shows a job's end (a
retrieve, a delete, upstream forgetting it) frees its slot at once, without waiting
for the tracker.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from .answers import (
    ID_SYNTAX,
    client_reply,
    in_client_ids,
    json_object,
    queued_object,
    video_object,
)
from .auth import Team
from .body import RequestBody, read_body
from .budgets import Spend, result_seconds
from .costs import JobCosts
from .downloads import DownloadBudget
from .errors import (
    GatewayError,
    character_not_found,
    invalid_request,
    queue_full,
    team_queue_full,
    upstream_error,
    video_not_found,
    video_not_ready,
)
from .logs import note
from .matching import loads_object, wanted
from .metrics import GatewayMetrics
from .openapi import FILE, VIDEO_ID, obj, operation, text
from .params import check_job_params
from .parse import whole_number
from .quota import JobSlots, Started, Ticket, retry_after_s
from .registry import TERMINAL_STATUSES, VideoRecord, VideoRegistry
from .relay import Relay
from .scheduler import Scheduler, StoredRequest, mint_job_id
from .sources import (
    CHARACTER_SOURCE,
    NO_SOURCE,
    REMIX_BY_BODY_SOURCE,
    derived_source,
    refuse_other_sources,
    source_refusal,
)
from .store import StoreFailure
from .store_failures import StoreFailures
from .upstream import Reply, Upstream, UpstreamCalls, response_headers

log = logging.getLogger("gateway.videos")

# Request shapes for the OpenAPI document (the handlers below check them for real).
PROMPT = text(32_000)
CREATE = obj(["prompt"], prompt=PROMPT, model=text(), seconds=text(), size=text())
CREATE_FORM = obj(
    ["prompt"], prompt=PROMPT, model=text(), seconds=text(), size=text(), input_reference=FILE
)
REMIX = obj(["prompt"], prompt=PROMPT)
REMIX_BY_BODY = obj(["video_id", "prompt"], video_id=VIDEO_ID, prompt=PROMPT)
DERIVED = obj(["prompt", "video"], prompt=PROMPT, seconds=text(), video=obj(["id"], id=VIDEO_ID))
DERIVED_FORM = obj(["prompt"], prompt=PROMPT, seconds=text(), video=FILE, **{"video[id]": VIDEO_ID})
CHARACTER_FORM = obj(["name", "video"], name=text(), video=FILE)
LIST_QUERY = {
    "after": VIDEO_ID,
    # OpenAI's own schema allows 0: an empty page that still says whether videos exist.
    "limit": {"type": "integer", "minimum": 0, "maximum": 100},
    "order": {"enum": ["asc", "desc"]},
}

MAX_PROMPT_CHARS = 32_000
# A queued answer's `openai-poll-after-ms` (CONTRACT §8.2 caps it at 10 s).
MAX_POLL_AFTER_MS = 10_000
MIN_POLL_AFTER_MS = 250


@dataclass(frozen=True)
class QueueMode:
    """`quota.when_full: queue`: the scheduler, and what a queued answer needs."""

    scheduler: Scheduler
    max_body_bytes: int  # a larger request waits for a slot as in `wait` mode
    defaults: Mapping[str, str | None]  # `upstream.defaults`: what upstream assumes


@dataclass(frozen=True)
class _QueueCandidate:
    """A checked job-creating request, before the one decision: start or queue."""

    kind: str
    path: str
    body: RequestBody
    outgoing: RequestBody | bytes
    want: dict[str, str]
    source: VideoRecord | None
    spend: Spend


CONTENT_VARIANTS = ("video", "thumbnail", "spritesheet")
CONTENT_QUERY = {"variant": {"enum": list(CONTENT_VARIANTS)}}


class VideoRoutes:
    """Handlers for every /v1 route of the contract."""

    def __init__(
        self,
        *,
        registry: VideoRegistry,
        upstream: Upstream,
        slots: JobSlots,
        downloads: DownloadBudget,
        metrics: GatewayMetrics,
        failures: StoreFailures,
        max_body_bytes: int,
        body_timeout_s: float,
        client_idle_timeout_s: float,
        remix_route: str,
        costs: JobCosts,
        queue: QueueMode | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.registry = registry
        self.upstream = upstream
        self.slots = slots
        self.downloads = downloads
        self.metrics = metrics
        self.failures = failures
        self.max_body_bytes = max_body_bytes
        self.body_timeout_s = body_timeout_s
        self.client_idle_timeout_s = client_idle_timeout_s
        self.remix_route = remix_route
        self.costs = costs
        self.queue = queue  # None: `when_full: wait`
        self.clock = clock

    def routes(self) -> list[Route]:
        return [
            Route("/v1/videos", self.create, methods=["POST"]),
            Route("/v1/videos", self.list, methods=["GET"]),
            Route("/v1/videos/remix", self.remix_by_body, methods=["POST"]),
            Route("/v1/videos/edits", self.edit, methods=["POST"]),
            Route("/v1/videos/extensions", self.extend, methods=["POST"]),
            Route("/v1/videos/characters", self.create_character, methods=["POST"]),
            Route("/v1/videos/characters/{character_id}", self.get_character, methods=["GET"]),
            Route("/v1/videos/{video_id}", self.retrieve, methods=["GET"]),
            Route("/v1/videos/{video_id}", self.delete, methods=["DELETE"]),
            Route("/v1/videos/{video_id}/remix", self.remix, methods=["POST"]),
            Route("/v1/videos/{video_id}/content", self.content, methods=["GET"]),
        ]

    # -- slot-taking routes -------------------------------------------------------------

    @operation("Start a video job (takes a shared slot)", json_body=CREATE, form_body=CREATE_FORM)
    async def create(self, request: Request) -> Response:
        body = await self._body(request)
        try:
            _require_prompt(body)
            refuse_other_sources(body, NO_SOURCE)
            return await self._start_job(request, "create", "videos", body)
        finally:
            body.close()

    @operation("Remix one of your completed videos", json_body=REMIX, form_body=REMIX)
    async def remix(self, request: Request) -> Response:
        """`POST /v1/videos/{video_id}/remix`: the SDKs' form."""
        source = _path_id(request, "video_id")
        body = await self._body(request)
        try:
            _require_prompt(body)
            # Only the checked id in the path may name the source: a second one in the
            # body could reach an upstream that takes the source from the body.
            refuse_other_sources(body, NO_SOURCE)
            record = await self._check_source(request, source, "video_id")
            upstream_source = _upstream_id(record)
            if self.remix_route == "path":
                return await self._start_job(
                    request, "remix", f"videos/{upstream_source}/remix", body, source=record
                )
            return await self._start_job(
                request,
                "remix",
                "videos/remix",
                body,
                _with_field(body, "video_id", upstream_source),
                source=record,
            )
        finally:
            body.close()

    @operation("Remix, the reseller's form", json_body=REMIX_BY_BODY, form_body=REMIX_BY_BODY)
    async def remix_by_body(self, request: Request) -> Response:
        """`POST /v1/videos/remix` with `{"video_id", "prompt"}`: the reseller's form."""
        body = await self._body(request)
        try:
            source = _field_id(body.fields.get("video_id"), "video_id")
            _require_prompt(body)
            refuse_other_sources(body, REMIX_BY_BODY_SOURCE)
            record = await self._check_source(request, source, "video_id")
            upstream_source = _upstream_id(record)
            if self.remix_route == "body":
                rewritten = _naming_source(body, ("video_id",), upstream_source, source)
                return await self._start_job(
                    request, "remix", "videos/remix", body, rewritten, source=record
                )
            if body.files:
                raise invalid_request(
                    "File parts are not accepted here; use POST /v1/videos/{video_id}/remix.",
                    sorted(body.files)[0],
                )
            fields = {k: v for k, v in body.fields.items() if k != "video_id"}
            return await self._start_job(
                request,
                "remix",
                f"videos/{upstream_source}/remix",
                body,
                json.dumps(fields).encode(),
                source=record,
            )
        finally:
            body.close()

    @operation(
        "Edit a video (a file, or one of yours by id)", json_body=DERIVED, form_body=DERIVED_FORM
    )
    async def edit(self, request: Request) -> Response:
        return await self._derived_job(request, "edit", "videos/edits")

    @operation(
        "Extend a video (a file, or one of yours by id)", json_body=DERIVED, form_body=DERIVED_FORM
    )
    async def extend(self, request: Request) -> Response:
        return await self._derived_job(request, "extension", "videos/extensions")

    async def _derived_job(self, request: Request, kind: str, path: str) -> Response:
        """Edits and extensions: `video` is an uploaded file or `{"id"}` of a source video."""
        body = await self._body(request)
        try:
            _require_prompt(body)
            reference = derived_source(body)
            record = None
            rewritten = None
            if reference is not None:
                source = _field_id(reference, "video.id")
                record = await self._check_source(request, source, "video.id")
                rewritten = _naming_source(body, ("video", "id"), _upstream_id(record), source)
            return await self._start_job(request, kind, path, body, rewritten, source=record)
        finally:
            body.close()

    async def _start_job(
        self,
        request: Request,
        kind: str,
        path: str,
        body: RequestBody,
        rewritten: RequestBody | bytes | None = None,
        *,
        source: VideoRecord | None = None,
    ) -> Response:
        """Take a shared slot, send the job-creating request upstream, record the job;
        or, with `when_full: queue` and no slot for it now, queue it (CONTRACT §8).

        `rewritten` is what to send instead of the client's own bytes, when the remix
        form has to be translated for upstream. `source` is the checked source video's
        record, whose fields the job inherits (so a lost answer's job can be recognised).
        What the create's outcome does to the slot is `quota.fate_of`'s to say.
        """
        check_job_params(body.fields)  # the syntax, then what the team may ask and spend
        team = _team(request)
        spend = self.costs.spend(team, kind, body.fields, source.body if source else None)
        origin = (source.upstream_id, source.body) if source else (None, "{}")
        want = wanted(kind, body.fields, *origin)
        calls = self.upstream.for_request(request)
        outgoing = body if rewritten is None else rewritten
        ids = source.source_ids() if source else {}
        size = len(outgoing) if isinstance(outgoing, bytes) else outgoing.size
        if self.queue is not None and size <= self.queue.max_body_bytes:
            job = _QueueCandidate(kind, path, body, outgoing, want, source, spend)
            return await self._start_or_queue(request, calls, job)
        hold = self.slots.hold(team, kind, want, request.is_disconnected, ids, spend)
        async with hold as ticket:
            started = await ticket.forward(_send(calls, path, outgoing))
            return await self._record_started(team, kind, started, ids)

    async def _start_or_queue(
        self, request: Request, calls: UpstreamCalls, job: _QueueCandidate
    ) -> Response:
        """Start the job now if the fair-share order gives it a free slot, else store
        it and answer `queued` at once (CONTRACT §8.2)."""
        assert self.queue is not None
        team = _team(request)
        content, content_type = await _whole(job.outgoing)
        job_id = mint_job_id()
        video = queued_object(
            job_id,
            kind=job.kind,
            fields=job.body.fields,
            inherited=loads_object(job.source.body) if job.source else {},
            defaults=self.queue.defaults,
            source=job.source.id if job.source else None,
            created_at=int(self.clock()),
        )
        stored = StoredRequest(
            job.path,
            content_type,
            calls.forwarded,
            content,
            job.source.id if job.source else "",
            calls.request_id or "",
        )
        enqueue = partial(
            self.queue.scheduler.enqueue,
            job_id,
            team=team.name,
            kind=job.kind,
            want=job.want,
            request=stored,
            video=video,
            typical_job_s=self.slots.typical_job_s,
            charge=job.spend.charge,
            limits=job.spend.limits,
        )
        ids = job.source.source_ids() if job.source else {}
        async with self.slots.start_or_queue(team, job.kind, enqueue, ids) as decision:
            if isinstance(decision, Ticket):
                send = calls.call("POST", job.path, content=content, content_type=content_type)
                started = await decision.forward(send)
                return await self._record_started(team, job.kind, started, ids)
        if decision.outcome == "queued":
            note(video_id=job_id, queued=True)
            headers = self._queue_headers(decision.position)
            return Response(json.dumps(video), media_type="application/json", headers=headers)
        if decision.over is not None:
            self.metrics.policy_rejected(team.name, "budget_exceeded")
            raise job.spend.refusal(team.name, decision.over)
        self.metrics.queue_rejected(team.name, decision.outcome)
        # Room comes back when a queued job starts: about one round of the slots away,
        # not a whole queue's worth (that would tell clients to wait hours).
        retry_s = retry_after_s(0, self.slots.ledger.limit, self.slots.typical_job_s)
        if decision.outcome == "team_queue_full":
            raise team_queue_full(retry_s)
        raise queue_full(retry_s)

    async def _record_started(
        self, team: Team, kind: str, started: Started, ids: dict[str, str]
    ) -> Response:
        """Record a job upstream started at once, and answer with upstream's object (in
        the client's ids: a source that started from the queue keeps its gateway id)."""
        reply = client_reply(started.reply, started.video, ids)
        seen = in_client_ids(started.video, ids)
        try:
            await self.registry.record(team.name, kind, seen, reply.body, ids=ids or None)
        except StoreFailure as exc:
            raise self.slots.not_recorded(exc, started.video["id"]) from None
        return _passthrough(reply)

    def _queue_headers(self, position: int | None) -> dict[str, str]:
        """`x-queue-position` (1 = next to start) and when to ask again: about half the
        expected wait, from the jobs seen to end lately, at most 10 s (CONTRACT §8.2)."""
        if position is None:
            return {}
        wait_s = position * self.slots.typical_job_s / max(1, self.slots.ledger.limit)
        poll_ms = min(MAX_POLL_AFTER_MS, max(MIN_POLL_AFTER_MS, int(wait_s * 500)))
        return {"x-queue-position": str(position), "openai-poll-after-ms": str(poll_ms)}

    # -- reads and deletes --------------------------------------------------------------

    @operation("One of your videos, as upstream sees it now")
    async def retrieve(self, request: Request) -> Response:
        video_id = _path_id(request, "video_id")
        record = await self._owned(request, video_id)
        if record.upstream_id is None:
            # Queued (upstream does not know it yet), or failed before it started: the
            # gateway's own record is the whole truth, and upstream is not asked.
            position = None
            if self.queue is not None:
                position = await self.queue.scheduler.position(video_id, self.slots.typical_job_s)
            headers = self._queue_headers(position) if record.queued else {}
            return Response(record.body, media_type="application/json", headers=headers)
        refreshed = await self._refresh(self.upstream.for_request(request), record)
        if refreshed is None:
            raise video_not_found()
        return _passthrough(refreshed[0])

    @operation("Delete one of your videos (frees its slot if it runs)")
    async def delete(self, request: Request) -> Response:
        video_id = _path_id(request, "video_id")
        record = await self._owned(request, video_id)
        if record.upstream_id is None:
            started = await self._delete_unstarted(record)
            if started is None:
                deleted = {"id": video_id, "object": "video.deleted", "deleted": True}
                return Response(json.dumps(deleted), media_type="application/json")
            record = started  # it started meanwhile: delete it upstream, below
        assert record.upstream_id is not None
        upstream_id = record.upstream_id
        reply = await self.upstream.for_request(request).call("DELETE", f"videos/{upstream_id}")
        if reply.status == 404:
            await self._gone(record)
            raise video_not_found()
        reply.raise_for_status()
        await self.registry.forget(video_id, record.team)
        await self.slots.finish(video_id=upstream_id, outcome="deleted")
        return _passthrough(_in_client_ids(reply, record))

    async def _delete_unstarted(self, record: VideoRecord) -> VideoRecord | None:
        """Delete a job upstream has not started: it leaves the queue and never reaches
        upstream (or, caught while being started, is deleted upstream by its starter:
        CONTRACT §8.5). None when done; the record as it now stands when the job started
        in the meantime (the caller deletes it upstream)."""
        cancelled = 0
        if self.queue is not None and not record.terminal:
            cancelled = await self.queue.scheduler.cancel(record.id, record.team)
            if cancelled == 0:
                fresh = await self.registry.owned(record.team, record.id)
                if fresh is not None and fresh.upstream_id is not None:
                    return fresh
        await self.registry.forget(record.id, record.team)
        if cancelled == 1:  # (one being started is counted when it is deleted upstream)
            self.metrics.job_ended(record.team, record.kind, "deleted", 0.0)
        return None

    @operation(
        "Download a video, its thumbnail or spritesheet",
        query=CONTENT_QUERY,
        answer="application/octet-stream",
    )
    async def content(self, request: Request) -> Response:
        video_id = _path_id(request, "video_id")
        variant = request.query_params.get("variant", "video")
        if variant not in CONTENT_VARIANTS:
            raise invalid_request(
                f"variant must be one of {', '.join(CONTENT_VARIANTS)}.", "variant"
            )
        record = await self._owned(request, video_id)
        if record.upstream_id is None:
            raise video_not_ready(video_id, record.status)
        claim = self.downloads.claim(_team(request).name)
        try:
            download = await self.upstream.for_request(request).open(
                "GET",
                f"videos/{record.upstream_id}/content",
                params={"variant": variant},
                pass_encoding=True,
                pool="download",
            )
        except BaseException:
            claim.release()
            raise
        if download.status >= 300:
            try:
                body = await download.read()
            finally:
                download.close()
                claim.release()
            Reply(download.status, download.headers, body, self.upstream.scrub).raise_for_status()
        headers = response_headers(download.headers, streaming=True)
        if request.method == "HEAD":
            # Upstream's head is the whole answer. The server drops a HEAD answer's body
            # unsent, so relaying it would pull the whole file from upstream into nowhere.
            download.close()
            claim.release()
            return Response(status_code=download.status, headers=headers)
        return Relay(
            download,
            headers=headers,
            send_timeout_s=self.client_idle_timeout_s,
            on_close=claim.release,
        )

    @operation("Your team's videos, newest first", query=LIST_QUERY)
    async def list(self, request: Request) -> Response:
        query = request.query_params
        limit = whole_number(query.get("limit", "20"))
        if limit is None or not 0 <= limit <= 100:
            raise invalid_request("limit must be a whole number from 0 to 100.", "limit")
        order = query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid_request("order must be 'asc' or 'desc'.", "order")
        after = query.get("after") or None
        if after is not None and not ID_SYNTAX.fullmatch(after):
            raise invalid_request("'after' is not a valid video id.", "after")
        page = await self.registry.page(
            _team(request).name, after=after, limit=limit, descending=order == "desc"
        )
        if page is None:
            raise invalid_request("'after' is not the id of one of your videos.", "after")
        return Response(page.render(), media_type="application/json")

    # -- characters ---------------------------------------------------------------------

    @operation("Create a character from a video", form_body=CHARACTER_FORM)
    async def create_character(self, request: Request) -> Response:
        body = await self._body(request)
        try:
            if not isinstance(body.fields.get("name"), str) or not body.fields["name"].strip():
                raise invalid_request("name is required.", "name")
            if "video" not in body.files:
                raise invalid_request("video is required, as a file.", "video")
            # The uploaded file is the only video a character is made from: no other
            # part may name one that an upstream might read instead.
            refuse_other_sources(body, CHARACTER_SOURCE)
            # Fail closed: a character made while its owner cannot be recorded would
            # exist upstream for nobody.
            await self.registry.ping()
            reply = await _send(self.upstream.for_request(request), "videos/characters", body)
        finally:
            body.close()
        character = json_object(reply.raise_for_status())
        character_id = character.get("id")
        if not isinstance(character_id, str) or not ID_SYNTAX.fullmatch(character_id):
            raise upstream_error("Upstream answered without a character id.")
        try:
            await self.registry.record_character(_team(request).name, character_id)
        except StoreFailure as exc:
            log.error("could not record a created character", extra={"character": character_id})
            raise self.failures.error(
                exc,
                "recording a created character",
                message=f"Character {character_id} was created but not recorded; do not retry it.",
                no_retry=True,
            ) from None
        return _passthrough(reply)

    @operation("One of your characters")
    async def get_character(self, request: Request) -> Response:
        character_id = _path_id(request, "character_id")
        if await self.registry.character_owner(character_id) != _team(request).name:
            raise character_not_found()
        calls = self.upstream.for_request(request)
        reply = await calls.call("GET", f"videos/characters/{character_id}")
        return _passthrough(reply.raise_for_status())

    # -- shared steps -------------------------------------------------------------------

    async def _body(self, request: Request) -> RequestBody:
        return await read_body(request, self.max_body_bytes, self.body_timeout_s)

    async def _owned(self, request: Request, video_id: str) -> VideoRecord:
        record = await self.registry.owned(_team(request).name, video_id)
        if record is None:
            raise video_not_found()
        return record

    async def _refresh(
        self, calls: UpstreamCalls, record: VideoRecord
    ) -> tuple[Reply, VideoRecord] | None:
        """Ask upstream for a video's state and store it; None when upstream forgot it.

        Returns upstream's answer and the record as it now stands.

        The store is written only when something changed, and the slot is released only
        when this answer is the first to show the end: a retrieve of a finished video
        costs one store read.
        """
        upstream_id = record.upstream_id
        if upstream_id is None:
            return None  # not started: nothing upstream to ask (callers check first)
        reply = await calls.call("GET", f"videos/{upstream_id}")
        if reply.status == 404:
            await self._gone(record)
            return None
        reply.raise_for_status()
        if not record.ids and reply.body == record.body.encode():
            return reply, record
        upstream_video = video_object(reply, asked=upstream_id)
        reply = client_reply(reply, upstream_video, record.ids)
        video = in_client_ids(upstream_video, record.ids)
        if reply.body == record.body.encode():
            return reply, record
        await self.registry.update(record.id, video, reply.body)
        if video.get("status") in TERMINAL_STATUSES and not record.terminal:
            await self.slots.finish(
                video_id=upstream_id, outcome=str(video["status"]), seconds=result_seconds(video)
            )
        return reply, record.seen(video, reply.body)

    async def _gone(self, record: VideoRecord) -> None:
        """Upstream no longer knows the video: forget it, and free its slot if it held one."""
        await self.registry.forget(record.id, record.team)
        await self.slots.finish(video_id=record.upstream_id or record.id, outcome="vanished")

    async def _check_source(self, request: Request, video_id: str, param: str) -> VideoRecord:
        """Refuse a remix/edit/extension source before anything is spent on it; the
        accepted source's record."""
        record = await self.registry.owned(_team(request).name, video_id)
        if record is not None and not record.terminal and not record.queued:
            refreshed = await self._refresh(self.upstream.for_request(request), record)
            record = None if refreshed is None else refreshed[1]
        refusal = source_refusal(record, param, now=self.clock())
        if refusal is not None:
            self.metrics.source_refused(str(refusal.code))
            raise refusal
        assert record is not None  # a missing record is refused above
        return record


# -- request parsing ------------------------------------------------------------------------


def _team(request: Request) -> Team:
    return request.state.team


def _request_id(request: Request) -> str:
    return request.state.request_id


def _path_id(request: Request, name: str) -> str:
    value = request.path_params[name]
    if not ID_SYNTAX.fullmatch(value):
        raise invalid_request(f"{name} is not a valid id.", name)
    if name == "video_id":
        note(video_id=value)
    return value


def _field_id(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise invalid_request(f"{param} is required.", param)
    if not ID_SYNTAX.fullmatch(value):
        raise invalid_request(f"{param} is not a valid video id.", param)
    return value


def _require_prompt(body: RequestBody) -> None:
    prompt = body.fields.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise invalid_request("prompt is required.", "prompt")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise invalid_request(f"prompt is longer than {MAX_PROMPT_CHARS} characters.", "prompt")


def _upstream_id(record: VideoRecord) -> str:
    """Upstream's id of a checked source (a completed video has one)."""
    assert record.upstream_id is not None  # only a completed record passes the check
    return record.upstream_id


def _naming_source(
    body: RequestBody, field: tuple[str, ...], upstream_id: str, client_id: str
) -> bytes | None:
    """The JSON body with its source field naming upstream's id, when the client named
    the source by a gateway id (a video that started from the queue); None when the
    client's own bytes already name upstream's id. Upstream never sees a gateway id."""
    if upstream_id == client_id:
        return None
    if body.is_multipart:
        raise invalid_request(
            "This video started from the gateway's queue; name it in a JSON body.",
            ".".join(field),
        )
    fields = copy.deepcopy(body.fields)
    holder = fields
    for name in field[:-1]:
        holder = holder[name]
    holder[field[-1]] = upstream_id
    return json.dumps(fields).encode()


def _with_field(body: RequestBody, name: str, value: str) -> bytes | RequestBody:
    """The body with one more field, for upstreams that take the remix source in the body."""
    if not body.is_multipart:
        return json.dumps({**body.fields, name: value}).encode()
    return _PrefixedBody(body, _form_part(body.boundary, name, value))


def _form_part(boundary: bytes, name: str, value: str) -> bytes:
    return (
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="' + name.encode() + b'"\r\n\r\n'
        + value.encode() + b"\r\n"
    )  # fmt: skip


class _PrefixedBody(RequestBody):
    """A multipart body replayed with one extra part in front."""

    def __init__(self, body: RequestBody, prefix: bytes) -> None:
        super().__init__(body.content_type, body.size + len(prefix), body.fields, body.files)
        self._inner = body
        self._prefix = prefix

    async def raw(self) -> AsyncIterator[bytes]:
        yield self._prefix
        async for chunk in self._inner.raw():
            yield chunk


# -- upstream calls and answers -------------------------------------------------------------


async def _send(calls: UpstreamCalls, path: str, outgoing: RequestBody | bytes) -> Reply:
    """POST a body upstream: the client's own bytes replayed, or a translated JSON body."""
    if isinstance(outgoing, bytes):
        return await calls.call("POST", path, content=outgoing, content_type="application/json")
    return await calls.call(
        "POST",
        path,
        content=outgoing.raw(),
        content_type=outgoing.content_type,
        content_length=outgoing.size,
    )


async def _whole(outgoing: RequestBody | bytes) -> tuple[bytes, str]:
    """The bytes to send and their content type, read whole: a queued job's request is
    stored (it is at most `quota.max_queued_body_bytes`)."""
    if isinstance(outgoing, bytes):
        return outgoing, "application/json"
    chunks = [chunk async for chunk in outgoing.raw()]
    return b"".join(chunks), outgoing.content_type


def _in_client_ids(reply: Reply, record: VideoRecord) -> Reply:
    """An answer about `record`'s job as its client knows it (see `answers.in_client_ids`)."""
    if not record.ids:
        return reply
    try:
        video = json_object(reply)
    except GatewayError:
        return reply
    return client_reply(reply, video, record.ids)


def _passthrough(reply: Reply) -> Response:
    """Upstream's own bytes, unchanged, with only the headers a client may see."""
    return Response(reply.body, status_code=reply.status, headers=response_headers(reply.headers))
