"""Secrets stay where they belong: the token only upstream, team keys only at the door.

A workload that touches every route, successes and errors alike, is sent with every
header a client might leak (cookies, organisation and project, forwarding headers, a
second credential); then upstream's view (what the simulator received) and the client's
view (every response) are searched for the token and the team keys, and the logs too.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, quote_plus

import httpx
import pytest
from openai import OpenAI

from gateway.simulator import fingerprint
from support.api import assert_envelope, assert_error, multipart, ok, settle
from support.simulator import (
    UPSTREAM_REQUEST_HEADERS,
    sim_config,
    sim_faults,
    sim_requests,
    sim_stats,
)
from support.stack import Rig

MiB = 1 << 20
BODY_CAP = 4 * MiB  # limits.max_body_bytes in the test stack's config

# The Videos API methods are marked deprecated in the SDK; they still are the API.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

# Every header the gateway may send upstream: its own allow-list plus what httpx adds.
UPSTREAM_HEADER_ALLOW_LIST = UPSTREAM_REQUEST_HEADERS | {"connection"}


def leaky_headers(stack: Any) -> dict[str, str]:
    """What a careless client sends along: none of it may reach upstream."""
    return {
        "cookie": "session=cookie-secret-" + secrets.token_hex(4),
        "openai-organization": "org-secret",
        "openai-project": "proj-secret",
        "x-forwarded-for": "203.0.113.7",
        "x-forwarded-host": "evil.example",
        "x-forwarded-proto": "https",
        "forwarded": "for=203.0.113.7",
        "x-real-ip": "203.0.113.7",
        "proxy-authorization": f"Bearer {stack.keys['beta']}",
        # The caller's own key a second time, under the other auth header.
        "api-key": stack.keys["alpha"],
        "x-custom-secret": stack.keys["gamma"],
    }


class Recorder:
    """Keeps every response the client saw, body read, for the leak checks."""

    def __init__(self) -> None:
        self.responses: list[httpx.Response] = []

    def __call__(self, response: httpx.Response) -> None:
        response.read()
        self.responses.append(response)


def run_workload(stack: Any, client: httpx.Client, sdk: OpenAI) -> dict[str, httpx.Response]:
    """Every /v1 route, and every kind of refusal; returns the error responses by name."""
    png = b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(4096)
    source = ok(
        client.post(
            "/v1/videos",
            **multipart(
                {"prompt": "a lantern"}, {"input_reference": ("ref.png", png, "image/png")}
            ),
        )
    )
    errors: dict[str, httpx.Response] = {}
    # Content of a video not completed yet: upstream's own 400, passed through.
    errors["content not ready"] = client.get(f"/v1/videos/{source['id']}/content")
    settle(client, source["id"])
    video_id = source["id"]
    json_video = ok(client.post("/v1/videos", json={"prompt": "a lantern, json"}))
    settle(client, json_video["id"])
    ok(client.get("/v1/videos"))
    ok(client.get("/v1/videos", params={"limit": 1, "order": "asc"}))
    ok(client.get(f"/v1/videos/{video_id}"))
    for variant in ("video", "thumbnail", "spritesheet"):
        assert (
            client.get(f"/v1/videos/{video_id}/content", params={"variant": variant}).status_code
            == 200
        )
    ranged = client.get(f"/v1/videos/{video_id}/content", headers={"range": "bytes=0-15"})
    assert ranged.status_code == 206
    assert len(ranged.content) == 16
    jobs = [
        client.post(f"/v1/videos/{video_id}/remix", json={"prompt": "remix by path"}),
        client.post("/v1/videos/remix", json={"video_id": video_id, "prompt": "remix by body"}),
    ]
    for job in jobs:
        settle(client, ok(job)["id"])
    jobs = [
        client.post("/v1/videos/edits", json={"prompt": "edit", "video": {"id": video_id}}),
        client.post("/v1/videos/extensions", **multipart({"prompt": "ext", "video[id]": video_id})),
    ]
    for job in jobs:
        settle(client, ok(job)["id"])
    character = ok(
        client.post(
            "/v1/videos/characters",
            **multipart(
                {"name": "Lantern Keeper"}, {"video": ("c.mp4", b"\0" * 1024, "video/mp4")}
            ),
        )
    )
    ok(client.get(f"/v1/videos/characters/{character['id']}"))

    # The official SDK, with organisation and project set (it sends them as headers).
    made = sdk.videos.create_and_poll(prompt="through the sdk", poll_interval_ms=20)
    assert made.status == "completed"
    assert next(v.id for v in sdk.videos.list(limit=2)) == made.id
    assert sdk.videos.download_content(made.id, variant="thumbnail").content[:4] == b"RIFF"
    assert sdk.videos.delete(made.id).deleted is True

    # Refusals of every kind.
    no_key = {k: v for k, v in client.headers.items() if k not in ("authorization", "api-key")}
    errors["401 no key"] = httpx.get(stack.gateway.url + "/v1/videos", headers=no_key)
    errors["401 unknown key"] = client.get(
        "/v1/videos", headers={"authorization": "Bearer sgw-unknown", "api-key": "sgw-unknown"}
    )
    errors["401 malformed authorization"] = client.get(
        "/v1/videos", headers={"authorization": f"Basic {stack.keys['alpha']}"}
    )
    errors["404 unknown video"] = client.get("/v1/videos/video_0000")
    errors["404 unknown character"] = client.get("/v1/videos/characters/char_0000")
    errors["400 missing prompt"] = client.post("/v1/videos", json={"seconds": "4"})
    errors["400 not json"] = client.post(
        "/v1/videos", content=b"{not json", headers={"content-type": "application/json"}
    )
    errors["400 unknown source"] = client.post(
        "/v1/videos/video_0000/remix", json={"prompt": "nope"}
    )
    errors["400 bad limit"] = client.get("/v1/videos", params={"limit": 101})
    errors["400 bad variant"] = client.get(
        f"/v1/videos/{video_id}/content", params={"variant": "gif"}
    )
    errors["400 upstream validation"] = client.post(
        "/v1/videos", json={"prompt": "a lantern", "seconds": "7"}
    )
    big = b'{"prompt": "' + b"x" * BODY_CAP + b'"}'
    errors["413 body over the cap"] = client.post(
        "/v1/videos", content=big, headers={"content-type": "application/json"}
    )
    sim_faults(stack, rate_limit_next=1)
    errors["429 upstream rate limit"] = client.post("/v1/videos", json={"prompt": "a lantern"})
    sim_faults(stack, fail_next=1)
    errors["502 upstream 5xx"] = client.get(f"/v1/videos/{video_id}")
    errors["404 unknown route"] = client.get("/v1/nothing-here")
    errors["405 PUT"] = client.put(f"/v1/videos/{video_id}", json={"prompt": "x"})
    ok(client.delete(f"/v1/videos/{json_video['id']}"))
    errors["404 after delete"] = client.get(f"/v1/videos/{json_video['id']}")
    return errors


def test_workload_keeps_every_secret_in_its_place(stack):  # noqa: C901  one workload, then every place a secret could leak, checked in turn
    sim_config(stack, queue_s=0.05, run_s=0.1, poll_after_ms=20)
    recorder = Recorder()
    client = stack.client("alpha", event_hooks={"response": [recorder]})
    client.headers.update(leaky_headers(stack))
    sdk = OpenAI(
        base_url=stack.base_url,
        api_key=stack.keys["alpha"],
        organization="org-secret",
        project="proj-secret",
        max_retries=0,
        default_headers={"cookie": "sdk=cookie", "x-forwarded-for": "203.0.113.8"},
    )
    with client, sdk:
        errors = run_workload(stack, client, sdk)

    expected = {
        "content not ready": (400, "video_not_completed"),
        "401 no key": (401, "invalid_api_key"),
        "401 unknown key": (401, "invalid_api_key"),
        "401 malformed authorization": (401, "invalid_api_key"),
        "404 unknown video": (404, "video_not_found"),
        "400 missing prompt": (400, "invalid_request"),
        "400 not json": (400, "invalid_request"),
        "400 unknown source": (400, "invalid_video_id"),
        "400 bad limit": (400, "invalid_request"),
        "400 bad variant": (400, "invalid_request"),
        "400 upstream validation": (400, "invalid_value"),
        "413 body over the cap": (413, "request_too_large"),
        "429 upstream rate limit": (429, "upstream_rate_limited"),
        "502 upstream 5xx": (502, "upstream_error"),
        "404 after delete": (404, "video_not_found"),
    }
    for name, (status, code) in expected.items():
        assert_error(errors[name], status, code)
    assert errors["429 upstream rate limit"].headers["retry-after"] == "1"
    assert errors["404 unknown character"].status_code == 404
    assert errors["404 unknown route"].status_code == 404
    assert errors["405 PUT"].status_code in (404, 405)
    # Every error, of every origin, is exactly the envelope.
    for name, reply in errors.items():
        assert reply.status_code >= 400, name
        assert_envelope(reply)

    # Upstream saw one credential only, the real token, and never refused it.
    stats = sim_stats(stack)
    assert stats["credentials_seen"] == [fingerprint(stack.token)]
    assert stats["auth_rejected"] == 0
    received = sim_requests(stack)
    assert len(received) == stats["requests"] > 20
    team_keys = list(stack.keys.values())
    for request in received:
        headers = request["headers"]
        where = f"{request['method']} {request['path']}"
        assert set(headers) <= UPSTREAM_HEADER_ALLOW_LIST, (where, sorted(headers))
        assert headers["authorization"] == f"Bearer {fingerprint(stack.token)}", where
        assert headers.get("connection", "keep-alive") == "keep-alive", where
        flat = repr(request)
        for key in team_keys:  # the simulator shows credentials as fingerprints
            assert key not in flat, where
            assert fingerprint(key) not in flat, where
        for leaked in ("secret", "203.0.113", "evil.example", "cookie"):
            assert leaked not in flat.lower(), (where, leaked)

    # The client saw neither the token nor any key, in any header or body.
    assert len(recorder.responses) > 30
    for response in recorder.responses:
        where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
        head = repr(sorted(response.headers.multi_items())).encode()
        for secret in stack.secrets():
            assert secret.encode() not in head, where
            assert secret.encode() not in response.content, where
        assert "set-cookie" not in response.headers, where
        assert "server" not in response.headers, where  # no server software advertised
    for name, reply in errors.items():
        for secret in stack.secrets():
            assert secret not in reply.text, name

    # Nor do the logs.
    gateway_log = stack.gateway.log()
    assert gateway_log, "the gateway log exists"
    for secret in stack.secrets():
        assert secret not in gateway_log
        assert secret not in stack.simulator.log()


def test_leaky_client_headers_do_not_reach_upstream(stack):
    leaky = leaky_headers(stack)
    with stack.client("alpha") as client:
        client.headers.update(leaky)
        client.headers["openai-beta"] = "videos=v1"
        video = ok(client.post("/v1/videos", json={"prompt": "a quiet pond"}))
        ok(client.get(f"/v1/videos/{video['id']}"))
        client.delete(f"/v1/videos/{video['id']}")
    received = sim_requests(stack)
    assert [(r["method"], r["path"]) for r in received] == [
        ("POST", "/v1/videos"),
        ("GET", f"/v1/videos/{video['id']}"),
        ("DELETE", f"/v1/videos/{video['id']}"),
    ]
    for request in received:
        headers = request["headers"]
        for name in leaky:
            assert name not in headers, (name, request)
        assert not [h for h in headers if h.startswith(("x-forwarded", "x-stainless"))], headers
        assert headers["authorization"] == f"Bearer {fingerprint(stack.token)}"
        # What the allow-list does pass, passes.
        assert headers["openai-beta"] == "videos=v1"
    assert sim_stats(stack)["credentials_seen"] == [fingerprint(stack.token)]


def test_a_bearer_for_upstream_is_never_taken_from_the_client(stack):
    """A client presenting the real upstream token is no team: 401, nothing forwarded."""
    with stack.client("alpha") as client:
        as_bearer = client.get("/v1/videos", headers={"authorization": f"Bearer {stack.token}"})
        client.headers.pop("authorization")
        as_api_key = client.get("/v1/videos", headers={"api-key": stack.token})
    for reply in (as_bearer, as_api_key):
        assert_error(reply, 401, "invalid_api_key")
        assert stack.token not in reply.text
    assert sim_stats(stack)["requests"] == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/v1"),
        ("GET", "/v1/"),
        ("GET", "/v1/nothing-here"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/videos/video_abc/frames"),
        ("GET", "/v1/videos/video_abc/remix/extra"),
        ("GET", "/v1/models"),
    ],
)
def test_unknown_route_is_404_with_a_key_and_401_without(stack, method, path):
    with stack.client("alpha") as client:
        known = client.request(method, path)
        client.headers.pop("authorization")
        anonymous = client.request(method, path)
        wrong = client.request(method, path, headers={"authorization": "Bearer sgw-wrong"})
    assert known.status_code == 404, known.text
    assert_envelope(known)
    assert known.headers.get("x-request-id")
    assert_error(anonymous, 401, "invalid_api_key")
    assert_error(wrong, 401, "invalid_api_key")
    assert sim_stats(stack)["requests"] == 0


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", "/v1/videos/video_abc"),
        ("PATCH", "/v1/videos/video_abc"),
        ("POST", "/v1/videos/video_abc"),
        ("DELETE", "/v1/videos"),
        ("PUT", "/v1/videos"),
        ("GET", "/v1/videos/remix"),
        ("GET", "/v1/videos/edits"),
        ("DELETE", "/v1/videos/video_abc/content"),
        ("GET", "/v1/videos/video_abc/remix"),
        ("DELETE", "/v1/videos/characters/char_abc"),
    ],
)
def test_known_path_with_a_method_it_does_not_serve(stack, method, path):
    with stack.client("alpha") as client:
        reply = client.request(method, path, json={"prompt": "x"})
        client.headers.pop("authorization")
        anonymous = client.request(method, path, json={"prompt": "x"})
    assert reply.status_code in (404, 405), reply.text
    assert_envelope(reply)
    assert reply.headers.get("x-request-id")
    assert_error(anonymous, 401, "invalid_api_key")
    assert sim_stats(stack)["requests"] == 0


# -- an upstream that quotes the token back ------------------------------------------------

# A token whose plain, URL-encoded, form-encoded and JSON-escaped forms all differ.
AWKWARD_TOKEN = 'up/stream+{hex} "quoted" back\\slash&key=value?'


@pytest.fixture(scope="module")
def awkward(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    """A store, simulator and gateway of their own, sharing an awkward upstream token."""
    token = AWKWARD_TOKEN.format(hex=secrets.token_hex(8))
    with Rig.open(tmp_path_factory.mktemp("awkward-token"), token=token) as rig:
        rig.start_gateway()
        yield rig


def test_upstream_quoting_the_token_is_scrubbed_from_every_field_in_every_encoding(
    awkward: Rig,
) -> None:
    gateway, token = awkward.gateway, awkward.token
    forms = {
        "plain": token,
        "quote": quote(token, safe=""),
        "quote_plus": quote_plus(token),
        "json": json.dumps(token)[1:-1],
    }
    assert len(set(forms.values())) == 4, "the token must tell the encodings apart"
    awkward.faults(quote_credential_next=1)
    with awkward.client("alpha") as client:
        reply = client.post("/v1/videos", json={"prompt": "a careless upstream"})
        error = assert_envelope(reply)
        assert reply.status_code == 400, reply.text
        # The slot taken for the refused create is free again.
        assert ok(client.post("/v1/videos", json={"prompt": "and then a good one"}))["id"]
    for field in ("message", "type", "param", "code"):
        assert "***" in error[field], (field, error)
        for name, form in forms.items():
            assert form.lower() not in error[field].lower(), (field, name, error)
    for form in forms.values():
        assert form not in reply.text
        assert form not in gateway.log()
