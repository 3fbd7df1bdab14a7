"""Shared steps for the end-to-end tests of the SDK, isolation, source checks and secrets.

Every wait here polls with a deadline; none sleeps to synchronise.
"""

from __future__ import annotations

import atexit
import functools
import secrets
import socket
from collections.abc import Iterable, Mapping
from typing import Any

import httpx
from processes import wait_until

TERMINAL = ("completed", "failed", "cancelled")
JOB_TIMEOUT_S = 15.0
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


def assert_envelope(reply: httpx.Response) -> dict[str, Any]:
    """The body is exactly the OpenAI error envelope; returns its `error` object."""
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    body = reply.json()
    assert isinstance(body, dict) and list(body) == ["error"], body
    error = body["error"]
    assert isinstance(error, dict) and set(error) == ENVELOPE_FIELDS, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error
    return error


def assert_error(
    reply: httpx.Response, status: int, code: str | None, param: Any = ...
) -> dict[str, Any]:
    """Status, envelope and code; `param` is checked only when given (None included)."""
    assert reply.status_code == status, f"{reply.status_code}: {reply.text}"
    assert reply.headers.get("x-request-id"), reply.headers
    error = assert_envelope(reply)
    assert error["code"] == code, error
    if param is not ...:
        assert error["param"] == param, error
    return error


def ok(reply: httpx.Response) -> dict[str, Any]:
    assert reply.status_code == 200, f"{reply.status_code}: {reply.text}"
    return reply.json()


def multipart(
    fields: Mapping[str, str] | Iterable[tuple[str, str]],
    files: dict[str, tuple[str, bytes, str]] | None = None,
) -> dict[str, Any]:
    """`content` and `headers` for a multipart/form-data body, text parts and file parts.

    httpx itself sends url-encoded forms when there is no file; the SDKs always send
    multipart, so the body is built here. Text parts given as (name, value) pairs may
    repeat a name.
    """
    boundary = "e2e-" + secrets.token_hex(12)
    parts: list[bytes] = []
    for name, value in fields.items() if isinstance(fields, Mapping) else fields:
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
            + value.encode()
            + b"\r\n"
        )
    for name, (filename, data, content_type) in (files or {}).items():
        head = (
            f"--{boundary}\r\n"
            f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n"
        )
        parts.append(head.encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return {
        "content": b"".join(parts),
        "headers": {"content-type": f"multipart/form-data; boundary={boundary}"},
    }


def create(client: httpx.Client, prompt: str = "a red fox in fresh snow", **fields: str) -> dict:
    """A create through the gateway, as multipart (what the SDKs send)."""
    return ok(client.post("/v1/videos", **multipart({"prompt": prompt, **fields})))


def settle(client: httpx.Client, video_id: str, timeout: float = JOB_TIMEOUT_S) -> dict:
    """Retrieve through the gateway until the job ends; returns the final video object.

    Retrieving is also the client's evidence that frees the job's quota slot at once.
    """
    seen: dict[str, Any] = {}

    def ended() -> bool:
        video = ok(client.get(f"/v1/videos/{video_id}"))
        seen.update(video)
        return video["status"] in TERMINAL

    wait_until(ended, timeout, f"{video_id} ended (last seen: {seen.get('status')})")
    return seen


def completed(client: httpx.Client, prompt: str = "a lighthouse at dusk") -> dict:
    """A video created through the gateway and polled there until completed."""
    video = settle(client, create(client, prompt)["id"])
    assert video["status"] == "completed", video
    return video


@functools.cache
def _client(base_url: str, token: str | None = None) -> httpx.Client:
    """One kept-alive client per address for the many small control calls of a test run."""
    headers = {"authorization": f"Bearer {token}"} if token else {}
    client = httpx.Client(base_url=base_url, headers=headers, timeout=10.0)
    atexit.register(client.close)
    return client


def sim_control(stack: Any) -> httpx.Client:
    """The simulator's control routes (/_sim/...)."""
    return _client(stack.simulator.url)


def sim_config(stack: Any, **settings: Any) -> dict[str, Any]:
    reply = sim_control(stack).post("/_sim/config", json=settings)
    reply.raise_for_status()
    return reply.json()


def sim_faults(stack: Any, **faults: int) -> None:
    sim_control(stack).post("/_sim/faults", json=faults).raise_for_status()


def sim_stats(stack: Any) -> dict[str, Any]:
    return sim_control(stack).get("/_sim/stats").json()


def sim_requests(stack: Any) -> list[dict[str, Any]]:
    return sim_control(stack).get("/_sim/requests", params={"limit": 1000}).json()


def direct(stack: Any) -> httpx.Client:
    """The simulator's own /v1 with the real token: what upstream itself says."""
    return httpx.Client(
        base_url=stack.simulator.url + "/v1",
        headers={"authorization": f"Bearer {stack.token}"},
        timeout=10.0,
    )


def upstream_status(stack: Any, video_id: str) -> dict[str, Any]:
    """The video as upstream has it, asked directly with the real token."""
    return ok(_client(stack.simulator.url + "/v1", stack.token).get(f"/videos/{video_id}"))


class UpstreamWatch:
    """What reached the simulator's /v1 between this object's creation and the checks."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        stats = sim_stats(stack)
        self.requests_before = stats["requests"]
        self.jobs_before = stats["jobs_created"]

    def new_requests(self) -> list[dict[str, Any]]:
        count = sim_stats(self.stack)["requests"] - self.requests_before
        return sim_requests(self.stack)[-count:] if count > 0 else []

    def assert_nothing_sent(self) -> None:
        assert self.new_requests() == []
        assert sim_stats(self.stack)["jobs_created"] == self.jobs_before

    def assert_no_job_started(self, *, refreshed: str | None = None) -> None:
        """No job-creating request went upstream; at most GETs refreshing `refreshed`."""
        allowed = {("GET", f"/v1/videos/{refreshed}")} if refreshed else set()
        sent = [(r["method"], r["path"]) for r in self.new_requests()]
        assert [s for s in sent if s not in allowed] == [], sent
        assert sim_stats(self.stack)["jobs_created"] == self.jobs_before


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """A raw HTTP answer's status, headers and whatever body bytes came with them."""
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = sock.recv(65536)
        assert chunk, f"closed before the headers: {received!r}"
        received += chunk
    raw, rest = received.split(b"\r\n\r\n", 1)
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest
