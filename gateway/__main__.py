"""Command line: `sora-gateway serve | check-config | new-key | simulate | demo`."""

from __future__ import annotations

import argparse
import logging
import sys

from .auth import key_digest, new_admin_key, new_key
from .config import ConfigError, load_settings
from .scrub import redact_url

# The servers the gateway is tested under; "auto" is uvicorn's pick (uvloop, httptools).
LOOPS = ("auto", "asyncio", "uvloop")
HTTP_PARSERS = ("auto", "httptools", "h11")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per upstream call is noise
    if args.command == "check-config":
        return _check_config(args.path)
    if args.command == "new-key":
        if args.admin == (args.team is not None):
            parser().error("new-key takes a TEAM, or --admin for a key of the /admin routes")
        return _new_admin_key() if args.admin else _new_key(args.team)
    if args.command == "serve":
        from .serve import serve as run_serve

        return run_serve(args.config, args.host, args.port, args.workers, args.loop, args.http)
    if args.command == "simulate":
        return _simulate(args)
    from .demo import run_demo

    return run_demo(args.config, args.port, args.sim_port)


def parser() -> argparse.ArgumentParser:
    """Every command and its options."""
    root = argparse.ArgumentParser(
        prog="sora-gateway",
        description="A shared, quota-enforcing gateway for OpenAI-compatible video APIs.",
    )
    commands = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _serve_options(commands.add_parser("serve", help="run the gateway"))
    commands.add_parser("check-config", help="validate a config file").add_argument("path")
    new_key_command = commands.add_parser("new-key", help="make a team key and its config line")
    new_key_command.add_argument("team", nargs="?", metavar="TEAM")
    new_key_command.add_argument(
        "--admin", action="store_true", help="a key of the /admin routes instead (no TEAM)"
    )
    _simulate_options(commands.add_parser("simulate", help="run the bundled upstream simulator"))
    _demo_options(
        commands.add_parser("demo", help="simulator + gateway + embedded store, ready to use")
    )
    return root


def _serve_options(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--config", required=True, help="path of the YAML config")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument(
        "--workers", type=int, default=1, help="worker processes, each a full replica"
    )
    serve.add_argument(
        "--loop", choices=LOOPS, default="auto", help="event loop (auto: uvloop when installed)"
    )
    serve.add_argument(
        "--http", choices=HTTP_PARSERS, default="auto", help="HTTP parser (auto: httptools)"
    )


def _simulate_options(simulate: argparse.ArgumentParser) -> None:
    simulate.add_argument("--host", default="127.0.0.1")
    simulate.add_argument("--port", type=int, default=8081)
    simulate.add_argument("--token", help="the only upstream token to accept (default: any)")
    simulate.add_argument("--queue-s", type=float, default=1.0, help="seconds a job is queued")
    simulate.add_argument("--run-s", type=float, default=4.0, help="seconds a job runs")
    simulate.add_argument("--expire-s", type=float, default=86400.0, help="content lifetime")
    simulate.add_argument("--max-running", type=int, default=2, help="the account's job limit")
    simulate.add_argument(
        "--content-bytes", type=int, help="serve this many bytes as the video (benchmarks)"
    )
    simulate.add_argument(
        "--time-scale", type=float, default=1.0, help="simulated seconds per real second"
    )
    simulate.add_argument(
        "--run-s-spread", type=float, default=0.0, help="run times vary by this fraction"
    )
    simulate.add_argument("--seed", type=int, default=0, help="seed of the run-time draws")


def _demo_options(demo: argparse.ArgumentParser) -> None:
    demo.add_argument(
        "--config", help="path of the YAML config (default: the demo config in the package)"
    )
    demo.add_argument("--port", type=int, default=8080, help="gateway port (default: 8080)")
    demo.add_argument(
        "--sim-port",
        type=int,
        default=8081,
        help="simulator port (default: 8081), the ${SORA_DEMO_SIM_PORT} of the config",
    )


def _check_config(path: str) -> int:
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        print(exc.report(), file=sys.stderr)
        return 1
    upstream = redact_url(settings.upstream.base_url)
    print(f"{path}: OK ({len(settings.teams)} teams, upstream {upstream})")
    return 0


def _new_key(team: str) -> int:
    key = new_key()
    print(key)
    print(f'- {{name: {team}, key_sha256: ["{key_digest(key)}"]}}')
    return 0


def _new_admin_key() -> int:
    key = new_admin_key()
    print(key)
    print(f'admin: {{key_sha256: ["{key_digest(key)}"]}}')
    return 0


def _simulate(args: argparse.Namespace) -> int:
    from .simulator import SimulatorSettings, run

    run(
        args.host,
        args.port,
        SimulatorSettings(
            token=args.token,
            queue_s=args.queue_s,
            run_s=args.run_s,
            expire_s=args.expire_s,
            max_running=args.max_running,
            content_bytes=args.content_bytes,
            time_scale=args.time_scale,
            run_s_spread=args.run_s_spread,
            seed=args.seed,
        ),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
