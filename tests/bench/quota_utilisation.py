"""Benchmark: how much of the upstream's shared quota the gateway keeps busy.

    PYTHONPATH=tests python -m bench.quota_utilisation [--seconds 60] [--replicas 2]
                                                       [--clients 6]

Starts its own store, simulator (2-second jobs) and gateway replica(s) with a fast
tracker, then drives a saturating load for `--seconds`: `--clients` loops that create
jobs back to back through the gateway and never poll a job's status, so only the
gateway's own tracker frees slots. What it measures:

- utilisation: the share of the load's wall time during which both upstream slots held
  a job. Computed exactly from the simulator's job timelines (each job counts against
  the account's limit from its admission to its end, both fixed when it is admitted),
  and cross-checked by sampling `/_sim/stats` `running` every ~20 ms;
- each create's slot wait (the gateway's `wait_ms` on its access-log line when it
  writes one, else the client's latency of the 200 minus upstream's time), p50/p99;
- the idle gaps between a job's end upstream and the next job's admission, split into
  end -> release by the tracker (from the gateway's `job ended` log lines) and
  release -> next create upstream;
- creates done, 429s from the gateway, the simulator's own 429s (`limit_hits`, which
  must stay 0) and the highest concurrency the simulator saw.

The figures go to tests/bench/results/quota_utilisation.json. The exit status is 1
only if the simulator's limit was hit; a utilisation under the 97 % target is reported,
not failed. pytest never collects this file (tests/bench is in `norecursedirs`).

The simulator runs in its own process as `create_simulator_app` plus one read-only
route, `/_bench/jobs`, that lists every job's admission and end times (the stock control
API only shows whole seconds); the rest of it is the bundled simulator unchanged.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[2]

TARGET_UTILISATION = 0.97
LIMIT = 2
RESULTS = ROOT / "tests" / "bench" / "results" / "quota_utilisation.json"
SAMPLE_EVERY_S = 0.02


# -- the simulator process (this file run with --serve-simulator) ---------------------------


def serve_simulator(port: int, token: str, queue_s: float, run_s: float) -> None:
    import uvicorn
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from gateway.simulator import SimulatorSettings, create_simulator_app

    app = create_simulator_app(SimulatorSettings(token=token, queue_s=queue_s, run_s=run_s))
    book = app.state.sim.jobs

    async def timelines(request: Request) -> JSONResponse:
        jobs = sorted(book.jobs.values(), key=lambda job: job.seq)
        return JSONResponse(
            {
                "now": book.now(),
                "jobs": [{"id": j.id, "created": j.created, "finished": j.finished} for j in jobs],
            }
        )

    app.router.routes.append(Route("/_bench/jobs", timelines, methods=["GET"]))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning")


# -- processes ------------------------------------------------------------------------------


@dataclass
class Simulator:
    popen: subprocess.Popen[bytes]
    url: str

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def start_simulator(workdir: Path, token: str, queue_s: float, run_s: float) -> Simulator:
    from gateway.embedded_store import free_port
    from support.processes import wait_until

    port = free_port()
    serve = ["--serve-simulator", str(port), token, str(queue_s), str(run_s)]
    log = (workdir / "simulator.log").open("ab")
    popen = subprocess.Popen(
        [sys.executable, "-m", "bench.quota_utilisation", *serve],
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=ROOT,
    )
    log.close()
    sim = Simulator(popen, f"http://127.0.0.1:{port}")

    def ready() -> bool:
        if popen.poll() is not None:
            raise RuntimeError((workdir / "simulator.log").read_text()[-2000:])
        try:
            return httpx.get(sim.url + "/healthz", timeout=1.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(ready, 20.0, "simulator ready")
    except BaseException:
        sim.stop()
        raise
    return sim


def gateway_config(
    simulator_url: str, store_url: str, token: str, keys: dict[str, str], args: argparse.Namespace
) -> dict[str, Any]:
    from gateway.auth import key_digest

    return {
        "upstream": {"base_url": simulator_url + "/v1", "token": token},
        "store": {"redis_url": store_url},
        "quota": {"max_in_flight": LIMIT, "wait_s": args.wait_s},
        "tracker": {"poll_interval_s": args.poll_s, "lease_s": args.lease_s},
        "teams": [{"name": team, "key_sha256": [key_digest(key)]} for team, key in keys.items()],
    }


# -- load -----------------------------------------------------------------------------------


@dataclass
class Outcome:
    sent: float  # wall clock (time.time), comparable with the simulator's
    latency_s: float
    status: int
    code: str | None = None
    video_id: str | None = None
    request_id: str | None = None


@dataclass
class Load:
    outcomes: list[Outcome] = field(default_factory=list)
    started: float = 0.0
    ended: float = 0.0


async def drive(gateways: list[str], keys: dict[str, str], clients: int, seconds: float) -> Load:
    load = Load()
    teams = list(keys)
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120.0, limits=limits) as http:
        load.started = time.time()
        end = load.started + seconds

        async def client_loop(n: int) -> None:
            url = gateways[n % len(gateways)] + "/v1/videos"
            headers = {"authorization": f"Bearer {keys[teams[n % len(teams)]]}"}
            i = 0
            while time.time() < end:
                i += 1
                sent = time.time()
                t0 = time.perf_counter()
                try:
                    reply = await http.post(
                        url, headers=headers, json={"prompt": f"bench client {n} job {i}"}
                    )
                except httpx.HTTPError as exc:
                    load.outcomes.append(Outcome(sent, time.perf_counter() - t0, 0, repr(exc)))
                    await asyncio.sleep(0.1)
                    continue
                latency = time.perf_counter() - t0
                body: Any = {}
                try:
                    body = reply.json()
                except ValueError:
                    body = {}
                outcome = Outcome(
                    sent, latency, reply.status_code, request_id=reply.headers.get("x-request-id")
                )
                if reply.status_code == 200:
                    outcome.video_id = body.get("id")
                else:
                    outcome.code = (body.get("error") or {}).get("code")
                load.outcomes.append(outcome)
                if reply.status_code == 429:
                    retry_ms = reply.headers.get("retry-after-ms", "1000")
                    await asyncio.sleep(min(1.0, int(retry_ms) / 1000 if retry_ms.isdigit() else 1))
                elif reply.status_code != 200:
                    await asyncio.sleep(0.1)

        await asyncio.gather(*(client_loop(n) for n in range(clients)))
        load.ended = time.time()
    return load


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


def busy_share(
    jobs: list[dict[str, float]], start: float, end: float
) -> tuple[float, float, list[tuple[float, float, int]]]:
    """Share of [start, end] with >= LIMIT jobs counting, the mean share of the LIMIT slots
    held, and the intervals inside the window when a slot was free.

    Each job counts against the account from `created` (queued counts) to `finished`.
    """
    events = sorted(
        [(j["created"], 1) for j in jobs] + [(j["finished"], -1) for j in jobs],
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


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[rank]


def log_time(text: str) -> float:
    """The gateway's JSON log `time` ("...T09:01:43.155Z", UTC) as epoch seconds."""
    whole, _, rest = text.rstrip("Z").partition(".")
    return calendar.timegm(time.strptime(whole, "%Y-%m-%dT%H:%M:%S")) + int(rest or 0) / 1000


def read_gateway_logs(paths: list[Path]) -> tuple[dict[str, dict], dict[str, float]]:
    """Access lines of creates by request id, and release times by video id."""
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


def scrape_wait_histogram(gateways: list[str]) -> dict[str, float]:
    """`sora_gateway_slot_wait_seconds` summed over replicas: count, sum, and mean."""
    from prometheus_client.parser import text_string_to_metric_families

    count = total = 0.0
    for url in gateways:
        text = httpx.get(url + "/metrics", timeout=10.0).text
        for family in text_string_to_metric_families(text):
            if family.name != "sora_gateway_slot_wait_seconds":
                continue
            for sample in family.samples:
                if sample.name.endswith("_count"):
                    count += sample.value
                elif sample.name.endswith("_sum"):
                    total += sample.value
    return {"count": count, "sum_s": total, "mean_s": total / count if count else 0.0}


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def analyse(
    args: argparse.Namespace,
    load: Load,
    timelines: dict[str, Any],
    samples: list[tuple[float, int]],
    stats: dict[str, Any],
    gateway_logs: tuple[dict[str, dict], dict[str, float]],
    histogram: dict[str, float],
) -> dict[str, Any]:
    start, end = load.started, load.started + args.seconds
    jobs = timelines["jobs"]
    utilisation, occupancy, idle = busy_share(jobs, start, end)
    in_window = [running for at, running in samples if start <= at <= end]
    sampled = sum(1 for r in in_window if r >= LIMIT) / len(in_window) if in_window else None

    creates, ended = gateway_logs
    done = [o for o in load.outcomes if o.status == 200]
    waits: list[float] = []
    wait_source = "gateway access log wait_ms"
    for o in done:
        entry = creates.get(o.request_id or "")
        if entry is not None and "wait_ms" in entry:
            waits.append(entry["wait_ms"] / 1000)
    if len(waits) < 0.9 * len(done):
        wait_source = "client latency minus upstream_ms"
        waits = []
        for o in done:
            entry = creates.get(o.request_id or "") or {}
            waits.append(max(0.0, o.latency_s - entry.get("upstream_ms", 0.0) / 1000))

    # Each idle gap inside the window: a job's end upstream, its release by the tracker,
    # and the next job's admission upstream.
    by_end = sorted(jobs, key=lambda j: j["finished"])
    created_sorted = sorted(j["created"] for j in jobs)
    detect, handoff, gaps = [], [], []
    for job in by_end:
        if not start <= job["finished"] <= end:
            continue
        nxt = bisect.bisect_left(created_sorted, job["finished"])
        if nxt == len(created_sorted):
            continue
        gap = created_sorted[nxt] - job["finished"]
        gaps.append(gap)
        released = ended.get(job["id"])
        if released is not None:
            detect.append(released - job["finished"])
            handoff.append(created_sorted[nxt] - released)
    idle_total = sum(hi - lo for lo, hi, _ in idle)

    statuses: dict[str, int] = {}
    for o in load.outcomes:
        key = str(o.status) if o.status == 200 else f"{o.status} {o.code}"
        statuses[key] = statuses.get(key, 0) + 1
    rejected = [o for o in load.outcomes if o.status == 429]
    return {
        "config": {
            "seconds": args.seconds,
            "replicas": args.replicas,
            "clients": args.clients,
            "job_s": args.queue_s + args.run_s,
            "queue_s": args.queue_s,
            "run_s": args.run_s,
            "tracker_poll_s": args.poll_s,
            "tracker_lease_s": args.lease_s,
            "quota_wait_s": args.wait_s,
            "limit": LIMIT,
        },
        "utilisation": round(utilisation, 5),
        "utilisation_sampled": None if sampled is None else round(sampled, 5),
        "samples": len(in_window),
        "target": TARGET_UTILISATION,
        "meets_target": utilisation >= TARGET_UTILISATION,
        "slot_occupancy": round(occupancy, 5),
        "idle": {
            "intervals": len(idle),
            "total_s": round(idle_total, 3),
            "mean_ms": ms(idle_total / len(idle)) if idle else None,
        },
        "gap_end_to_next_admission_ms": {
            "n": len(gaps),
            "mean": ms(statistics.fmean(gaps)) if gaps else None,
            "p50": ms(percentile(gaps, 50)),
            "p99": ms(percentile(gaps, 99)),
            "max": ms(max(gaps)) if gaps else None,
        },
        "gap_end_to_release_ms": {
            "n": len(detect),
            "mean": ms(statistics.fmean(detect)) if detect else None,
            "p50": ms(percentile(detect, 50)),
            "p99": ms(percentile(detect, 99)),
        },
        "gap_release_to_next_admission_ms": {
            "n": len(handoff),
            "mean": ms(statistics.fmean(handoff)) if handoff else None,
            "p50": ms(percentile(handoff, 50)),
            "p99": ms(percentile(handoff, 99)),
        },
        "slot_wait_ms": {
            "source": wait_source,
            "n": len(waits),
            "p50": ms(percentile(waits, 50)),
            "p99": ms(percentile(waits, 99)),
            "max": ms(max(waits)) if waits else None,
            "metric_mean": ms(histogram["mean_s"]),
            "metric_count": histogram["count"],
        },
        "client_latency_ms": {
            "p50": ms(percentile([o.latency_s for o in done], 50)),
            "p99": ms(percentile([o.latency_s for o in done], 99)),
        },
        "creates_done": len(done),
        "requests": len(load.outcomes),
        "statuses": statuses,
        "gateway_429s": len(rejected),
        "simulator_limit_hits": stats["limit_hits"],
        "simulator_max_concurrency": stats["max_concurrency"],
        "simulator_jobs_created": stats["jobs_created"],
    }


def table(result: dict[str, Any]) -> str:
    def show(value: Any, unit: str = "") -> str:
        return "-" if value is None else f"{value}{unit}"

    c = result["config"]
    sampled = result["utilisation_sampled"]
    rows = [
        (
            "utilisation (both slots busy)",
            f"{result['utilisation'] * 100:.2f} %  (target >= {result['target'] * 100:.0f} %, "
            f"{'met' if result['meets_target'] else 'NOT met'})",
        ),
        (
            "  cross-check: /_sim/stats samples",
            f"{show(None if sampled is None else round(sampled * 100, 2), ' %')}"
            f"  ({result['samples']} samples)",
        ),
        (
            "  mean slot occupancy",
            f"{result['slot_occupancy'] * 100:.2f} %  (each slot's busy share, averaged)",
        ),
        (
            "slot wait p50 / p99",
            f"{show(result['slot_wait_ms']['p50'], ' ms')} / "
            f"{show(result['slot_wait_ms']['p99'], ' ms')}  ({result['slot_wait_ms']['source']})",
        ),
        (
            "job end -> next admission p50 / p99",
            f"{show(result['gap_end_to_next_admission_ms']['p50'], ' ms')} / "
            f"{show(result['gap_end_to_next_admission_ms']['p99'], ' ms')}"
            f"  (mean {show(result['gap_end_to_next_admission_ms']['mean'], ' ms')})",
        ),
        (
            "  of which end -> release (tracker)",
            f"mean {show(result['gap_end_to_release_ms']['mean'], ' ms')}, "
            f"p99 {show(result['gap_end_to_release_ms']['p99'], ' ms')}",
        ),
        (
            "  of which release -> next create",
            f"mean {show(result['gap_release_to_next_admission_ms']['mean'], ' ms')}, "
            f"p99 {show(result['gap_release_to_next_admission_ms']['p99'], ' ms')}",
        ),
        ("creates done (200)", str(result["creates_done"])),
        ("429s from the gateway", str(result["gateway_429s"])),
        ("simulator 429s (limit_hits)", str(result["simulator_limit_hits"])),
        ("max concurrency upstream", str(result["simulator_max_concurrency"])),
        ("answers", ", ".join(f"{k}: {v}" for k, v in sorted(result["statuses"].items()))),
    ]
    head = (
        f"quota utilisation: {c['seconds']:g} s, {c['replicas']} replica(s), {c['clients']} "
        f"clients, {c['job_s']:g} s jobs, tracker poll {c['tracker_poll_s']:g} s / lease "
        f"{c['tracker_lease_s']:g} s"
    )
    width = max(len(name) for name, _ in rows)
    lines = [head, "-" * len(head)]
    lines += [f"{name.ljust(width)}  {value}" for name, value in rows]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="length of the load")
    parser.add_argument("--replicas", type=int, default=2, help="gateway replicas")
    parser.add_argument("--clients", type=int, default=6, help="concurrent client loops")
    parser.add_argument("--queue-s", type=float, default=0.2, help="simulator: queued seconds")
    parser.add_argument("--run-s", type=float, default=1.8, help="simulator: running seconds")
    parser.add_argument("--poll-s", type=float, default=0.1, help="tracker.poll_interval_s")
    parser.add_argument("--lease-s", type=float, default=1.0, help="tracker.lease_s")
    parser.add_argument("--wait-s", type=float, default=30.0, help="quota.wait_s")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)

    from gateway.auth import new_key
    from gateway.embedded_store import EmbeddedRedis
    from support.processes import start_gateway

    workdir = Path(tempfile.mkdtemp(prefix="sgw-bench-"))
    token = "bench-" + secrets.token_urlsafe(16)
    keys = {"red": new_key(), "blue": new_key()}
    store = EmbeddedRedis(workdir / "store", persistent=False).start()
    simulator: Simulator | None = None
    gateways: list[Any] = []
    sampler: Sampler | None = None
    try:
        simulator = start_simulator(workdir, token, args.queue_s, args.run_s)
        config = gateway_config(simulator.url, store.url, token, keys, args)
        for _ in range(args.replicas):
            gateways.append(start_gateway(workdir, config))
        sampler = Sampler(simulator.url)
        sampler.start()
        print(
            f"driving {args.clients} clients through {args.replicas} replica(s) for "
            f"{args.seconds:g} s (logs in {workdir}) ...",
            file=sys.stderr,
        )
        load = asyncio.run(drive([g.url for g in gateways], keys, args.clients, args.seconds))
        sampler.stopping.set()
        sampler.join(5)
        with httpx.Client(base_url=simulator.url, timeout=10.0) as sim:
            timelines = sim.get("/_bench/jobs").json()
            stats = sim.get("/_sim/stats").json()
        histogram = scrape_wait_histogram([g.url for g in gateways])
        logs = read_gateway_logs([g.log_path for g in gateways])
    finally:
        if sampler is not None:
            sampler.stopping.set()
        for gateway in gateways:
            gateway.stop()
        if simulator is not None:
            simulator.stop()
        store.cleanup()

    result = analyse(args, load, timelines, sampler.samples, stats, logs, histogram)
    result["workdir"] = str(workdir)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    print(f"\nfigures written to {os.path.relpath(args.output, Path.cwd())}")
    if result["simulator_limit_hits"]:
        print("FAIL: the simulator's own limit was hit: the gateway over-admitted", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 6 and sys.argv[1] == "--serve-simulator":
        serve_simulator(int(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5]))
    else:
        sys.exit(main())
