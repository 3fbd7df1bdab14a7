"""Shared machinery of the benchmarks in tests/bench: processes, load, figures, tables.

Nothing here is a test (pytest never collects tests/bench). What it provides:

- CPU placement: on a machine with two or more cores the gateway (and the nginx hop it
  is compared with) run on the first core, the load generator, the fast upstream and
  Redis on the second, so the gateway's own core is not shared with what drives it;
- the fast upstream: Debian's nginx answering the Videos API from its config alone (a
  video object for `GET /v1/videos/{id}`, a fresh id from `$request_id` for
  `POST /v1/videos`, a sparse file for the content), or, when nginx is missing and
  cannot be installed, a minimal asyncio server doing the same;
- an nginx `proxy_pass` hop, the floor a generic reverse proxy sets;
- load: `wrk` (Debian's) with a Lua script for headers, bodies and a JSON summary, or
  a Python asyncio client when wrk is missing (then itself the bottleneck: it says so);
- a raw keep-alive HTTP/1.1 client for latencies at one connection;
- gateway replicas started as `python -m gateway serve` (support.processes), and the
  figures' rows and the one-table format every bench prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import redis

ROOT = Path(__file__).resolve().parents[2]

RESULTS_DIR = ROOT / "tests" / "bench" / "results"
VIDEO_PROMPT = "bench: a cat on a windowsill watching the rain"
# Bounds on every wait in here: nothing may hang a bench run.
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


# -- CPU placement --------------------------------------------------------------------------


def cpu_plan() -> tuple[set[int] | None, set[int] | None, str]:
    """(gateway cores, load cores, description); (None, None) when there is one core."""
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None, None, "not pinned (one core)"
    gateway, load = {cores[0]}, {cores[1]}
    return (
        gateway,
        load,
        f"gateway and nginx hop on core {cores[0]}; load generator, fast upstream and "
        f"Redis on core {cores[1]}",
    )


def all_cores() -> set[int]:
    return set(os.sched_getaffinity(0))


def pin(pid: int, cpus: set[int] | None, *, tree: bool = True) -> None:
    """Set the affinity of every thread of `pid` (and of its children, with `tree`)."""
    if not cpus:
        return
    try:
        root = psutil.Process(pid)
        procs = [root, *(root.children(recursive=True) if tree else [])]
    except psutil.Error:
        return
    for proc in procs:
        try:
            threads = [t.id for t in proc.threads()]
        except psutil.Error:
            continue
        for tid in threads:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, cpus)


def taskset(cpus: set[int] | None) -> list[str]:
    """A `taskset -c` prefix for a command, or nothing."""
    if not cpus or not shutil.which("taskset"):
        return []
    return ["taskset", "-c", ",".join(str(c) for c in sorted(cpus))]


def cpu_seconds(pids: Iterable[int]) -> float:
    """User + system CPU seconds of these processes and their children so far."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            continue
        for proc in procs:
            if proc.pid in seen:
                continue
            seen.add(proc.pid)
            try:
                times = proc.cpu_times()
            except psutil.Error:
                continue
            total += times.user + times.system
    return total


def _tree_cpu_s() -> float:
    """CPU seconds of this process and everything it started, live or reaped."""
    total = 0.0
    me = psutil.Process()
    for proc in [me, *me.children(recursive=True)]:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


class CoreMeter:
    """How busy each core was (all processes) between construction and `busy()`."""

    def __init__(self) -> None:
        self.before = psutil.cpu_times(percpu=True)

    def busy(self) -> dict[str, float]:
        out = {}
        for n, (a, b) in enumerate(zip(self.before, psutil.cpu_times(percpu=True), strict=True)):
            total = sum(b) - sum(a)
            idle = (b.idle - a.idle) + (getattr(b, "iowait", 0.0) - getattr(a, "iowait", 0.0))
            out[f"core{n}"] = round(1 - idle / total, 3) if total > 0 else 0.0
        return out


def _busy_cpu_s() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0) - getattr(t, "steal", 0.0)


