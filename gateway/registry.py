"""Who owns which video, and what the gateway last saw of it; kept in Redis.

Ownership must be shared by every replica, so it lives in the store, not in memory.
Each video is one hash holding its team, kind, status, expiry and the last upstream
JSON body (served as-is by the list route, never re-encoded). Each team has an index
ordered newest first by `created_at`, ties in the order the gateway recorded them;
its members are `created_at:sequence:id`, so a lexicographic range is that order.
The keys are listed in `store`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field, replace
from typing import Any, cast, overload

from redis.asyncio import Redis
from redis.exceptions import NoScriptError, RedisError
from redis.typing import EncodableT

from .batching import CommandBatcher
from .store import VIDEO_SEQ, alias_key, character_key, team_index_key, video_key
from .store_clients import ANY_FAILURE, translate_errors, translated

log = logging.getLogger("gateway.store")

TERMINAL_STATUSES = frozenset({"completed", "failed", "cancelled"})
# A record whose expiry upstream has not announced yet is kept this long after its last
# update; one with an expiry is kept a day past it, so refusals can still say "expired".
UNSETTLED_TTL_S = 7 * 86400
EXPIRED_GRACE_S = 86400
CHARACTER_TTL_S = 30 * 86400
_RECORD_FIELDS = ("team", "kind", "status", "expires_at", "body", "upstream", "ids")

# Record a video: its hash and its entry in its team's index. Idempotent: recording
# the same id twice keeps its first index entry. Shared with the scheduler, which records
# a queued job in the script that queues it (`scheduler.ENQUEUE_SCRIPT`): a job is never
# queued without its record, nor recorded without being queued.
RECORD_LUA = """
local function record_video(kvideo, kindex, kseq, id, team, kind, status, created, expires,
                            body, ttl)
  if redis.call('EXISTS', kvideo) == 0 then
    local seq = redis.call('INCR', kseq)
    local member = created .. ':' .. string.format('%016d', seq) .. ':' .. id
    redis.call('HSET', kvideo, 'team', team, 'kind', kind, 'member', member)
    redis.call('ZADD', kindex, 0, member)
  end
  redis.call('HSET', kvideo, 'status', status, 'expires_at', expires, 'body', body)
  redis.call('EXPIRE', kvideo, tonumber(ttl))
end
"""

# KEYS[1] video hash, KEYS[2] team index, KEYS[3] sequence counter.
# ARGV: id, team, kind, status, created_at (zero-padded), expires_at, body, ttl seconds,
# ids (JSON upstream id -> gateway id to rewrite in its answers, '' for none).
RECORD_SCRIPT = (
    RECORD_LUA
    + """
record_video(KEYS[1], KEYS[2], KEYS[3], ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5],
             ARGV[6], ARGV[7], ARGV[8])
if ARGV[9] ~= '' then redis.call('HSET', KEYS[1], 'ids', ARGV[9]) end
return 1
"""
)

# A queued job started upstream: its record (by the gateway's id) learns upstream's
# id, the ids its answers are rewritten with, and upstream's first answer; upstream's id
# gets an alias naming the gateway's. Shared with the scheduler, which calls it in the
# script that binds the job's slot (`scheduler.STARTED_SCRIPT`). Returns 0 when the
# record is gone (its client deleted it).
STARTED_LUA = """
local function start_record(kvideo, kalias, upstream, ids, status, expires, body, ttl, id)
  if redis.call('EXISTS', kvideo) == 0 then return 0 end
  redis.call('HSET', kvideo, 'upstream', upstream, 'ids', ids, 'status', status,
             'expires_at', expires, 'body', body)
  redis.call('EXPIRE', kvideo, tonumber(ttl))
  redis.call('SET', kalias, id, 'EX', tonumber(ttl))
  return 1
