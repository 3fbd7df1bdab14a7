"""The store's namespace and its failures: every key the gateway writes, and what a
failed command means.

Errors first, as the caller meets them (the model is httpx's `_exceptions.py`):

    StoreFailure            the command may not have happened
      StoreUnavailable      the store is unreachable or timed out: 503 `store_unavailable`
      StoreBusy             no pooled connection came free in time: 503 `store_busy`

Only `ledger.py`, `scheduler.py` and `registry.py` send commands, and they raise these,
never a redis exception: `store_clients.translate_errors` is the one place that converts.

Keys. Every key shares the `{sgw}` hash tag, so each script touches one cluster slot.
The strings are the stored format: an existing store must keep working, so they never
change.

The slot ledger (`ledger.py`):
- `holders`  ZSET slot id -> lease deadline (ms). Its size is the count; nothing else is.
- `slots`    HASH slot id -> JSON {team, state, video, owner, started, kind, want}; state is
  `reserved` (create sent or about to be), `bound` (a job id is known) or `unknown`
  (the create's answer was lost: the job may exist upstream; the tracker settles it).
- `jobs`     HASH video id -> slot id: one job is counted by one slot.
- `queue:<team>` ZSET waiting slot id -> arrival number: one FIFO per team, so an
  admission decision merges the heads of the teams' FIFOs (at most `free slots` steps)
  instead of walking every waiter. `queued_teams` SET: the teams whose FIFO is not
  empty. `beats` ZSET waiter -> heartbeat deadline (a waiter whose replica died drops
  out); `waiter_team` HASH waiter -> team (which FIFO it is in); `waiter_charge` HASH
  waiter -> the charge it reserved when it joined (given back if it leaves unadmitted);
  `queue_seq` the arrival counter shared by all FIFOs.
- `queued` ZSET queued job id -> accepted at (ms): every job the scheduler holds
  (its size is `quota.max_queued`'s count; its oldest are the ones past
  `quota.max_queue_s`); `queued_by_team` HASH team -> queued jobs; `job:<id>` HASH one
  queued job's stored request (team, kind, want, meta, body, arrival, attempts,
  accepted; `slot` once taken, `deleted` when its client deleted it while it started).
  A queued job waits in its team's FIFO (`queue:<team>`) beside the live waiters of
  `when_full: wait`, so both are served in one fair order.
- `used:<team>` ZSET `slot:ms` -> end (ms): the spans of the team's finished jobs within
  `quota.fair_window_s`; `used_sum` HASH team -> their total ms. A team's share is
  that total plus its running jobs' elapsed time, divided by its weight.
- `usage:<team>:<YYYY-MM-DD>` HASH a team's usage on a UTC day (the day each job was
  checked): `spent` and `reserved` µUSD, and by model `<model>|cost` µUSD,
  `<model>|seconds` and `<model>|jobs|<outcome>`; `usage:<team>:<YYYY-MM>` HASH `spent`
  and `reserved` µUSD of the month. Kept `usage.retention_days` (see `budgets`).
- `paused_until` STRING: upstream answered a queued start with 429; nothing starts
  before this time (ms).
- `released` the pub/sub channel each release publishes its slot id on: every
  replica's waiters wake at once instead of at their next re-check.

The registry (`registry.py`):
- `video:<id>` HASH team, kind, status, expires_at, body (the last upstream JSON, served
  as-is) and member (its entry in the team's index); it expires a day past the video's
  own expiry, or a week after its last update while that is unknown.
- `team:<team>:videos` ZSET, every score 0, members `created_at:sequence:id`: a
  lexicographic range lists the team's videos newest first, ties in recording order.
- `alias:<upstream id>` STRING the gateway id of a job that was queued before it started
  (the client only ever sees the gateway's id); a video hash of such a job holds
  `upstream` (upstream's id) and `ids` (JSON upstream id -> gateway id, rewritten in
  every answer about it).
- `seq` the counter that gives each index entry its sequence number.
- `character:<id>` STRING the team that owns the character (30 days).
"""

from __future__ import annotations


class StoreFailure(Exception):
    """A store command failed: it may or may not have happened. A caller that must act
    on "it may not have been written" (a created job not recorded) catches this."""


class StoreUnavailable(StoreFailure):
    """The store could not be reached, or did not answer in time: the store is down
    (alert), and nothing may be admitted without the shared count."""


class StoreBusy(StoreFailure):
    """Every pooled connection stayed in use for `store_clients.POOL_WAIT_S`: this
    replica is busy, the store is not down. Never counted or answered as an unreachable
    store; the caller answers 503 `store_busy` with a retry hint."""


PREFIX = "{sgw}:"

# The slot ledger.
HOLDERS = PREFIX + "holders"
SLOTS = PREFIX + "slots"
JOBS = PREFIX + "jobs"
QUEUED_TEAMS = PREFIX + "queued_teams"
BEATS = PREFIX + "beats"
WAITER_TEAM = PREFIX + "waiter_team"
WAITER_CHARGE = PREFIX + "waiter_charge"
QUEUE_SEQ = PREFIX + "queue_seq"
# A team's FIFO is this prefix + its name (`queue_key`); the scripts receive the prefix.
QUEUE_PREFIX = PREFIX + "queue:"
RELEASED_CHANNEL = PREFIX + "released"
# The scheduler.
QUEUED = PREFIX + "queued"
QUEUED_BY_TEAM = PREFIX + "queued_by_team"
USED_SUM = PREFIX + "used_sum"
USED_PREFIX = PREFIX + "used:"
PAUSED_UNTIL = PREFIX + "paused_until"
JOB_PREFIX = PREFIX + "job:"

# Budgets: a team's usage is this prefix + team + ':' + a UTC day or month.
USAGE_PREFIX = PREFIX + "usage:"

# The registry.
VIDEO_SEQ = PREFIX + "seq"
# A video's hash is this prefix + its id (`video_key`); the scripts receive the prefix.
VIDEO_PREFIX = PREFIX + "video:"


def queue_key(team: str) -> str:
    """The FIFO of `team`'s waiters."""
    return QUEUE_PREFIX + team


def job_key(job_id: str) -> str:
    """A queued job's stored request."""
    return JOB_PREFIX + job_id


def used_key(team: str) -> str:
    """The spans of `team`'s finished jobs within the fair-share window."""
    return USED_PREFIX + team


def alias_key(upstream_id: str) -> str:
    """The gateway id of a queued-born job, by the id upstream gave it."""
    return f"{PREFIX}alias:{upstream_id}"


def usage_day_key(team: str, day: str) -> str:
    """`team`'s usage on a UTC day (`YYYY-MM-DD`)."""
    return f"{USAGE_PREFIX}{team}:{day}"


def usage_month_key(team: str, month: str) -> str:
    """`team`'s spent and reserved µUSD in a UTC month (`YYYY-MM`)."""
    return f"{USAGE_PREFIX}{team}:{month}"


def video_key(video_id: str) -> str:
    return VIDEO_PREFIX + video_id


def team_index_key(team: str) -> str:
    """`team`'s videos, in list order."""
    return f"{PREFIX}team:{team}:videos"


def character_key(character_id: str) -> str:
    return f"{PREFIX}character:{character_id}"