class ForeignLoad:
    """How many cores processes that are not this bench's kept busy meanwhile.

    System-wide busy CPU time minus this process tree's own: on a shared machine this
    says how much the figures were disturbed (0.0 is a quiet machine).
    """

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = _busy_cpu_s()
        self.ours0 = _tree_cpu_s()

    def cores(self) -> float:
        wall = time.monotonic() - self.t0
        foreign = (_busy_cpu_s() - self.busy0) - (_tree_cpu_s() - self.ours0)
        return round(max(0.0, foreign) / wall, 2) if wall > 0 else 0.0


def machine_note() -> dict[str, Any]:
    """What else the machine was doing: figures from a busy machine are worth less."""
    load1, load5, _ = os.getloadavg()
    return {
        "cores": os.cpu_count(),
        "loadavg_1m": round(load1, 2),
        "loadavg_5m": round(load5, 2),
        "python": platform.python_version(),
    }


# -- tools ----------------------------------------------------------------------------------


def ensure_tool(binary: str, package: str, notes: list[str]) -> str | None:
    """The tool's path; installed with apt-get when missing and running as root."""
    found = shutil.which(binary) or (
        f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None
    )
    if found:
        return found
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        notes.append(f"{binary} not found and not root: install Debian's {package} to use it")
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for attempt in ("install", "update+install"):
        if attempt == "update+install":
            subprocess.run(
                ["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=False
            )
        print(f"installing {package} with apt-get ...", file=sys.stderr)
        done = subprocess.run(
            ["apt-get", "install", "-y", "-qq", package],
            env=env,
            capture_output=True,
            timeout=600,
            check=False,
        )
        if done.returncode == 0:
            break
    found = shutil.which(binary) or (
        f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}") else None
    )
    if not found:
        notes.append(f"{binary}: apt-get install {package} failed")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port: int, timeout: float, popen: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if popen is not None and popen.poll() is not None:
            raise RuntimeError(f"process exited before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port} after {timeout}s")
        time.sleep(0.05)


