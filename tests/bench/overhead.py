"""Benchmark: what the gateway adds to a retrieve and a create, against a fast upstream.

    PYTHONPATH=tests python -m bench.overhead [--seconds 5] [--rounds 3]
                                              [--latency-requests 5000] [--no-profile]

Starts its own Redis, a fast upstream (Debian's nginx answering from its config: a
video object for `GET /v1/videos/{id}`, a fresh id from `$request_id` for
`POST /v1/videos`), one gateway (`serve`, 1 uvicorn worker, JSON access log at info as
deployed) and an nginx `proxy_pass` hop to the same upstream (the floor a generic
reverse proxy sets; skipped with a message when nginx cannot be had). Then, for
`GET /v1/videos/{id}` and `POST /v1/videos`, each figure straight to the upstream
("direct"), through the gateway and through the nginx hop, in one run, alternating:

- latency at one connection: a raw keep-alive HTTP/1.1 client sends request after
  request, one to each target in turn (the order rotates every round), so drift hits
  all three alike; p50/p99 and what the gateway adds to the direct figure;
- requests/s, p50 and p99 at 32 connections: `wrk` (1 thread, Lua script for the key
  and the body), `--rounds` rounds of `--seconds` per target in rotating order; the
  median over rounds is reported, with the CPU share the gateway, the upstream and
  Redis used during the gateway's runs.

Placement: on two or more cores the gateway and the nginx hop run on the first core;
this driver, wrk, the upstream and Redis on the second.

Slots: every create through the gateway takes a shared slot. The quota is set huge
(1,000,000) and a janitor here empties the ledger's slot keys every 20 ms (and every
ten creates in the latency loop), since nothing would end these jobs and the acquire
script reads every held slot; the figures are thus a create with a nearly empty ledger.
The tracker polls every 30 s, so its work stays out of the windows.

With py-spy (`pip install py-spy`; not a project dependency) and no `--no-profile`,
the gateway is then profiled during one more 32-connection run of each retrieve (not
counted in the figures above: py-spy pauses it for each sample); the top costs are
printed and the speedscope files are kept beside the JSON.

Writes tests/bench/results/overhead.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.common import (
    CHANGING,
    RESULTS_DIR,
    ROOT,
    ForeignLoad,
    Janitor,
    LoadGenerator,
    RawHttp,
    bench_gateway_config,
    cpu_plan,
    create_video,
    ensure_tool,
    fmt,
    gateway_pids,
    get_request,
    machine_note,
    make_workdir,
    median,
    new_keys,
    percentile,
    post_request,
    render_rows,
    row,
    start_fast_upstream,
    start_gateway,
    start_nginx_hop,
    start_store,
    write_result,
)

BENCH = "overhead"
LATENCY_TARGET_P50_MS = 0.6
LATENCY_TARGET_P99_MS = 1.5
RPS_TARGET = 3000
LATENCY_PHASE_MAX_S = 180.0
# name -> (method, extra request headers). "retrieve" polls a video whose state did not
# move (the gateway only reads its record); "retrieve*" gets a different body on every
# answer, as while a job's progress moves (the gateway also rewrites the record).
ROUTES: dict[str, tuple[str, dict[str, str] | None]] = {
    "retrieve": ("GET", None),
    "retrieve*": ("GET", dict([CHANGING])),
    "create": ("POST", None),
}


# -- latency at one connection --------------------------------------------------------------


def latency_phase(
    targets: dict[str, tuple[str, str | None]],
    path: str,
    method: str,
    n: int,
    janitor: Janitor,
    headers: dict[str, str] | None,
) -> dict[str, Any]:
    """`n` requests to each target, interleaved; per target its latencies' percentiles."""
    clients = {name: RawHttp(url) for name, (url, _) in targets.items()}
    build = post_request if method == "POST" else get_request
    requests = {name: build(url, path, key, headers) for name, (url, key) in targets.items()}
    names = list(targets)
    samples: dict[str, list[float]] = {name: [] for name in names}
    errors: dict[str, int] = dict.fromkeys(names, 0)
    try:
        for i in range(min(300, n)):  # warm-up: connections, caches, the JIT-less paths
            for name in names:
                clients[name].request(requests[name])
            if method == "POST" and i % 10 == 9:
                janitor.sweep()
        deadline = time.monotonic() + LATENCY_PHASE_MAX_S
        gc.collect()
        gc.disable()
        done = 0
        for i in range(n):
            order = names[i % len(names) :] + names[: i % len(names)]
            for name in order:
                t0 = time.perf_counter_ns()
                status, _ = clients[name].request(requests[name])
                samples[name].append((time.perf_counter_ns() - t0) / 1e6)
                if status != 200:
                    errors[name] += 1
            if method == "POST" and i % 10 == 9:
                janitor.sweep()
            done = i + 1
            if time.monotonic() > deadline:
                break
    finally:
        gc.enable()
        for client in clients.values():
            client.close()
    out: dict[str, Any] = {"requests_per_target": done}
    for name in names:
        values = samples[name]
        out[name] = {
            "p50_ms": percentile(values, 50),
            "p90_ms": percentile(values, 90),
            "p99_ms": percentile(values, 99),
            "mean_ms": sum(values) / len(values) if values else None,
            "errors": errors[name],
        }
    return out


