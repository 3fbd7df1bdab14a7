"""Benchmark: retrieves with 1, 2 and 4 uvicorn workers and with 2 replicas on one Redis.

    PYTHONPATH=tests python -m bench.scale [--seconds 10] [--rounds 2] [--idle-seconds 10]

Starts its own Redis and a fast upstream (Debian's nginx answering a video object for
`GET /v1/videos/{id}`), then one configuration at a time: `serve --workers 1`, `2`,
`4`, and two `serve` processes (1 worker each) on the same Redis. For each, and for
two kinds of retrieve ("retrieve": upstream's answer does not change, so the gateway
only reads its record; "retrieve*": a different body every time, as while a job's
progress moves, so the gateway also rewrites its record):

- requests/s, p50 and p99 of `GET /v1/videos/{id}` at 32 connections (`wrk`, 1 thread;
  for 2 replicas, two wrk processes with 16 connections each, run together), `--rounds`
  runs of `--seconds`, the median reported with its ratio to 1 worker;
- Redis commands per retrieve: the delta of `INFO commandstats` calls over the load
  (commands run inside the Lua scripts are counted too: Redis counts them), minus the
  background (trackers, release listeners, health checks) measured while idle for
  `--idle-seconds` just before, divided by the retrieves served;
- which of those commands the gateway sends itself and which its scripts run: Redis
  `MONITOR` during 400 more retrieves at one connection (its own window, since MONITOR
  slows Redis), again net of the idle background.

The trackers run with the default settings (poll every 5 s), so the background is what
a deployment sees. Nothing is pinned: N workers need both cores, so they share them
with wrk, the upstream and Redis; the direct upstream's rate, measured first and last,
shows the load generator and upstream are not the limit, and how much the machine
drifted.

Writes tests/bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import redis

from bench.common import (
    CHANGING,
    RESULTS_DIR,
    ForeignLoad,
    LoadGenerator,
    LoadResult,
    Monitor,
    RawHttp,
    all_cores,
    bench_gateway_config,
    calls_delta,
    command_calls,
    cpu_seconds,
    create_video,
    ensure_tool,
    fmt,
    gateway_pids,
    get_request,
    machine_note,
    make_workdir,
    median,
    new_keys,
    render_rows,
    row,
    start_fast_upstream,
    start_gateway,
    start_store,
    write_result,
)

BENCH = "scale"
COMMANDS_TARGET = 3
CONFIGS = (("1 worker", 1, 1), ("2 workers", 2, 1), ("4 workers", 4, 1), ("2 replicas", 1, 2))
MONITOR_REQUESTS = 400
# "retrieve": the answer does not change (the gateway only reads its record);
# "retrieve*": a different body on every answer (the gateway also rewrites the record).
VARIANTS: dict[str, dict[str, str] | None] = {"retrieve": None, "retrieve*": dict([CHANGING])}


def per_second(delta: dict[str, int], seconds: float) -> dict[str, float]:
    return {k: v / seconds for k, v in delta.items()}


def net_of_idle(
    delta: dict[str, int], idle_rate: dict[str, float], seconds: float
) -> dict[str, float]:
    names = set(delta) | set(idle_rate)
    return {n: max(0.0, delta.get(n, 0) - idle_rate.get(n, 0.0) * seconds) for n in names}


def run_load(
    load: LoadGenerator,
    urls: list[str],
    key: str | None,
    connections: int,
    seconds: float,
    headers: dict[str, str] | None = None,
) -> LoadResult:
    """`connections` spread over `urls`, all at once; their requests and rates summed."""
    share = connections // len(urls)
    handles = [load.start(url, "GET", key, share, seconds, headers) for url in urls]
    results = [load.finish(h) for h in handles]
    if len(results) == 1:
        return results[0]
    total = sum(r.requests for r in results)
    return LoadResult(
        results[0].tool,
        connections,
        max(r.seconds for r in results),
        total,
        sum(r.errors for r in results),
        sum(r.rps for r in results),
        max(r.p50_ms for r in results),
        max(r.p90_ms for r in results),
        max(r.p99_ms for r in results),
        max(r.max_ms for r in results),
    )


def measure_config(
    name: str,
    gateways: list[Any],
    key: str,
    path: str,
    client: redis.Redis,
    store_url: str,
    load: LoadGenerator,
    args: argparse.Namespace,
) -> dict[str, Any]:
    urls = [g.url + path for g in gateways]
    for headers in VARIANTS.values():  # warm-up
        run_load(load, urls, key, args.connections, 2, headers)
    time.sleep(0.5)
    t0, idle_before = time.monotonic(), command_calls(client)
    time.sleep(args.idle_seconds)
    idle_rate = per_second(calls_delta(idle_before, command_calls(client)), time.monotonic() - t0)
    pids = [pid for g in gateways for pid in gateway_pids(g)]
    out: dict[str, Any] = {
        "idle_calls_per_s": round(sum(idle_rate.values()), 2),
        "idle_by_command_per_s": {k: round(v, 2) for k, v in sorted(idle_rate.items())},
    }
    runs: dict[str, list[dict[str, Any]]] = {variant: [] for variant in VARIANTS}
    for r in range(args.rounds):
        for variant, headers in VARIANTS.items():
            before = command_calls(client)
            cpu_before = cpu_seconds(pids)
            started = time.monotonic()
            result = run_load(load, urls, key, args.connections, args.seconds, headers)
            wall = time.monotonic() - started
            delta = calls_delta(before, command_calls(client))
            net = net_of_idle(delta, idle_rate, wall)
            served = max(1, result.requests)
            runs[variant].append(
                {
                    **result.as_dict(),
                    "cpu_gateway_cores": round((cpu_seconds(pids) - cpu_before) / wall, 3),
                    "calls_total": sum(delta.values()),
                    "calls_net": sum(net.values()),
                    "per_request_total": sum(delta.values()) / served,
                    "per_request_net": sum(net.values()) / served,
                    "per_request_by_command": {
                        k: round(v / served, 3)
                        for k, v in sorted(net.items())
                        if v / served > 0.005
                    },
                }
            )
            got = runs[variant][-1]
            print(
                f"  {name:10s} {variant:9s} round {r + 1}: {result.rps:8,.0f} req/s  "
                f"p99 {result.p99_ms:.1f} ms  {got['per_request_net']:.2f} Redis "
                f"commands/request  errors {result.errors}",
                file=sys.stderr,
            )
    for variant, headers in VARIANTS.items():
        rs = runs[variant]
        out[variant] = {
            "rps": median([x["rps"] for x in rs]),
            "p50_ms": median([x["p50_ms"] for x in rs]),
            "p99_ms": median([x["p99_ms"] for x in rs]),
            "errors": sum(x["errors"] for x in rs),
            "cpu_gateway_cores": median([x["cpu_gateway_cores"] for x in rs]),
            "per_request_net": median([x["per_request_net"] for x in rs]),
            "per_request_total": median([x["per_request_total"] for x in rs]),
            "per_request_by_command": rs[-1]["per_request_by_command"],
            "monitor": monitor_phase(gateways, key, path, store_url, headers),
            "runs": rs,
        }
    return out


def monitor_phase(
    gateways: list[Any], key: str, path: str, store_url: str, headers: dict[str, str] | None
) -> dict[str, Any]:
    """Commands per retrieve as Redis saw them arrive: sent by the gateway, or by scripts."""
    idle = Monitor(store_url)
    idle.start()
    idle.ready.wait(5)
    time.sleep(2.0)
    idle.stop()
    idle_s = 2.0
    clients = [RawHttp(g.url) for g in gateways]
    requests = [get_request(g.url, path, key, headers) for g in gateways]
    for c, req in zip(clients, requests, strict=True):  # connections up before the window
        c.request(req)
    watch = Monitor(store_url)
    watch.start()
    watch.ready.wait(5)
    started = time.monotonic()
    errors = 0
    for i in range(MONITOR_REQUESTS):
        n = i % len(clients)
        status, _ = clients[n].request(requests[n])
        errors += status != 200
    seconds = time.monotonic() - started
    watch.stop()
    for c in clients:
        c.close()

    def per_request(book: dict[str, int], idle_book: dict[str, int]) -> dict[str, float]:
        out = {}
        for k, v in book.items():
            net = v - idle_book.get(k, 0) * seconds / idle_s
            if net > 0.5:
                out[k] = round(net / MONITOR_REQUESTS, 3)
        return dict(sorted(out.items()))

    sent = per_request(watch.top, idle.top)
    scripted = per_request(watch.scripted, idle.scripted)
    return {
        "requests": MONITOR_REQUESTS,
        "errors": errors,
        "sent_per_request": sent,
        "scripted_per_request": scripted,
        "sent_total": round(sum(sent.values()), 2),
        "scripted_total": round(sum(scripted.values()), 2),
    }


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    configs = result["configs"]
    conns = result["config"]["connections"]
    rows = []
    for variant in VARIANTS:
        base = configs["1 worker"][variant]
        for name, config in configs.items():
            c = config[variant]
            rows.append(
                row(
                    BENCH,
                    f"{variant} req/s, {conns} conn, {name}",
                    c["rps"],
                    "req/s",
                    reference="1 worker",
                    reference_value=base["rps"],
                    note=f"p99 {fmt(c['p99_ms'], 'ms')}; gateway processes used "
                    f"{c['cpu_gateway_cores']:.2f} cores: "
                    f"~{c['rps'] / max(c['cpu_gateway_cores'], 0.01):,.0f} req/s per core",
                )
            )
    for variant in VARIANTS:
        base = configs["1 worker"][variant]
        for name, config in configs.items():
            c = config[variant]
            m = c["monitor"]
            flat = abs(c["per_request_net"] - base["per_request_net"]) <= 0.1
            by_command = ", ".join(f"{k} {v:g}" for k, v in c["per_request_by_command"].items())
            sent = ", ".join(f"{k} {v:g}" for k, v in m["sent_per_request"].items()) or "-"
            scripted = ", ".join(f"{k} {v:g}" for k, v in m["scripted_per_request"].items())
            rows.append(
                row(
                    BENCH,
                    f"Redis commands per {variant}, {name}",
                    c["per_request_net"],
                    "",
                    reference="1 worker",
                    reference_value=base["per_request_net"],
                    target=f"<= {COMMANDS_TARGET}, flat",
                    met=c["per_request_net"] <= COMMANDS_TARGET + 0.05 and flat,
                    note=(
                        f"commandstats: {by_command}; of which sent by the gateway (MONITOR): "
                        f"{m['sent_total']:g} ({sent}), run inside scripts: "
                        f"{m['scripted_total']:g} ({scripted or '-'}); idle background "
                        f"{config['idle_calls_per_s']:g} commands/s"
                    ),
                )
            )
    direct = result["direct"]
    rows.append(
        row(
            BENCH,
            "upstream direct req/s (first / last)",
            direct[0]["rps"],
            "req/s",
            reference="last",
            reference_value=direct[-1]["rps"],
            note="the fast upstream alone, same placement: the ceiling and the drift",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="wrk runs per configuration")
    parser.add_argument("--idle-seconds", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / f"{BENCH}.json")
    args = parser.parse_args(argv)

    notes: list[str] = []
    cores = all_cores()
    os.sched_setaffinity(0, cores)
    nginx = ensure_tool("nginx", "nginx", notes)
    wrk = ensure_tool("wrk", "wrk", notes)
    workdir = make_workdir(BENCH)
    machine_before = machine_note()
    foreign = ForeignLoad()
    started = time.time()
    store = upstream = None
    gateways: list[Any] = []
    configs: dict[str, Any] = {}
    direct: list[dict[str, Any]] = []
    load = LoadGenerator(wrk, workdir, None)
    try:
        store = start_store(workdir, None)
        client = redis.Redis.from_url(store.url)
        upstream = start_fast_upstream(workdir, nginx, None)
        keys = new_keys("bench")
        key = keys["bench"]
        token = "bench-" + secrets.token_urlsafe(16)
        config = bench_gateway_config(upstream.url, store.url, token, keys)
        del config["tracker"]  # the defaults: the background a deployment has
        video = "/v1/videos/{id}"
        direct.append(
            run_load(load, [upstream.url + video.format(id="video_x")], None, 32, 5).as_dict()
        )
        for name, workers, replicas in CONFIGS:
            print(f"{name} ...", file=sys.stderr)
            client.flushall()
            gateways = [
                start_gateway(workdir, config, workers=workers, cpus=cores) for _ in range(replicas)
            ]
            video_id = create_video(gateways[0].url, key)
            configs[name] = measure_config(
                name, gateways, key, video.format(id=video_id), client, store.url, load, args
            )
            configs[name].update({"workers": workers, "replicas": replicas})
            for g in gateways:
                g.stop()
            gateways = []
        direct.append(
            run_load(load, [upstream.url + video.format(id="video_x")], None, 32, 5).as_dict()
        )
        client.close()
    finally:
        for g in gateways:
            g.stop()
        if upstream is not None:
            upstream.stop()
        if store is not None:
            store.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

    result: dict[str, Any] = {
        "bench": BENCH,
        "started": started,
        "config": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "idle_seconds": args.idle_seconds,
            "connections": args.connections,
            "placement": "nothing pinned: gateway workers, wrk, upstream and Redis share "
            f"all {len(cores)} cores",
            "load_generator": load.name,
            "upstream": f"{upstream.kind} (fast, static JSON)",
            "tracker": "defaults (poll 5 s, lease 30 s)",
        },
        "configs": configs,
        "direct": direct,
        "machine": {
            "before": machine_before,
            "after": machine_note(),
            "other_cores_busy": foreign.cores(),
        },
        "notes": notes,
    }
    result["rows"] = figures(result)
    path_out = write_result(BENCH, result, args.output)
    c = result["config"]
    head = f"scale: retrieve at {c['connections']} connections, 1/2/4 workers and 2 replicas"
    print(head)
    print("-" * len(head))
    print(f"placement: {c['placement']}")
    print(
        f"load: {c['load_generator']}, {c['rounds']} x {c['seconds']:g} s per configuration "
        f"(median); upstream {c['upstream']}; tracker {c['tracker']}"
    )
    print(
        f"machine: loadavg {machine_before['loadavg_1m']} before, "
        f"{result['machine']['after']['loadavg_1m']} after; other processes kept "
        f"{result['machine']['other_cores_busy']} cores busy on average"
    )
    print()
    print(render_rows(result["rows"]))
    for note in notes:
        print(f"note: {note}")
    print(f"\nfigures written to {os.path.relpath(path_out, Path.cwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
