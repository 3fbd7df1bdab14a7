"""Benchmark: the cost of one admission decision of the queue's scheduler, with 10 and
with 5,000 jobs queued (CONTRACT §8; ARCHITECTURE "The scheduler": one decision must be
O(teams), not O(jobs)).

    PYTHONPATH=tests python -m bench.admission_cost [--rounds 200] [--depths 10,5000]

Starts its own Redis-compatible store (the embedded one, no persistence), holds both
slots of a 2-slot account and fills the queue to each depth with jobs spread round
robin over 3 teams, then measures `--rounds` rounds of the two decisions, one call at a
time, each between `CONFIG RESETSTAT` and `INFO commandstats`:

- `take()`: a slot was just freed (outside the measurement): which queued job starts;
- `enqueue()`: a create finds the account full: it is queued (the create's decision).

Between them (outside the measurement) the taken job's start is settled, so every round
sees the same depth, the same held slots and the same free slot. Per decision:

- Redis commands run, counted by `INFO commandstats` (the commands a script runs are
  counted too, each under its own name) and the scripts among them (`eval*`, `fcall*`);
- script time on the server (the `usec` of `evalsha`/`eval`/`fcall`, which includes
  the commands they run) and the client's round trip of the call.

The reference measured in the same run is a bare `PING` round trip on the same client.
The table gives each figure at each depth and the ratio deepest / shallowest, which
should be ~1 (flat). Figures go to tests/bench/results/admission_cost.json.

The scheduler (`gateway.scheduler`) is imported only when the bench runs, and every call
this bench makes on it is in the "ADAPT" section below. The exit status is 1 when the
module is missing or its interface differs from that section (the message says which
call), else 0; a ratio off target is reported, not failed.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import importlib
import json
import statistics
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

from bench.common import (
    RESULTS_DIR,
    make_workdir,
    median,
    percentile,
    render_rows,
    row,
    write_result,
)

LIMIT = 2
TEAMS = ("red", "green", "blue")
SCRIPT_COMMANDS = ("eval", "evalsha", "eval_ro", "evalsha_ro", "fcall", "fcall_ro")
OWN_COMMANDS = ("info", "config|resetstat", "config", "ping")  # the bench's, not counted
RESULTS = RESULTS_DIR / "admission_cost.json"
PING_ROUNDS = 500
WARMUP_ROUNDS = 20  # script loading and a cold connection stay out of the figures

# -- ADAPT: every call this bench makes on the scheduler (gateway/scheduler.py) ----------
# Planned before the module existed as `Scheduler(redis, limit=2, owner=..., lease_s=30,
# fair_window_s=3600)`, `enqueue(job)`, `take()`; as it landed (main 1643c17) the limit,
# owner, lease, weights and window live on the `SlotLedger` the scheduler is given,
# `enqueue(job_id, slot_id, team=, kind=, want=, request=, video=)` is the create's own
# decision (start now or queue), a taken job's slot is freed by `ledger.release(slot_id)`
# and its start settled by `done(job_id)`. If it changes again, change only this section.


class Bench:
    """The scheduler on one Redis client, with the ids of the slots it holds."""

    def __init__(self, module: ModuleType, redis: Any, depth: int) -> None:
        from gateway.ledger import SlotLedger

        self.module = module
        ledger = SlotLedger(
            redis,
            limit=LIMIT,
            team_caps={},
            owner="bench",
            lease_s=30,
            team_weights={team: 1.0 for team in TEAMS},
            fair_window_s=3600,
        )
        self.ledger = ledger
        self.sched = module.Scheduler(redis, ledger, max_queued=depth + 100, team_max_queued={})
        self.held: list[str] = []
        self.n = 0

    async def enqueue(self, team: str) -> str:
        """One create's decision; returns its outcome ('admitted' holds a slot)."""
        self.n += 1
        job_id = self.module.mint_job_id()
        slot_id = f"slot_{uuid.uuid4().hex}"
        prompt = f"bench admission {self.n}"
        request = self.module.StoredRequest(
            path="/videos",
            content_type="application/json",
            headers={},
            body=json.dumps({"prompt": prompt}).encode(),
        )
        video = {
            "id": job_id,
            "object": "video",
            "status": "queued",
            "progress": 0,
            "created_at": int(time.time()),
            "model": "sora-2",
            "size": "720x1280",
            "seconds": "4",
            "prompt": prompt,
            "completed_at": None,
            "expires_at": None,
            "error": None,
        }
        done = await self.sched.enqueue(
            job_id, slot_id, team=team, kind="create", want={}, request=request, video=video
        )
        if done.outcome == "admitted":
            self.held.append(slot_id)
        return str(done.outcome)

    async def take(self) -> Any:
        """One dispatch decision: the job given the free slot, or None."""
        return await self.sched.take()

    async def started(self, job: Any) -> None:
        """What the dispatcher does after the send: the start is settled, the slot held."""
        self.held.append(job.slot_id)
        await self.sched.done(job.id)

    async def free_one(self) -> None:
        """One held slot freed, as the tracker does when its job ends."""
        await self.ledger.release(self.held.pop(0))


def load_scheduler() -> ModuleType:
    return importlib.import_module("gateway.scheduler")


# -- measurement ----------------------------------------------------------------------------


def command_stats(info: dict[str, Any]) -> tuple[int, int, float]:
    """(commands, scripts, script usec) from `INFO commandstats`, the bench's own left out."""
    commands = scripts = 0
    script_usec = 0.0
    for name, value in info.items():
        command = name.removeprefix("cmdstat_")
        if command in OWN_COMMANDS:
            continue
        commands += int(value["calls"])
        if command in SCRIPT_COMMANDS:
            scripts += int(value["calls"])
            script_usec += float(value["usec"])
    return commands, scripts, script_usec