# -- throughput at 32 connections -----------------------------------------------------------


def load_phase(
    load: LoadGenerator,
    targets: dict[str, tuple[str, str | None]],
    path: str,
    method: str,
    args: argparse.Namespace,
    watch: dict[str, list[int]],
    janitor_url: str,
    headers: dict[str, str] | None,
) -> dict[str, Any]:
    names = list(targets)
    runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
    janitor = Janitor(janitor_url) if method == "POST" else None
    if janitor is not None:
        janitor.start()
    try:
        for name in names:  # warm-up, not counted
            url, key = targets[name]
            load.run(url + path, method, key, args.connections, 2, headers=headers)
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                url, key = targets[name]
                result = load.run(
                    url + path, method, key, args.connections, args.seconds, watch, headers
                )
                runs[name].append(result.as_dict())
                print(
                    f"  {method} {name:8s} round {r + 1}: {result.rps:10,.0f} req/s  "
                    f"p99 {result.p99_ms:.2f} ms  errors {result.errors}",
                    file=sys.stderr,
                )
    finally:
        if janitor is not None:
            janitor.stop()
    out: dict[str, Any] = {"runs": dict(runs)}
    for name in names:
        rs = runs[name]
        out[name] = {
            "rps": median([x["rps"] for x in rs]),
            "p50_ms": median([x["p50_ms"] for x in rs]),
            "p99_ms": median([x["p99_ms"] for x in rs]),
            "errors": sum(x["errors"] for x in rs),
            "cpu": {k: median([x["cpu"].get(k, 0.0) for x in rs]) for k in rs[0]["cpu"]},
        }
    if janitor is not None:
        out["janitor"] = janitor.summary()
    return out


# -- profile --------------------------------------------------------------------------------


def find_py_spy() -> str | None:
    here = Path(sys.executable).parent / "py-spy"
    return shutil.which("py-spy") or (str(here) if here.exists() else None)


def profile_phase(
    py_spy: str,
    load: LoadGenerator,
    url: str,
    key: str,
    pid: int,
    seconds: float,
    connections: int,
    output: Path,
    headers: dict[str, str] | None,
) -> dict[str, Any]:
    """py-spy on the gateway during a retrieve load; the hottest functions and packages.

    py-spy pauses the process for each sample (not `--nonblocking`): reading a running
    process tears its coroutine stacks, and the inclusive figures need them whole. The
    rate while sampled is printed, since the pauses slow the gateway a little.
    """
    handle = load.start(url, "GET", key, connections, seconds + 3, headers)
    time.sleep(1.5)
    spy = subprocess.run(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "250",
            "--format",
            "speedscope",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=False,
    )
    result = load.finish(handle)
    if spy.returncode != 0 or not output.exists():
        return {"error": (spy.stderr or spy.stdout)[-1000:]}
    summary = summarise_speedscope(json.loads(output.read_text()))
    summary["load_rps_while_profiled"] = result.rps
    summary["speedscope"] = os.path.relpath(output, ROOT)
    return summary


def _where(file: str) -> tuple[str, str]:
    """(package, short file) of a frame's file."""
    path = file.replace("\\", "/")
    for marker in ("/site-packages/", "/dist-packages/"):
        if marker in path:
            short = path.split(marker, 1)[1]
            return short.split("/", 1)[0].removesuffix(".py"), short
    if f"{ROOT}/" in path:
        short = path.split(f"{ROOT}/", 1)[1]
        return short.split("/", 1)[0], short
    if "/lib/python3" in path:
        short = path.split("/lib/python3", 1)[1].split("/", 1)[1]
        return "stdlib:" + short.split("/", 1)[0].removesuffix(".py"), short
    return "other", path


# The process's entry frames, on every stack the event loop itself runs: not informative.
_ENTRY_FRAMES = re.compile(
    r"\((<frozen runpy>|gateway/__main__\.py|gateway/serve\.py|uvicorn/main\.py|"
    r"uvicorn/server\.py|uvicorn/_compat\.py|asyncio/runners\.py)\)$"
)


