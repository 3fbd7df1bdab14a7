"""Header and path hygiene, on the wire: what a hostile client or upstream sends by hand.

Requests are written byte by byte on a raw socket where an HTTP client would refuse or
normalise them: header splitting (CRLF in paths and queries, obs-fold), duplicate
credentials and lengths, oversized headers, Host and forwarding spoofs, Transfer-Encoding
tricks and smuggling, encoded slashes and dot segments, Unicode look-alikes and NUL bytes
in ids. Each answer must be a 4xx (the HTTP server's own 400, or the gateway's envelope)
or a normal answer; nothing refused may reach upstream (the simulator logs every request
it gets, with its headers), and no injected header may reach upstream or the client.

Client credentials, cookies and organisation headers never reach upstream; upstream's
cookies, hop-by-hop and internal headers never reach the client: a throwaway upstream
sends them all (the simulator cannot), and a dedicated gateway stands in front of it.
The gateway is healthy after every test.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.embedded_store import EmbeddedRedis, free_port
from gateway.simulator import fingerprint
from gateway.upstream import FORWARDED_RESPONSE_HEADERS, STREAM_RESPONSE_HEADERS
from support.api import assert_error, completed, multipart, ok, settle
from support.processes import Process, start_gateway
from support.simulator import UPSTREAM_REQUEST_HEADERS, sim_config
from support.stack import Stack, gateway_config

# What a client may see: upstream's allow-listed headers, and the gateway's own.
CLIENT_HEADERS = {
    *FORWARDED_RESPONSE_HEADERS,
    *STREAM_RESPONSE_HEADERS,
    "x-request-id",
    "x-upstream-request-id",
    "date",
    "server",
    "content-length",
    "content-type",
    "connection",
    "transfer-encoding",
}
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


# -- raw HTTP on a socket -------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def exchange(port: int, data: bytes, *, timeout: float = 5.0) -> list[RawResponse]:
    """Send raw bytes, read until the server closes; every HTTP response it wrote."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        deadline = time.monotonic() + timeout
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise AssertionError(f"no answer within {timeout} s") from None
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            assert time.monotonic() < deadline, "the connection stayed open"
    return parse_responses(b"".join(chunks))


def parse_responses(raw: bytes) -> list[RawResponse]:
    responses = []
    while raw:
        head, separator, rest = raw.partition(b"\r\n\r\n")
        assert separator, f"a truncated response: {raw[:300]!r}"
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        values = dict(headers)
        if values.get("transfer-encoding") == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                body, rest = body + rest[:size], rest[size + 2 :]
                if size == 0:
                    break
        else:
            length = int(values.get("content-length", "0"))
            body, rest = rest[:length], rest[length:]
        responses.append(RawResponse(status, headers, body))
        raw = rest
    return responses


def request_bytes(
    method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# -- what reached upstream -------------------------------------------------------------


class Upstream:
    """The simulator's view: requests received since this object was made (tracker aside)."""

    def __init__(self, stack: Stack) -> None:
        self.stack = stack
        self.before = stack.sim_stats()
        self.count = self.before["requests"]

    def new(self) -> list[dict[str, Any]]:
        count = self.stack.sim_stats()["requests"] - self.count
        if count <= 0:
            return []
        with self.stack.sim() as sim:
            recent = sim.get("/_sim/requests", params={"limit": count}).json()
        return [
            r for r in recent if not r["headers"].get("x-request-id", "").startswith("req_tracker_")
        ]

    def assert_nothing_sent(self) -> None:
        assert self.new() == []
        assert self.stack.sim_stats()["jobs_created"] == self.before["jobs_created"]

    def assert_clean(self) -> list[dict[str, Any]]:
        """Everything that went upstream carried only allow-listed headers and the token."""
        sent = self.new()
        for request in sent:
            headers = request["headers"]
            assert set(headers) <= UPSTREAM_REQUEST_HEADERS, (
                request,
                set(headers) - UPSTREAM_REQUEST_HEADERS,
            )
            assert headers.get("authorization") == f"Bearer {fingerprint(self.stack.token)}", (
                request
            )
            assert headers["host"] == f"127.0.0.1:{self.stack.simulator.port}", request
            assert "\r" not in request["path"], request
            assert "\n" not in request["path"], request
        return sent


@pytest.fixture
def healthy(stack: Stack) -> Iterator[Stack]:
    """The shared stack, checked healthy after the test (and its store still answering)."""
    yield stack
    with httpx.Client(base_url=stack.gateway.url, timeout=5) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 200
        assert ok(client.get("/v1/videos", headers=auth(stack.keys["alpha"])))["object"] == "list"


def auth(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def own_video(stack: Stack, team: str = "alpha") -> str:
    """A completed video of `team`, made through the gateway."""
    sim_config(stack, queue_s=0.05, run_s=0.1)
    with stack.client(team) as client:
        return completed(client, f"hygiene {uuid.uuid4().hex[:6]}")["id"]


def is_refusal(response: RawResponse) -> bool:
    """The HTTP server's own 400 (a request it could not parse), or an envelope 4xx."""
    if not 400 <= response.status < 500:
        return False
    if response.header("content-type") == "text/plain; charset=utf-8":
        return response.status == 400  # uvicorn: "Invalid HTTP request received."
    error = json.loads(response.body)["error"]
    return isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}


# -- header splitting --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "target",
    [
        "/v1/videos/{id}%0d%0aInjected:%20yes",
        "/v1/videos/{id}%0d%0aInjected:%20yes/content",
        "/v1/videos/{id}/content?variant=video%0d%0aInjected:%20yes",
        "/v1/videos/{id}/content?variant=video&x=%0d%0aInjected:%20yes",
        "/v1/videos?after={id}%0d%0aInjected:%20yes",
        "/v1/videos?limit=1%0d%0aInjected:%20yes",
        "/v1/videos/{id}%0aInjected:%20yes",
        "/v1/videos/{id}%0dInjected:%20yes",
        "/v1/videos/characters/x%0d%0aInjected:%20yes",
    ],
)
def test_encoded_crlf_in_path_or_query_injects_nothing(healthy: Stack, target: str) -> None:
    stack = healthy
    video = own_video(stack)
    upstream = Upstream(stack)
    data = request_bytes(
        "GET",
        target.format(id=video),
        [
            ("Host", "gw"),
            ("Authorization", f"Bearer {stack.keys['alpha']}"),
            ("Connection", "close"),
        ],
    )
    [response] = exchange(stack.gateway.port, data)
    assert response.status < 500, response
    assert "injected" not in {name for name, _ in response.headers}, response.headers
    if response.status >= 400:
        assert is_refusal(response), response
    for request in upstream.assert_clean():
        # The one allowed case: a download whose stray query parameter the gateway dropped.
        assert request["path"] == f"/v1/videos/{video}/content", request
        assert request["query"] == "variant=video", request
    if response.status == 200:
        assert target.startswith(("/v1/videos/{id}/content?variant=video&", "/v1/videos?")), target


