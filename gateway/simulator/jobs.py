"""The simulated account: settings, video jobs and the rules between them (no HTTP here).

A job's whole life is fixed when it is admitted (when it starts, when it ends and how), so
its state at any moment is a pure function of the clock: nothing runs in the background,
and a test moves time by swapping the clock.

Simulated time: `JobBook.now()` is the only place the clock is read, and it runs
`time_scale` simulated seconds per real second. Every duration of the settings
(`queue_s`, `run_s`, `expire_s`) and every timestamp a job reports (`created_at`,
`completed_at`, `expires_at`, progress) is in simulated seconds, so with time_scale 60 a
180 s job runs 3 real seconds and reports a 3 minute life. Latency, `poll_after_ms` and
`retry-after` stay real. A changed scale applies from the moment it is set, with no jump
of the simulated clock; away from 1 the simulated clock runs ahead of the wall clock.
"""

from __future__ import annotations

import math
import random
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

VIDEO_SECONDS = ("4", "8", "12")
EXTENSION_SECONDS = ("4", "8", "12", "16", "20")
VIDEO_SIZES = ("720x1280", "1280x720", "1024x1792", "1792x1024")
DEFAULT_MODEL = "sora-2"
DEFAULT_SECONDS = "4"
DEFAULT_SIZE = "720x1280"
MAX_PROMPT_CHARS = 32000
FAIL_MARKER = "#fail"
CANCEL_MARKER = "#cancel"
RUNNING = frozenset({"queued", "in_progress"})


@dataclass
class SimulatorSettings:
    """Knobs of the simulated upstream; every field can also be changed at runtime.

    Durations are simulated seconds (see `time_scale`). With `run_s_spread` > 0 each
    job's run time is drawn uniformly from run_s * (1 - spread) .. run_s * (1 + spread),
    from a generator seeded with `seed` (again on every reset and every new seed), so a
    run is reproducible and fair-share tests still see unequal jobs.

    `result_seconds` plays an upstream that produced (and billed) another length than the
    one asked for: every job admitted while it is set reports it as `seconds` once
    completed; while running, and when it failed, it reports the asked length.
    """

    token: str | None = None
    queue_s: float = 1.0
    run_s: float = 4.0
    expire_s: float = 86400.0
    max_running: int = 2
    content_bytes: int | None = None
    poll_after_ms: int | None = None
    time_scale: float = 1.0  # simulated seconds per real second
    run_s_spread: float = 0.0  # 0..1
    seed: int = 0
    result_seconds: int | None = None  # a completed job reports this length, not the asked one

    def update(self, values: Mapping[str, Any]) -> None:
        """Apply a partial update, all or nothing; raises ValueError(field, reason)."""
        known = {f.name for f in fields(self)}
        checked: dict[str, Any] = {}
        for name, value in values.items():
            if name not in known:
                raise ValueError(name, "unknown setting")
            checked[name] = _check_setting(name, value)
        for name, value in checked.items():
            setattr(self, name, value)

    def copy_from(self, other: SimulatorSettings) -> None:
        """Take every value of `other` in place, so holders of this object see the change."""
        for f in fields(self):
            setattr(self, f.name, getattr(other, f.name))


def _check_setting(name: str, value: Any) -> Any:
    if name == "token":
        if value is None or (isinstance(value, str) and value):
            return value
        raise ValueError(name, "must be a non-empty string or null")
    if value is None and name in ("content_bytes", "poll_after_ms", "result_seconds"):
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise ValueError(name, "must be a non-negative number")
    if name in ("max_running", "content_bytes", "poll_after_ms", "seed", "result_seconds"):
        return _whole(name, value)
    if not math.isfinite(value):
        raise ValueError(name, "must be finite")
    if name == "time_scale" and value == 0:
        raise ValueError(name, "must be a positive number")
    if name == "run_s_spread" and value > 1:
        raise ValueError(name, "must be between 0 and 1")
    return float(value)


def _whole(name: str, value: float) -> int:
    if not math.isfinite(value) or value != int(value):
        raise ValueError(name, "must be an integer")
    if name == "result_seconds" and value == 0:
        raise ValueError(name, "must be a positive integer or null")
    return int(value)