def summarise_speedscope(data: dict[str, Any], top: int = 15) -> dict[str, Any]:
    frames = data["shared"]["frames"]
    keys = []
    packages = []
    for frame in frames:
        package, short = _where(frame.get("file") or "")
        keys.append(f"{frame['name']} ({short})")
        packages.append(package)
    own: dict[str, float] = defaultdict(float)
    total: dict[str, float] = defaultdict(float)
    by_package: dict[str, float] = defaultdict(float)
    samples = 0.0
    count = 0
    for profile in data["profiles"]:
        if profile.get("type") != "sampled":
            continue
        for stack, weight in zip(profile["samples"], profile["weights"], strict=True):
            if not stack:
                continue
            samples += weight
            count += 1
            leaf = stack[-1]  # speedscope stacks run from the root to the leaf
            own[keys[leaf]] += weight
            by_package[packages[leaf]] += weight
            for name in {keys[i] for i in stack}:
                total[name] += weight

    def share(table: dict[str, float], n: int, ours: bool = False) -> list[dict[str, Any]]:
        ranked = sorted(table.items(), key=lambda kv: -kv[1])
        if ours:  # the gateway's own functions, its entry frames left out
            ranked = [(k, v) for k, v in ranked if "(gateway/" in k and not _ENTRY_FRAMES.search(k)]
        return [{"function": k, "percent": round(100 * v / samples, 1)} for k, v in ranked[:n]]

    return {
        "samples": count,
        "sampled_s": round(samples, 2),
        "self": share(own, top),
        "inclusive": share(total, top, ours=True),
        "in_asgi_app": round(
            100
            * max(
                (v for k, v in total.items() if k.startswith("RequestResponseCycle.run_asgi")),
                default=0,
            )
            / samples,
            1,
        ),
        "self_by_package": [
            {"package": k, "percent": round(100 * v / samples, 1)}
            for k, v in sorted(by_package.items(), key=lambda kv: -kv[1])[:top]
        ],
    }


def render_profile(route: str, profile: dict[str, Any]) -> str:
    if "error" in profile:
        return f"profile: py-spy failed: {profile['error']}"
    lines = [
        f"profile of the gateway during a 32-connection {route} load (py-spy, "
        f"{profile['samples']} samples, {profile['load_rps_while_profiled']:,.0f} req/s "
        f"while sampled; {profile['speedscope']})",
        "  self time by package (leaf frame):",
    ]
    lines += [f"    {p['percent']:5.1f} %  {p['package']}" for p in profile["self_by_package"]]
    lines.append("  top functions by self time:")
    lines += [f"    {p['percent']:5.1f} %  {p['function']}" for p in profile["self"]]
    lines.append(
        f"  the gateway's own functions by inclusive time (the ASGI app as a whole: "
        f"{profile['in_asgi_app']} %; the rest is uvicorn's protocol, aiohttp's and redis' "
        "callbacks and uvloop's C code, which shows as Runner.run):"
    )
    lines += [f"    {p['percent']:5.1f} %  {p['function']}" for p in profile["inclusive"]]
    return "\n".join(lines)