@pytest.mark.parametrize("header", ["X-Request-Id", "User-Agent", "Accept", "OpenAI-Beta"])
def test_obs_fold_and_bare_cr_never_smuggle_a_header(healthy: Stack, header: str) -> None:
    """A folded line (obs-fold) or a bare CR inside a value must not become a header."""
    stack = healthy
    video = own_video(stack)
    for value in ("abc\r\n Injected: yes", "abc\r\n\tInjected: yes", "abc\rInjected: yes"):
        upstream = Upstream(stack)
        data = request_bytes(
            "GET",
            f"/v1/videos/{video}",
            [
                ("Host", "gw"),
                ("Authorization", f"Bearer {stack.keys['alpha']}"),
                (header, value),
                ("Connection", "close"),
            ],
        )
        [response] = exchange(stack.gateway.port, data)
        assert response.status == 200 or is_refusal(response), response
        assert "injected" not in {name for name, _ in response.headers}, response.headers
        assert "Injected" not in (response.header("x-request-id") or "")
        for request in upstream.assert_clean():
            assert "injected" not in request["headers"], request
            assert all("Injected" not in v for v in request["headers"].values()), request


def test_split_header_lines_stay_separate_headers(healthy: Stack) -> None:
    """`X-Request-Id: a` then `Injected: b` is two headers; the second reaches nobody."""
    stack = healthy
    video = own_video(stack)
    upstream = Upstream(stack)
    data = request_bytes(
        "GET",
        f"/v1/videos/{video}",
        [
            ("Host", "gw"),
            ("Authorization", f"Bearer {stack.keys['alpha']}"),
            ("X-Request-Id", "hygiene-split"),
            ("Injected", "yes"),
            ("User-Agent", "ua"),
            ("Set-Cookie", "client=cookie"),
            ("Connection", "close"),
        ],
    )
    [response] = exchange(stack.gateway.port, data)
    assert response.status == 200, response
    assert response.header("x-request-id") == "hygiene-split"
    assert {"injected", "set-cookie"}.isdisjoint(name for name, _ in response.headers)
    [request] = upstream.assert_clean()
    assert request["headers"]["x-request-id"] == "hygiene-split"
    assert request["headers"]["user-agent"] == "ua"


# -- duplicate headers ---------------------------------------------------------------------


def test_duplicate_authorization_never_authenticates_with_the_second(healthy: Stack) -> None:
    stack = healthy
    beta_video = own_video(stack, "beta")
    alpha_key, beta_key = stack.keys["alpha"], stack.keys["beta"]
    upstream = Upstream(stack)

    def listing(*values: str) -> RawResponse:
        headers = [("Host", "gw"), *(("Authorization", v) for v in values), ("Connection", "close")]
        [response] = exchange(stack.gateway.port, request_bytes("GET", "/v1/videos", headers))
        assert response.status < 500, response
        return response

    # A bad first credential: refused, even though the second one is good.
    for first in ("Bearer sgw-unknown", "Basic " + alpha_key, "Bearer", ""):
        response = listing(first, f"Bearer {alpha_key}")
        assert response.status == 401, response
        assert response.json()["error"]["code"] == "invalid_api_key"
    # Two good keys of different teams: never the second team's view.
    response = listing(f"Bearer {alpha_key}", f"Bearer {beta_key}")
    if response.status == 200:
        assert beta_video not in {v["id"] for v in response.json()["data"]}, response.json()
    else:
        assert response.status in (400, 401), response
    # The same with `api-key` twice, and Authorization against api-key (Authorization wins).
    headers = [("Host", "gw"), ("api-key", "sgw-unknown"), ("api-key", beta_key)]
    [response] = exchange(
        stack.gateway.port,
        request_bytes("GET", "/v1/videos", [*headers, ("Connection", "close")]),
    )
    assert response.status == 401, response
    headers = [("Host", "gw"), ("Authorization", "Bearer sgw-unknown"), ("api-key", beta_key)]
    [response] = exchange(
        stack.gateway.port, request_bytes("GET", "/v1/videos", [*headers, ("Connection", "close")])
    )
    assert response.status == 401, response
    # A refused credential never reaches upstream, in any header.
    upstream.assert_nothing_sent()


