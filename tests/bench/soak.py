"""Soak: many clients on every route for minutes; nothing leaks, nothing is lost.

    PYTHONPATH=tests python -m bench.soak [--seconds 180] [--clients 200]

Starts its own store, simulator (1-second jobs, the account's limit of 2) and two gateway
replicas (`quota.max_in_flight` 2 to match, `quota.wait_s` 1 s: most creates are answered
429 after a short wait), with three teams, one of them capped at one job. Then
`--clients` asyncio clients mix every route and team for `--seconds`, each request sent
to a random replica. The clients run in one process, loopback only, sharing pooled httpx
clients (one pool per 20 clients), and every request has a client-side timeout. They
send creates (JSON, multipart, with an `input_reference` file), retrieves, lists with
pagination, downloads (every variant, Range sometimes), remixes (both forms), edits and
extensions (by id as JSON or multipart, or with a file), deletes (some while the job
runs), characters, and bad requests: a wrong or missing key, bad ids, another team's
video or character, unknown ids, a failed source, malformed bodies, unknown routes.
Every answer is checked against the status (and error code) its request must get.

Checks (the exit status is 1 if any enforced one fails):

- no answer >= 500 from the gateway, as the clients saw it and as its own
  `requests_total` counted it; no client timeout or transport error; every answer
  as expected, with its `x-request-id`;
- the upstream's limit never hit, `slots_in_use` never above the limit while sampled,
  and back to 0 (queue empty) on every replica within `--drain-s` of the load's end;
- every video a 200 created is in its team's `GET /v1/videos` unless deleted, and no
  list ever showed another team's video; every job upstream still has (listed with
  the token) is known to the gateway, and the simulator created exactly the jobs the
  clients were answered 200 for; `jobs_total` counted each of them once;
- characters private and still there; only the upstream token ever reached upstream;
  no error line in the gateway logs;
- per replica (psutil on the gateway pid), between the load's first and last window
  (a minute each on a long run), no growth of:
  - open file descriptors, both with and without the clients' own connections to the
    gateway's port (those follow the clients' pools, not the gateway);
  - RSS;
  - threads;
  - asyncio tasks.

  There is no endpoint for the task count. A `sitecustomize` probe, put on the gateways'
  PYTHONPATH by this run only, counts `asyncio.all_tasks()` on the gateway's loop every
  0.5 s and times how long that callback waited (the loop's lag). After the load, the
  count must fall back to its idle level from before the load.

The table also shows, per operation, the gateway's own time for the requests (its
access log's `duration_ms`, matched by `x-request-id`) next to the clients' time, the
CPU of every process, and the load generator's loop lag: on a small machine the client
time is mostly queueing in the load generator and on the cores, not the gateway.

The figures go to tests/bench/results/soak.json. `run_soak(SoakConfig(...))` is the same
run as a function: tests/e2e/test_soak.py runs a short one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import secrets
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from gateway.simulator import fingerprint
from support.api import multipart

ROOT = Path(__file__).resolve().parents[2]

RESULTS = ROOT / "tests" / "bench" / "results" / "soak.json"
TEAMS = ("red", "green", "blue")
CAPPED_TEAM = "blue"  # teams[].max_in_flight 1: its creates may get the team's own 429
LIMIT = 2  # the simulator's --max-running and quota.max_in_flight, always together
TERMINAL = frozenset({"completed", "failed", "cancelled"})
SLOT_KINDS = ("create", "remix", "edit", "extension")
CLIENTS_PER_POOL = 20  # clients sharing one httpx connection pool
MAX_LIST_PAGES = 4  # a client's list walks at most this many pages
MAX_FINAL_PAGES = 10_000  # the final walk of a team's whole list
FAILURE_SAMPLES = 25  # descriptions kept per failure kind
REF_IMAGE = bytes(range(256)) * 8  # an `input_reference` file part, 2 KiB
VIDEO_FILE = b"\x00\x00\x00\x18ftypmp42" + bytes(4096)  # a `video` file part, ~4 KiB
RANGES = (("bytes=0-99", 100), ("bytes=-64", 64), ("bytes=16-1039", 1024))

# The probe a gateway loads at startup (its own PYTHONPATH only): the asyncio task count
# of its running loop, counted on the loop itself, written to a file every 0.5 s.
TASK_PROBE = '''\
"""Soak probe (tests/bench/soak.py): this process's asyncio task count, to a file."""
import asyncio
import gc
import json
import os
import threading
import time

_OUT = os.environ.get("SOAK_TASK_PROBE")


def _running_loop():
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.AbstractEventLoop) and obj.is_running():
            return obj
    return None


def _watch():
    path = f"{_OUT}.{os.getpid()}"
    loop = None
    box = []

    def count(asked):
        box.append((len(asyncio.all_tasks()), time.time(), time.monotonic() - asked))

    for _ in range(200_000):  # bounded: more than a day at 0.5 s
        time.sleep(0.5)
        if loop is None or loop.is_closed():
            loop = _running_loop()
            if loop is None:
                continue
        try:
            loop.call_soon_threadsafe(count, time.monotonic())
        except RuntimeError:
            loop = None
            continue
        time.sleep(0.05)  # the loop runs `count` soon; a busy one, a little later
        if box:
            tasks, at, lag = box[-1]
            box.clear()
            with open(path + ".tmp", "w") as out:
                json.dump({"tasks": tasks, "at": at, "lag_ms": round(lag * 1000, 1)}, out)
            os.replace(path + ".tmp", path)


if _OUT:
    threading.Thread(target=_watch, name="soak-task-probe", daemon=True).start()