async def ping_rtt_us(redis: Any, rounds: int) -> list[float]:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        await redis.ping()
        times.append((time.perf_counter() - t0) * 1e6)
    return times


async def counted(redis: Any, call: Any) -> tuple[Any, tuple[int, int, float, float]]:
    """`call()` with its Redis commands, scripts, script usec and client round trip (us)."""
    await redis.config_resetstat()
    t0 = time.perf_counter()
    result = await call()
    rtt_us = (time.perf_counter() - t0) * 1e6
    commands, scripts, script_usec = command_stats(await redis.info("commandstats"))
    return result, (commands, scripts, script_usec, rtt_us)


def summary(samples: list[tuple[int, int, float, float]]) -> dict[str, Any]:
    commands = [s[0] for s in samples]
    usec = [s[2] for s in samples]
    rtt = [s[3] for s in samples]
    return {
        "commands_mean": statistics.fmean(commands),
        "commands_max": max(commands),
        "scripts_mean": statistics.fmean(s[1] for s in samples),
        "script_usec_median": median(usec),
        "script_usec_p99": percentile(usec, 99),
        "rtt_us_median": median(rtt),
        "rtt_us_p99": percentile(rtt, 99),
    }


async def measure_depth(module: ModuleType, redis: Any, depth: int, rounds: int) -> dict[str, Any]:
    """Both slots held and `depth` queued; then per round: free a slot, take (measured),
    settle its start, enqueue one more for the team taken from (measured: it queues)."""
    await redis.flushdb()
    bench = Bench(module, redis, depth)
    for i in range(LIMIT + depth):
        await bench.enqueue(TEAMS[i % len(TEAMS)])
    if len(bench.held) != LIMIT:
        raise SystemExit(f"expected {LIMIT} creates admitted at once, got {len(bench.held)}")
    takes, enqueues = [], []
    for k in range(WARMUP_ROUNDS + rounds):
        await bench.free_one()
        job, take_cost = await counted(redis, bench.take)
        if job is None:
            raise SystemExit(f"take() found nothing to start at depth {depth} (round {k})")
        await bench.started(job)
        outcome, enqueue_cost = await counted(redis, functools.partial(bench.enqueue, job.team))
        if outcome != "queued":
            raise SystemExit(f"an enqueue with both slots held answered {outcome!r}")
        if k >= WARMUP_ROUNDS:
            takes.append(take_cost)
            enqueues.append(enqueue_cost)
    return {"depth": depth, "rounds": rounds, "take": summary(takes), "enqueue": summary(enqueues)}


async def measure(depths: list[int], rounds: int) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from gateway.embedded_store import EmbeddedRedis

    module = load_scheduler()
    workdir = make_workdir("admission")
    store = EmbeddedRedis(Path(workdir) / "store", persistent=False).start()
    client = aioredis.Redis.from_url(store.url)
    try:
        ping = await ping_rtt_us(client, PING_ROUNDS)
        by_depth = [await measure_depth(module, client, depth, rounds) for depth in depths]
    finally:
        await client.aclose()
        store.cleanup()
    return {"ping_us_median": median(ping), "ping_us_p99": percentile(ping, 99), "depths": by_depth}


# -- output ---------------------------------------------------------------------------------


DECISIONS = {
    "take": "take() (a slot is free: which queued job starts)",
    "enqueue": "enqueue() (account full: the create is queued)",
}


def figure_rows(figures: dict[str, Any]) -> list[dict[str, Any]]:
    depths = figures["depths"]
    low, high = depths[0], depths[-1]
    ping = figures["ping_us_median"]
    rows = []
    for decision, name in DECISIONS.items():
        for d in depths:
            f = d[decision]
            rows.append(
                row(
                    "admission",
                    f"{name}, {d['depth']} queued: round trip, median",
                    f["rtt_us_median"],
                    "us",
                    reference="PING",
                    reference_value=ping,
                    note=f"p99 {f['rtt_us_p99']:.0f} us; script time {f['script_usec_median']:g}"
                    f" us (p99 {f['script_usec_p99']:g}); {f['commands_mean']:g} Redis commands"
                    f" ({f['scripts_mean']:g} of them script calls)",
                )
            )
        for key, what, limit in (
            ("commands_mean", "Redis commands", 1.25),
            ("script_usec_median", "script time", 1.5),
        ):
            lo, hi = low[decision][key], high[decision][key]
            value = hi / lo if lo else None
            rows.append(
                row(
                    "admission",
                    f"{decision}(): {what}, {high['depth']} / {low['depth']} queued",
                    value,
                    "x",
                    target=f"~1 (<= {limit:g})",
                    met=None if value is None else value <= limit,
                )
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200, help="decisions measured per depth")
    parser.add_argument("--depths", default="10,5000", help="queue depths, comma-separated")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    depths = sorted(int(d) for d in args.depths.split(",") if d.strip())

    try:
        figures = asyncio.run(measure(depths, args.rounds))
    except (ImportError, AttributeError, TypeError, SystemExit) as exc:
        message = f"the scheduler is not there, or not as planned (see ADAPT): {exc!r}"
        write_result(
            "admission_cost",
            {"error": message, "rows": [row("admission", "did not run", None, "", note=message)]},
            args.output,
        )
        print(f"admission_cost: {message}", file=sys.stderr)
        return 1
    rows = figure_rows(figures)
    write_result("admission_cost", {"figures": figures, "rows": rows}, args.output)
    print(
        f"admission decision cost: {args.rounds} decisions per depth, {len(TEAMS)} teams, "
        f"limit {LIMIT}; PING {figures['ping_us_median']:.0f} us"
    )
    print(render_rows(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