@pytest.mark.parametrize(
    "lengths",
    [("2", "40"), ("2", "2"), ("2, 40", None), ("+2", None), ("-1", None), ("0x2", None)],
)
def test_conflicting_content_lengths_are_refused_by_the_server(
    healthy: Stack, lengths: tuple[str, str | None]
) -> None:
    stack = healthy
    upstream = Upstream(stack)
    headers = [
        ("Host", "gw"),
        ("Authorization", f"Bearer {stack.keys['alpha']}"),
        ("Content-Type", "application/json"),
        *(("Content-Length", value) for value in lengths if value is not None),
        ("Connection", "close"),
    ]
    body = b'{"prompt": "two lengths"}'
    responses = exchange(stack.gateway.port, request_bytes("POST", "/v1/videos", headers, body))
    assert len(responses) == 1, responses
    [response] = responses
    if lengths == ("2", "2"):
        # Two equal lengths may be merged (RFC 9112 allows it): then {" is not JSON.
        assert response.status == 400, response
    else:
        assert response.status == 400, response
        assert response.header("content-type") == "text/plain; charset=utf-8", response
    upstream.assert_nothing_sent()


# -- oversized headers ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["X-Big", "User-Agent", "Cookie", "Authorization"])
def test_a_100_kb_header_never_breaks_the_gateway(healthy: Stack, name: str) -> None:
    stack = healthy
    video = own_video(stack)
    upstream = Upstream(stack)
    big = "a" * 100_000
    value = f"Bearer {big}" if name == "Authorization" else big
    headers = [("Host", "gw"), ("Authorization", f"Bearer {stack.keys['alpha']}")]
    headers = [h for h in headers if h[0] != name] + [(name, value), ("Connection", "close")]
    try:
        responses = exchange(
            stack.gateway.port, request_bytes("GET", f"/v1/videos/{video}", headers)
        )
    except (BrokenPipeError, ConnectionResetError):
        responses = []  # closed on us: an acceptable refusal
    for response in responses:
        assert response.status < 500, response
        assert response.status == 200 or is_refusal(response), response
    if name == "Authorization":
        assert [r.status for r in responses] in ([], [401], [400], [431]), responses
    for request in upstream.assert_clean():
        # Only an allow-listed header may travel on, and only to the video's own route.
        assert request["path"] == f"/v1/videos/{video}", request
        assert name == "User-Agent" or big not in json.dumps(request["headers"]), request


def test_an_oversized_header_block_is_refused(healthy: Stack) -> None:
    stack = healthy
    headers = [
        ("Host", "gw"),
        ("Authorization", f"Bearer {stack.keys['alpha']}"),
        ("X-Big", "a" * (1 << 20)),
        ("Connection", "close"),
    ]
    try:
        responses = exchange(stack.gateway.port, request_bytes("GET", "/v1/videos", headers))
    except (BrokenPipeError, ConnectionResetError):
        responses = []
    assert [r.status for r in responses] in ([], [400], [413], [431]), responses


# -- Host and forwarding headers ---------------------------------------------------------------

SPOOFS = [
    ("X-Forwarded-For", "203.0.113.7"),
    ("X-Forwarded-Host", "evil.example"),
    ("X-Forwarded-Proto", "https"),
    ("X-Forwarded-Port", "8443"),
    ("X-Forwarded-Prefix", "/evil"),
    ("Forwarded", "for=203.0.113.7;host=evil.example;proto=https"),
    ("X-Real-IP", "203.0.113.7"),
    ("X-Original-URL", "/v1/videos/other"),
    ("X-Rewrite-URL", "/v1/videos/other"),
    ("X-HTTP-Method-Override", "DELETE"),
    ("Via", "1.1 evil.example"),
]


@pytest.mark.parametrize("target", ["/v1/videos/{id}", "http://evil.example/v1/videos/{id}"])
def test_host_and_forwarding_spoofs_never_reach_upstream(healthy: Stack, target: str) -> None:
    stack = healthy
    video = own_video(stack)
    upstream = Upstream(stack)
    headers = [
        ("Host", "evil.example"),
        ("Authorization", f"Bearer {stack.keys['alpha']}"),
        *SPOOFS,
        ("Connection", "close"),
    ]
    [response] = exchange(
        stack.gateway.port, request_bytes("GET", target.format(id=video), headers)
    )
    assert response.status == 200, response
    assert response.json()["id"] == video  # the route asked for, not an "original URL"
    assert "evil" not in json.dumps(response.headers), response.headers
    [request] = upstream.assert_clean()  # upstream's own Host, nothing forwarded
    assert (request["method"], request["path"]) == ("GET", f"/v1/videos/{video}")
    # Still there: the method override was not obeyed.
    with stack.client() as client:
        ok(client.get(f"/v1/videos/{video}"))


# -- Transfer-Encoding and smuggling ------------------------------------------------------------


