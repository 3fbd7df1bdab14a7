"""The gateway's API as a client sees it: the error envelope, multipart bodies, a video
created and polled to its end.

Every wait here polls with a deadline; none sleeps to synchronise.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from typing import Any

import httpx

from support.processes import wait_until

TERMINAL = ("completed", "failed", "cancelled")
JOB_TIMEOUT_S = 15.0
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


def assert_envelope(reply: httpx.Response) -> dict[str, Any]:
    """The body is exactly the OpenAI error envelope; returns its `error` object."""
    assert reply.headers.get("content-type", "").startswith("application/json"), reply.headers
    body = reply.json()
    assert isinstance(body, dict), body
    assert list(body) == ["error"], body
    error = body["error"]
    assert isinstance(error, dict), error
    assert set(error) == ENVELOPE_FIELDS, error
    assert isinstance(error["message"], str), error
    assert error["message"], error
    assert isinstance(error["type"], str), error
    assert error["type"], error
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
