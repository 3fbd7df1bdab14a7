"""CONTRACT §2's errors table for what goes wrong beyond the gateway: upstream and Redis.

Upstream failures are switched on with the simulator's fault knobs. Gateways with other
settings (a 1 s upstream timeout and a small body cap, an upstream that is not there, a
store that is not there) are started here as their own processes.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from gateway.embedded_store import free_port
from support.processes import Process, start_gateway, write_config
from support.stack import gateway_config

SMALL_BODY_CAP = 16 * 1024
PROMPT = {"prompt": "a paper boat on a puddle"}


def assert_error(
    reply: httpx.Response, status: int, code: str | None, param: str | None = None
) -> dict[str, Any]:
    """The OpenAI envelope, exactly: four fields, with the expected status, code and param."""
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.headers.get("x-request-id")
    body = reply.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str)
    assert error["message"]
    assert isinstance(error["type"], str)
    assert error["type"]
    assert error["code"] == code
    assert error["param"] == param
    return error


def set_faults(stack: Any, **faults: int) -> None:
    with stack.sim() as sim:
        sim.post("/_sim/faults", json=faults).raise_for_status()


def video_posts(stack: Any) -> list[dict[str, Any]]:
    return [r for r in stack.sim_requests() if r["method"] == "POST"]


def client_for(process: Process, key: str, **kwargs: Any) -> httpx.Client:
    return httpx.Client(
        base_url=process.url, headers={"authorization": f"Bearer {key}"}, timeout=30.0, **kwargs
    )


def create(stack: Any, team: str = "alpha") -> str:
    with stack.client(team) as client:
        reply = client.post("/v1/videos", json=PROMPT)
    assert reply.status_code == 200, reply.text
    return reply.json()["id"]


@pytest.fixture(scope="module")
def tight_gateway(session_stack, workdir) -> Iterator[Process]:
    """A gateway on the shared simulator and store, with a 1 s upstream timeout and a
    16 KiB body cap."""
    config = gateway_config(
        session_stack.simulator.url,
        session_stack.store.url,
        session_stack.token,
        session_stack.keys,
        timeout_s=1,
    )
    config["limits"]["max_body_bytes"] = SMALL_BODY_CAP
    process = start_gateway(workdir, config)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def no_upstream_gateway(session_stack, workdir) -> Iterator[Process]:
    """A gateway whose upstream address is a port nothing listens on."""
    config = gateway_config(
        f"http://127.0.0.1:{free_port()}",
        session_stack.store.url,
        session_stack.token,
        session_stack.keys,
    )
    process = start_gateway(workdir, config)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def no_store_gateway(session_stack, workdir) -> Iterator[Process]:
    """A gateway whose Redis is a port nothing listens on. It never becomes ready, so it
    is started by hand and waited for on /healthz instead of /readyz."""
    config = gateway_config(
        session_stack.simulator.url,
        f"redis://127.0.0.1:{free_port()}/0",
        session_stack.token,
        session_stack.keys,
    )
    port = free_port()
    path = write_config(workdir / f"gateway-nostore-{port}.yaml", config)
    process = Process(
        "gateway-without-store",
        ["serve", "--config", str(path), "--port", str(port)],
        port,
        workdir / f"gateway-nostore-{port}.log",
    ).start("/healthz")
    yield process
    process.stop()


# -- upstream 4xx ---------------------------------------------------------------------------


def test_upstream_4xx_keeps_upstreams_status_code_and_param(stack):
    with stack.client() as client:
        reply = client.post("/v1/videos", json={**PROMPT, "seconds": "7"})
    error = assert_error(reply, 400, "invalid_value", "seconds")
    assert "seconds" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert "x-should-retry" not in reply.headers  # nothing was created: a retry is harmless
    assert stack.sim_stats()["jobs_created"] == 0
    # A refused create is not the team's video.
    with stack.client() as client:
        assert client.get("/v1/videos").json()["data"] == []


def test_upstream_4xx_on_a_multipart_create_is_passed_through(stack):
    with stack.client() as client:
        reply = client.post(
            "/v1/videos",
            data={"prompt": "a kite", "size": "10x10"},
            files={"input_reference": ("ref.png", b"\x89PNG fake", "image/png")},
        )
    assert_error(reply, 400, "invalid_value", "size")


def test_retrieve_of_a_video_upstream_no_longer_has_is_not_found(stack):
    video_id = create(stack)
    with httpx.Client(
        base_url=stack.simulator.url, headers={"authorization": f"Bearer {stack.token}"}
    ) as upstream:
        assert upstream.delete(f"/v1/videos/{video_id}").status_code == 200
    with stack.client() as client:
        reply = client.get(f"/v1/videos/{video_id}")
        assert_error(reply, 404, "video_not_found")
        # The record is marked gone: the team's list no longer shows it.
        assert client.get("/v1/videos").json()["data"] == []


# -- upstream 5xx ---------------------------------------------------------------------------


def test_upstream_5xx_on_retrieve_is_502_upstream_error(stack):
    video_id = create(stack)
    # Many, not one: a background tracker polling the same job must not use it up first.
    set_faults(stack, fail_next=1000)
    try:
        with stack.client() as client:
            reply = client.get(f"/v1/videos/{video_id}")
    finally:
        set_faults(stack, fail_next=0)
    error = assert_error(reply, 502, "upstream_error")
    assert stack.token not in reply.text
    assert error["type"] != "invalid_request_error"
    # Still the team's video once upstream recovers.
    with stack.client() as client:
        assert client.get(f"/v1/videos/{video_id}").status_code == 200


def completed_source(stack: Any) -> str:
    """A completed video of team alpha: the simulator's jobs are made to finish at once."""
    with stack.sim() as sim:
        sim.post("/_sim/config", json={"queue_s": 0, "run_s": 0}).raise_for_status()
    video_id = create(stack)
    with stack.client() as client:
        assert client.get(f"/v1/videos/{video_id}").json()["status"] == "completed"
    return video_id


