"""Benchmark: how much of the upstream's shared quota the gateway keeps busy, when full
requests wait for a slot (`quota.when_full: wait`) and when they are queued (`queue`).

    PYTHONPATH=tests python -m bench.quota_utilisation [--mode both|wait|queue]
        [--seconds 30] [--replicas 2] [--clients 6] [--queued 4]

Each mode gets its own store, simulator (2-second jobs) and gateway replicas with a fast
tracker, and a saturating load for `--seconds`; nobody polls a job's status, so only the
gateway's own tracker frees slots.

- wait (`quota.when_full: wait`, or no such key on a gateway from before the queue):
  `--clients` loops create jobs back to back; a create that finds both slots taken
  waits in the gateway (up to `quota.wait_s`) for one.
- queue: the gateway runs with `quota.when_full: queue` (CONTRACT §8), so a create
  answers at once (200 `status: queued` with a gateway id when no slot is free) and
  nothing waits; the load keeps `--queued` accepted jobs not yet started upstream at
  all times (accepted or in flight minus the simulator's `jobs_created`).

What it measures, from the simulator's create log (`/_sim/creates`: every job's
admission and end, and the prompt that made it):

- utilisation: the share of the load's wall time during which both upstream slots held
  a job (each job counts from its admission to its end, both fixed at admission),
  cross-checked by sampling `/_sim/stats` `running` every ~20 ms; target 97 % waiting,
  98 % queued;
- slot free -> next start upstream, p50/p99: each time a slot comes free (a job ends),
  the gap until the next admission takes that slot (free slots are taken oldest first),
  split with the gateway's `job ended` log lines into end -> release by the tracker and
  release -> next create upstream;
- accept -> start upstream (queue mode: the time jobs spent in the gateway's queue) and
  the create's client latency; the slot wait of wait mode;
- creates done, 429s from the gateway (must be 0 queued), the simulator's own 429s
  (`limit_hits`, must be 0) and the highest concurrency it saw, and jobs started upstream
  more than once (same prompt admitted twice; must be 0).

The figures go to tests/bench/results/quota_utilisation.json (`modes.wait`,
`modes.queue`). The exit status is 1 if a mode could not run (the gateway refuses
`when_full` until the queue lands), the simulator's limit was hit, or a job started
twice; a missed utilisation target is reported, not failed. pytest never collects
this file (tests/bench is in `norecursedirs`).
"""

from __future__ import annotations

import argparse
import asyncio
import calendar
import json
import math
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]

TARGETS = {"wait": 0.97, "queue": 0.98}
MODES = ("wait", "queue")
LIMIT = 2
RESULTS = ROOT / "tests" / "bench" / "results" / "quota_utilisation.json"
SAMPLE_EVERY_S = 0.02
FEED_EVERY_S = 0.02


# -- processes ------------------------------------------------------------------------------


