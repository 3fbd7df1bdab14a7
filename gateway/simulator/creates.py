"""The account's create log: every job-creating request and the job it answered with.

Kept apart from the request log (`/_sim/requests`, the last 1000 /v1 requests of any
kind), where a long run's polls push the creates out: this one holds only POSTs of
create, remix, edit and extension, the last `CREATES_CAPACITY` of them, so a test can
prove each job was started upstream exactly once (count the records with a `video_id`
per prompt) and a bench can rebuild the account's slot timeline. Served, oldest first,
at `GET /_sim/creates[?limit=N]`.

One record per request that reached its route (the gate's refusals, `fail_next`, `flap`
and a bad credential, never get here; they are in the request log):

- `n`: 1, 2, ... in arrival order (ever-growing: a gap at the front means records left);
- `kind` (`create` | `remix` | `edit` | `extension`), `path`;
- `prompt` (its first `PROMPT_HEAD` characters) and `prompt_sha256` (of the whole
  prompt), both null when the request was refused before its prompt was read;
- `status` and `code`: what was answered (`code` null on a 200), `status` null while
  the answer is still held (`create_then_hang_next`);
- `video_id`: the job created, or null when none was. A job can exist under a 500
  (`create_then_500_next`), so count jobs by `video_id`, not by status;
- `remixed_from_video_id`;
- `at`, `admitted`, `started`, `finished`, `deleted`: simulated clock times (floats):
  the request's arrival; then, for a created job, its admission (its `created_at`), its
  planned start and end, and its deletion (null unless deleted). The job holds its
  place in the account from `admitted` to the earlier of `finished` and `deleted`.
"""

from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from .jobs import Job

CREATES_CAPACITY = 10_000
PROMPT_HEAD = 200


@dataclass
class CreateRecord:
    """One job-creating request; filled in as the route learns more."""

    n: int
    kind: str
    path: str
    at: float
    prompt: str | None = None
    prompt_sha256: str | None = None
    status: int | None = None
    code: str | None = None
    video_id: str | None = None
    remixed_from_video_id: str | None = None
    admitted: float | None = None
    started: float | None = None
    finished: float | None = None
    deleted: float | None = None

    def saw_prompt(self, prompt: str) -> None:
        self.prompt = prompt[:PROMPT_HEAD]
        self.prompt_sha256 = hashlib.sha256(prompt.encode()).hexdigest()

    def answered(self, status: int, code: str | None) -> None:
        self.status, self.code = status, code


class CreateLog:
    """A bounded log of CreateRecords, with the ones that made a job found by id."""

    def __init__(self, capacity: int = CREATES_CAPACITY) -> None:
        self.capacity = capacity
        self._records: deque[CreateRecord] = deque()
        self._by_video: dict[str, CreateRecord] = {}
        self._count = 0

    def open(self, kind: str, path: str, at: float) -> CreateRecord:
        """A new record, the oldest one leaving when the log is full."""
        if len(self._records) >= self.capacity:
            gone = self._records.popleft()
            if gone.video_id is not None and self._by_video.get(gone.video_id) is gone:
                del self._by_video[gone.video_id]
        self._count += 1
        record = CreateRecord(n=self._count, kind=kind, path=path, at=at)
        self._records.append(record)
        return record

    def created(self, record: CreateRecord, job: Job) -> None:
        """The request made `job`: its id and timeline go on the record."""
        record.video_id = job.id
        record.remixed_from_video_id = job.spec.remixed_from
        record.admitted, record.started, record.finished = job.created, job.started, job.finished
        self._by_video[job.id] = record

    def deleted(self, video_id: str, at: float) -> None:
        """Mark the job's deletion time (it stopped holding its place then)."""
        record = self._by_video.get(video_id)
        if record is not None and record.deleted is None:
            record.deleted = at

    def recent(self, limit: int) -> list[dict[str, Any]]:
        """The last `limit` records, oldest first."""
        if limit <= 0:
            return []
        return [asdict(record) for record in list(self._records)[-limit:]]

    def clear(self) -> None:
        self._records.clear()
        self._by_video.clear()
        self._count = 0