# Every slot-taking route, as (path, JSON body) for a given completed source video.
JOB_ROUTES = {
    "create": lambda src: ("/v1/videos", PROMPT),
    "remix": lambda src: (f"/v1/videos/{src}/remix", PROMPT),
    "remix-by-body": lambda src: ("/v1/videos/remix", {**PROMPT, "video_id": src}),
    "edit": lambda src: ("/v1/videos/edits", {**PROMPT, "video": {"id": src}}),
    "extension": lambda src: ("/v1/videos/extensions", {**PROMPT, "video": {"id": src}}),
}


@pytest.mark.parametrize("route", JOB_ROUTES)
def test_upstream_5xx_after_creating_is_502_and_forbids_a_retry(stack, route):
    path, body = JOB_ROUTES[route](completed_source(stack))
    before = stack.sim_stats()["jobs_created"]
    set_faults(stack, create_then_500_next=1)
    with stack.client() as client:
        reply = client.post(path, json=body)
    assert_error(reply, 502, "upstream_error")
    assert reply.headers["x-should-retry"] == "false"
    assert stack.sim_stats()["jobs_created"] == before + 1  # the job does exist upstream


def test_upstream_5xx_before_creating_is_also_502_and_forbids_a_retry(stack):
    # The gateway cannot tell a 500 before the job from one after it.
    set_faults(stack, fail_next=1)
    with stack.client() as client:
        reply = client.post("/v1/videos", json=PROMPT)
    assert_error(reply, 502, "upstream_error")
    assert reply.headers["x-should-retry"] == "false"


@pytest.mark.parametrize("knob", ["rate_limit_next", "account_limit"])
def test_upstream_429_on_create_is_upstream_rate_limited_with_its_retry_after(stack, knob):
    if knob == "account_limit":  # upstream's own "too many running tasks"
        with stack.sim() as sim:
            sim.post("/_sim/config", json={"max_running": 0}).raise_for_status()
    else:
        set_faults(stack, rate_limit_next=1)
    with stack.client() as client:
        reply = client.post("/v1/videos", json=PROMPT)
        assert_error(reply, 429, "upstream_rate_limited")
        assert reply.headers["retry-after"] == "1"  # the simulator's value
        assert reply.headers.get("x-should-retry") != "false"
        with stack.sim() as sim:
            sim.post("/_sim/reset").raise_for_status()
        # The reservation was given back: the next create goes through.
        assert client.post("/v1/videos", json=PROMPT).status_code == 200


@pytest.mark.parametrize("route", JOB_ROUTES)
def test_a_job_start_that_hangs_upstream_is_504_and_forbids_a_retry(stack, tight_gateway, route):
    path, body = JOB_ROUTES[route](completed_source(stack))
    set_faults(stack, create_then_hang_next=1)
    try:
        with client_for(tight_gateway, stack.keys["alpha"]) as client:
            reply = client.post(path, json=body)
    finally:
        with stack.sim() as sim:
            sim.post("/_sim/reset").raise_for_status()  # wakes the hung request
    assert_error(reply, 504, "upstream_timeout")
    assert reply.headers["x-should-retry"] == "false"


# -- upstream unreachable -------------------------------------------------------------------


@pytest.mark.parametrize("route", JOB_ROUTES)
def test_unreachable_upstream_on_a_job_start_is_502_and_retry_is_allowed(
    stack, no_upstream_gateway, route
):
    path, body = JOB_ROUTES[route](completed_source(stack))
    with client_for(no_upstream_gateway, stack.keys["alpha"]) as client:
        reply = client.post(path, json=body)
    assert_error(reply, 502, "upstream_unavailable")
    assert reply.headers.get("x-should-retry") != "false"