def gateway_config(
    mode: str,
    simulator_url: str,
    store_url: str,
    token: str,
    keys: dict[str, str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    from gateway.auth import key_digest

    quota: dict[str, Any] = {"max_in_flight": LIMIT, "wait_s": args.wait_s, "when_full": mode}
    return {
        "upstream": {"base_url": simulator_url + "/v1", "token": token},
        "store": {"redis_url": store_url},
        "quota": quota,
        "tracker": {"poll_interval_s": args.poll_s, "lease_s": args.lease_s},
        "teams": [{"name": team, "key_sha256": [key_digest(key)]} for team, key in keys.items()],
    }


def config_refusal(workdir: Path, config: dict[str, Any]) -> str | None:
    """What `check-config` says against the config, or None when it takes it."""
    from support.processes import write_config

    path = write_config(workdir / "check.yaml", config)
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "check-config", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if done.returncode == 0:
        return None
    return (done.stderr or done.stdout).strip()[-1500:]


# -- load -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    prompt: str
    sent: float  # wall clock (time.time), the simulator's clock at time_scale 1
    latency_s: float
    status: int
    code: str | None = None
    video_id: str | None = None
    request_id: str | None = None
    queue_position: str | None = None  # x-queue-position: the job was queued


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0


class Creator:
    """Sends creates round robin over the replicas and teams, recording each outcome."""

    def __init__(self, http: httpx.AsyncClient, gateways: list[str], keys: dict[str, str]):
        self.http = http
        self.gateways = gateways
        self.keys = list(keys.values())
        self.load = Load()
        self.sent = 0

    async def create(self, mode: str, lane: int) -> Outcome:
        self.sent += 1
        n = self.sent
        url = self.gateways[lane % len(self.gateways)] + "/v1/videos"
        headers = {"authorization": f"Bearer {self.keys[lane % len(self.keys)]}"}
        prompt = f"bench {mode} lane {lane} job {n}"
        sent = time.time()
        t0 = time.perf_counter()
        try:
            reply = await self.http.post(url, headers=headers, json={"prompt": prompt})
        except httpx.HTTPError as exc:
            outcome = Outcome(prompt, sent, time.perf_counter() - t0, 0, repr(exc))
            self.load.outcomes.append(outcome)
            return outcome
        outcome = Outcome(
            prompt,
            sent,
            time.perf_counter() - t0,
            reply.status_code,
            request_id=reply.headers.get("x-request-id"),
            queue_position=reply.headers.get("x-queue-position"),
        )
        try:
            body = reply.json()
        except ValueError:
            body = {}
        if not isinstance(body, dict):
            body = {}
        if reply.status_code == 200:
            outcome.video_id = body.get("id")
        else:
            outcome.code = (body.get("error") or {}).get("code")
        self.load.outcomes.append(outcome)
        return outcome


async def backoff(outcome: Outcome) -> None:
    if outcome.status == 429:
        await asyncio.sleep(1.0)
    elif outcome.status != 200:
        await asyncio.sleep(0.1)


async def drive_wait(creator: Creator, clients: int, end: float) -> None:
    """`clients` loops creating back to back; each waits in the gateway when full."""

    async def client_loop(lane: int) -> None:
        while time.time() < end:
            await backoff(await creator.create("wait", lane))

    await asyncio.gather(*(client_loop(n) for n in range(clients)))


async def drive_queue(creator: Creator, sim_url: str, queued: int, end: float) -> None:
    """Keep `queued` accepted jobs not yet started upstream, topping up every ~20 ms."""
    in_flight: set[asyncio.Task[None]] = set()
    lane = 0

    async def one(n: int) -> None:
        await backoff(await creator.create("queue", n))

    while time.time() < end:
        t0 = time.time()
        try:
            started = (await creator.http.get(sim_url + "/_sim/stats")).json()["jobs_created"]
        except (httpx.HTTPError, ValueError, KeyError):
            started = None
        if started is not None:
            accepted = sum(1 for o in creator.load.outcomes if o.status == 200)
            for _ in range(queued - (accepted + len(in_flight) - started)):
                lane += 1
                task = asyncio.create_task(one(lane))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        await asyncio.sleep(max(0.0, FEED_EVERY_S - (time.time() - t0)))
    if in_flight:
        await asyncio.wait(in_flight, timeout=30)


async def drive(
    mode: str, gateways: list[str], keys: dict[str, str], sim_url: str, args: argparse.Namespace
) -> Load:
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as http:
        creator = Creator(http, gateways, keys)
        creator.load.started = time.time()
        end = creator.load.started + args.seconds
        if mode == "wait":
            await drive_wait(creator, args.clients, end)
        else:
            await drive_queue(creator, sim_url, args.queued, end)
        creator.load.ended = time.time()
    return creator.load


class Sampler(threading.Thread):
    """Reads the simulator's `running` every ~20 ms, for the cross-check."""

    def __init__(self, sim_url: str) -> None:
        super().__init__(daemon=True)
        self.sim_url = sim_url
        self.samples: list[tuple[float, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.sim_url, timeout=5.0) as sim:
            while not self.stopping.is_set():
                t0 = time.time()
                try:
                    running = sim.get("/_sim/stats").json()["running"]
                except (httpx.HTTPError, ValueError, KeyError):
                    running = None
                if running is not None:
                    # The answer was computed somewhere between the two stamps.
                    self.samples.append(((t0 + time.time()) / 2, running))
                self.stopping.wait(max(0.0, SAMPLE_EVERY_S - (time.time() - t0)))


# -- analysis -------------------------------------------------------------------------------


def timelines(creates: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The jobs of the create log: id, prompt, and the span it held a place upstream."""
    jobs = []
    for record in creates:
        if record["video_id"] is None:
            continue
        end = record["finished"]
        if record["deleted"] is not None:
            end = min(end, record["deleted"])
        jobs.append(
            {
                "id": record["video_id"],
                "prompt": record["prompt"],
                "admitted": record["admitted"],
                "ended": end,
            }
        )
    return jobs


def busy_share(
    jobs: list[dict[str, Any]], start: float, end: float
) -> tuple[float, float, list[tuple[float, float, int]]]:
    """Share of [start, end] with >= LIMIT jobs counting, the mean share of the LIMIT slots
    held, and the intervals inside the window when a slot was free."""
    events = sorted(
        [(j["admitted"], 1) for j in jobs] + [(j["ended"], -1) for j in jobs],
        key=lambda e: (e[0], e[1]),  # an end before a start at the same instant
    )
    events.append((math.inf, 0))
    count, last, full, held = 0, start, 0.0, 0.0
    idle: list[tuple[float, float, int]] = []  # (from, to, jobs counting meanwhile)
    for at, delta in events:
        lo, hi = max(last, start), min(at, end)
        if hi > lo:
            held += min(count, LIMIT) * (hi - lo)
            if count >= LIMIT:
                full += hi - lo
            else:
                idle.append((lo, hi, count))
        count += delta
        last = at
    return full / (end - start), held / (LIMIT * (end - start)), idle


def handoffs(
    jobs: list[dict[str, Any]], start: float, end: float
) -> list[tuple[float, float, str]]:
    """(freed at, taken at, id of the job that freed it) for each slot freed inside
    [start, end] and taken again: each admission takes the slot free the longest."""
    events = sorted(
        [(j["ended"], 0, j["id"]) for j in jobs] + [(j["admitted"], 1, j["id"]) for j in jobs]
    )
    free: deque[tuple[float, str | None]] = deque([(-math.inf, None)] * LIMIT)
    found = []
    for at, kind, job_id in events:
        if kind == 0:
            free.append((at, job_id))
        elif free:
            freed_at, freed_by = free.popleft()
            if freed_by is not None and start <= freed_at <= end:
                found.append((freed_at, at, freed_by))
    return found


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[rank]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def spread(values: list[float]) -> dict[str, Any]:
    return {
        "n": len(values),
        "mean": ms(statistics.fmean(values)) if values else None,
        "p50": ms(percentile(values, 50)),
        "p99": ms(percentile(values, 99)),
        "max": ms(max(values)) if values else None,
    }


def log_time(text: str) -> float:
    """The gateway's JSON log `time` ("...T09:01:43.155Z", UTC) as epoch seconds."""
    whole, _, rest = text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(rest or 0) / 1000


def read_gateway_logs(paths: list[Path]) -> tuple[dict[str, dict], dict[str, float]]:
    """Access lines of creates by request id, and release times by upstream video id."""
    creates: dict[str, dict] = {}
    ended: dict[str, float] = {}
    for path in paths:
        for line in path.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if not isinstance(entry, dict):
                continue
            if entry.get("message") == "job ended" and entry.get("video_id"):
                ended[entry["video_id"]] = log_time(entry["time"])
            elif (
                entry.get("logger") == "gateway.access"
                and entry.get("method") == "POST"
                and entry.get("route") == "/v1/videos"
                and entry.get("request_id")
            ):
                creates[entry["request_id"]] = entry
    return creates, ended


def slot_waits(done: list[Outcome], creates: dict[str, dict]) -> tuple[list[float], str]:
    """Each create's wait for a slot: the gateway's `wait_ms`, else latency minus upstream's."""
    waits = [
        creates[o.request_id]["wait_ms"] / 1000
        for o in done
        if o.request_id in creates and "wait_ms" in creates[o.request_id]
    ]
    if len(waits) >= 0.9 * len(done):
        return waits, "gateway access log wait_ms"
    waits = []
    for o in done:
        entry = creates.get(o.request_id or "") or {}
        waits.append(max(0.0, o.latency_s - entry.get("upstream_ms", 0.0) / 1000))
    return waits, "client latency minus upstream_ms"


def analyse(
    mode: str,
    args: argparse.Namespace,
    load: Load,
    creates: list[dict[str, Any]],
    samples: list[tuple[float, int]],
    stats: dict[str, Any],
    gateway_logs: tuple[dict[str, dict], dict[str, float]],
) -> dict[str, Any]:
    start, end = load.started, load.started + args.seconds
    jobs = timelines(creates)
    utilisation, occupancy, idle = busy_share(jobs, start, end)
    in_window = [running for at, running in samples if start <= at <= end]
    sampled = sum(1 for r in in_window if r >= LIMIT) / len(in_window) if in_window else None

    access, ended = gateway_logs
    gaps, detect, handoff = [], [], []
    for freed_at, taken_at, freed_by in handoffs(jobs, start, end):
        gaps.append(taken_at - freed_at)
        released = ended.get(freed_by)
        if released is not None:
            detect.append(released - freed_at)
            handoff.append(taken_at - released)

    # Each client's prompt is unique: its admissions upstream are its starts.
    starts = Counter(job["prompt"] for job in jobs if job["prompt"].startswith("bench "))
    started_at = {job["prompt"]: job["admitted"] for job in jobs}
    done = [o for o in load.outcomes if o.status == 200]
    queued = [o for o in done if o.queue_position is not None]
    to_start = [started_at[o.prompt] - o.sent for o in done if o.prompt in started_at]
    waits, wait_source = slot_waits(done, access)

    statuses: Counter[str] = Counter(
        str(o.status) if o.status == 200 else f"{o.status} {o.code}" for o in load.outcomes
    )
    rejected = sum(1 for o in load.outcomes if o.status == 429)
    target = TARGETS[mode]
    return {
        "mode": mode,
        "utilisation": round(utilisation, 5),
        "utilisation_sampled": None if sampled is None else round(sampled, 5),
        "samples": len(in_window),
        "target": target,
        "meets_target": utilisation >= target,
        "slot_occupancy": round(occupancy, 5),
        "idle": {
            "intervals": len(idle),
            "total_s": round(sum(hi - lo for lo, hi, _ in idle), 3),
        },
        "gap_slot_free_to_next_start_ms": spread(gaps),
        "gap_end_to_release_ms": spread(detect),
        "gap_release_to_next_start_ms": spread(handoff),
        "accept_to_start_upstream_ms": spread(to_start),
        "slot_wait_ms": {"source": wait_source, **spread(waits)},
        "client_latency_ms": spread([o.latency_s for o in done]),
        "creates_done": len(done),
        "creates_queued": len(queued),
        "accepted_not_started": sum(1 for o in done if o.prompt not in started_at),
        "requests": len(load.outcomes),
        "statuses": dict(statuses),
        "gateway_429s": rejected,
        "started_twice": sorted(prompt for prompt, n in starts.items() if n > 1),
        "simulator_limit_hits": stats["limit_hits"],
        "simulator_max_concurrency": stats["max_concurrency"],
        "simulator_jobs_created": stats["jobs_created"],
    }


# -- one mode -------------------------------------------------------------------------------


def run_mode(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fresh store, simulator and replicas; the load; the figures (or why it did not run)."""
    from gateway.auth import new_key
    from gateway.embedded_store import EmbeddedRedis
    from support.processes import Process, start_gateway, start_simulator

    workdir = Path(tempfile.mkdtemp(prefix=f"sgw-bench-quota-{mode}-"))
    token = "bench-" + secrets.token_urlsafe(16)
    keys = {"red": new_key(), "blue": new_key()}
    store = EmbeddedRedis(workdir / "store", persistent=False).start()
    simulator: Process | None = None
    gateways: list[Process] = []
    sampler: Sampler | None = None
    try:
        simulator = start_simulator(workdir, token, queue_s=args.queue_s, run_s=args.run_s)
        config = gateway_config(mode, simulator.url, store.url, token, keys, args)
        refusal = config_refusal(workdir, config)
        note = None
        if refusal is not None and mode == "wait" and "when_full" in refusal:
            # A gateway from before the queue: waiting is all it does, and it has no key.
            del config["quota"]["when_full"]
            refusal = config_refusal(workdir, config)
            note = "the gateway has no quota.when_full: waiting is its only mode"
        if refusal is not None:
            return {"mode": mode, "error": f"the gateway refused its config: {refusal}"}
        try:
            for _ in range(args.replicas):
                gateways.append(start_gateway(workdir, config))
        except AssertionError as exc:  # support.processes: it exited or never got ready
            return {"mode": mode, "error": f"a gateway did not start: {str(exc)[-1500:]}"}
        sampler = Sampler(simulator.url)
        sampler.start()
        print(
            f"[{mode}] {args.replicas} replica(s), {args.seconds:g} s (logs in {workdir}) ...",
            file=sys.stderr,
        )
        load = asyncio.run(drive(mode, [g.url for g in gateways], keys, simulator.url, args))
        sampler.stopping.set()
        sampler.join(5)
        with httpx.Client(base_url=simulator.url, timeout=10.0) as sim:
            creates = sim.get("/_sim/creates").json()
            stats = sim.get("/_sim/stats").json()
        logs = read_gateway_logs([g.log_path for g in gateways])
    finally:
        if sampler is not None:
            sampler.stopping.set()
        for gateway in gateways:
            gateway.stop()
        if simulator is not None:
            simulator.stop()
        store.cleanup()
    result = analyse(mode, args, load, creates, sampler.samples, stats, logs)
    result["workdir"] = str(workdir)
    result["note"] = note
    return result


# -- output ---------------------------------------------------------------------------------


def _show(value: Any, unit: str = "") -> str:
    return "-" if value is None else f"{value}{unit}"


def _pair(figures: dict[str, Any], unit: str = " ms") -> str:
    return f"{_show(figures['p50'], unit)} / {_show(figures['p99'], unit)}"


TABLE_ROWS: list[tuple[str, Any]] = [
    (
        "utilisation (both slots busy)",
        lambda r: (
            f"{r['utilisation'] * 100:.2f} % "
            f"({'met' if r['meets_target'] else 'NOT met'} >= {r['target'] * 100:.0f} %)"
        ),
    ),
    (
        "  cross-check: /_sim/stats samples",
        lambda r: _show(
            None if r["utilisation_sampled"] is None else round(r["utilisation_sampled"] * 100, 2),
            " %",
        ),
    ),
    ("  mean slot occupancy", lambda r: f"{r['slot_occupancy'] * 100:.2f} %"),
    ("slot free -> next start p50 / p99", lambda r: _pair(r["gap_slot_free_to_next_start_ms"])),
    ("  end -> release (tracker) p50 / p99", lambda r: _pair(r["gap_end_to_release_ms"])),
    ("  release -> next start p50 / p99", lambda r: _pair(r["gap_release_to_next_start_ms"])),
    ("accept -> start upstream p50 / p99", lambda r: _pair(r["accept_to_start_upstream_ms"])),
    ("slot wait p50 / p99", lambda r: _pair(r["slot_wait_ms"])),
    ("create latency p50 / p99", lambda r: _pair(r["client_latency_ms"])),
    ("creates done (200)", lambda r: str(r["creates_done"])),
    ("  of which queued (x-queue-position)", lambda r: str(r["creates_queued"])),
    ("429s from the gateway", lambda r: str(r["gateway_429s"])),
    ("simulator 429s (limit_hits)", lambda r: str(r["simulator_limit_hits"])),
    ("max concurrency upstream", lambda r: str(r["simulator_max_concurrency"])),
    ("jobs started twice upstream", lambda r: str(len(r["started_twice"]))),
]


def table(result: dict[str, Any]) -> str:
    """Both modes side by side."""
    c = result["config"]
    modes = list(result["modes"])
    head = (
        f"quota utilisation: {c['seconds']:g} s per mode, {c['replicas']} replicas, "
        f"{c['job_s']:g} s jobs, tracker poll {c['tracker_poll_s']:g} s / lease "
        f"{c['tracker_lease_s']:g} s; wait: {c['clients']} clients, queue: "
        f"{c['queued']} kept queued"
    )
    cells: list[list[str]] = [["", *modes]]
    for name, cell in TABLE_ROWS:
        line = [name]
        for mode in modes:
            r = result["modes"][mode]
            line.append("-" if "error" in r else cell(r))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(cells[0]))]
    lines = [head, "-" * len(head)]
    lines += [
        "  ".join(text.ljust(w) for text, w in zip(line, widths, strict=True)) for line in cells
    ]
    for mode in modes:
        r = result["modes"][mode]
        if "error" in r:
            lines.append(f"{mode}: NOT RUN: {r['error']}")
        else:
            answers = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
            lines.append(f"{mode} answers: {answers}")
    return "\n".join(lines)


def failures(result: dict[str, Any]) -> list[str]:
    found = []
    for mode, r in result["modes"].items():
        if "error" in r:
            found.append(f"{mode} mode did not run")
            continue
        if r["simulator_limit_hits"]:
            found.append(f"{mode}: the simulator's own limit was hit: the gateway over-admitted")
        if r["started_twice"]:
            found.append(f"{mode}: {len(r['started_twice'])} job(s) started twice upstream")
    return found


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=("both", *MODES), default="both")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each load")
    parser.add_argument("--replicas", type=int, default=2, help="gateway replicas")
    parser.add_argument("--clients", type=int, default=6, help="wait mode: client loops")
    parser.add_argument("--queued", type=int, default=4, help="queue mode: jobs kept queued")
    parser.add_argument("--queue-s", type=float, default=0.2, help="simulator: queued seconds")
    parser.add_argument("--run-s", type=float, default=1.8, help="simulator: running seconds")
    parser.add_argument("--poll-s", type=float, default=0.1, help="tracker.poll_interval_s")
    parser.add_argument("--lease-s", type=float, default=1.0, help="tracker.lease_s")
    parser.add_argument("--wait-s", type=float, default=30.0, help="quota.wait_s")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)

    modes = MODES if args.mode == "both" else (args.mode,)
    result: dict[str, Any] = {
        "config": {
            "seconds": args.seconds,
            "replicas": args.replicas,
            "clients": args.clients,
            "queued": args.queued,
            "job_s": args.queue_s + args.run_s,
            "queue_s": args.queue_s,
            "run_s": args.run_s,
            "tracker_poll_s": args.poll_s,
            "tracker_lease_s": args.lease_s,
            "quota_wait_s": args.wait_s,
            "limit": LIMIT,
        },
        "modes": {mode: run_mode(mode, args) for mode in modes},
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nfigures written to {os.path.relpath(args.output, Path.cwd())}")
    problems = failures(result)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