def smuggling_payloads(stack: Stack, video: str, smuggled_id: str) -> dict[str, bytes]:
    key = stack.keys["alpha"]
    hidden = (
        f"GET /v1/videos/{video} HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {key}\r\n"
        f"X-Request-Id: {smuggled_id}\r\n\r\n"
    ).encode()
    base = [
        ("Host", "gw"),
        ("Authorization", f"Bearer {key}"),
        ("Content-Type", "application/json"),
    ]
    chunked_end = b"0\r\n\r\n"

    def post(extra: list[tuple[str, str]], body: bytes) -> bytes:
        return request_bytes("POST", "/v1/videos", [*base, *extra], body)

    return {
        "CL.TE": post(
            [("Content-Length", str(len(chunked_end + hidden))), ("Transfer-Encoding", "chunked")],
            chunked_end + hidden,
        ),
        "TE.CL": post(
            [("Transfer-Encoding", "chunked"), ("Content-Length", "4")],
            f"{len(hidden):x}\r\n".encode() + hidden + b"\r\n" + chunked_end,
        ),
        "xchunked": post(
            [("Transfer-Encoding", "xchunked"), ("Content-Length", str(len(hidden)))], hidden
        ),
        "chunked, identity": post(
            [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "identity")],
            chunked_end + hidden,
        ),
        "space before colon": post(
            [("Transfer-Encoding ", "chunked"), ("Content-Length", str(len(hidden)))],
            chunked_end + hidden,
        ),
        "tab value": post(
            [("Transfer-Encoding", "\tchunked"), ("Content-Length", "5")], chunked_end + hidden
        ),
        "bad chunk size": post([("Transfer-Encoding", "chunked")], b"0x5\r\nhello\r\n" + hidden),
        "chunk size overflow": post(
            [("Transfer-Encoding", "chunked")], b"ffffffffffffffffff1\r\n" + hidden
        ),
        # Unambiguous framing: the hidden request is only a body (not JSON: 400).
        "request as a body": post([("Content-Length", str(len(hidden)))], hidden),
    }


@pytest.mark.parametrize(
    "variant",
    [
        "CL.TE",
        "TE.CL",
        "xchunked",
        "chunked, identity",
        "space before colon",
        "tab value",
        "bad chunk size",
        "chunk size overflow",
        "request as a body",
    ],
)
def test_a_request_hidden_in_a_body_never_reaches_upstream(healthy: Stack, variant: str) -> None:
    stack = healthy
    video = own_video(stack)
    smuggled_id = f"smuggled-{uuid.uuid4().hex[:8]}"
    payload = smuggling_payloads(stack, video, smuggled_id)[variant]
    upstream = Upstream(stack)
    # A last request on the same connection flushes whatever the server made of the rest.
    closing = b"GET /healthz HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n"
    try:
        responses = exchange(stack.gateway.port, payload + closing)
    except (BrokenPipeError, ConnectionResetError):
        responses = []
    assert responses, "no answer at all"
    for response in responses:
        assert response.status < 500, response
        assert response.header("x-request-id") != smuggled_id, responses
    first = responses[0]
    assert is_refusal(first), first
    # No answer to the hidden request: only the refusal, then maybe the closing /healthz.
    assert [r.status for r in responses[1:]] in ([], [200]), responses
    sent = upstream.new()
    assert [r for r in sent if r["headers"].get("x-request-id") == smuggled_id] == [], sent
    upstream.assert_nothing_sent()


def test_a_request_inside_an_uploaded_file_stays_a_body_upstream(healthy: Stack) -> None:
    """The bytes the gateway replays upstream are framed exactly: upstream sees one request."""
    stack = healthy
    video = own_video(stack)
    smuggled_id = f"smuggled-{uuid.uuid4().hex[:8]}"
    hidden = (
        f"\r\n\r\n0\r\n\r\nGET /v1/videos/{video} HTTP/1.1\r\nHost: x\r\n"
        f"Authorization: Bearer {stack.token}\r\nX-Request-Id: {smuggled_id}\r\n\r\n"
    ).encode()
    upstream = Upstream(stack)
    with stack.client() as client:
        form = multipart(
            {"prompt": "a file with a request in it"},
            {"input_reference": ("r.png", hidden, "image/png")},
        )
        created = ok(client.post("/v1/videos", **form))
        settle(client, created["id"])
    sent = upstream.assert_clean()
    assert [(r["method"], r["path"]) for r in sent if r["method"] != "GET"] == [
        ("POST", "/v1/videos")
    ], sent
    assert all(r["headers"].get("x-request-id") != smuggled_id for r in sent), sent
    assert stack.sim_stats()["jobs_created"] == upstream.before["jobs_created"] + 1


# -- ids: encodings, dot segments, look-alikes, NUL ---------------------------------------------

ODD_IDS = [
    "..%2F..%2Fadmin",
    "..%2F..%2Fhealthz",
    "%2e%2e",
    "%2E%2E%2F%2E%2E%2Fmetrics",
    ".",
    "%2e",
    "{id}%3B",
    "{id};x=1",
    "{id}%3Bx",
    "{id}%00",
    "%00{id}",
    "{id}%20",
    "{id}%09",
    "{id}%5C",
    "..%5C..%5Cadmin",
    "{id}%2500",
    "{id}%252F",
    "%EF%BD%96%EF%BD%89%EF%BD%84%EF%BD%85%EF%BD%8F_1",  # fullwidth "video"
    "{cyrillic}",  # the real id with a Cyrillic "o" in "video"
    "{id}%E2%80%8B",  # a zero-width space after the id
    "{id}%C0%AF",  # an overlong "/"
    "x" * 129,
]
ROUTES = [
    ("GET", "/v1/videos/{}"),
    ("DELETE", "/v1/videos/{}"),
    ("GET", "/v1/videos/{}/content"),
    ("POST", "/v1/videos/{}/remix"),
    ("GET", "/v1/videos/characters/{}"),
]