# -- figures --------------------------------------------------------------------------------


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    has_hop = "nginx" in result["targets"]
    for route, (method, _) in ROUTES.items():
        lat = result["latency"][route]
        d, g = lat["direct"], lat["gateway"]
        for q, target in (("p50", LATENCY_TARGET_P50_MS), ("p99", LATENCY_TARGET_P99_MS)):
            added = g[f"{q}_ms"] - d[f"{q}_ms"]
            hop_note = None
            if has_hop:
                hop_added = lat["nginx"][f"{q}_ms"] - d[f"{q}_ms"]
                hop_note = (
                    f"gateway {fmt(g[f'{q}_ms'], 'ms')}, "
                    f"nginx hop {fmt(lat['nginx'][f'{q}_ms'], 'ms')} (adds {fmt(hop_added, 'ms')})"
                )
            rows.append(
                row(
                    BENCH,
                    f"{method} {route}: added latency {q}, 1 conn",
                    added,
                    "ms",
                    reference=f"direct {q}",
                    reference_value=d[f"{q}_ms"],
                    ratio=g[f"{q}_ms"] / d[f"{q}_ms"],
                    target=f"<= {target} ms" + ("" if method == "GET" else " (retrieve's)"),
                    met=added <= target,
                    note=hop_note,
                )
            )
        load = result["load"][route]
        d, g = load["direct"], load["gateway"]
        rows.append(
            row(
                BENCH,
                f"{method} {route}: req/s, {result['config']['connections']} conn",
                g["rps"],
                "req/s",
                reference="direct",
                reference_value=d["rps"],
                target=f">= {RPS_TARGET:,}" if method == "GET" else None,
                met=g["rps"] >= RPS_TARGET if method == "GET" else None,
                note=(
                    f"~{g['rps'] / max(g['cpu'].get('gateway', 0), 0.01):,.0f} req/s per core the "
                    "gateway used (robust to a busy machine); "
                    "CPU during the gateway's runs (share of one core): "
                    f"gateway {g['cpu'].get('gateway', 0):.0%}, "
                    f"upstream {g['cpu'].get('upstream', 0):.0%}, "
                    f"Redis {g['cpu'].get('redis', 0):.0%}; cores busy (all processes): "
                    + ", ".join(f"{k} {v:.0%}" for k, v in g["cpu"].items() if k.startswith("core"))
                ),
            )
        )
        rows.append(
            row(
                BENCH,
                f"{method} {route}: p99, {result['config']['connections']} conn",
                g["p99_ms"],
                "ms",
                reference="direct",
                reference_value=d["p99_ms"],
            )
        )
        if has_hop:
            n = load["nginx"]
            rows.append(
                row(
                    BENCH,
                    f"{method} {route}: nginx hop req/s (floor)",
                    n["rps"],
                    "req/s",
                    reference="direct",
                    reference_value=d["rps"],
                    note=f"gateway / nginx hop = x{g['rps'] / n['rps']:.2f}; "
                    f"nginx hop p99 {fmt(n['p99_ms'], 'ms')}",
                )
            )
    return rows