def stop_popen(popen: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if popen is None or popen.poll() is not None:
        return
    popen.send_signal(sig)
    try:
        popen.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        popen.kill()
        popen.wait()


# -- the fast upstream and the nginx hop ----------------------------------------------------

# What the fast upstream answers: small, valid video objects, like the real API's.
VIDEO_FIELDS = (
    '"object":"video","created_at":1700000000,"model":"sora-2","seconds":"4",'
    '"size":"720x1280","remixed_from_video_id":null,"expires_at":null,"error":null'
)
# GET answers `in_progress`: the common case of a client polling a running job. (A
# terminal status would add one release script per retrieve.)
GET_BODY = '{"id":"%s",%s,"status":"in_progress","progress":50}'
# With this request header (one the gateway forwards) every answer differs, as when a
# job's progress moves between polls: the gateway then writes its record each time.
CHANGING = ("OpenAI-Beta", "bench-changing")
GET_BODY_CHANGING = '{"id":"%s",%s,"status":"in_progress","progress":50,"bench_nonce":"%s"}'
POST_BODY = '{"id":"video_%s",%s,"status":"queued","progress":0}'


def _nginx_common(prefix: Path) -> str:
    user = "user root;\n" if os.geteuid() == 0 else ""
    return (
        f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\n"
        f"error_log {prefix}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
    )


def _http_common(prefix: Path) -> str:
    return (
        "access_log off;\n"
        f"client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;\n"
        f"fastcgi_temp_path {prefix}/fastcgi; uwsgi_temp_path {prefix}/uwsgi;\n"
        f"scgi_temp_path {prefix}/scgi;\n"
        "keepalive_requests 100000000; keepalive_timeout 300s;\n"
        "sendfile on; tcp_nopush on;\n"
    )


def upstream_nginx_conf(prefix: Path, port: int, www: Path) -> str:
    get_body = GET_BODY % ("$vid", VIDEO_FIELDS)
    changing_body = GET_BODY_CHANGING % ("$vid", VIDEO_FIELDS, "$request_id")
    post_body = POST_BODY % ("$request_id", VIDEO_FIELDS)
    return _nginx_common(prefix) + (
        "http {\n" + _http_common(prefix) + "default_type application/json;\n"
        "server {\n"
        f"  listen 127.0.0.1:{port} backlog=4096;\n"
        '  location = /healthz { return 200 \'{"status":"ok"}\'; }\n'
        f"  location = /v1/videos {{ return 200 '{post_body}'; }}\n"
        "  location ~ ^/v1/videos/(?<vid>[A-Za-z0-9_-]+)$ {\n"
        f"    if ($http_openai_beta = {CHANGING[1]}) {{ return 200 '{changing_body}'; }}\n"
        f"    return 200 '{get_body}';\n"
        "  }\n"
        "  location ~ ^/v1/videos/[A-Za-z0-9_-]+/content$ {\n"
        f"    root {www}; try_files /video.bin =404;\n"
        "    types { } default_type video/mp4;\n"
        "  }\n"
        "}\n}\n"
    )


# nginx's proxy_buffer_size/proxy_buffers default to one memory page (4 KiB here).
BIG_BUFFERS = "proxy_buffer_size 64k; proxy_buffers 8 64k; proxy_busy_buffers_size 128k;"


def proxy_nginx_conf(prefix: Path, upstream_port: int, servers: dict[int, str]) -> str:
    """One nginx, one server per port, each `proxy_pass` to the upstream with keep-alive."""
    blocks = []
    for port, extra in servers.items():
        blocks.append(
            "server {\n"
            f"  listen 127.0.0.1:{port} backlog=4096;\n"
            "  location / {\n"
            "    proxy_pass http://fast; proxy_http_version 1.1;\n"
            '    proxy_set_header Connection "";\n'
            f"    {extra}\n"
            "  }\n"
            "}\n"
        )
    return _nginx_common(prefix) + (
        "http {\n" + _http_common(prefix) + "upstream fast {\n"
        f"  server 127.0.0.1:{upstream_port};\n"
        "  keepalive 64; keepalive_requests 100000000; keepalive_timeout 300s;\n"
        "}\n" + "".join(blocks) + "}\n"
    )


class Nginx:
    """One nginx master + one worker, in its own prefix, in the foreground."""

    def __init__(self, binary: str, prefix: Path, conf: str, ports: list[int], cpus: set[int]):
        self.binary = binary
        self.prefix = prefix
        self.conf = conf
        self.ports = ports
        self.cpus = cpus
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Nginx:
        self.prefix.mkdir(parents=True, exist_ok=True)
        conf = self.prefix / "nginx.conf"
        conf.write_text(self.conf)
        log = (self.prefix / "stdout.log").open("ab")
        self.popen = subprocess.Popen(
            [
                *taskset(self.cpus),
                self.binary,
                "-e",
                str(self.prefix / "error.log"),
                "-p",
                str(self.prefix),
                "-c",
                str(conf),
                "-g",
                "daemon off;",
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        try:
            for port in self.ports:
                wait_for_port(port, START_TIMEOUT_S, self.popen)
        except BaseException:
            self.stop()
            err = self.prefix / "error.log"
            raise RuntimeError(f"nginx did not start:\n{err.read_text()[-2000:]}") from None
        return self

    def pids(self) -> list[int]:
        return [self.popen.pid] if self.popen is not None else []

    def stop(self) -> None:
        stop_popen(self.popen, signal.SIGQUIT)
        self.popen = None


class PythonUpstream:
    """The fallback fast upstream (no nginx): this file run with `--serve-upstream`."""

    def __init__(self, port: int, content_path: Path, cpus: set[int] | None, log: Path):
        self.port = port
        self.content_path = content_path
        self.cpus = cpus
        self.log = log
        self.popen: subprocess.Popen[bytes] | None = None

    def start(self) -> PythonUpstream:
        out = self.log.open("ab")
        self.popen = subprocess.Popen(
            [
                *taskset(self.cpus),
                sys.executable,
                "-m",
                "bench.common",
                "--serve-upstream",
                str(self.port),
                str(self.content_path),
            ],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        out.close()
        wait_for_port(self.port, START_TIMEOUT_S, self.popen)
        return self

    def pids(self) -> list[int]:
        return [self.popen.pid] if self.popen is not None else []

    def stop(self) -> None:
        stop_popen(self.popen)
        self.popen = None


@dataclass
class Upstream:
    """The fast upstream the benches put behind the gateway, whichever serves it."""

    kind: str  # "nginx" | "python"
    port: int
    server: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def pids(self) -> list[int]:
        return self.server.pids()

    def stop(self) -> None:
        self.server.stop()


def start_fast_upstream(
    workdir: Path, nginx: str | None, cpus: set[int] | None, content_bytes: int = 0
) -> Upstream:
    """nginx when there is one, else the asyncio fallback; a sparse content file."""
    www = workdir / "www"
    www.mkdir(parents=True, exist_ok=True)
    content = www / "video.bin"
    with content.open("wb") as handle:
        handle.truncate(max(content_bytes, 1))
    port = free_port()
    if nginx is not None:
        conf = upstream_nginx_conf(workdir / "nginx-upstream", port, www)
        server: Any = Nginx(nginx, workdir / "nginx-upstream", conf, [port], cpus or set())
        return Upstream("nginx", port, server.start())
    server = PythonUpstream(port, content, cpus, workdir / "python-upstream.log").start()
    return Upstream("python", port, server)


def start_nginx_hop(
    workdir: Path, nginx: str, upstream_port: int, variants: dict[str, str], cpus: set[int] | None
) -> tuple[Nginx, dict[str, int]]:
    """One nginx proxying to the upstream; a port per variant (name -> extra directives)."""
    ports = {name: free_port() for name in variants}
    conf = proxy_nginx_conf(
        workdir / "nginx-hop", upstream_port, {ports[n]: extra for n, extra in variants.items()}
    )
    hop = Nginx(nginx, workdir / "nginx-hop", conf, list(ports.values()), cpus or set())
    return hop.start(), ports


# -- the fallback upstream server (this file run with --serve-upstream PORT PATH) -----------


def serve_upstream(port: int, content_path: str) -> None:
    """A minimal HTTP/1.1 keep-alive server answering like the nginx upstream above."""
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    size = os.path.getsize(content_path)
    chunk = b"\0" * (1 << 20)
    video_route = re.compile(rb"^/v1/videos/([A-Za-z0-9_-]+)$")
    content_route = re.compile(rb"^/v1/videos/[A-Za-z0-9_-]+/content")
    fields = VIDEO_FIELDS

    def reply(status: str, body: bytes, ctype: bytes = b"application/json") -> bytes:
        return (
            b"HTTP/1.1 " + status.encode() + b"\r\ncontent-type: " + ctype
            + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )  # fmt: skip

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                line, _, rest = head.partition(b"\r\n")
                method, target, _ = line.split(b" ", 2)
                length = 0
                changing = False
                for header in rest.split(b"\r\n"):
                    name, _, value = header.partition(b":")
                    name = name.strip().lower()
                    if name == b"content-length":
                        length = int(value)
                    elif name == b"openai-beta":
                        changing = value.strip().decode() == CHANGING[1]
                if length:
                    await reader.readexactly(length)
                path = target.split(b"?", 1)[0]
                if path == b"/v1/videos" and method == b"POST":
                    writer.write(reply("200 OK", (POST_BODY % (uuid.uuid4().hex, fields)).encode()))
                elif content_route.match(path):
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: video/mp4\r\ncontent-length: "
                        + str(size).encode()
                        + b"\r\n\r\n"
                    )
                    left = size
                    while left > 0:
                        writer.write(chunk[: min(left, len(chunk))])
                        left -= len(chunk)
                        await writer.drain()
                elif (match := video_route.match(path)) is not None:
                    vid = match[1].decode()
                    body = (
                        GET_BODY_CHANGING % (vid, fields, uuid.uuid4().hex)
                        if changing
                        else GET_BODY % (vid, fields)
                    )
                    writer.write(reply("200 OK", body.encode()))
                elif path == b"/healthz":
                    writer.write(reply("200 OK", b'{"status":"ok"}'))
                else:
                    writer.write(reply("404 Not Found", b'{"error":{"message":"no route"}}'))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=4096)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


# -- the gateway ----------------------------------------------------------------------------


def bench_gateway_config(
    upstream_url: str, store_url: str, token: str, keys: dict[str, str]
) -> dict[str, Any]:
    """The gateway as deployed (JSON access log at info), with a quota that never binds.

    `quota.max_in_flight` is huge so creates are never refused or queued, and the tracker
    polls rarely, so its background work stays out of the measured windows; the benches
    that create many jobs free the slots themselves (see `Janitor`).
    """
    from gateway.auth import key_digest

    return {
        "upstream": {"base_url": upstream_url + "/v1", "token": token},
        "store": {"redis_url": store_url},
        "quota": {"max_in_flight": 1_000_000, "wait_s": 5},
        "tracker": {"poll_interval_s": 30, "lease_s": 120},
        "teams": [{"name": team, "key_sha256": [key_digest(key)]} for team, key in keys.items()],
    }


def start_gateway(
    workdir: Path, config: dict[str, Any], *, workers: int = 1, cpus: set[int] | None = None
) -> Any:
    """`python -m gateway serve` (support.processes.Process), pinned to `cpus`."""
    from support.processes import Process, wait_until, write_config

    port = free_port()
    path = write_config(workdir / f"gateway-{port}.yaml", config)
    args = ["serve", "--config", str(path), "--port", str(port)]
    if workers > 1:
        args += ["--workers", str(workers)]
    proc = Process("gateway", args, port, workdir / f"gateway-{port}.log").start("/readyz")
    if workers > 1:
        # /readyz answers from the first worker up; wait until all of them are there.
        def all_up() -> bool:
            try:
                kids = psutil.Process(proc.pid()).children(recursive=True)
            except psutil.Error:
                return False
            return sum(1 for k in kids if "python" in (k.name() or "")) >= workers

        wait_until(all_up, START_TIMEOUT_S, f"{workers} gateway workers up", interval=0.1)
        time.sleep(1.0)  # each worker's lifespan (tracker, store) starts after its fork
    pin(proc.pid(), cpus)
    return proc


def gateway_pids(proc: Any) -> list[int]:
    """The serve process and its workers (the embedded store is not used here)."""
    try:
        root = psutil.Process(proc.pid())
        return [root.pid, *(k.pid for k in root.children(recursive=True))]
    except psutil.Error:
        return []


def new_keys(*teams: str) -> dict[str, str]:
    from gateway.auth import new_key

    return {team: new_key() for team in teams}


def start_store(workdir: Path, cpus: set[int] | None) -> Any:
    from gateway.embedded_store import EmbeddedRedis

    store = EmbeddedRedis(workdir / "store", persistent=False).start()
    assert store.process is not None
    pin(store.process.pid, cpus)
    return store


def create_video(base_url: str, key: str) -> str:
    """One job created through the gateway: its id, recorded for the key's team."""
    client = RawHttp(base_url)
    try:
        status, body = client.request(post_request(base_url, "/v1/videos", key))
    finally:
        client.close()
    if status != 200:
        raise RuntimeError(f"create through the gateway answered {status}: {body[:300]!r}")
    return json.loads(body)["id"]


def make_workdir(name: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=f"sgw-bench-{name}-"))


class Janitor(threading.Thread):
    """Frees the ledger's slots every `every_s`, so creates never pile up slots.

    The acquire script reads every held slot (it counts them per team), so each create
    would get slower as slots accumulate; a real account frees them as jobs end. This
    empties `holders`, `slots` and `jobs` in one transaction and remembers how many
    slots it found, so the output can say how many a create saw at most.
    """

    def __init__(self, store_url: str, every_s: float = 0.02, max_s: float = 900.0) -> None:
        super().__init__(daemon=True)
        from gateway.store import HOLDERS, JOBS, SLOTS

        self.keys = [HOLDERS, SLOTS, JOBS]
        self.client = redis.Redis.from_url(store_url)
        self.every_s = every_s
        self.max_s = max_s
        self.stopping = threading.Event()
        self.seen: list[int] = []

    def sweep(self) -> int:
        pipe = self.client.pipeline(transaction=True)
        pipe.zcard(self.keys[0])
        pipe.delete(*self.keys)
        held, _ = pipe.execute()
        self.seen.append(int(held))
        return int(held)

    def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        while not self.stopping.wait(self.every_s) and time.monotonic() < deadline:
            try:
                self.sweep()
            except redis.RedisError:
                return

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)
        self.client.close()

    def summary(self) -> dict[str, Any]:
        seen = self.seen or [0]
        return {"every_ms": self.every_s * 1000, "max_slots_seen": max(seen)}