@pytest.mark.parametrize("odd", ODD_IDS)
def test_odd_ids_are_refused_and_nothing_is_forwarded(healthy: Stack, odd: str) -> None:
    stack = healthy
    video = own_video(stack)
    cyrillic = quote_utf8(video.replace("o", "\u043e", 1))
    segment = odd.format(id=video, cyrillic=cyrillic)
    upstream = Upstream(stack)
    for method, route in ROUTES:
        body = b'{"prompt": "odd"}' if method == "POST" else b""
        headers = [
            ("Host", "gw"),
            ("Authorization", f"Bearer {stack.keys['alpha']}"),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
        ]
        target = route.format(segment)
        [response] = exchange(stack.gateway.port, request_bytes(method, target, headers, body))
        where = f"{method} {target}"
        assert response.status in (400, 404, 405), (where, response)
        assert is_refusal(response), (where, response)
        if response.header("content-type") == "application/json":
            error = response.json()["error"]
            allowed = {
                400: {"invalid_request"},
                404: {"not_found", "video_not_found", "character_not_found"},
                405: {"method_not_allowed"},
            }[response.status]
            assert error["code"] in allowed, (where, error)
        upstream.assert_nothing_sent()


def quote_utf8(text: str) -> str:
    return "".join(c if c.isascii() else "".join(f"%{b:02X}" for b in c.encode()) for c in text)


def test_unicode_look_alikes_in_body_ids_are_invalid_requests(healthy: Stack) -> None:
    stack = healthy
    video = own_video(stack)
    upstream = Upstream(stack)
    look_alikes = [
        video.replace("o", "\u043e", 1),  # Cyrillic o
        video.replace("v", "\uff56", 1),  # fullwidth v
        video + "\u200b",
        video + "\x00",
        "\x00",
        video.replace("_", "\uff3f", 1),  # fullwidth low line
    ]
    with stack.client() as client:
        for odd in look_alikes:
            assert_error(
                client.post("/v1/videos/remix", json={"video_id": odd, "prompt": "p"}),
                400,
                "invalid_request",
                "video_id",
            )
            assert_error(
                client.post("/v1/videos/edits", json={"video": {"id": odd}, "prompt": "p"}),
                400,
                "invalid_request",
                "video.id",
            )
            form = multipart({"prompt": "p", "video[id]": odd})
            assert_error(
                client.post("/v1/videos/extensions", **form), 400, "invalid_request", "video.id"
            )
            assert_error(
                client.get("/v1/videos", params={"after": odd}), 400, "invalid_request", "after"
            )
    upstream.assert_nothing_sent()


def test_a_trailing_newline_is_not_a_valid_id(healthy: Stack) -> None:
    stack = healthy
    video = own_video(stack)
    upstream = Upstream(stack)
    with stack.client() as client:
        # In the path (%0A), and in a body field: refused on syntax, before any lookup.
        assert_error(
            client.post("/v1/videos/remix", json={"video_id": video + "\n", "prompt": "p"}),
            400,
            "invalid_request",
            "video_id",
        )
        assert_error(
            client.post("/v1/videos/edits", json={"video": {"id": video + "\n"}, "prompt": "p"}),
            400,
            "invalid_request",
            "video.id",
        )
        [response] = exchange(
            stack.gateway.port,
            request_bytes(
                "GET",
                f"/v1/videos/{video}%0A",
                [("Host", "gw"), ("Authorization", f"Bearer {stack.keys['alpha']}"),
                 ("Connection", "close")],
            ),
        )  # fmt: skip
        assert response.status == 400, response
        assert response.json()["error"] == {**response.json()["error"], "code": "invalid_request"}
    upstream.assert_nothing_sent()


@pytest.mark.parametrize(
    ("method", "target"),
    [("GET", "/v1/videos/{id}/"), ("POST", "/v1/videos/"), ("GET", "/v1/videos/{id}%2F")],
)
def test_a_trailing_slash_is_a_404_not_a_redirect(healthy: Stack, method: str, target: str) -> None:
    stack = healthy
    video = own_video(stack)
    upstream = Upstream(stack)
    headers = [
        ("Host", "evil.example"),
        ("X-Forwarded-Proto", "https"),
        ("Authorization", f"Bearer {stack.keys['alpha']}"),
        ("Content-Type", "application/json"),
        ("Content-Length", "2"),
        ("Connection", "close"),
    ]
    [response] = exchange(
        stack.gateway.port, request_bytes(method, target.format(id=video), headers, b"{}")
    )
    upstream.assert_nothing_sent()
    assert "evil.example" not in (response.header("location") or "")
    assert response.status == 404, response
    assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "target"),
    [("GET", "/v1/videos/{id}%2Fcontent"), ("POST", "/v1/videos/{id}%2Fremix")],
)
def test_an_encoded_slash_never_changes_the_route(healthy: Stack, method: str, target: str) -> None:
    stack = healthy
    video = own_video(stack)
    upstream = Upstream(stack)
    body = b'{"prompt": "through an encoded slash"}' if method == "POST" else b""
    headers = [
        ("Host", "gw"),
        ("Authorization", f"Bearer {stack.keys['alpha']}"),
        ("Content-Type", "application/json"),
        ("Content-Length", str(len(body))),
        ("Connection", "close"),
    ]
    [response] = exchange(
        stack.gateway.port, request_bytes(method, target.format(id=video), headers, body)
    )
    assert response.status in (400, 404), response
    assert is_refusal(response), response
    upstream.assert_nothing_sent()