def detail_table(result: dict[str, Any]) -> str:
    names = list(result["targets"])
    head = ["route", "measure", *names]
    lines = []
    for route, (method, _) in ROUTES.items():
        lat = result["latency"][route]
        load = result["load"][route]
        d_lat, d_load = lat["direct"], load["direct"]
        for q in ("p50", "p99"):
            cells = [f"{method} {route}", f"1 conn {q}"]
            for name in names:
                v = lat[name][f"{q}_ms"]
                extra = "" if name == "direct" else f" (+{v - d_lat[f'{q}_ms']:.3f})"
                cells.append(f"{v:.3f} ms{extra}")
            lines.append(cells)
        conns = result["config"]["connections"]
        for label, key, unit in (
            ("req/s", "rps", ""),
            ("p50", "p50_ms", " ms"),
            ("p99", "p99_ms", " ms"),
        ):
            cells = [f"{method} {route}", f"{conns} conn {label}"]
            for name in names:
                v = load[name][key]
                extra = "" if name == "direct" else f" (x{v / d_load[key]:.2f})"
                cells.append(f"{fmt(v)}{unit}{extra}")
            lines.append(cells)
    widths = [max(len(c) for c in col) for col in zip(head, *lines, strict=True)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) for cells in lines]
    return "\n".join(out)


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="length of each wrk run")
    parser.add_argument("--rounds", type=int, default=3, help="wrk rounds per target")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--latency-requests", type=int, default=5000, help="requests per target at 1 conn"
    )
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profile")
    parser.add_argument("--profile-seconds", type=float, default=10.0)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / f"{BENCH}.json")
    args = parser.parse_args(argv)

    notes: list[str] = []
    gw_cpus, load_cpus, placement = cpu_plan()
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)  # this driver, and what it starts, on the load core
    nginx = ensure_tool("nginx", "nginx", notes)
    wrk = ensure_tool("wrk", "wrk", notes)
    if nginx is None:
        notes.append("no nginx: the upstream is the Python fallback and the nginx hop is skipped")
    workdir = make_workdir(BENCH)
    started = time.time()
    machine_before = machine_note()
    foreign = ForeignLoad()
    store = upstream = hop = gateway = None
    profile: dict[str, Any] | None = None
    try:
        store = start_store(workdir, load_cpus)
        upstream = start_fast_upstream(workdir, nginx, load_cpus)
        targets: dict[str, tuple[str, str | None]] = {"direct": (upstream.url, None)}
        keys = new_keys("bench")
        key = keys["bench"]
        token = "bench-" + secrets.token_urlsafe(16)
        config = bench_gateway_config(upstream.url, store.url, token, keys)
        gateway = start_gateway(workdir, config, cpus=gw_cpus)
        targets["gateway"] = (gateway.url, key)
        if nginx is not None:
            hop, ports = start_nginx_hop(workdir, nginx, upstream.port, {"hop": ""}, gw_cpus)
            targets["nginx"] = (f"http://127.0.0.1:{ports['hop']}", None)
        video_id = create_video(gateway.url, key)
        paths = {
            "retrieve": f"/v1/videos/{video_id}",
            "retrieve*": f"/v1/videos/{video_id}",
            "create": "/v1/videos",
        }
        load = LoadGenerator(wrk, workdir, load_cpus)
        assert store.process is not None
        watch = {
            "gateway": gateway_pids(gateway),
            "upstream": upstream.pids(),
            "redis": [store.process.pid],
        }
        janitor = Janitor(store.url)
        latency: dict[str, Any] = {}
        for route, (method, headers) in ROUTES.items():
            print(f"latency at 1 connection: {route} ...", file=sys.stderr)
            latency[route] = latency_phase(
                targets, paths[route], method, args.latency_requests, janitor, headers
            )
        janitor.client.close()
        loads: dict[str, Any] = {}
        for route, (method, headers) in ROUTES.items():
            print(f"load at {args.connections} connections: {route} ...", file=sys.stderr)
            loads[route] = load_phase(
                load, targets, paths[route], method, args, watch, store.url, headers
            )
        py_spy = None if args.no_profile else find_py_spy()
        if py_spy is not None:
            profile = {}
            for route, suffix in (("retrieve", ""), ("retrieve*", "_changed")):
                print(f"profiling the gateway with py-spy: {route} ...", file=sys.stderr)
                profile[route] = profile_phase(
                    py_spy,
                    load,
                    gateway.url + paths[route],
                    key,
                    gateway.pid(),
                    args.profile_seconds,
                    args.connections,
                    args.output.with_name(f"{BENCH}_profile{suffix}.speedscope.json"),
                    ROUTES[route][1],
                )
        elif not args.no_profile:
            notes.append("py-spy not found: no profile (pip install py-spy)")
    finally:
        for part in (gateway, hop, upstream):
            if part is not None:
                part.stop()
        if store is not None:
            store.cleanup()
        shutil.rmtree(workdir, ignore_errors=True)

    result: dict[str, Any] = {
        "bench": BENCH,
        "started": started,
        "config": {
            "seconds": args.seconds,
            "rounds": args.rounds,
            "connections": args.connections,
            "latency_requests": args.latency_requests,
            "gateway_workers": 1,
            "placement": placement,
            "load_generator": load.name,
            "latency_client": "raw keep-alive HTTP/1.1 socket client (Python), interleaved",
            "upstream": f"{upstream.kind} (fast, static JSON)",
            "slots": "quota 1,000,000; ledger emptied every 20 ms by the bench's janitor",
        },
        "targets": {name: url for name, (url, _) in targets.items()},
        "latency": latency,
        "load": loads,
        "profile": profile,
        "machine": {
            "before": machine_before,
            "after": machine_note(),
            "other_cores_busy": foreign.cores(),
        },
        "notes": notes,
    }
    result["rows"] = figures(result)
    path = write_result(BENCH, result, args.output)
    print(report(result))
    print(f"\nfigures written to {os.path.relpath(path, Path.cwd())}")
    return 0


def report(result: dict[str, Any]) -> str:
    c = result["config"]
    head = (
        f"overhead: gateway ({c['gateway_workers']} uvicorn worker) vs direct vs nginx hop; "
        f"upstream {c['upstream']}"
    )
    lines = [
        head,
        "-" * len(head),
        f"placement: {c['placement']}",
        f"load: {c['load_generator']}, {c['connections']} connections, {c['rounds']} rounds x "
        f"{c['seconds']:g} s per target, alternating, median of rounds",
        "retrieve: a video whose answer does not change (the gateway only reads its "
        "record); retrieve*: a different body on every answer, as while a job's progress "
        "moves (the gateway also rewrites its record)",
        f"1-connection latency: {c['latency_client']}, "
        f"{result['latency']['retrieve']['requests_per_target']} requests per target per route",
        f"slots: {c['slots']} (most held at a sweep: "
        f"{result['load']['create'].get('janitor', {}).get('max_slots_seen', '-')})",
        f"machine: loadavg {result['machine']['before']['loadavg_1m']} before, "
        f"{result['machine']['after']['loadavg_1m']} after; other processes kept "
        f"{result['machine']['other_cores_busy']} cores busy on average",
        "",
        detail_table(result),
        "",
        render_rows(result["rows"]),
    ]
    for route, profile in (result["profile"] or {}).items():
        lines += ["", render_profile(route, profile)]
    for note in result["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