# -- a raw keep-alive HTTP/1.1 client, for latencies at one connection ----------------------


def _extra(key: str | None, headers: dict[str, str] | None) -> str:
    lines = f"Authorization: Bearer {key}\r\n" if key else ""
    return lines + "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())


def get_request(
    base_url: str, path: str, key: str | None = None, headers: dict[str, str] | None = None
) -> bytes:
    host = base_url.split("://", 1)[1]
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\n{_extra(key, headers)}\r\n".encode()


def post_request(
    base_url: str, path: str, key: str | None = None, headers: dict[str, str] | None = None
) -> bytes:
    host = base_url.split("://", 1)[1]
    auth = _extra(key, headers)
    body = json.dumps({"prompt": VIDEO_PROMPT}).encode()
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


class RawHttp:
    """One keep-alive connection; `request` sends prepared bytes and reads one answer."""

    def __init__(self, base_url: str, timeout: float = 10.0) -> None:
        host, _, port = base_url.split("://", 1)[1].partition(":")
        self.address = (host, int(port))
        self.timeout = timeout
        self.sock: socket.socket | None = None
        self.buf = b""

    def _connect(self) -> socket.socket:
        sock = socket.create_connection(self.address, timeout=self.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        return sock

    def request(self, data: bytes) -> tuple[int, bytes]:
        if self.sock is None:
            self.sock = self._connect()
        self.sock.sendall(data)
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, self.buf = self.buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length: int | None = None
        chunked = close = False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
            elif name == b"connection" and value.strip().lower() == b"close":
                close = True
        body = self._chunked() if chunked else self._exactly(length or 0)
        if close:
            self.close()
        return status, body

    def _fill(self) -> None:
        assert self.sock is not None
        data = self.sock.recv(65536)
        if not data:
            self.close()
            raise ConnectionError("connection closed mid-answer")
        self.buf += data

    def _exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            self._fill()
        body, self.buf = self.buf[:n], self.buf[n:]
        return body

    def _chunked(self) -> bytes:
        parts = []
        while True:
            while b"\r\n" not in self.buf:
                self._fill()
            size_line, _, self.buf = self.buf.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            parts.append(self._exactly(size))
            self._exactly(2)
            if size == 0:
                return b"".join(parts)

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
        self.sock = None


# -- load -----------------------------------------------------------------------------------


@dataclass
class LoadResult:
    tool: str
    connections: int
    seconds: float
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    cpu: dict[str, float] = field(default_factory=dict)  # share of one core, per party

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


WRK_LUA = """
wrk.method = "%(method)s"
%(headers)s
%(body)s
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%%d,"duration_us":%%d,"connect":%%d,"read":%%d,"write":%%d,' ..
    '"status":%%d,"timeout":%%d,"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _lua_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


class LoadGenerator:
    """wrk when there is one, else a Python asyncio client (which then limits the rates)."""

    def __init__(self, wrk: str | None, workdir: Path, cpus: set[int] | None) -> None:
        self.wrk = wrk
        self.workdir = workdir
        self.cpus = cpus
        self._scripts: dict[tuple[Any, ...], Path] = {}

    @property
    def name(self) -> str:
        if self.wrk:
            version = subprocess.run(
                [self.wrk, "-v"], capture_output=True, text=True, check=False
            ).stdout.split("[")[0]
            return f"{version.strip() or 'wrk'} (1 thread)"
        return "Python asyncio client (wrk missing: the client is likely the bottleneck)"

    def _script(self, method: str, key: str | None, extra: dict[str, str] | None) -> Path:
        slot = (method, key, tuple(sorted((extra or {}).items())))
        if slot not in self._scripts:
            headers = [
                f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}"
                for k, v in (extra or {}).items()
            ]
            if key:
                headers.append(f'wrk.headers["Authorization"] = {_lua_string("Bearer " + key)}')
            body = ""
            if method == "POST":
                headers.append('wrk.headers["Content-Type"] = "application/json"')
                body = f"wrk.body = {_lua_string(json.dumps({'prompt': VIDEO_PROMPT}))}"
            path = self.workdir / f"wrk-{len(self._scripts)}.lua"
            path.write_text(
                WRK_LUA % {"method": method, "headers": "\n".join(headers), "body": body}
            )
            self._scripts[slot] = path
        return self._scripts[slot]

    def start(
        self,
        url: str,
        method: str,
        key: str | None,
        connections: int,
        seconds: float,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """Begin a run; `finish(handle)` waits for it and returns its LoadResult."""
        if self.wrk:
            cmd = [
                *taskset(self.cpus),
                self.wrk,
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(seconds))}s",
                "--timeout",
                "10s",
                "-s",
                str(self._script(method, key, headers)),
                url,
            ]
            popen = subprocess.Popen(
                cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            return ("wrk", popen, connections, seconds)
        result: dict[str, Any] = {}

        def run() -> None:
            result["value"] = asyncio.run(
                _python_load(url, method, key, connections, seconds, headers), debug=False
            )

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return ("python", thread, result, connections)

    def finish(self, handle: Any) -> LoadResult:
        if handle[0] == "wrk":
            _, popen, connections, seconds = handle
            try:
                out, _ = popen.communicate(timeout=seconds + 60)
            except subprocess.TimeoutExpired:
                popen.kill()
                out, _ = popen.communicate()
            line = next((x for x in out.splitlines() if x.startswith("WRKJSON ")), None)
            if line is None:
                raise RuntimeError(f"wrk printed no summary:\n{out[-2000:]}")
            s = json.loads(line[len("WRKJSON ") :])
            duration = s["duration_us"] / 1e6
            errors = s["connect"] + s["read"] + s["write"] + s["status"] + s["timeout"]
            return LoadResult(
                "wrk",
                connections,
                round(duration, 3),
                s["requests"],
                errors,
                s["requests"] / duration,
                s["p50_us"] / 1000,
                s["p90_us"] / 1000,
                s["p99_us"] / 1000,
                s["max_us"] / 1000,
            )
        _, thread, result, connections = handle
        thread.join()
        return result["value"]

    def run(
        self,
        url: str,
        method: str,
        key: str | None,
        connections: int,
        seconds: float,
        watch: dict[str, list[int]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> LoadResult:
        """One closed-loop run; `watch` names processes whose CPU share to report."""
        watch = watch or {}
        before = {name: cpu_seconds(pids) for name, pids in watch.items()}
        cores = CoreMeter()
        started = time.perf_counter()
        handle = self.start(url, method, key, connections, seconds, headers)
        result = self.finish(handle)
        wall = time.perf_counter() - started
        result.cpu = {
            name: round((cpu_seconds(pids) - before[name]) / wall, 3)
            for name, pids in watch.items()
        }
        result.cpu.update(cores.busy())
        return result


async def _python_load(
    url: str,
    method: str,
    key: str | None,
    connections: int,
    seconds: float,
    headers: dict[str, str] | None,
) -> LoadResult:
    try:
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    except ImportError:
        pass
    base, _, path = url.partition("://")[2].partition("/")
    base_url = "http://" + base
    path = "/" + path
    build = post_request if method == "POST" else get_request
    data = build(base_url, path, key, headers)
    host, _, port = base.partition(":")
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def one() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < end:
                t0 = time.perf_counter()
                writer.write(data)
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - t0)
                if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(connections)))
    duration = time.perf_counter() - started
    return LoadResult(
        "python",
        connections,
        round(duration, 3),
        len(latencies),
        errors,
        len(latencies) / duration,
        (percentile(latencies, 50) or 0) * 1000,
        (percentile(latencies, 90) or 0) * 1000,
        (percentile(latencies, 99) or 0) * 1000,
        max(latencies, default=0) * 1000,
    )


# -- Redis accounting -----------------------------------------------------------------------


def command_calls(client: redis.Redis) -> dict[str, int]:
    """`INFO commandstats` calls by command (commands run inside Lua scripts included)."""
    stats = client.info("commandstats")
    calls: dict[str, int] = {}
    for name, value in stats.items():
        command = name.removeprefix("cmdstat_")
        if command in ("info", "config|resetstat", "monitor"):
            continue  # the bench's own
        calls[command] = int(value["calls"])
    return calls


def calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {
        k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)
    }


class Monitor(threading.Thread):
    """Redis MONITOR: counts commands sent by clients apart from those run by scripts."""

    def __init__(self, url: str, max_s: float = 120.0) -> None:
        super().__init__(daemon=True)
        from urllib.parse import urlparse

        parsed = urlparse(url)
        self.address = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        self.max_s = max_s
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.top: dict[str, int] = {}
        self.scripted: dict[str, int] = {}

    def run(self) -> None:
        sock = socket.create_connection(self.address, timeout=0.2)
        sock.sendall(b"MONITOR\r\n")
        pending = b""
        deadline = time.monotonic() + self.max_s
        try:
            while not self.stopping.is_set() and time.monotonic() < deadline:
                try:
                    data = sock.recv(65536)
                except TimeoutError:
                    continue
                if not data:
                    return
                pending += data
                *lines, pending = pending.split(b"\r\n")
                for line in lines:
                    self._count(line)
        finally:
            sock.close()

    def _count(self, line: bytes) -> None:
        if line == b"+OK":
            self.ready.set()
            return
        match = re.match(rb'^\+[\d.]+ \[\d+ ([^\]]+)\] "([^"]+)"', line)
        if match is None:
            return
        command = match[2].decode().lower()
        book = self.scripted if match[1] == b"lua" else self.top
        book[command] = book.get(command, 0) + 1

    def stop(self) -> None:
        self.stopping.set()
        self.join(5)


# -- figures and tables ---------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, math.ceil(q / 100 * len(ordered)) - 1)
    return ordered[rank]


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 2] if n % 2 else (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def row(
    bench: str,
    figure: str,
    value: float | None,
    unit: str,
    *,
    reference: str | None = None,
    reference_value: float | None = None,
    ratio: float | None = None,
    target: str | None = None,
    met: bool | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """One figure of the combined table, with its same-run reference and its target."""
    if ratio is None and value is not None and reference_value:
        ratio = value / reference_value
    return {
        "bench": bench,
        "figure": figure,
        "value": value,
        "unit": unit,
        "reference": reference,
        "reference_value": reference_value,
        "ratio": ratio,
        "target": target,
        "met": met,
        "note": note,
    }


def fmt(value: float | None, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 100):
        return f"{value:,.0f} {unit}".rstrip()
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 100:
        text = f"{value:.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    elif abs(value) >= 1:
        text = f"{value:.2f}"
    else:
        text = f"{value:.3f}"
    return f"{text} {unit}".rstrip()


def render_rows(rows: list[dict[str, Any]], *, with_bench: bool = False) -> str:
    head = ["figure", "value", "reference (same run)", "ratio", "target", "verdict"]
    if with_bench:
        head.insert(0, "bench")
    lines = []
    for r in rows:
        verdict = "-" if r["met"] is None else ("met" if r["met"] else "MISSED")
        ref = "-"
        if r["reference"]:
            ref = f"{r['reference']} {fmt(r['reference_value'], r['unit'])}".strip()
        ratio = "-" if r["ratio"] is None else f"x{r['ratio']:.2f}"
        cells = [r["figure"], fmt(r["value"], r["unit"]), ref, ratio, r["target"] or "-", verdict]
        if with_bench:
            cells.insert(0, r["bench"])
        lines.append(cells)
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines, strict=False)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    for cells in lines:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True)))
    notes = [f"  * {r['figure']}: {r['note']}" for r in rows if r.get("note")]
    return "\n".join(out + (["", "notes:", *notes] if notes else []))


def write_result(name: str, result: dict[str, Any], output: Path | None = None) -> Path:
    path = output or RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-upstream":
        serve_upstream(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit("usage: common.py --serve-upstream PORT CONTENT_PATH")