class SimError(Exception):
    """An answer in the OpenAI error envelope; raised by the rules, rendered by the app."""

    def __init__(
        self,
        status: int,
        code: str | None,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.type = type
        self.headers = dict(headers or {})

    def envelope(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class JobSpec:
    """What a job-creating request asked for, already validated."""

    prompt: str
    model: str = DEFAULT_MODEL
    seconds: str = DEFAULT_SECONDS
    size: str = DEFAULT_SIZE
    remixed_from: str | None = None


@dataclass
class Job:
    """One video job; `started` and `finished` are clock times fixed at admission."""

    id: str
    seq: int
    spec: JobSpec
    created: float
    started: float
    finished: float
    expire_s: float
    outcome: str
    result_seconds: str | None = None  # what a completed job reports instead of the asked length

    def status(self, now: float) -> str:
        if now < self.started:
            return "queued"
        if now < self.finished:
            return "in_progress"
        return self.outcome

    def is_running(self, now: float) -> bool:
        return self.status(now) in RUNNING

    def progress(self, now: float) -> int:
        status = self.status(now)
        if status == "queued":
            return 0
        if status == "in_progress":
            share = (now - self.started) / (self.finished - self.started)
            return min(99, max(0, int(share * 100)))
        return 100 if status == "completed" else 0

    @property
    def completed_at(self) -> int:
        return int(self.finished)

    @property
    def expires_at(self) -> int:
        return int(self.finished + self.expire_s)

    def is_expired(self, now: float) -> bool:
        """Compared with the integer the client sees, so both sides agree on the boundary."""
        return self.outcome == "completed" and now > self.expires_at

    def to_dict(self, now: float) -> dict[str, Any]:
        status = self.status(now)
        terminal = status not in RUNNING
        error = None
        if status == "failed":
            error = {
                "code": "content_policy_violation",
                "message": "The prompt was flagged by the simulated content policy (#fail).",
            }
        return {
            "id": self.id,
            "object": "video",
            "model": self.spec.model,
            "status": status,
            "progress": self.progress(now),
            "created_at": int(self.created),
            "completed_at": self.completed_at if terminal else None,
            "expires_at": self.expires_at if status == "completed" else None,
            "seconds": self.result_seconds
            if status == "completed" and self.result_seconds
            else self.spec.seconds,
            "size": self.spec.size,
            "prompt": self.spec.prompt,
            "remixed_from_video_id": self.spec.remixed_from,
            "error": error,
        }


def _outcome(prompt: str) -> str:
    if FAIL_MARKER in prompt:
        return "failed"
    if CANCEL_MARKER in prompt:
        return "cancelled"
    return "completed"


@dataclass
class JobBook:
    """All jobs and characters of the account, with its concurrency limit and counters.

    `clock` is real time; `now()` turns it into simulated time, from an anchor moved
    only by `follow_scale`.
    """

    settings: SimulatorSettings
    clock: Callable[[], float] = time.time
    jobs: dict[str, Job] = field(default_factory=dict)
    characters: dict[str, dict[str, Any]] = field(default_factory=dict)
    max_concurrency: int = 0
    limit_hits: int = 0
    jobs_created: int = 0
    _seq: int = 0
    _real_anchor: float = field(init=False)
    _sim_anchor: float = field(init=False)
    _scale: float = field(init=False)
    _rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self._real_anchor = self._sim_anchor = self.clock()
        self._scale = self.settings.time_scale
        self.reseed()

    def now(self) -> float:
        """Simulated time: the one conversion from the real clock."""
        return self._sim_anchor + (self.clock() - self._real_anchor) * self._scale

    def follow_scale(self) -> None:
        """Adopt `settings.time_scale` from this instant on; simulated time does not jump."""
        real = self.clock()
        self._sim_anchor += (real - self._real_anchor) * self._scale
        self._real_anchor = real
        self._scale = self.settings.time_scale

    def reseed(self) -> None:
        """Start the run-time draws over from `settings.seed`."""
        self._rng = random.Random(self.settings.seed)

    def _run_s(self) -> float:
        spread = self.settings.run_s_spread
        if spread == 0:
            return self.settings.run_s
        return self.settings.run_s * self._rng.uniform(1 - spread, 1 + spread)

    def running_count(self, now: float | None = None) -> int:
        at = self.now() if now is None else now
        return sum(1 for job in self.jobs.values() if job.is_running(at))

    def admit(self, spec: JobSpec) -> Job:
        """Create a job if the account has room; synchronous, so check and insert are atomic."""
        now = self.now()
        running = self.running_count(now)
        if running >= self.settings.max_running:
            self.limit_hits += 1
            raise SimError(
                429,
                "too_many_running_tasks",
                "Too many running tasks",
                type="rate_limit_error",
                headers={"retry-after": "1"},
            )
        started = now + self.settings.queue_s
        self._seq += 1
        job = Job(
            id=f"video_{uuid.uuid4().hex}",
            seq=self._seq,
            spec=spec,
            created=now,
            started=started,
            finished=started + self._run_s(),
            expire_s=self.settings.expire_s,
            outcome=_outcome(spec.prompt),
            result_seconds=None
            if self.settings.result_seconds is None
            else str(self.settings.result_seconds),
        )
        self.jobs[job.id] = job
        self.jobs_created += 1
        if job.is_running(now):
            running += 1
        self.max_concurrency = max(self.max_concurrency, running)
        return job

    def get(self, video_id: str) -> Job:
        job = self.jobs.get(video_id)
        if job is None:
            raise SimError(404, "video_not_found", f"Video '{video_id}' not found.")
        return job

    def other_id(self, video_id: str) -> str:
        """The id of the newest job other than `video_id` (a made-up one if there is none)."""
        others = [job for job in self.jobs.values() if job.id != video_id]
        if not others:
            return f"video_{uuid.uuid4().hex}"
        return max(others, key=lambda job: (job.created, job.seq)).id

    def delete(self, video_id: str) -> None:
        """Forget the job; a running one stops counting against the limit at once."""
        self.get(video_id)
        del self.jobs[video_id]

    def source(self, video_id: str, param: str) -> Job:
        """The seed's rules for a remix, edit or extension source."""
        job = self.jobs.get(video_id)
        if job is None:
            raise SimError(
                400, "invalid_video_id", f"Video '{video_id}' does not exist.", param=param
            )
        now = self.now()
        if job.status(now) != "completed":
            raise SimError(
                400,
                "video_not_completed",
                f"Video '{video_id}' is {job.status(now)}; only a completed video can be used.",
                param=param,
            )
        if job.is_expired(now):
            raise SimError(400, "video_expired", f"Video '{video_id}' has expired.", param=param)
        return job

    def page(self, after: str | None, limit: int, order: str) -> tuple[list[Job], bool]:
        """One page of the list, newest first for `desc`; ties keep admission order."""
        ordered = sorted(self.jobs.values(), key=lambda job: (job.created, job.seq))
        if order == "desc":
            ordered.reverse()
        if after is not None:
            ids = [job.id for job in ordered]
            if after not in ids:
                raise SimError(
                    400, "invalid_value", f"No video '{after}' to list after.", param="after"
                )
            ordered = ordered[ids.index(after) + 1 :]
        return ordered[:limit], len(ordered) > limit

    def add_character(self, name: str) -> dict[str, Any]:
        character_id = f"char_{uuid.uuid4().hex}"
        character = {
            "id": character_id,
            "object": "character",
            "name": name,
            "created_at": int(self.now()),
        }
        self.characters[character_id] = character
        return character

    def get_character(self, character_id: str) -> dict[str, Any]:
        character = self.characters.get(character_id)
        if character is None:
            raise SimError(404, "character_not_found", f"Character '{character_id}' not found.")
        return character

    def clear(self) -> None:
        self.jobs.clear()
        self.characters.clear()
        self.max_concurrency = 0
        self.limit_hits = 0
        self.jobs_created = 0
        self.reseed()