end
"""

# KEYS[1] video hash. ARGV: status, expires_at, body, ttl seconds.
# Only an existing record is updated, so a concurrent delete is never undone.
UPDATE_SCRIPT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'status', ARGV[1], 'expires_at', ARGV[2], 'body', ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[4]))
return 1
"""

# KEYS[1] video hash, KEYS[2] the index of the team the caller believes owns it.
# ARGV: that team. Removes the record, and its index entry only from its own team's
# index: a caller wrong about the team leaves no other team's index touched (the stale
# entry is tidied by the next page that passes it).
FORGET_SCRIPT = """
local team = redis.call('HGET', KEYS[1], 'team')
local member = redis.call('HGET', KEYS[1], 'member')
if team == ARGV[1] and member then
  redis.call('ZREM', KEYS[2], member)
end
return redis.call('DEL', KEYS[1])
"""


@dataclass(frozen=True)
class VideoRecord:
    id: str
    team: str
    kind: str
    status: str
    expires_at: int | None
    body: str
    # Upstream's id of the job: the record's own id for a job that started at once,
    # None for a queued job not started yet, another id for one started from the queue.
    upstream_id: str | None = None
    ids: dict[str, str] = field(default_factory=dict)  # upstream id -> gateway id

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def source_ids(self) -> dict[str, str]:
        """The ids a job made from this video names that its client knows by others."""
        ids = dict(self.ids)
        if self.upstream_id and self.upstream_id != self.id:
            ids[self.upstream_id] = self.id
        return ids

    @property
    def queued(self) -> bool:
        """Waiting in the gateway's queue: upstream does not know it yet."""
        return self.upstream_id is None and not self.terminal

    def seen(self, video: dict[str, Any], body: bytes) -> VideoRecord:
        """This record as it stands after `update(video, body)`, without reading it back."""
        return replace(
            self,
            status=str(video.get("status") or ""),
            expires_at=_int(video.get("expires_at")),
            body=body.decode(),
        )


@dataclass(frozen=True)
class Page:
    bodies: list[str]
    first_id: str | None
    last_id: str | None
    has_more: bool

    def render(self) -> bytes:
        """The list object, with each video's stored JSON spliced in unchanged."""
        head = json.dumps({"object": "list"})[:-1]
        tail = json.dumps(
            {"first_id": self.first_id, "last_id": self.last_id, "has_more": self.has_more}
        )[1:]
        return f'{head}, "data": [{", ".join(self.bodies)}], {tail}'.encode()