def test_nul_bytes_are_refused_everywhere(healthy: Stack) -> None:
    stack = healthy
    video = own_video(stack)
    upstream = Upstream(stack)
    key = stack.keys["alpha"]
    raw = [
        request_bytes("GET", f"/v1/videos/{video}\x00", [("Host", "gw"), ("Authorization", f"Bearer {key}"), ("Connection", "close")]),  # noqa: E501
        request_bytes("GET", f"/v1/videos/{video}", [("Host", "gw"), ("Authorization", f"Bearer {key}\x00"), ("Connection", "close")]),  # noqa: E501
        request_bytes("GET", f"/v1/videos/{video}", [("Host", "gw"), ("Authorization", f"Bearer {key}"), ("X-Request-Id", "a\x00b"), ("Connection", "close")]),  # noqa: E501
        request_bytes("GET", f"/v1/videos/{video}", [("Host", "gw"), ("Authorization", f"Bearer {key}"), ("User\x00Agent", "x"), ("Connection", "close")]),  # noqa: E501
    ]  # fmt: skip
    for data in raw:
        [response] = exchange(stack.gateway.port, data)
        assert is_refusal(response), (data[:80], response)
    [response] = exchange(
        stack.gateway.port,
        request_bytes(
            "GET",
            f"/v1/videos/{video}%00",
            [("Host", "gw"), ("Authorization", f"Bearer {key}"), ("Connection", "close")],
        ),
    )
    assert response.status == 400
    assert response.json()["error"]["code"] == "invalid_request"
    upstream.assert_nothing_sent()


# -- client credentials never reach upstream ---------------------------------------------------


def test_client_credentials_cookies_and_organisation_never_reach_upstream(healthy: Stack) -> None:
    stack = healthy
    video = own_video(stack)
    marker = f"client-secret-{uuid.uuid4().hex[:8]}"
    leaky = {
        "cookie": f"session={marker}",
        "openai-organization": f"org-{marker}",
        "openai-project": f"proj-{marker}",
        "proxy-authorization": f"Basic {marker}",
        "x-api-key": marker,
        "api-key": stack.keys["alpha"],
        "x-amz-security-token": marker,
        "x-goog-api-key": marker,
        "authentication": marker,
        "x-auth-token": marker,
        "x-csrf-token": marker,
        "openai-beta": "assistants=v2",  # allow-listed: this one may pass
    }
    upstream = Upstream(stack)
    sim_config(stack, queue_s=0.05, run_s=0.1)
    with stack.client() as client:
        client.headers.update(leaky)
        ok(client.get(f"/v1/videos/{video}"))
        assert client.get(f"/v1/videos/{video}/content").status_code == 200
        remix = ok(client.post(f"/v1/videos/{video}/remix", json={"prompt": "leak check"}))
        png = b"\x89PNG\r\n\x1a\n" + b"\0" * 64
        character = ok(
            client.post(
                "/v1/videos/characters",
                **multipart({"name": "Leak"}, {"video": ("c.mp4", png, "video/mp4")}),
            )
        )
        ok(client.get(f"/v1/videos/characters/{character['id']}"))
        settle(client, remix["id"])
        ok(client.delete(f"/v1/videos/{remix['id']}"))
    sent = upstream.assert_clean()
    assert {(r["method"], r["path"].split("/")[-1]) for r in sent} >= {
        ("GET", video),
        ("GET", "content"),
        ("POST", "remix"),
        ("POST", "characters"),
        ("DELETE", remix["id"]),
    }
    everything = json.dumps(sent)
    assert marker not in everything
    for key in stack.keys.values():
        assert key not in everything
    assert all(r["headers"].get("openai-beta") == "assistants=v2" for r in sent)
    assert stack.sim_stats()["credentials_seen"] == [fingerprint(stack.token)]


# -- upstream's cookies, hop-by-hop and internal headers never reach the client -----------------

UPSTREAM_MARKER = "upstream-secret"
HOSTILE_HEADERS = [
    ("Set-Cookie", f"upstream_session={UPSTREAM_MARKER}; Path=/; HttpOnly"),
    ("Set-Cookie", f"second={UPSTREAM_MARKER}-2"),
    ("Set-Cookie2", f"old={UPSTREAM_MARKER}"),
    ("Keep-Alive", "timeout=999, max=777"),
    ("Connection", "keep-alive, X-Secret-Internal"),
    ("Proxy-Authenticate", f'Basic realm="{UPSTREAM_MARKER}"'),
    ("Proxy-Connection", "keep-alive"),
    ("Upgrade", "h2c"),
    ("TE", "trailers"),
    ("Trailer", "X-Upstream-Trailer"),
    ("X-Secret-Internal", UPSTREAM_MARKER),
    ("Server", f"{UPSTREAM_MARKER}-server/1.0"),
    ("Via", f"1.1 {UPSTREAM_MARKER}-proxy"),
    ("Alt-Svc", f'h3=":443"; {UPSTREAM_MARKER}'),
    ("Strict-Transport-Security", "max-age=1; includeSubDomains"),
    ("Access-Control-Allow-Origin", "*"),
    ("Access-Control-Allow-Credentials", "true"),
    ("WWW-Authenticate", f'Bearer realm="{UPSTREAM_MARKER}"'),
    ("Authorization", f"Bearer {UPSTREAM_MARKER}"),
    ("X-Powered-By", UPSTREAM_MARKER),
    ("Location", f"http://{UPSTREAM_MARKER}.example/"),
    ("Refresh", f"0; url=http://{UPSTREAM_MARKER}.example/"),
    ("Content-Security-Policy", UPSTREAM_MARKER),
    ("X-Request-Id", "req_from_upstream"),
    ("OpenAI-Poll-After-Ms", "1234"),
    ("OpenAI-Organization", f"org-{UPSTREAM_MARKER}"),
]