'''


@dataclass
class SoakConfig:
    seconds: float = 180.0
    clients: int = 200
    replicas: int = 2
    think_s: float = 1.0  # mean pause between two requests of one client
    wait_s: float = 1.0  # quota.wait_s
    queue_s: float = 0.2  # simulator: a job is queued this long, then
    run_s: float = 0.8  # runs this long
    poll_s: float = 0.25  # tracker.poll_interval_s
    lease_s: float = 3.0  # tracker.lease_s
    request_timeout_s: float = 30.0  # every client request
    drain_s: float = 30.0  # slots must be back to 0 this long after the load
    sample_s: float = 1.0  # resource sampling period
    window_s: float = 60.0  # the "first" and "last" windows compared (at most)
    idle_s: float = 3.0  # idle sampling before the load and after the drain
    settle_s: float = 2.0  # between the drain and the idle sampling after it
    fd_margin: int = 24  # allowed growth: this many fds, or fd_margin_share, whichever is more
    fd_margin_share: float = 0.2
    rss_margin_mib: float = 8.0  # likewise for RSS
    rss_margin_share: float = 0.1
    task_margin: int = 24  # likewise for tasks under load (tasks track in-flight requests)
    task_margin_share: float = 0.5
    idle_task_margin: int = 2  # tasks after the load, over their idle level before it
    enforce_rss: bool = True
    enforce_all_fds: bool = True  # fds with the clients' connections, which the clients drive
    enforce_task_growth: bool = True  # tasks under load follow the requests in flight
    probe_tasks: bool = True
    seed: int = 1


# -- what the clients know -----------------------------------------------------------------


@dataclass
class Book:
    """The clients' own record of what they did: the truth the final checks compare with."""

    created: dict[str, dict[str, str]] = field(default_factory=lambda: defaultdict(dict))
    kept: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    completed: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    failed: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    characters: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    seen_in_lists: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    status: dict[str, str] = field(default_factory=dict)
    deleted: set[str] = field(default_factory=set)
    refused_after: set[str] = field(default_factory=set)  # `after` ids a list page refused
    job_answers: int = 0  # 200s of job-creating requests

    def owner(self, video_id: str) -> str | None:
        for team, videos in self.created.items():
            if video_id in videos:
                return team
        return None

    def all_created(self) -> dict[str, str]:
        return {vid: team for team, videos in self.created.items() for vid in videos}


@dataclass
class Stats:
    counts: Counter[tuple[str, str]] = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    failures: Counter[str] = field(default_factory=Counter)
    samples: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    server_errors: int = 0
    request_ids: list[tuple[str, str]] = field(default_factory=list)  # (op, x-request-id)
    loop_lag: list[float] = field(default_factory=list)  # the load generator's, seconds

    def fail(self, kind: str, detail: str) -> None:
        self.failures[kind] += 1
        if len(self.samples[kind]) < FAILURE_SAMPLES:
            self.samples[kind].append(detail)


Expect = dict[int, set[str] | None]  # status -> allowed error codes (None: any body)


def error_code(reply: httpx.Response) -> str | None:
    try:
        body = reply.json()
    except ValueError:
        return "<not json>"
    error = body.get("error") if isinstance(body, dict) else None
    return error.get("code") if isinstance(error, dict) else "<no envelope>"


# -- one client ----------------------------------------------------------------------------


class Client:
    """One simulated user of one team: picks an operation, checks its answer, pauses."""

    def __init__(
        self,
        n: int,
        http: httpx.AsyncClient,
        gateways: list[str],
        keys: dict[str, str],
        book: Book,
        stats: Stats,
        config: SoakConfig,
    ) -> None:
        self.n = n
        self.http = http
        self.gateways = gateways
        self.team = TEAMS[n % len(TEAMS)]
        self.key = keys[self.team]
        self.others = [t for t in TEAMS if t != self.team]
        self.book = book
        self.stats = stats
        self.config = config
        self.rng = random.Random(config.seed * 100_003 + n)
        self.own: list[str] = []  # this client's disposable videos: it deletes them
        self.jobs = 0
        self.job_expect: Expect = {
            200: None,
            429: {"concurrency_limit_exceeded"}
            | ({"team_concurrency_limit_exceeded"} if self.team == CAPPED_TEAM else set()),
        }
        ops: list[tuple[Callable[[], Any], int]] = [
            (self.create_json, 8),
            (self.create_multipart, 4),
            (self.remix_path, 3),
            (self.remix_body, 2),
            (self.edit, 2),
            (self.extension, 2),
            (self.retrieve, 18),
            (self.list, 8),
            (self.content, 10),
            (self.delete, 4),
            (self.character_create, 2),
            (self.character_get, 3),
            (self.character_other, 1),
            (self.bad_key, 5),
            (self.bad_id, 5),
            (self.other_team, 6),
            (self.unknown_id, 3),
            (self.failed_source, 2),
            (self.bad_body, 4),
            (self.bad_route, 3),
            (self.operational, 3),
        ]
        self.ops = [op for op, _ in ops]
        self.weights = [weight for _, weight in ops]

    async def run(self, end: float) -> None:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(self.rng.uniform(0, self.config.think_s))
        while loop.time() < end:
            if self.own and self.rng.random() < 0.2:
                await self.delete()  # its own videos go, some while their job runs
            else:
                await self.rng.choices(self.ops, self.weights)[0]()
            pause = self.rng.uniform(0, 2 * self.config.think_s)
            await asyncio.sleep(max(0.0, min(pause, end - loop.time())))

    # -- the request, and the check of its answer

    async def call(
        self,
        op: str,
        method: str,
        path: str,
        expect: Expect,
        *,
        key: str | None = "",
        **kwargs: Any,
    ) -> httpx.Response | None:
        """Send one request to a random replica and check its answer against `expect`.

        `key` "" is this client's team key, None sends no key at all.
        """
        headers: dict[str, str] = dict(kwargs.pop("headers", {}))
        key = self.key if key == "" else key
        if key is not None:
            if self.rng.random() < 0.1:
                headers["api-key"] = key
            else:
                headers["authorization"] = f"Bearer {key}"
        request_id = None
        if self.rng.random() < 0.3:
            request_id = f"soak-{self.n}-{secrets.token_hex(6)}"
            headers["x-request-id"] = request_id
        url = self.rng.choice(self.gateways) + path
        where = f"{op}: {method} {path}"
        started = time.perf_counter()
        try:
            reply = await self.http.request(method, url, headers=headers, **kwargs)
        except httpx.TimeoutException as exc:
            self.stats.counts[op, "timeout"] += 1
            self.stats.fail("client timeout", f"{where}: {type(exc).__name__}")
            return None
        except httpx.HTTPError as exc:
            self.stats.counts[op, "transport error"] += 1
            self.stats.fail("transport error", f"{where}: {exc!r}")
            return None
        self.stats.latencies[op].append(time.perf_counter() - started)
        status = reply.status_code
        self.stats.counts[op, str(status)] += 1
        if status >= 500:
            self.stats.server_errors += 1
            self.stats.fail("gateway 5xx", f"{where} -> {status} {reply.text[:300]}")
        elif status not in expect:
            self.stats.fail("unexpected status", f"{where} -> {status} {reply.text[:300]}")
        elif expect[status] is not None and error_code(reply) not in expect[status]:
            self.stats.fail("unexpected code", f"{where} -> {status} {reply.text[:300]}")
        echoed = reply.headers.get("x-request-id")
        if not echoed or (request_id is not None and echoed != request_id):
            self.stats.fail("x-request-id", f"{where}: sent {request_id!r}, got {echoed!r}")
        elif echoed:
            self.stats.request_ids.append((op, echoed))
        return reply

    # -- picking targets

    def prompt(self, what: str) -> str:
        self.jobs += 1
        fail = " #fail" if self.rng.random() < 0.05 else ""
        return f"soak {what} by {self.team} client {self.n} #{self.jobs}{fail}"

    def pick(self, pool: list[str]) -> str | None:
        return self.rng.choice(pool) if pool else None

    def completed_source(self) -> str | None:
        return self.pick(self.book.completed[self.team])

    def started(self, reply: httpx.Response | None, kind: str) -> None:
        """A job-creating request was answered: record the job it started, if any."""
        if reply is None or reply.status_code != 200:
            return
        video = reply.json()
        video_id = video.get("id")
        if not isinstance(video_id, str):
            self.stats.fail("bad answer", f"{kind}: no id in {reply.text[:200]}")
            return
        if self.book.owner(video_id) is not None:
            self.stats.fail("duplicate id", f"{kind}: {video_id} was answered twice")
        self.book.job_answers += 1
        self.book.created[self.team][video_id] = kind
        self.book.status[video_id] = str(video.get("status"))
        if self.rng.random() < 0.3:
            self.own.append(video_id)  # deleted later by this client, maybe while it runs
        else:
            self.book.kept[self.team].append(video_id)

    def learn(self, video_id: str, status: str) -> None:
        """A retrieve showed a video's status; kept videos become sources once ended."""
        if self.book.status.get(video_id) == status:
            return
        self.book.status[video_id] = status
        if video_id in self.own:
            return  # this client deletes it: never a source for the others
        if status == "completed":
            self.book.completed[self.team].append(video_id)
        elif status == "failed":
            self.book.failed[self.team].append(video_id)

    # -- job-creating requests: 200, or 429 after quota.wait_s

    async def create_json(self) -> None:
        body: dict[str, Any] = {"prompt": self.prompt("create")}
        if self.rng.random() < 0.5:
            body["seconds"] = self.rng.choice(["4", "8"])
        reply = await self.call("create.json", "POST", "/v1/videos", self.job_expect, json=body)
        self.started(reply, "create")

    async def create_multipart(self) -> None:
        files = None
        if self.rng.random() < 0.5:
            files = {"input_reference": ("ref.png", REF_IMAGE, "image/png")}
        form = multipart({"prompt": self.prompt("multipart create")}, files)
        reply = await self.call("create.multipart", "POST", "/v1/videos", self.job_expect, **form)
        self.started(reply, "create")

    async def remix_path(self) -> None:
        source = self.completed_source()
        if source is None:
            return await self.list()
        prompt = self.prompt("remix")
        path = f"/v1/videos/{source}/remix"
        if self.rng.random() < 0.3:
            reply = await self.call(
                "remix.path", "POST", path, self.job_expect, **multipart({"prompt": prompt})
            )
        else:
            reply = await self.call(
                "remix.path", "POST", path, self.job_expect, json={"prompt": prompt}
            )
        self.started(reply, "remix")

    async def remix_body(self) -> None:
        source = self.completed_source()
        if source is None:
            return await self.list()
        body = {"video_id": source, "prompt": self.prompt("remix by body")}
        reply = await self.call(
            "remix.body", "POST", "/v1/videos/remix", self.job_expect, json=body
        )
        self.started(reply, "remix")

    async def _derived(self, op: str, path: str, kind: str) -> None:
        prompt = self.prompt(kind)
        roll = self.rng.random()
        if roll < 0.15:  # an uploaded video, no source to check
            form = multipart({"prompt": prompt}, {"video": ("in.mp4", VIDEO_FILE, "video/mp4")})
            reply = await self.call(f"{op}.file", "POST", path, self.job_expect, **form)
            return self.started(reply, kind)
        source = self.completed_source()
        if source is None:
            return await self.list()
        if roll < 0.5:
            form = multipart({"prompt": prompt, "video[id]": source})
            reply = await self.call(f"{op}.id", "POST", path, self.job_expect, **form)
        else:
            body = {"prompt": prompt, "video": {"id": source}}
            reply = await self.call(f"{op}.id", "POST", path, self.job_expect, json=body)
        self.started(reply, kind)

    async def edit(self) -> None:
        await self._derived("edit", "/v1/videos/edits", "edit")

    async def extension(self) -> None:
        await self._derived("extension", "/v1/videos/extensions", "extension")

    # -- reads and deletes of the team's own videos

    async def retrieve(self) -> None:
        video_id = self.pick(self.book.kept[self.team] + self.own)
        if video_id is None:
            return await self.list()
        reply = await self.call("retrieve", "GET", f"/v1/videos/{video_id}", {200: None})
        if reply is None or reply.status_code != 200:
            return
        video = reply.json()
        if video.get("id") != video_id:
            self.stats.fail("wrong video", f"retrieve {video_id} answered {reply.text[:200]}")
            return
        self.learn(video_id, str(video.get("status")))

    async def list(self) -> None:
        limit = self.rng.randint(1, 50)
        order = self.rng.choice(["desc", "asc"])
        seen: set[str] = set()
        after: str | None = None
        for page in range(MAX_LIST_PAGES):
            params: dict[str, Any] = {"limit": limit, "order": order}
            if after is not None:
                params["after"] = after
            # A later page's `after` may be a video another client deleted meanwhile:
            # then 400 is the contract's answer (checked at the end: it was deleted).
            expect: Expect = {200: None} if page == 0 else {200: None, 400: {"invalid_request"}}
            reply = await self.call("list", "GET", "/v1/videos", expect, params=params)
            if reply is None or reply.status_code != 200:
                if reply is not None and reply.status_code == 400 and after is not None:
                    self.book.refused_after.add(after)
                return
            body = reply.json()
            ids = [video.get("id") for video in body.get("data", [])]
            if len(ids) > limit or (
                ids and (body["first_id"], body["last_id"]) != (ids[0], ids[-1])
            ):
                self.stats.fail("bad list page", f"limit {limit}: {reply.text[:300]}")
            repeated = seen.intersection(ids)
            if repeated:
                self.stats.fail("list repeats", f"{order} pages repeat {sorted(repeated)[:3]}")
            seen.update(ids)
            self.book.seen_in_lists[self.team].update(ids)
            if not body.get("has_more") or not ids:
                return
            after = ids[-1]

    async def content(self) -> None:
        video_id = self.completed_source()
        if video_id is None:
            return await self.retrieve()
        variant = self.rng.choice(["video", "video", "thumbnail", "spritesheet"])
        headers: dict[str, str] = {}
        wanted = None
        if self.rng.random() < 0.4:
            headers["range"], wanted = self.rng.choice(RANGES)
        expect: Expect = {206: None} if wanted else {200: None}
        reply = await self.call(
            "content",
            "GET",
            f"/v1/videos/{video_id}/content",
            expect,
            params={"variant": variant},
            headers=headers,
        )
        if reply is None or reply.status_code >= 300:
            return
        length = reply.headers.get("content-length")
        if wanted is not None and len(reply.content) != wanted:
            self.stats.fail("bad content", f"{headers}: {len(reply.content)} bytes")
        elif length is not None and int(length) != len(reply.content):
            self.stats.fail("bad content", f"content-length {length}, {len(reply.content)} bytes")

    async def delete(self) -> None:
        if not self.own:
            return await self.retrieve()
        video_id = self.own.pop(self.rng.randrange(len(self.own)))
        reply = await self.call("delete", "DELETE", f"/v1/videos/{video_id}", {200: None})
        if reply is not None and reply.status_code == 200:
            if reply.json().get("deleted") is not True:
                self.stats.fail("bad answer", f"delete {video_id}: {reply.text[:200]}")
            self.book.deleted.add(video_id)
        elif reply is None:
            self.own.append(video_id)  # unknown outcome: try again later

    # -- characters

    async def character_create(self) -> None:
        form = multipart(
            {"name": f"soak character {self.n}"}, {"video": ("c.mp4", VIDEO_FILE, "video/mp4")}
        )
        reply = await self.call(
            "character.create", "POST", "/v1/videos/characters", {200: None}, **form
        )
        if reply is not None and reply.status_code == 200:
            self.book.characters[self.team].append(reply.json()["id"])

    async def character_get(self) -> None:
        character = self.pick(self.book.characters[self.team])
        if character is None:
            return await self.character_create()
        reply = await self.call(
            "character.get", "GET", f"/v1/videos/characters/{character}", {200: None}
        )
        if reply is not None and reply.status_code == 200 and reply.json().get("id") != character:
            self.stats.fail("wrong character", f"{character}: {reply.text[:200]}")

    async def character_other(self) -> None:
        character = self.pick(self.book.characters[self.rng.choice(self.others)])
        character = character or f"char_{secrets.token_hex(16)}"
        await self.call(
            "bad.character_other_team",
            "GET",
            f"/v1/videos/characters/{character}",
            {404: {"character_not_found"}},
        )

    # -- requests that must be refused, each with its contract answer

    async def bad_key(self) -> None:
        key = self.rng.choice([None, "sgw-" + secrets.token_urlsafe(32), "not-a-key"])
        video_id = self.pick(self.book.kept[self.team]) or "video_0"
        method, path, kwargs = self.rng.choice(
            [
                ("GET", "/v1/videos", {}),
                ("GET", f"/v1/videos/{video_id}", {}),
                ("DELETE", f"/v1/videos/{video_id}", {}),
                ("POST", "/v1/videos", {"json": {"prompt": "no key"}}),
                ("GET", "/v1/no-such-route", {}),
            ]
        )
        await self.call("bad.key", method, path, {401: {"invalid_api_key"}}, key=key, **kwargs)

    async def bad_id(self) -> None:
        bad = self.rng.choice(["bad.id", "x" * 129, "a%20b", "%24dollar", "semi%3Bcolon"])
        invalid: Expect = {400: {"invalid_request"}}
        method, path, kwargs = self.rng.choice(
            [
                ("GET", f"/v1/videos/{bad}", {}),
                ("DELETE", f"/v1/videos/{bad}", {}),
                ("GET", f"/v1/videos/{bad}/content", {}),
                ("POST", f"/v1/videos/{bad}/remix", {"json": {"prompt": "bad id"}}),
                ("POST", "/v1/videos/remix", {"json": {"video_id": "a b", "prompt": "x"}}),
                ("POST", "/v1/videos/edits", {"json": {"prompt": "x", "video": {"id": "a/b"}}}),
                ("GET", f"/v1/videos/characters/{bad}", {}),
            ]
        )
        await self.call("bad.id", method, path, invalid, **kwargs)

    async def other_team(self) -> None:
        """Another team's video (maybe deleted since): unknown to this team, nothing more."""
        other = self.rng.choice(self.others)
        video_id = self.pick(list(self.book.created[other]))
        if video_id is None:
            return await self.unknown_id()
        not_found: Expect = {404: {"video_not_found"}}
        not_source: Expect = {400: {"invalid_video_id"}}
        method, path, expect, kwargs = self.rng.choice(
            [
                ("GET", f"/v1/videos/{video_id}", not_found, {}),
                ("DELETE", f"/v1/videos/{video_id}", not_found, {}),
                ("GET", f"/v1/videos/{video_id}/content", not_found, {}),
                ("POST", f"/v1/videos/{video_id}/remix", not_source, {"json": {"prompt": "x"}}),
                (
                    "POST",
                    "/v1/videos/remix",
                    not_source,
                    {"json": {"video_id": video_id, "prompt": "x"}},
                ),
                (
                    "POST",
                    "/v1/videos/extensions",
                    not_source,
                    {"json": {"prompt": "x", "video": {"id": video_id}}},
                ),
                ("GET", "/v1/videos", {400: {"invalid_request"}}, {"params": {"after": video_id}}),
            ]
        )
        await self.call("bad.other_team", method, path, expect, **kwargs)

    async def unknown_id(self) -> None:
        video_id = f"video_{secrets.token_hex(16)}"
        if self.rng.random() < 0.5:
            await self.call(
                "bad.unknown_id", "GET", f"/v1/videos/{video_id}", {404: {"video_not_found"}}
            )
        else:
            form = multipart({"prompt": "x", "video[id]": video_id})
            await self.call(
                "bad.unknown_id", "POST", "/v1/videos/edits", {400: {"invalid_video_id"}}, **form
            )

    async def failed_source(self) -> None:
        source = self.pick(self.book.failed[self.team])
        if source is None:
            return await self.unknown_id()
        await self.call(
            "bad.failed_source",
            "POST",
            f"/v1/videos/{source}/remix",
            {400: {"video_not_completed"}},
            json={"prompt": "remix of a failed video"},
        )

    async def bad_body(self) -> None:
        invalid: Expect = {400: {"invalid_request"}}
        method, path, kwargs = self.rng.choice(
            [
                ("POST", "/v1/videos", {"json": {}}),
                ("POST", "/v1/videos", {"json": {"prompt": "   "}}),
                ("POST", "/v1/videos", {"json": ["prompt"]}),
                (
                    "POST",
                    "/v1/videos",
                    {"content": b"prompt=x", "headers": {"content-type": "text/plain"}},
                ),
                (
                    "POST",
                    "/v1/videos",
                    {"content": b"{not json", "headers": {"content-type": "application/json"}},
                ),
                ("GET", "/v1/videos", {"params": {"limit": "101"}}),
                ("GET", "/v1/videos", {"params": {"order": "sideways"}}),
                ("GET", "/v1/videos", {"params": {"after": "video_unknown"}}),
            ]
        )
        await self.call("bad.body", method, path, invalid, **kwargs)

    async def bad_route(self) -> None:
        video_id = self.pick(self.book.kept[self.team]) or "video_0"
        method, path, expect = self.rng.choice(
            [
                ("GET", "/v1/models", {404: {"not_found"}}),
                ("POST", "/v1/videos/a/b/c", {404: {"not_found"}}),
                ("PUT", f"/v1/videos/{video_id}", {404: None, 405: None}),
                ("PATCH", "/v1/videos", {404: None, 405: None}),
            ]
        )
        await self.call("bad.route", method, path, expect)

    async def operational(self) -> None:
        path = self.rng.choice(["/healthz", "/readyz", "/metrics"])
        await self.call("operational", "GET", path, {200: None}, key=None)


async def drive(
    config: SoakConfig, gateways: list[str], keys: dict[str, str], book: Book, stats: Stats
) -> None:
    """Run every client until `config.seconds` have passed; each loop ends by itself.

    Clients share pooled httpx clients, one per CLIENTS_PER_POOL clients: httpcore scans
    every connection of a pool for each request, so one pool of 200 connections would
    make the load generator, not the gateway, the bottleneck.
    """
    pools = [
        httpx.AsyncClient(
            # Idle connections are dropped before the server's keep-alive timeout (uvicorn's
            # 5 s): reusing one the server is closing at that instant fails the request.
            limits=httpx.Limits(max_connections=CLIENTS_PER_POOL, keepalive_expiry=2.0),
            timeout=httpx.Timeout(config.request_timeout_s, connect=10.0),
        )
        for _ in range(-(-config.clients // CLIENTS_PER_POOL))
    ]
    try:
        end = asyncio.get_running_loop().time() + config.seconds
        clients = [
            Client(n, pools[n // CLIENTS_PER_POOL], gateways, keys, book, stats, config)
            for n in range(config.clients)
        ]
        tasks = [asyncio.create_task(client.run(end)) for client in clients]
        lag = asyncio.create_task(measure_lag(stats.loop_lag))
        # A client's last request starts before `end` and has its own timeout.
        bound = config.seconds + 2 * config.think_s + config.request_timeout_s + 30
        done, pending = await asyncio.wait(tasks, timeout=bound)
        for task in pending:
            task.cancel()
            stats.fail("client stuck", "a client loop did not end in time")
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            if task.exception() is not None:
                stats.fail("client crashed", repr(task.exception()))
        lag.cancel()
    finally:
        for pool in pools:
            await pool.aclose()


async def measure_lag(lags: list[float], period: float = 0.05) -> None:
    """How late this loop wakes up: the load generator's own saturation, for the table."""
    loop = asyncio.get_running_loop()
    while True:
        asked = loop.time()
        await asyncio.sleep(period)
        lags.append(max(0.0, loop.time() - asked - period))


# -- resources -------------------------------------------------------------------------------


@dataclass
class Sample:
    at: float  # seconds since the sampler started
    replica: int
    fds: int | None
    fds_own: int | None  # fds less the clients' connections to the gateway's port
    rss_mib: float | None
    threads: int | None
    tcp: int | None
    close_wait: int | None
    tasks: int | None
    cpu: float | None  # % of one core since the previous sample
    loop_lag_ms: float | None  # how long the probe's callback waited for the gateway's loop


class Sampler(threading.Thread):
    """psutil on each gateway process, the task probe's file, and the slots gauge."""

    def __init__(
        self,
        pids: list[int],
        ports: list[int],
        probe: Path | None,
        gateway: str,
        period: float,
        others: dict[str, int],
    ) -> None:
        super().__init__(daemon=True, name="soak-sampler")
        self.processes = [psutil.Process(pid) for pid in pids]
        self.ports = ports
        # CPU only, for the other processes on the machine's cores (the load generator too).
        self.others = {name: psutil.Process(pid) for name, pid in others.items()}
        self.cpu: dict[str, list[tuple[float, float]]] = {name: [] for name in others}
        self.probe = probe
        self.gateway = gateway
        self.period = period
        self.origin = time.monotonic()
        self.samples: list[Sample] = []
        self.slots: list[tuple[float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(timeout=5.0) as http:
            while not self.stopping.is_set():
                began = time.monotonic()
                at = began - self.origin
                pairs = zip(self.processes, self.ports, strict=True)
                for replica, (process, port) in enumerate(pairs):
                    self.samples.append(self._sample(at, replica, process, port))
                for name, process in self.others.items():
                    with contextlib.suppress(psutil.Error):
                        self.cpu[name].append((at, process.cpu_percent()))
                try:
                    in_use = gauges(http.get(self.gateway + "/metrics").text)["slots_in_use"]
                    self.slots.append((at, int(in_use)))
                except (httpx.HTTPError, KeyError, ValueError):
                    pass
                self.stopping.wait(max(0.0, self.period - (time.monotonic() - began)))

    def _sample(self, at: float, replica: int, process: psutil.Process, port: int) -> Sample:
        try:
            with process.oneshot():
                fds = process.num_fds()
                rss = process.memory_info().rss / (1 << 20)
                threads = process.num_threads()
                cpu = process.cpu_percent()
            connections = process.net_connections(kind="tcp")
        except psutil.Error:
            return Sample(at, replica, *[None] * 10)
        close_wait = sum(1 for c in connections if c.status == psutil.CONN_CLOSE_WAIT)
        inbound = sum(
            1 for c in connections if c.laddr.port == port and c.status != psutil.CONN_LISTEN
        )
        tasks, lag = self._probe(process.pid)
        return Sample(
            at,
            replica,
            fds,
            fds - inbound,
            rss,
            threads,
            len(connections),
            close_wait,
            tasks,
            cpu,
            lag,
        )

    def _probe(self, pid: int) -> tuple[int | None, float | None]:
        """The probe's last reading: task count and loop lag, if fresh."""
        if self.probe is None:
            return None, None
        try:
            data = json.loads(Path(f"{self.probe}.{pid}").read_text())
        except (OSError, ValueError):
            return None, None
        if time.time() - data["at"] > 3:
            return None, None
        return int(data["tasks"]), float(data["lag_ms"])

    def mark(self) -> float:
        return time.monotonic() - self.origin


METRICS = (
    "fds",
    "fds_own",
    "rss_mib",
    "threads",
    "tcp",
    "close_wait",
    "tasks",
    "cpu",
    "loop_lag_ms",
)


def summarise(samples: list[Sample], replica: int, lo: float, hi: float) -> dict[str, Any]:
    """Median and max of each resource over [lo, hi] for one replica."""
    inside = [s for s in samples if s.replica == replica and lo <= s.at <= hi]
    out: dict[str, Any] = {"samples": len(inside)}
    for name in METRICS:
        values = [getattr(s, name) for s in inside if getattr(s, name) is not None]
        out[name] = (
            {"median": round(statistics.median(values), 1), "max": round(max(values), 1)}
            if values
            else None
        )
    return out


# -- the gateway's and the simulator's own view -------------------------------------------------


def scrape(text: str) -> list[tuple[str, dict[str, str], float]]:
    from prometheus_client.parser import text_string_to_metric_families

    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


def gauges(text: str) -> dict[str, float]:
    """The two unlabelled quota gauges, read with a line scan (cheap, once a second)."""
    found = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("sora_gateway_slots_in_use", "sora_gateway_slot_queue_length"):
            found[name.removeprefix("sora_gateway_")] = float(value)
    return found


def counter_sum(
    samples: list[tuple[str, dict[str, str], float]],
    name: str,
    where: Callable[[dict[str, str]], bool] = lambda labels: True,
) -> float:
    return sum(value for n, labels, value in samples if n == name and where(labels))


def list_team(http: httpx.Client, gateway: str, key: str) -> tuple[list[str], str | None]:
    """Every id of a team's `GET /v1/videos`, walked page by page (newest first)."""
    ids: list[str] = []
    after = None
    for _ in range(MAX_FINAL_PAGES):
        params: dict[str, Any] = {"limit": 100}
        if after:
            params["after"] = after
        reply = http.get(
            gateway + "/v1/videos", params=params, headers={"authorization": f"Bearer {key}"}
        )
        if reply.status_code != 200:
            return ids, f"list answered {reply.status_code}: {reply.text[:200]}"
        body = reply.json()
        ids += [video["id"] for video in body["data"]]
        if not body["has_more"] or not body["data"]:
            return ids, None
        after = body["last_id"]
    return ids, "list did not end"


def list_upstream(http: httpx.Client, simulator: str, token: str) -> tuple[list[str], str | None]:
    """Every job upstream still has, asked directly with the real token."""
    ids: list[str] = []
    after = None
    for _ in range(MAX_FINAL_PAGES):
        params: dict[str, Any] = {"limit": 100, "order": "asc"}
        if after:
            params["after"] = after
        reply = http.get(
            simulator + "/v1/videos", params=params, headers={"authorization": f"Bearer {token}"}
        )
        if reply.status_code != 200:
            return ids, f"upstream list answered {reply.status_code}"
        body = reply.json()
        ids += [video["id"] for video in body["data"]]
        if not body["has_more"] or not body["data"]:
            return ids, None
        after = body["last_id"]
    return ids, "upstream list did not end"


def read_logs(paths: list[Path]) -> tuple[list[str], dict[str, float]]:
    """Lines at level error or worse (or not JSON at all) in the gateways' logs, and
    each request's `duration_ms` by request id (the gateway's own time for it)."""
    found = []
    durations: dict[str, float] = {}
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if not isinstance(entry, dict):
                found.append(f"{path.name}: not JSON: {line[:200]}")
            elif entry.get("level") in ("error", "critical"):
                found.append(f"{path.name}: {entry.get('message')} {entry.get('error', '')[:300]}")
            elif entry.get("logger") == "gateway.access" and "duration_ms" in entry:
                durations[str(entry.get("request_id"))] = float(entry["duration_ms"])
    return found, durations


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


# -- the run ---------------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    enforced: bool = True


def run_soak(
    config: SoakConfig, workdir: Path | None = None, say: Callable[[str], None] | None = None
) -> dict[str, Any]:
    """Start everything, drive the load, drain, check; returns the result (see `table`)."""
    from gateway.auth import new_key
    from gateway.embedded_store import EmbeddedRedis
    from support.processes import start_gateway, start_simulator, wait_until
    from support.stack import gateway_config

    say = say or (lambda text: print(text, file=sys.stderr))
    workdir = Path(workdir or tempfile.mkdtemp(prefix="sgw-soak-"))
    token = "soak-upstream-" + secrets.token_urlsafe(16)
    keys = {team: new_key() for team in TEAMS}
    book, stats = Book(), Stats()
    env: dict[str, str] = {}
    probe = None
    if config.probe_tasks:
        probe_dir = workdir / "probe"
        probe_dir.mkdir(parents=True, exist_ok=True)
        (probe_dir / "sitecustomize.py").write_text(TASK_PROBE)
        probe = probe_dir / "tasks"
        paths = [str(probe_dir), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {"PYTHONPATH": os.pathsep.join(paths), "SOAK_TASK_PROBE": str(probe)}

    store = EmbeddedRedis(workdir / "store", persistent=False).start()
    simulator = None
    gateways: list[Any] = []
    sampler: Sampler | None = None
    result: dict[str, Any] = {"config": asdict(config), "workdir": str(workdir)}
    try:
        simulator = start_simulator(
            workdir, token, queue_s=config.queue_s, run_s=config.run_s, max_running=LIMIT
        )
        gateway_settings = gateway_config(simulator.url, store.url, token, keys)
        # Wait mode (CONTRACT §8): the clients check the answers of a create that waits,
        # then 429s; the queue's own soak is the acceptance test's.
        gateway_settings["quota"] = {
            "when_full": "wait",
            "max_in_flight": LIMIT,
            "wait_s": config.wait_s,
        }
        gateway_settings["tracker"] = {
            "poll_interval_s": config.poll_s,
            "lease_s": config.lease_s,
        }
        for team in gateway_settings["teams"]:
            if team["name"] == CAPPED_TEAM:
                team["max_in_flight"] = 1
        for _ in range(config.replicas):
            gateways.append(start_gateway(workdir, gateway_settings, env=env))
        urls = [g.url for g in gateways]
        others = {
            "load generator": os.getpid(),
            "simulator": simulator.pid(),
            "store": store.process.pid,
        }
        sampler = Sampler(
            [g.pid() for g in gateways],
            [g.port for g in gateways],
            probe,
            urls[0],
            config.sample_s,
            others,
        )
        sampler.start()
        time.sleep(config.idle_s)  # the idle level, before any load
        load_start = sampler.mark()
        say(
            f"soak: {config.clients} clients on {config.replicas} replicas for "
            f"{config.seconds:g} s (logs in {workdir}) ..."
        )
        asyncio.run(drive(config, urls, keys, book, stats))
        load_end = sampler.mark()

        # Drain: once the last jobs end, every replica must show the slots free.
        drained_at: float | None = None
        last: dict[str, float] = {}

        def drained() -> bool:
            nonlocal last
            for url in urls:
                try:
                    last = gauges(httpx.get(url + "/metrics", timeout=5.0).text)
                except httpx.HTTPError as exc:
                    last = {"error": repr(exc)}  # type: ignore[dict-item]
                if last.get("slots_in_use") != 0 or last.get("slot_queue_length") != 0:
                    return False
            return True

        try:
            wait_until(drained, config.drain_s, "slots back to 0", interval=0.1)
            drained_at = sampler.mark()
        except AssertionError:
            pass
        time.sleep(config.settle_s + config.idle_s)  # the idle level after the load
        idle_after = (sampler.mark() - config.idle_s, sampler.mark())
        sampler.stopping.set()
        sampler.join(10)

        with httpx.Client(timeout=30.0) as http:
            team_lists: dict[str, list[str]] = {}
            list_problems = []
            for n, team in enumerate(TEAMS):
                ids, problem = list_team(http, urls[n % len(urls)], keys[team])
                team_lists[team] = ids
                if problem:
                    list_problems.append(f"{team}: {problem}")
            upstream_ids, upstream_problem = list_upstream(http, simulator.url, token)
            character_problems = []
            for n, (team, characters) in enumerate(book.characters.items()):
                other = keys[TEAMS[(TEAMS.index(team) + 1) % len(TEAMS)]]
                for character in characters:
                    path = f"/v1/videos/characters/{character}"
                    url = urls[n % len(urls)] + path
                    mine = http.get(url, headers={"authorization": f"Bearer {keys[team]}"})
                    theirs = http.get(url, headers={"authorization": f"Bearer {other}"})
                    if mine.status_code != 200 or theirs.status_code != 404:
                        character_problems.append(
                            f"{character}: owner {mine.status_code}, other {theirs.status_code}"
                        )
            sim_stats = http.get(simulator.url + "/_sim/stats").json()
            metrics = [scrape(http.get(url + "/metrics").text) for url in urls]
    finally:
        if sampler is not None:
            sampler.stopping.set()
        for gateway in gateways:
            gateway.stop()
        if simulator is not None:
            simulator.stop()
        store.cleanup()
    logged_errors, durations = read_logs([g.log_path for g in gateways])

    # -- checks
    checks: list[Check] = []
    p = "sora_gateway_"

    def check(name: str, ok: bool, detail: str, enforced: bool = True) -> None:
        checks.append(Check(name, ok, detail, enforced))

    served_5xx = sum(
        counter_sum(m, p + "requests_total", lambda labels: labels["status"].startswith("5"))
        for m in metrics
    )
    check(
        "no 5xx from the gateway",
        stats.server_errors == 0 and served_5xx == 0,
        f"{stats.server_errors} seen by clients, {served_5xx:g} in requests_total",
    )
    transport = stats.failures["client timeout"] + stats.failures["transport error"]
    check("no client timeout or transport error", transport == 0, f"{transport}")
    wrong = {
        kind: n
        for kind, n in stats.failures.items()
        if kind not in ("gateway 5xx", "client timeout", "transport error")
    }
    check(
        "every answer as its request must get",
        not wrong,
        ", ".join(f"{k}: {n}" for k, n in sorted(wrong.items())) or "all",
    )
    max_slots = max((n for _, n in sampler.slots), default=0) if sampler else 0
    check(
        "upstream limit never hit",
        sim_stats["limit_hits"] == 0
        and sim_stats["max_concurrency"] <= LIMIT
        and max_slots <= LIMIT,
        f"limit_hits {sim_stats['limit_hits']}, max running upstream "
        f"{sim_stats['max_concurrency']}, max slots_in_use sampled {max_slots}",
    )
    check(
        "slots_in_use back to 0 after the load",
        drained_at is not None,
        f"in {drained_at - load_end:.1f} s" if drained_at is not None else f"still {last}",
    )

    created = book.all_created()
    missing, leaked, foreign, unknown = [], [], [], []
    for team in TEAMS:
        listed = set(team_lists[team])
        expected = set(book.created[team]) - book.deleted
        missing += sorted(expected - listed)
        leaked += sorted(listed & book.deleted)
        for video_id in (listed | book.seen_in_lists[team]) - set(book.created[team]):
            (foreign if video_id in created else unknown).append(video_id)
    check(
        "every created video in its team's list",
        not missing and not leaked and not list_problems,
        f"{len(created)} created, {len(book.deleted)} deleted; missing {missing[:5]}, "
        f"deleted yet listed {leaked[:5]} {'; '.join(list_problems)}",
    )
    check(
        "lists show only the team's own videos",
        not foreign and not unknown,
        f"another team's: {foreign[:5]}, never answered to a client: {unknown[:5]}",
    )
    refused_alive = sorted(book.refused_after - book.deleted)
    check(
        "a refused 'after' was always a deleted video",
        not refused_alive,
        f"{len(book.refused_after)} refused, not deleted: {refused_alive[:5]}",
    )
    listed_anywhere = set().union(*team_lists.values())
    upstream = set(upstream_ids)
    deleted_jobs = len(book.deleted & set(created))
    check(
        "every upstream job known to the gateway",
        upstream_problem is None
        and upstream == listed_anywhere
        and sim_stats["jobs_created"] == book.job_answers == len(created)
        and len(upstream) + deleted_jobs == sim_stats["jobs_created"],
        f"upstream created {sim_stats['jobs_created']}, clients got {book.job_answers} job 200s "
        f"({len(created)} ids); upstream has {len(upstream)} + {deleted_jobs} deleted; "
        f"unknown to the gateway {sorted(upstream - listed_anywhere)[:5]}, "
        f"gone upstream {sorted(listed_anywhere - upstream)[:5]} {upstream_problem or ''}",
    )
    jobs_counted = sum(counter_sum(m, p + "jobs_total") for m in metrics)
    lease_expiries = sum(counter_sum(m, p + "lease_expiries_total") for m in metrics)
    check(
        "jobs_total counts each job once",
        jobs_counted == len(created) and lease_expiries == 0,
        f"{jobs_counted:g} counted over replicas for {len(created)} jobs, "
        f"{lease_expiries:g} lease expiries",
    )
    upstream_trouble = sum(
        counter_sum(m, p + "upstream_errors_total") + counter_sum(m, p + "store_errors_total")
        for m in metrics
    )
    check("no upstream or store error counted", upstream_trouble == 0, f"{upstream_trouble:g}")
    characters = sum(len(c) for c in book.characters.values())
    check(
        "characters private and still there",
        not character_problems,
        f"{characters} checked; {character_problems[:3]}",
    )
    check(
        "only the upstream token reached upstream",
        sim_stats["credentials_seen"] == [fingerprint(token)] and sim_stats["auth_rejected"] == 0,
        f"{len(sim_stats['credentials_seen'])} credential(s) seen, "
        f"{sim_stats['auth_rejected']} refused",
    )
    check("no error line in the gateway logs", not logged_errors, "; ".join(logged_errors[:3]))

    # Resources: the load's first and last windows, and idle before and after it.
    seconds = load_end - load_start
    warm = min(10.0, seconds * 0.1)
    window = min(config.window_s, (seconds - warm) / 2)
    windows = {"first": (warm, warm + window), "last": (seconds - window, seconds)}
    resources = []
    samples = sampler.samples if sampler else []
    for replica in range(len(gateways)):

        def phase(lo: float, hi: float, replica: int = replica) -> dict[str, Any]:
            return summarise(samples, replica, lo, hi)

        row = {
            "replica": replica + 1,
            "windows_s": windows,  # from the load's start
            "idle_before": phase(load_start - config.idle_s - 1, load_start),
            "first": phase(load_start + windows["first"][0], load_start + windows["first"][1]),
            "last": phase(load_start + windows["last"][0], load_start + windows["last"][1]),
            "idle_after": phase(*idle_after),
        }
        resources.append(row)
        name = f"replica {replica + 1}"

        def growth(metric: str, margin: float, share: float, row: dict = row) -> tuple[bool, str]:
            first, last = row["first"][metric], row["last"][metric]
            if first is None or last is None:
                return True, "no data"
            allowed = max(margin, share * first["median"])
            grown = last["median"] - first["median"]
            return grown <= allowed, (
                f"median {first['median']:g} -> {last['median']:g} "
                f"(max {first['max']:g} -> {last['max']:g}; allowed +{allowed:g})"
            )

        ok, detail = growth("fds_own", config.fd_margin, config.fd_margin_share)
        check(f"{name}: open fds not growing (less client connections)", ok, detail)
        ok, detail = growth("fds", config.fd_margin, config.fd_margin_share)
        check(f"{name}: open fds not growing (all)", ok, detail, config.enforce_all_fds)
        ok, detail = growth("rss_mib", config.rss_margin_mib, config.rss_margin_share)
        check(f"{name}: RSS not growing (MiB)", ok, detail, config.enforce_rss)
        ok, detail = growth("threads", 2, 0.0)
        check(f"{name}: threads not growing", ok, detail)
        ok, detail = growth("tasks", config.task_margin, config.task_margin_share)
        enforce_tasks = config.enforce_task_growth and row["first"]["tasks"] is not None
        check(f"{name}: asyncio tasks not growing", ok, detail, enforce_tasks)
        before, after = row["idle_before"]["tasks"], row["idle_after"]["tasks"]
        if before is not None and after is not None:
            check(
                f"{name}: asyncio tasks back to idle",
                after["median"] <= before["max"] + config.idle_task_margin,
                f"{before['max']:g} before the load, {after['median']:g} after (median)",
            )
        else:
            check(f"{name}: asyncio tasks back to idle", True, "no probe data", False)

    cpu_during_load: dict[str, Any] = {}
    for process, values in (sampler.cpu if sampler else {}).items():
        during = [v for at, v in values if load_start <= at <= load_end]
        cpu_during_load[process] = (
            {"median": round(statistics.median(during)), "max": round(max(during))}
            if during
            else None
        )
    for replica in resources:
        cpu = [
            s.cpu
            for s in samples
            if s.replica == replica["replica"] - 1
            and s.cpu is not None
            and load_start <= s.at <= load_end
        ]
        cpu_during_load[f"gateway {replica['replica']}"] = (
            {"median": round(statistics.median(cpu)), "max": round(max(cpu))} if cpu else None
        )

    by_op: dict[str, dict[str, Any]] = {}
    for (op, status), n in sorted(stats.counts.items()):
        by_op.setdefault(op, {"statuses": {}})["statuses"][status] = n
    gateway_ms: dict[str, list[float]] = defaultdict(list)
    for op, request_id in stats.request_ids:
        if request_id in durations:
            gateway_ms[op].append(durations[request_id])
    for op, latencies in stats.latencies.items():
        row = by_op[op]
        row["client_p50_ms"] = round(percentile(latencies, 0.5) * 1000, 1)
        row["client_p99_ms"] = round(percentile(latencies, 0.99) * 1000, 1)
        if gateway_ms[op]:
            row["gateway_p50_ms"] = round(percentile(gateway_ms[op], 0.5), 1)
            row["gateway_p99_ms"] = round(percentile(gateway_ms[op], 0.99), 1)
    kinds = Counter(kind for videos in book.created.values() for kind in videos.values())
    result.update(
        {
            "ok": all(c.ok for c in checks if c.enforced),
            "load_s": round(seconds, 1),
            "requests": sum(stats.counts.values()),
            "by_op": by_op,
            "jobs": {
                "started": len(created),
                "by_kind": {k: kinds[k] for k in SLOT_KINDS},
                "deleted": len(book.deleted),
                "upstream_created": sim_stats["jobs_created"],
                "upstream_max_running": sim_stats["max_concurrency"],
            },
            "characters": characters,
            "resources": resources,
            "cpu_percent_during_load": cpu_during_load,
            "load_generator_loop_lag_ms": {
                "p50": round((percentile(stats.loop_lag, 0.5) or 0) * 1000, 1),
                "p99": round((percentile(stats.loop_lag, 0.99) or 0) * 1000, 1),
                "max": round(max(stats.loop_lag, default=0) * 1000, 1),
            },
            "checks": [asdict(c) for c in checks],
            "failure_samples": {k: v for k, v in stats.samples.items()},
        }
    )
    return result


def table(result: dict[str, Any]) -> str:
    c = result["config"]
    head = (
        f"soak: {result['load_s']:g} s, {c['clients']} clients, {c['replicas']} replicas, "
        f"{len(TEAMS)} teams, {c['queue_s'] + c['run_s']:g} s jobs, quota {LIMIT} "
        f"(wait {c['wait_s']:g} s), think {c['think_s']:g} s"
    )
    lines = [head, "-" * len(head)]
    jobs = result["jobs"]
    lines.append(
        f"requests   {result['requests']} ({result['requests'] / result['load_s']:.0f}/s); "
        f"jobs started {jobs['started']} "
        f"({', '.join(f'{k} {n}' for k, n in jobs['by_kind'].items())}), "
        f"{jobs['deleted']} deleted; {result['characters']} characters"
    )
    width = max(len(op) for op in result["by_op"])
    lines.append(
        f"  {'operation'.ljust(width)}  {'gateway p50/p99 ms':>19}  {'client p50/p99 ms':>19}  "
        "answers"
    )
    for op, row in result["by_op"].items():
        statuses = ", ".join(f"{s}: {n}" for s, n in row["statuses"].items())
        gateway = f"{row.get('gateway_p50_ms', '-')} / {row.get('gateway_p99_ms', '-')}"
        client = f"{row.get('client_p50_ms', '-')} / {row.get('client_p99_ms', '-')}"
        lines.append(f"  {op.ljust(width)}  {gateway:>19}  {client:>19}  {statuses}")
    lag = result["load_generator_loop_lag_ms"]
    lines.append(
        f"  (client time - gateway time = the load generator and the machine: its loop "
        f"lag p50 {lag['p50']} ms, p99 {lag['p99']} ms, max {lag['max']} ms)"
    )

    def show(summary: dict[str, Any] | None, metric: str) -> str:
        value = summary and summary.get(metric)
        return "-" if not value else f"{value['median']:g}"

    lines.append(
        "resources  median per window: idle before | first | last | idle after "
        "(windows {first} s and {last} s of the load)".format(
            **{
                k: f"{lo:.0f}-{hi:.0f}"
                for k, (lo, hi) in result["resources"][0]["windows_s"].items()
            }
        )
    )
    for row in result["resources"]:
        cells = []
        for metric in METRICS:
            values = " | ".join(
                show(row[phase], metric) for phase in ("idle_before", "first", "last", "idle_after")
            )
            cells.append(f"{metric} {values}")
        lines.append(f"  replica {row['replica']}: " + "; ".join(cells))
    lines.append(
        "cpu        % of one core during the load, median (max): "
        + ", ".join(
            f"{name} {v['median']} ({v['max']})"
            for name, v in result["cpu_percent_during_load"].items()
            if v
        )
    )
    lines.append("checks")
    for check in result["checks"]:
        mark = ("PASS" if check["ok"] else "FAIL") if check["enforced"] else "info"
        lines.append(f"  {mark}  {check['name']}: {check['detail']}")
    for kind, samples in result["failure_samples"].items():
        lines.append(f"  {kind}, e.g.: {samples[0]}")
    lines.append(f"result: {'PASS' if result['ok'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    defaults = SoakConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=defaults.seconds, help="load length")
    parser.add_argument("--clients", type=int, default=defaults.clients, help="concurrent clients")
    parser.add_argument("--think-s", type=float, default=defaults.think_s, help="mean pause")
    parser.add_argument("--wait-s", type=float, default=defaults.wait_s, help="quota.wait_s")
    parser.add_argument("--drain-s", type=float, default=defaults.drain_s, help="slots deadline")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--no-task-probe", action="store_true", help="no sitecustomize probe")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    config = SoakConfig(
        seconds=args.seconds,
        clients=args.clients,
        think_s=args.think_s,
        wait_s=args.wait_s,
        drain_s=args.drain_s,
        seed=args.seed,
        probe_tasks=not args.no_task_probe,
    )
    result = run_soak(config)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nfigures written to {os.path.relpath(args.output, Path.cwd())}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