class VideoRegistry:
    """Video and character records; a store failure is raised as a `store.StoreFailure`."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis
        self._batched = CommandBatcher(redis)
        self._record = redis.register_script(RECORD_SCRIPT)
        self._update = redis.register_script(UPDATE_SCRIPT)
        self._forget = redis.register_script(FORGET_SCRIPT)

    @translated
    async def record(
        self,
        team: str,
        kind: str,
        video: dict[str, Any],
        body: bytes,
        ids: dict[str, str] | None = None,
    ) -> None:
        """Remember a video the gateway just started for `team`; `ids` are the upstream
        ids its answers name that the client knows by a gateway id."""
        video_id = str(video["id"])
        await self._record(
            keys=[video_key(video_id), team_index_key(team), VIDEO_SEQ],
            args=[
                video_id,
                team,
                kind,
                str(video.get("status") or "queued"),
                *record_args(video, body),
                json.dumps(ids) if ids else "",
            ],
        )

    @translated
    async def update(self, video_id: str, video: dict[str, Any], body: bytes) -> bool:
        """Store what upstream just said of `video_id`; False if there is no record of it.

        The record is named by the id the caller asked about, never by the answer's own
        `id` (see `answers.video_object`, which refuses an answer about another video).
        """
        key = video_key(video_id)
        args: list[EncodableT] = [
            str(video.get("status") or ""),
            _expiry_arg(video),
            body,
            _ttl(video),
        ]
        try:
            updated = await self._batched.execute("EVALSHA", self._update.sha, 1, key, *args)
        except NoScriptError:  # the store restarted or was flushed: load it again
            updated = await self._update(keys=[key], args=args)
        return bool(updated)

    @translated
    async def known_sources(self, video: dict[str, Any]) -> dict[str, str]:
        """The video `video` was remixed from, when its client knows it by a gateway id
        (it started from the queue): upstream id -> gateway id, to rewrite in answers."""
        source = video.get("remixed_from_video_id")
        if not isinstance(source, str) or not source:
            return {}
        known_as = _str(await self._redis.get(alias_key(source)))
        return {source: known_as} if known_as else {}

    @translated
    async def get(self, video_id: str) -> VideoRecord | None:
        values = await self._batched.execute("HMGET", video_key(video_id), *_RECORD_FIELDS)
        team, kind, status, expires_at, body, upstream, ids = (_str(v) for v in values)
        if team is None:
            return None
        if upstream is None:
            upstream = video_id  # a job that started at once: upstream's id is its own
        # (A queued job not started yet has `upstream` empty: None below.)
        return VideoRecord(
            id=video_id,
            team=team,
            kind=kind or "create",
            status=status or "",
            expires_at=int(expires_at) if expires_at else None,
            body=body or "{}",
            upstream_id=upstream or None,
            ids=json.loads(ids) if ids else {},
        )

    @translated
    async def owned(self, team: str, video_id: str) -> VideoRecord | None:
        """The record if `team` owns the video; None for unknown and foreign alike."""
        record = await self.get(video_id)
        return record if record is not None and record.team == team else None

    @translated
    async def known(self, video_ids: list[str]) -> set[str]:
        """Which of these videos the gateway has a record of (one round trip)."""
        if not video_ids:
            return set()
        async with self._redis.pipeline(transaction=False) as pipe:
            for video_id in video_ids:
                # A queued job's upstream id is known by its alias, not a record.
                pipe.exists(video_key(video_id), alias_key(video_id))
            found = await pipe.execute()
        return {video_id for video_id, hit in zip(video_ids, found, strict=True) if hit}

    @translated
    async def forget(self, video_id: str, team: str) -> None:
        """Remove `team`'s record of the video and its entry in the team's list."""
        await self._forget(keys=[video_key(video_id), team_index_key(team)], args=[team])

    @translated
    async def page(
        self, team: str, *, after: str | None, limit: int, descending: bool
    ) -> Page | None:
        """One page of the team's videos; None when `after` is not one of the team's own."""
        if after is None:
            bound = "+" if descending else "-"
        else:
            owner, member = await self._redis.hmget(video_key(after), ["team", "member"])
            if member is None or _str(owner) != team:
                return None
            bound = "(" + _str(member)  # exclusive: the page starts past `after`
        index = team_index_key(team)
        bodies: list[str] = []
        ids: list[str] = []
        while len(bodies) <= limit:
            want = limit + 1 - len(bodies)
            members = await self._index_range(index, bound, want, descending)
            for video_id, body in await self._bodies(index, members):
                ids.append(video_id)
                bodies.append(body)
            if len(members) < want:
                break
            bound = "(" + members[-1]
        has_more = len(bodies) > limit
        del bodies[limit:], ids[limit:]
        return Page(bodies, ids[0] if ids else None, ids[-1] if ids else None, has_more)

    async def _index_range(self, index: str, bound: str, count: int, descending: bool) -> list[str]:
        """Up to `count` index members past `bound`, in the page's order."""
        if descending:
            reply = await self._redis.zrange(
                index, bound, "-", desc=True, bylex=True, offset=0, num=count
            )
        else:
            reply = await self._redis.zrange(index, bound, "+", bylex=True, offset=0, num=count)
        # Members only: redis-py's stubs do not narrow the reply on `withscores=False`.
        return [_str(m) for m in cast("list[bytes | str]", reply)]

    async def _bodies(self, index: str, members: list[str]) -> list[tuple[str, str]]:
        """(id, stored body) of each member still recorded, in one round trip; the
        index entries of expired records are tidied as they are passed."""
        video_ids = [m.rsplit(":", 1)[1] for m in members]
        async with self._redis.pipeline(transaction=False) as pipe:
            for video_id in video_ids:
                pipe.hget(video_key(video_id), "body")
            found = await pipe.execute()
        stale = [m for m, b in zip(members, found, strict=True) if b is None]
        if stale:
            await self._redis.zrem(index, *stale)
        return [(v, _str(b)) for v, b in zip(video_ids, found, strict=True) if b is not None]

    @translated
    async def ping(self) -> None:
        """Raises if the store is unreachable."""
        await self._redis.ping()

    @translated
    async def record_character(self, team: str, character_id: str) -> None:
        await self._redis.set(character_key(character_id), team, ex=CHARACTER_TTL_S)

    @translated
    async def character_owner(self, character_id: str) -> str | None:
        return _str(await self._redis.get(character_key(character_id)))