@dataclass
class HostileUpstream:
    """A tiny HTTP/1.1 Videos API that adds every header a client must never see.

    Raw asyncio, so it can send what no framework would: hop-by-hop headers on any
    answer, chunked framing with a trailer, cookies. Keeps connections alive properly,
    so the gateway's pooled client is never cut off mid-reuse.
    """

    port: int = field(default_factory=free_port)
    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    videos: dict[str, dict[str, Any]] = field(default_factory=dict)
    _loop: asyncio.AbstractEventLoop | None = None
    _thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> HostileUpstream:
        started = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            server = loop.run_until_complete(
                asyncio.start_server(self._serve, "127.0.0.1", self.port)
            )
            started.set()
            try:
                loop.run_forever()
            finally:
                server.close()
                loop.run_until_complete(server.wait_closed())
                loop.close()

        self._thread = threading.Thread(target=run, name="hostile-upstream", daemon=True)
        self._thread.start()
        assert started.wait(5), "the hostile upstream did not start"
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                if "content-length" in headers:
                    await reader.readexactly(int(headers["content-length"]))
                elif headers.get("transfer-encoding") == "chunked":
                    while True:
                        size = int((await reader.readline()).split(b";")[0], 16)
                        await reader.readexactly(size + 2)
                        if size == 0:
                            break
                path = target.split("?", 1)[0]
                self.requests.append((method, path, headers))
                writer.write(self._answer(method, path))
                await writer.drain()
                if headers.get("connection", "").lower() == "close":
                    return
        finally:
            writer.close()

    def _answer(self, method: str, path: str) -> bytes:
        parts = path.removeprefix("/v1/").split("/")
        now = int(time.time())
        if parts == ["videos"] and method == "POST":
            video_id = f"video_{uuid.uuid4().hex}"
            self.videos[video_id] = {
                "id": video_id,
                "object": "video",
                "status": "completed",
                "progress": 100,
                "created_at": now,
                "completed_at": now,
                "expires_at": now + 3600,
                "model": "sora-2",
                "seconds": "4",
                "size": "720x1280",
                "prompt": "hostile",
            }
            return self._json(200, self.videos[video_id])
        if parts == ["videos", "characters"] and method == "POST":
            return self._json(200, {"id": "char_hostile", "object": "character", "name": "x"})
        if parts[:2] == ["videos", "characters"] and method == "GET":
            return self._json(200, {"id": parts[2], "object": "character", "name": "x"})
        if len(parts) == 3 and parts[2] == "content":
            return self._chunked(200, b"\0\0\0\x18ftypmp42" + b"\0" * 100, "video/mp4")
        if len(parts) == 3 and parts[2] == "remix":
            error = {"error": {"message": "no", "type": "invalid_request_error", "param": None,
                               "code": "upstream_says_no"}}  # fmt: skip
            return self._json(400, error, extra=[("Retry-After", "3")])
        if parts[0] == "videos" and parts[1:] == ["edits"]:
            error = {"error": {"message": "busy", "type": "rate_limit_error", "param": None,
                               "code": "rate_limit_exceeded"}}  # fmt: skip
            return self._json(429, error, extra=[("Retry-After", "2")])
        if len(parts) == 2 and parts[1] in self.videos:
            if method == "DELETE":
                del self.videos[parts[1]]
                return self._json(200, {"id": parts[1], "object": "video.deleted", "deleted": True})
            return self._chunked(
                200, json.dumps(self.videos[parts[1]]).encode(), "application/json"
            )
        if parts == ["videos"] and method == "GET":
            return self._json(200, {"object": "list", "data": list(self.videos.values())})
        return self._json(404, {"error": {"message": "gone", "type": "invalid_request_error",
                                          "param": None, "code": "video_not_found"}})  # fmt: skip

    def _json(self, status: int, value: Any, extra: list[tuple[str, str]] | None = None) -> bytes:
        body = json.dumps(value).encode()
        headers = [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
        return self._head(status, [*headers, *(extra or [])]) + body

    def _chunked(self, status: int, body: bytes, content_type: str) -> bytes:
        headers = [("Content-Type", content_type), ("Transfer-Encoding", "chunked")]
        half = len(body) // 2
        chunks = b"".join(
            f"{len(c):x}\r\n".encode() + c + b"\r\n" for c in (body[:half], body[half:])
        )
        trailer = f"0\r\nX-Upstream-Trailer: {UPSTREAM_MARKER}\r\n\r\n".encode()
        return self._head(status, headers) + chunks + trailer

    def _head(self, status: int, headers: list[tuple[str, str]]) -> bytes:
        lines = [
            f"HTTP/1.1 {status} Whatever",
            *(f"{k}: {v}" for k, v in [*headers, *HOSTILE_HEADERS]),
        ]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


@dataclass
class HostileStack:
    upstream: HostileUpstream
    gateway: Process
    key: str


@pytest.fixture(scope="module")
def hostile(
    workdir: Path, store_server: EmbeddedRedis, team_keys: dict[str, str], upstream_token: str
) -> Iterator[HostileStack]:
    upstream = HostileUpstream().start()
    config = gateway_config(upstream.url, store_server.url, upstream_token, team_keys)
    config["quota"] = {"wait_s": 1}
    try:
        gateway = start_gateway(workdir, config)
    except BaseException:
        upstream.stop()
        raise
    yield HostileStack(upstream, gateway, team_keys["alpha"])
    gateway.stop()
    upstream.stop()


def assert_clean_for_client(response: httpx.Response, *, streaming: bool = False) -> None:
    """Only allow-listed and the gateway's own headers; nothing of upstream's secrets."""
    names = [name.lower() for name in response.headers]
    assert set(names) <= CLIENT_HEADERS, set(names) - CLIENT_HEADERS
    assert "set-cookie" not in names
    assert not response.cookies
    for name, value in response.headers.items():
        assert UPSTREAM_MARKER not in value, (name, value)
        assert "X-Secret-Internal".lower() not in value.lower(), (name, value)
    assert response.headers.get("connection", "keep-alive").lower() in ("keep-alive", "close")
    if streaming:
        assert response.headers.get("transfer-encoding", "chunked") == "chunked"
    else:
        assert "transfer-encoding" not in response.headers
    for hop in HOP_BY_HOP - {"connection", "transfer-encoding"}:
        assert hop not in names, hop


def test_upstream_cookies_and_hop_by_hop_headers_never_reach_the_client(
    healthy: Stack, hostile: HostileStack
) -> None:
    """`healthy` flushes the shared store first, so this gateway starts with free slots."""
    with httpx.Client(
        base_url=hostile.gateway.url, headers=auth(hostile.key), timeout=10
    ) as client:
        created = client.post("/v1/videos", json={"prompt": "hostile upstream"})
        assert created.status_code == 200, created.text
        assert_clean_for_client(created)
        video = created.json()["id"]
        # The allow-listed ones do pass, under their own or the gateway's name.
        assert created.headers["openai-poll-after-ms"] == "1234"
        assert created.headers["x-upstream-request-id"] == "req_from_upstream"
        assert created.headers["x-request-id"] != "req_from_upstream"

        retrieved = client.get(f"/v1/videos/{video}")  # chunked upstream, with a trailer
        assert retrieved.status_code == 200, retrieved.text
        assert retrieved.json()["id"] == video
        assert_clean_for_client(retrieved)

        download = client.get(f"/v1/videos/{video}/content")
        assert download.status_code == 200, download.text
        assert download.content.startswith(b"\0\0\0\x18ftyp")
        assert_clean_for_client(download, streaming=True)

        refused = client.post(f"/v1/videos/{video}/remix", json={"prompt": "no"})
        assert_error(refused, 400, "upstream_says_no")
        assert_clean_for_client(refused)
        assert refused.headers.get("retry-after") == "3"

        limited = client.post("/v1/videos/edits", json={"prompt": "p", "video": {"id": video}})
        assert_error(limited, 429, "upstream_rate_limited")
        assert_clean_for_client(limited)

        character = client.post(
            "/v1/videos/characters",
            **multipart({"name": "x"}, {"video": ("c.mp4", b"\0" * 32, "video/mp4")}),
        )
        assert character.status_code == 200, character.text
        assert_clean_for_client(character)
        fetched = client.get("/v1/videos/characters/char_hostile")
        assert fetched.status_code == 200, fetched.text
        assert_clean_for_client(fetched)

        deleted = client.delete(f"/v1/videos/{video}")
        assert deleted.status_code == 200, deleted.text
        assert_clean_for_client(deleted)
        gone = client.get(f"/v1/videos/{video}")
        assert_error(gone, 404, "video_not_found")
        assert_clean_for_client(gone)

        assert client.get("/healthz").status_code == 200
    # And the gateway sent this upstream nothing but its allow-list, under its own Host.
    assert hostile.upstream.requests
    for method, path, headers in hostile.upstream.requests:
        assert set(headers) <= UPSTREAM_REQUEST_HEADERS | {"connection"}, (method, path, headers)
        assert headers["host"] == f"127.0.0.1:{hostile.upstream.port}", headers
        assert headers.get("connection", "keep-alive").lower() == "keep-alive", headers


def test_upstream_headers_never_reach_the_client_on_the_raw_wire(
    healthy: Stack, hostile: HostileStack
) -> None:
    """The same, read byte by byte: no header line the client library might have merged."""
    with httpx.Client(base_url=hostile.gateway.url, headers=auth(hostile.key), timeout=10) as c:
        video = ok(c.post("/v1/videos", json={"prompt": "raw wire"}))["id"]
    for target in (f"/v1/videos/{video}", f"/v1/videos/{video}/content"):
        data = request_bytes(
            "GET", target, [("Host", "gw"), ("Authorization", f"Bearer {hostile.key}"),
                            ("Connection", "close")],
        )  # fmt: skip
        [response] = exchange(hostile.gateway.port, data)
        assert response.status == 200, response
        names = [name for name, _ in response.headers]
        assert len(names) == len(set(names)), names  # no header twice
        assert set(names) <= CLIENT_HEADERS, set(names) - CLIENT_HEADERS
        assert not any(UPSTREAM_MARKER in value for _, value in response.headers), response
        assert response.header("connection") == "close"
        assert not re.search(rb"x-upstream-trailer", response.body, re.IGNORECASE)
    with httpx.Client(base_url=hostile.gateway.url, timeout=5) as client:
        assert client.get("/healthz").status_code == 200