@pytest.mark.parametrize(("method", "suffix"), [("GET", ""), ("GET", "/content"), ("DELETE", "")])
def test_unreachable_upstream_on_a_known_video_is_502(stack, no_upstream_gateway, method, suffix):
    video_id = create(stack)  # through the working gateway; both share the store
    with client_for(no_upstream_gateway, stack.keys["alpha"]) as client:
        reply = client.request(method, f"/v1/videos/{video_id}{suffix}")
        assert_error(reply, 502, "upstream_unavailable")
    # Ownership is still checked first: another team's id is 404, not 502.
    with client_for(no_upstream_gateway, stack.keys["beta"]) as client:
        reply = client.request(method, f"/v1/videos/{video_id}{suffix}")
        assert_error(reply, 404, "video_not_found")
    # The record survives the outage.
    with stack.client() as client:
        assert client.get(f"/v1/videos/{video_id}").status_code == 200


# -- Redis unreachable ----------------------------------------------------------------------


def test_without_redis_the_gateway_is_alive_but_not_ready(stack, no_store_gateway):
    health = httpx.get(no_store_gateway.url + "/healthz", timeout=10)
    assert health.status_code == 200
    assert health.headers.get("x-request-id")
    ready = httpx.get(no_store_gateway.url + "/readyz", timeout=10)
    assert_error(ready, 503, "store_unavailable")


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/videos", PROMPT),
        ("GET", "/v1/videos", None),
        ("GET", "/v1/videos/video_abc", None),
        ("DELETE", "/v1/videos/video_abc", None),
        ("GET", "/v1/videos/video_abc/content", None),
    ],
)
def test_without_redis_team_routes_fail_closed_with_503(
    stack, no_store_gateway, method, path, body
):
    with client_for(no_store_gateway, stack.keys["alpha"]) as client:
        reply = client.request(method, path, json=body)
    assert_error(reply, 503, "store_unavailable")


def test_without_redis_a_create_is_never_sent_upstream(stack, no_store_gateway):
    with client_for(no_store_gateway, stack.keys["alpha"]) as client:
        reply = client.post("/v1/videos", json=PROMPT)
    assert_error(reply, 503, "store_unavailable")
    assert video_posts(stack) == []
    assert stack.sim_stats()["jobs_created"] == 0


# -- body cap -------------------------------------------------------------------------------


def _over_cap_json() -> bytes:
    return b'{"prompt": "' + b"x" * (2 * SMALL_BODY_CAP) + b'"}'


def _chunks(data: bytes, size: int = 4096) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


CAPPED_ROUTES = [
    "/v1/videos",
    "/v1/videos/video_abc/remix",
    "/v1/videos/remix",
    "/v1/videos/edits",
    "/v1/videos/extensions",
    "/v1/videos/characters",
]


@pytest.mark.parametrize("path", CAPPED_ROUTES)
@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_a_body_over_the_cap_is_413_and_never_forwarded(stack, tight_gateway, path, framing):
    data = _over_cap_json()
    headers = {"content-type": "application/json"}
    with client_for(tight_gateway, stack.keys["alpha"]) as client:
        if framing == "content-length":
            request = client.build_request("POST", path, content=data, headers=headers)
            assert request.headers["content-length"] == str(len(data))
        else:
            request = client.build_request("POST", path, content=_chunks(data), headers=headers)
            assert request.headers["transfer-encoding"] == "chunked"
            assert "content-length" not in request.headers
        reply = client.send(request)
    assert_error(reply, 413, "request_too_large")
    assert video_posts(stack) == []
    assert stack.sim_stats()["jobs_created"] == 0


def test_a_multipart_upload_over_the_cap_is_413(stack, tight_gateway):
    big = secrets.token_bytes(2 * SMALL_BODY_CAP)
    with client_for(tight_gateway, stack.keys["alpha"]) as client:
        reply = client.post(
            "/v1/videos",
            data={"prompt": "a kite"},
            files={"input_reference": ("ref.png", big, "image/png")},
        )
    assert_error(reply, 413, "request_too_large")
    assert video_posts(stack) == []


def test_a_body_at_the_cap_is_accepted(stack, tight_gateway):
    head, tail = b'{"prompt": "', b'"}'
    data = head + b"y" * (SMALL_BODY_CAP - len(head) - len(tail)) + tail
    assert len(data) == SMALL_BODY_CAP
    with client_for(tight_gateway, stack.keys["alpha"]) as client:
        reply = client.post(
            "/v1/videos", content=_chunks(data), headers={"content-type": "application/json"}
        )
    assert reply.status_code == 200, reply.text
    assert stack.sim_stats()["jobs_created"] == 1