class StoreProbe:
    """What the operational side asks of the store itself, on its own client (`ops`)."""

    def __init__(self, redis: Redis) -> None:
        self._redis = redis

    async def ping(self, timeout_s: float) -> None:
        """Raises StoreFailure unless the store answers within `timeout_s`: readiness
        reads every failure of the client or its socket as "not answering", not only
        an unreachable store. A failure that is a bug (no redis or socket error) is
        raised as itself."""
        with translate_errors(ANY_FAILURE):
            async with asyncio.timeout(timeout_s):
                await self._redis.ping()

    async def warn_if_volatile(self) -> None:
        """Say loudly when the store keeps nothing on disk: a restart would then forget
        every slot held, and the gateway would admit past the upstream's limit."""
        try:
            appendonly = await self._redis.config_get("appendonly")
            save = await self._redis.config_get("save")
        except RedisError:
            return  # CONFIG is often disabled on managed Redis; nothing to learn then
        if _config_value(appendonly, "appendonly") == "no" and not _config_value(save, "save"):
            log.warning(
                "the store persists nothing (appendonly no, no save points): a store restart "
                "forgets the slots held and the shared limit can be exceeded; enable AOF"
            )


def _config_value(reply: dict[Any, Any], key: str) -> str:
    value = reply.get(key, reply.get(key.encode(), ""))
    return value.decode() if isinstance(value, bytes) else str(value)


def started_args(ids: dict[str, str], video: dict[str, Any], body: bytes) -> list[EncodableT]:
    """`STARTED_LUA`'s ids, status, expires_at, body and ttl."""
    status = str(video.get("status") or "")
    return [json.dumps(ids), status, _expiry_arg(video), body, _ttl(video)]


def record_args(video: dict[str, Any], body: bytes) -> list[EncodableT]:
    """`RECORD_LUA`'s created_at, expires_at, body and ttl for a video object."""
    created_at = _int(video.get("created_at")) or int(time.time())
    return [f"{created_at:012d}", _expiry_arg(video), body, _ttl(video)]


def _expiry_arg(video: dict[str, Any]) -> str:
    expires_at = _int(video.get("expires_at"))
    return "" if expires_at is None else str(expires_at)


def _ttl(video: dict[str, Any]) -> int:
    expires_at = _int(video.get("expires_at"))
    if expires_at is None:
        return UNSETTLED_TTL_S
    return max(60, expires_at - int(time.time()) + EXPIRED_GRACE_S)


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return int(value)
    return None


@overload
def _str(value: bytes | str) -> str: ...
@overload
def _str(value: bytes | str | None) -> str | None: ...
def _str(value: bytes | str | None) -> str | None:
    """A reply as text: the client returns bytes (it does not decode responses)."""
    return value.decode() if isinstance(value, bytes) else value
