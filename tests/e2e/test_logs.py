"""The gateway's logs, whole: every line of one run (`serve --workers 2`, started, driven
through many routes and answers, stopped) read back from its log file.

- every line is one JSON object;
- every `gateway.access` line carries the `request_id` the client got as `x-request-id`,
  with the method, route template and status the client saw, once per request; lines
  written while a request was handled (a job starting) carry its id too;
- no line contains a team key (nor a key that was refused) or the upstream token.

The run has its own store and simulator (a `Rig`), so its log holds nothing but this
workload.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from gateway.auth import new_key
from support.processes import Process, wait_until
from support.stack import Rig

VIDEO = "/v1/videos"
ONE_VIDEO = "/v1/videos/{video_id}"


@dataclass
class Exchange:
    """One request as the client saw it, and the route template it should be logged under."""

    method: str
    route: str | None
    status: int
    request_id: str


@dataclass
class Run:
    lines: list[str]
    exchanges: list[Exchange]
    jobs: dict[str, str]  # video id -> request id of the request that started the job
    secrets: list[str]


class Driver:
    """Sends requests to the gateway and remembers what each one got back."""

    def __init__(self, gateway: Process, keys: dict[str, str]) -> None:
        self.http = httpx.Client(base_url=gateway.url, timeout=30.0)
        self.keys = keys
        self.exchanges: list[Exchange] = []
        self.jobs: dict[str, str] = {}
        self.refused: list[str] = []  # keys tried that belong to no team

    def send(
        self,
        method: str,
        path: str,
        route: str | None,
        *,
        team: str | None = "alpha",
        expect: int = 200,
        headers: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        headers = dict(headers or {})
        if team is not None:
            headers.setdefault("authorization", f"Bearer {self.keys[team]}")
        reply = self.http.request(method, path, headers=headers, **kwargs)
        assert reply.status_code == expect, f"{method} {path}: {reply.status_code} {reply.text}"
        request_id = reply.headers.get("x-request-id")
        assert request_id, reply.headers
        self.exchanges.append(Exchange(method, route, reply.status_code, request_id))
        return reply

    def create(self, path: str = VIDEO, route: str = VIDEO, **kwargs: Any) -> str:
        reply = self.send("POST", path, route, **kwargs)
        video_id = reply.json()["id"]
        self.jobs[video_id] = reply.headers["x-request-id"]
        return video_id

    def settle(self, video_id: str, team: str = "alpha") -> None:
        def ended() -> bool:
            reply = self.send("GET", f"{VIDEO}/{video_id}", ONE_VIDEO, team=team)
            return reply.json()["status"] not in ("queued", "in_progress")

        wait_until(ended, 15, f"{video_id} ended")


def drive(rig: Rig) -> Driver:
    """Every route, most answers: successes, refusals, auth failures, upstream failures."""
    keys = rig.keys
    d = Driver(rig.gateway, keys)
    for path in ("/healthz", "/readyz", "/metrics"):
        d.send("GET", path, path, team=None)

    done = d.create(json={"prompt": "a lighthouse at dusk"})
    d.settle(done)
    upload = {"input_reference": ("ref.png", b"\x89PNG\r\n\x1a\n" + b"0" * 64, "image/png")}
    other = d.create(team="beta", data={"prompt": "a fox in snow"}, files=upload)
    d.settle(other, team="beta")
    d.send("GET", VIDEO, VIDEO, params={"limit": "5"})
    d.send("GET", f"{VIDEO}/{done}/content", "/v1/videos/{video_id}/content")
    d.send(
        "GET",
        f"{VIDEO}/{done}/content",
        "/v1/videos/{video_id}/content",
        params={"variant": "thumbnail"},
    )
    remix = d.create(
        f"{VIDEO}/{done}/remix",
        "/v1/videos/{video_id}/remix",
        json={"prompt": "the same, at night"},
    )
    d.settle(remix)
    edit = d.create(
        f"{VIDEO}/edits",
        "/v1/videos/edits",
        data={"prompt": "brighter", "video[id]": done},
        files={"unused": ("x.txt", b"x", "text/plain")},
    )
    d.settle(edit)
    character = d.send(
        "POST",
        f"{VIDEO}/characters",
        "/v1/videos/characters",
        data={"name": "Mia"},
        files={"video": ("mia.mp4", b"\x00" * 256, "video/mp4")},
    ).json()["id"]
    d.send("GET", f"{VIDEO}/characters/{character}", "/v1/videos/characters/{character_id}")
    d.send(
        "GET",
        f"{VIDEO}/characters/{character}",
        "/v1/videos/characters/{character_id}",
        team="beta",
        expect=404,
    )

    # Refusals before anything is spent.
    d.send(
        "POST",
        f"{VIDEO}/remix",
        "/v1/videos/remix",
        json={"video_id": "video_0000unknown", "prompt": "x"},
        expect=400,
    )
    d.send(
        "POST",
        f"{VIDEO}/extensions",
        "/v1/videos/extensions",
        json={"prompt": "longer", "video": {"id": "not an id!"}},
        expect=400,
    )
    d.send(
        "POST",
        VIDEO,
        VIDEO,
        content=b"{not json",
        expect=400,
        headers={"content-type": "application/json"},
    )
    d.send("GET", VIDEO, VIDEO, params={"limit": "101"}, expect=400)
    d.send("GET", f"{VIDEO}/{done}", ONE_VIDEO, team="beta", expect=404)
    d.send(
        "GET",
        f"{VIDEO}/{done}/content",
        "/v1/videos/{video_id}/content",
        params={"variant": "poster"},
        expect=400,
    )
    # A client that puts its own key where it does not belong: the query string.
    d.send("GET", VIDEO, VIDEO, params={"after": keys["alpha"]}, expect=400)

    # Auth: a refused key, none at all, the api-key header, an unknown path, a bad method.
    refused = new_key()
    d.refused.append(refused)
    d.send(
        "GET", VIDEO, None, team=None, headers={"authorization": f"Bearer {refused}"}, expect=401
    )
    d.send("GET", f"{VIDEO}/{done}", None, team=None, expect=401)
    d.send("GET", VIDEO, VIDEO, team=None, headers={"api-key": keys["beta"]})
    d.send("GET", "/v1/nothing/here", None, expect=404)
    d.send("PUT", VIDEO, VIDEO, expect=405)

    # Request ids: the client's own (echoed) and a malformed one (replaced).
    chosen = f"client-{secrets.token_hex(6)}"
    reply = d.send("GET", f"{VIDEO}/{done}", ONE_VIDEO, headers={"x-request-id": chosen})
    assert reply.headers["x-request-id"] == chosen
    too_long = "x" * 200
    reply = d.send("GET", f"{VIDEO}/{done}", ONE_VIDEO, headers={"x-request-id": too_long})
    assert reply.headers["x-request-id"] != too_long

    # Upstream failing: a 5xx on a retrieve, a 429 on a create.
    rig.faults(fail_next=1)
    d.send("GET", f"{VIDEO}/{done}", ONE_VIDEO, expect=502)
    rig.faults(rate_limit_next=1)
    d.send("POST", VIDEO, VIDEO, json={"prompt": "x"}, expect=429)

    d.send("DELETE", f"{VIDEO}/{remix}", ONE_VIDEO)
    d.send("GET", f"{VIDEO}/{remix}", ONE_VIDEO, expect=404)
    d.http.close()
    return d


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    with Rig.open(tmp_path_factory.mktemp("logs"), queue_s=0.1, run_s=0.3) as rig:
        gateway = rig.start_gateway(
            extra_args=("--workers", "2"),
            tracker={"poll_interval_s": 0.3, "lease_s": 2},
            logging={"level": "debug"},  # the most lines there can be
        )
        driver = drive(rig)
        gateway.stop()  # the whole run, shutdown lines included
        yield Run(
            lines=gateway.log().splitlines(),
            exchanges=driver.exchanges,
            jobs=driver.jobs,
            secrets=[rig.token, *rig.keys.values(), *driver.refused],
        )


def records(run: Run) -> list[dict[str, Any]]:
    return [json.loads(line) for line in run.lines if line.strip()]


def test_every_line_is_a_json_object(run: Run) -> None:
    assert len(run.lines) > len(run.exchanges)
    for number, line in enumerate(run.lines, 1):
        try:
            record = json.loads(line)
        except ValueError:
            pytest.fail(f"line {number} is not JSON: {line!r}")
        assert isinstance(record, dict), line
        assert {"time", "level", "logger", "message"} <= set(record), line


def test_every_access_line_carries_the_request_id_the_client_got(run: Run) -> None:
    access = [r for r in records(run) if r["logger"] == "gateway.access"]
    assert all(isinstance(r.get("request_id"), str) and r["request_id"] for r in access)
    by_id: dict[str, list[dict[str, Any]]] = {}
    for record in access:
        by_id.setdefault(record["request_id"], []).append(record)
    for exchange in run.exchanges:
        lines = by_id.get(exchange.request_id, [])
        assert len(lines) == 1, (exchange, lines)
        (line,) = lines
        seen = (line["method"], line["route"], line["status"])
        assert seen == (exchange.method, exchange.route, exchange.status), (exchange, line)
    # Lines written while a request was handled carry its id: the start of each job.
    started = {
        r["video_id"]: r.get("request_id") for r in records(run) if r["message"] == "job started"
    }
    assert started == run.jobs


def test_no_line_contains_a_key_or_the_upstream_token(run: Run) -> None:
    log = "\n".join(run.lines)
    assert "Bearer " not in log
    for secret in run.secrets:
        assert secret not in log
