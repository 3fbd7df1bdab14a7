"""Run every benchmark in tests/bench and print one combined table.

    PYTHONPATH=tests python -m bench.run_all [--quick]
        [--only overhead,stream,quota,scale,admission]

(from the repository's root, as `make bench` does). Each bench runs as its own process
(`python -m bench.<module>`, in the same environment) with its defaults (the quota bench
runs both modes, wait and queue, 30 s each), prints its own detailed table and writes its JSON under
tests/bench/results/; this script then reads those files and prints every figure in
one table, each with its reference measured in the same run, its ratio to it, the
target and whether it was met. The summary goes to tests/bench/results/summary.json.
`--quick` shortens every bench (a smoke run: its figures are not worth quoting).

The exit status is 1 when a bench failed to run (or the quota bench saw the upstream's
own limit hit, a job started twice, or a mode it could not run); a missed target is
reported, not failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import RESULTS_DIR, ROOT, ForeignLoad, machine_note, render_rows, row

BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    # name -> (module, arguments, --quick arguments)
    "overhead": (
        "bench.overhead",
        [],
        ["--seconds", "2", "--rounds", "1", "--latency-requests", "500", "--profile-seconds", "3"],
    ),
    "stream": ("bench.stream", [], ["--rounds", "1"]),
    "quota": ("bench.quota_utilisation", [], ["--seconds", "10"]),
    "scale": ("bench.scale", [], ["--seconds", "3", "--rounds", "1", "--idle-seconds", "3"]),
    "admission": ("bench.admission_cost", [], ["--rounds", "50"]),
}
RESULT_FILES = {
    "overhead": "overhead.json",
    "stream": "stream.json",
    "quota": "quota_utilisation.json",
    "scale": "scale.json",
    "admission": "admission_cost.json",
}
BENCH_TIMEOUT_S = 1800
# Above this many cores kept busy by other processes, the figures say so.
NOISY_CORES = 0.25


def quota_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The quota bench writes no rows of its own: its figures per mode, in the common form."""
    c = result["config"]
    rows = []
    for mode, r in result["modes"].items():
        name = f"quota ({mode})"
        if "error" in r:
            rows.append(row(name, "did not run", None, "", note=r["error"][:300]))
            continue
        gap = r["gap_slot_free_to_next_start_ms"]
        rows += [
            row(
                name,
                f"utilisation, both slots busy ({c['replicas']} replicas, {c['seconds']:g} s)",
                r["utilisation"] * 100,
                "%",
                reference="ideal",
                reference_value=100.0,
                target=f">= {r['target'] * 100:g} %",
                met=r["meets_target"],
                note=f"cross-check from /_sim/stats samples: "
                f"{(r['utilisation_sampled'] or 0) * 100:.2f} %; {r['creates_done']} creates done",
            ),
            row(
                name,
                "slot free -> next start upstream, p50",
                gap["p50"],
                "ms",
                note=f"p99 {gap['p99']} ms",
            ),
            row(
                name,
                "429s from the gateway",
                r["gateway_429s"],
                "",
                target="0" if mode == "queue" else None,
                met=r["gateway_429s"] == 0 if mode == "queue" else None,
            ),
            row(
                name,
                "upstream's own 429s (limit hits)",
                r["simulator_limit_hits"],
                "",
                target="0",
                met=r["simulator_limit_hits"] == 0,
            ),
            row(
                name,
                "jobs started twice upstream",
                len(r["started_twice"]),
                "",
                target="0",
                met=not r["started_twice"],
            ),
        ]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(BENCHES), help="comma-separated benches")
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in BENCHES]
    if unknown:
        parser.error(f"unknown bench(es): {', '.join(unknown)}; know {', '.join(BENCHES)}")

    started = time.time()
    machine = machine_note()
    statuses: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for name in chosen:
        module, normal, quick = BENCHES[name]
        output = RESULTS_DIR / RESULT_FILES[name]
        output.unlink(missing_ok=True)  # never report a stale figure as this run's
        cmd = [sys.executable, "-m", module, *(quick if args.quick else normal)]
        print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.monotonic()
        foreign = ForeignLoad()
        try:
            code = subprocess.run(cmd, cwd=ROOT, timeout=BENCH_TIMEOUT_S, check=False).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        statuses[name] = {
            "exit": code,
            "seconds": round(time.monotonic() - t0, 1),
            "other_cores_busy": foreign.cores(),
        }
        if not output.exists():
            rows.append(row(name, "bench did not finish", None, "", note=f"exit {code}"))
            continue
        result = json.loads(output.read_text())
        rows += quota_rows(result) if name == "quota" else result["rows"]

    summary = {
        "started": started,
        "quick": args.quick,
        "machine": {"before": machine, "after": machine_note()},
        "benches": statuses,
        "rows": rows,
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    (RESULTS_DIR / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    head = "sora-gateway benchmarks" + (
        " (--quick: smoke run, figures not comparable)" * args.quick
    )
    print(f"\n{head}\n{'=' * len(head)}")
    took = ", ".join(
        f"{k} {v['seconds']:g} s (other processes: {v['other_cores_busy']} cores)"
        for k, v in statuses.items()
    )
    print(
        f"loadavg {machine['loadavg_1m']} before, {summary['machine']['after']['loadavg_1m']} "
        f"after; {took}"
    )
    noisy = {
        k: v["other_cores_busy"] for k, v in statuses.items() if v["other_cores_busy"] > NOISY_CORES
    }
    if noisy:
        print(
            "WARNING: other processes kept cores busy during "
            + ", ".join(f"{k} ({v} cores)" for k, v in noisy.items())
            + ": those figures are lower than this machine gives when quiet"
        )
    print(render_rows(rows, with_bench=True))
    met = sum(1 for r in rows if r["met"] is True)
    missed = [r for r in rows if r["met"] is False]
    print(f"\ntargets: {met} met, {len(missed)} missed")
    for r in missed:
        print(f"  MISSED  {r['bench']}: {r['figure']} ({r['target']})")
    print(f"\nper-bench JSON and summary.json in {os.path.relpath(RESULTS_DIR, Path.cwd())}/")
    failed = [k for k, v in statuses.items() if v["exit"] != 0]
    if failed:
        print(f"failed to run: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
