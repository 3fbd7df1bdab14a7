"""Benchmark: a 1 GiB content download through the gateway, against a fast upstream.

    PYTHONPATH=tests python -m bench.stream [--rounds 3] [--bytes 1073741824]

Starts its own Redis, a fast upstream (Debian's nginx serving a sparse file of
`--bytes` for `GET /v1/videos/{id}/content`, with sendfile), one gateway (1 uvicorn
worker) and one nginx with two `proxy_pass` hops to the same upstream: nginx's default
proxy buffers (8 x one page, 4 KiB here), and 64 KiB buffers. Then `--rounds` rounds,
each downloading the whole content once from every target in rotating order with
`curl -o /dev/null` (`%{speed_download}`; a Python socket reader that discards the bytes
when curl is missing), after one direct download to fill the page cache:

- MB/s (10^6 bytes a second) straight from the upstream ("direct"), through the
  gateway and through each nginx hop: the median over rounds;
- the gateway's peak RSS growth: its RSS (all its processes) sampled every 5 ms by
  psutil during its downloads, peak minus the RSS just before the first one.

Placement: on two or more cores the gateway and the nginx hops run on the first core;
this driver, curl, the upstream and Redis on the second.

Writes tests/bench/results/stream.json.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bench.common import (
    BIG_BUFFERS,
    RESULTS_DIR,
    CoreMeter,
    ForeignLoad,
    bench_gateway_config,
    cpu_plan,
    cpu_seconds,
    create_video,
    ensure_tool,
    fmt,
    gateway_pids,
    machine_note,
    make_workdir,
    median,
    new_keys,
    render_rows,
    row,
    start_fast_upstream,
    start_gateway,
    start_nginx_hop,
    start_store,
    taskset,
    write_result,
)

BENCH = "stream"
GIB = 1 << 30
MIB = 1 << 20
MB = 1e6
MBPS_TARGET = 1000
RSS_TARGET_MIB = 16
DOWNLOAD_TIMEOUT_S = 300
HOPS = {"nginx default": "", "nginx 64k buffers": BIG_BUFFERS}


class RssSampler(threading.Thread):
    """Peak summed RSS of some processes, sampled every `every_s`, bounded in time."""

    def __init__(self, pids: list[int], every_s: float = 0.005, max_s: float = 600) -> None:
        super().__init__(daemon=True)
        self.procs = [psutil.Process(pid) for pid in pids]
        self.every_s = every_s
        self.max_s = max_s
        self.stopping = threading.Event()
        self.peak = 0
        self.samples = 0

    def rss(self) -> int:
        total = 0
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                total += proc.memory_info().rss
        return total

    def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        while not self.stopping.is_set() and time.monotonic() < deadline:
            self.peak = max(self.peak, self.rss())
            self.samples += 1
            time.sleep(self.every_s)

    def stop(self) -> int:
        self.stopping.set()
        self.join(5)
        return self.peak


def download(
    curl: str | None, url: str, key: str | None, size: int, cpus: set[int] | None
) -> dict[str, Any]:
    """One whole download to nowhere: MB/s and bytes."""
    if curl is not None:
        cmd = [*taskset(cpus), curl, "-s", "-o", "/dev/null", "--max-time", str(DOWNLOAD_TIMEOUT_S)]
        if key:
            cmd += ["-H", f"Authorization: Bearer {key}"]
        cmd += ["-w", "%{http_code} %{size_download} %{speed_download} %{time_total}", url]
        out = subprocess.run(
            cmd, capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S + 30, check=False
        ).stdout.split()
        code, got, speed, seconds = int(out[0]), int(out[1]), float(out[2]), float(out[3])
    else:
        code, got, seconds = _python_download(url, key)
        speed = got / seconds if seconds else 0.0
    if code != 200 or got != size:
        raise RuntimeError(f"download from {url}: HTTP {code}, {got} of {size} bytes")
    return {"mb_s": speed / MB, "bytes": got, "seconds": seconds}


def _python_download(url: str, key: str | None) -> tuple[int, int, float]:
    host, _, rest = url.split("://", 1)[1].partition("/")
    name, _, port = host.partition(":")
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    request = f"GET /{rest} HTTP/1.1\r\nHost: {host}\r\n{auth}Connection: close\r\n\r\n"
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    started = time.perf_counter()
    with socket.create_connection((name, int(port)), timeout=30) as sock:
        sock.sendall(request.encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(65536)
            if not chunk:
                break
            head += chunk
        header, _, body = head.partition(b"\r\n\r\n")
        code = int(header.split(b" ", 2)[1])
        got = len(body)
        deadline = time.monotonic() + DOWNLOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            n = sock.recv_into(view)
            if not n:
                break
            got += n
    return code, got, time.perf_counter() - started


def _cores(runs: list[dict[str, Any]]) -> str:
    """Median busy share of each core over some downloads."""
    names = sorted(runs[0].get("cores_busy", {}))
    return ", ".join(f"{n} {median([r['cores_busy'][n] for r in runs]):.0%}" for n in names)


def figures(result: dict[str, Any]) -> list[dict[str, Any]]:
    mbps = result["mb_s"]
    rows = [
        row(
            BENCH,
            f"content {result['config']['bytes'] / GIB:g} GiB: MB/s through the gateway",
            mbps["gateway"],
            "MB/s",
            reference="direct",
            reference_value=mbps["direct"],
            target=f">= {MBPS_TARGET:,} MB/s",
            met=mbps["gateway"] >= MBPS_TARGET,
            note=f"gateway used {result['gateway_cpu']:.0%} of a core during its downloads; "
            f"cores busy (all processes): {_cores(result['runs']['gateway'])}",
        )
    ]
    if "nginx default" in mbps:
        rows.append(
            row(
                BENCH,
                "content: gateway vs nginx hop (default buffers)",
                mbps["gateway"],
                "MB/s",
                reference="nginx default",
                reference_value=mbps["nginx default"],
                target=">= nginx default",
                met=mbps["gateway"] >= mbps["nginx default"],
            )
        )
        for hop in HOPS:
            rows.append(
                row(
                    BENCH,
                    f"content: MB/s through the {hop} hop",
                    mbps[hop],
                    "MB/s",
                    reference="direct",
                    reference_value=mbps["direct"],
                    note=f"cores busy (all processes): {_cores(result['runs'][hop])}",
                )
            )
    rss = result["rss"]
    rows.append(
        row(
            BENCH,
            f"gateway peak RSS growth, {result['config']['bytes'] / GIB:g} GiB download",
            rss["growth_mib"],
            "MiB",
            reference="RSS before",
            reference_value=rss["before_mib"],
            target=f"<= {RSS_TARGET_MIB} MiB",
            met=rss["growth_mib"] <= RSS_TARGET_MIB,
            note=f"per download: {', '.join(fmt(g, 'MiB') for g in rss['per_download_mib'])}",
        )
    )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bytes", type=int, default=GIB, help="content size")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / f"{BENCH}.json")
    args = parser.parse_args(argv)

    notes: list[str] = []
    gw_cpus, load_cpus, placement = cpu_plan()
    if load_cpus:
        os.sched_setaffinity(0, load_cpus)
    nginx = ensure_tool("nginx", "nginx", notes)
    curl = shutil.which("curl")
    if curl is None:
        notes.append("curl not found: downloads read by a Python socket reader")
    if nginx is None:
        notes.append("no nginx: the upstream is the Python fallback and the nginx hops are skipped")
    workdir = make_workdir(BENCH)
    machine_before = machine_note()
    foreign = ForeignLoad()
    started = time.time()
    store = upstream = hop = gateway = None
    runs: dict[str, list[dict[str, Any]]] = {}
    rss_runs: list[int] = []
    gateway_cpu: list[float] = []
    try:
        store = start_store(workdir, load_cpus)
        upstream = start_fast_upstream(workdir, nginx, load_cpus, content_bytes=args.bytes)
        keys = new_keys("bench")
        key = keys["bench"]
        token = "bench-" + secrets.token_urlsafe(16)
        gateway = start_gateway(
            workdir, bench_gateway_config(upstream.url, store.url, token, keys), cpus=gw_cpus
        )
        video_id = create_video(gateway.url, key)
        path = f"/v1/videos/{video_id}/content"
        targets: dict[str, tuple[str, str | None]] = {
            "direct": (upstream.url + path, None),
            "gateway": (gateway.url + path, key),
        }
        if nginx is not None:
            hop, ports = start_nginx_hop(workdir, nginx, upstream.port, HOPS, gw_cpus)
            for name, port in ports.items():
                targets[name] = (f"http://127.0.0.1:{port}{path}", None)
        print("warming the page cache with one direct download ...", file=sys.stderr)
        download(curl, targets["direct"][0], None, args.bytes, load_cpus)
        pids = gateway_pids(gateway)
        baseline = RssSampler(pids).rss()
        names = list(targets)
        runs = {name: [] for name in names}
        for r in range(args.rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                url, k = targets[name]
                sampler = None
                cores = CoreMeter()
                if name == "gateway":
                    sampler = RssSampler(pids)
                    sampler.start()
                    cpu_before = cpu_seconds(pids)
                    wall = time.perf_counter()
                got = download(curl, url, k, args.bytes, load_cpus)
                got["cores_busy"] = cores.busy()
                if sampler is not None:
                    gateway_cpu.append(
                        (cpu_seconds(pids) - cpu_before) / (time.perf_counter() - wall)
                    )
                    rss_runs.append(sampler.stop())
                runs[name].append(got)
                print(f"  round {r + 1} {name:18s} {got['mb_s']:8,.0f} MB/s", file=sys.stderr)
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
            "bytes": args.bytes,
            "rounds": args.rounds,
            "placement": placement,
            "client": "curl -o /dev/null" if curl else "Python socket reader",
            "upstream": (
                "nginx serving a sparse file (sendfile)"
                if upstream.kind == "nginx"
                else "the Python fallback server streaming zeros"
            ),
            "gateway_workers": 1,
        },
        "mb_s": {name: median([x["mb_s"] for x in rs]) for name, rs in runs.items()},
        "runs": runs,
        "gateway_cpu": median(gateway_cpu) if gateway_cpu else 0.0,
        "rss": {
            "before_mib": baseline / MIB,
            "peak_mib": max(rss_runs) / MIB,
            "growth_mib": (max(rss_runs) - baseline) / MIB,
            "per_download_mib": [(peak - baseline) / MIB for peak in rss_runs],
        },
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
    head = f"stream: {c['bytes'] / GIB:g} GiB content download, {c['rounds']} rounds, alternating"
    print(head)
    print("-" * len(head))
    print(f"placement: {c['placement']}")
    print(f"client: {c['client']}; upstream: {c['upstream']}; MB = 10^6 bytes")
    print(
        f"machine: loadavg {machine_before['loadavg_1m']} before, "
        f"{result['machine']['after']['loadavg_1m']} after; other processes kept "
        f"{result['machine']['other_cores_busy']} cores busy on average"
    )
    for name, rs in runs.items():
        print(f"  {name:18s} " + "  ".join(f"{x['mb_s']:8,.0f}" for x in rs) + "  MB/s per round")
    print()
    print(render_rows(result["rows"]))
    for note in notes:
        print(f"note: {note}")
    print(f"\nfigures written to {os.path.relpath(path_out, Path.cwd())}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
