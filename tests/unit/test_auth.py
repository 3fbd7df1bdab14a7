"""Team keys: Bearer or api-key, Authorization wins, anything else is 401 invalid_api_key."""

from __future__ import annotations

import hashlib

import httpx
import pytest
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from gateway.auth import (
    ADMIN_KEY_PREFIX,
    KEY_PREFIX,
    AdminKeys,
    TeamDirectory,
    key_digest,
    new_admin_key,
    new_key,
    presented_key,
)
from gateway.config import TeamSettings
from gateway.errors import GatewayError
from gateway.metrics import GatewayMetrics
from gateway.middleware import GatewayMiddleware
from gateway.observe import RequestRecorder

MARKETING_KEY = new_key()
MARKETING_OLD_KEY = new_key()
RESEARCH_KEY = new_key()
ADMIN_KEY = new_admin_key()


@pytest.fixture
def directory() -> TeamDirectory:
    return TeamDirectory(
        [
            TeamSettings(
                "marketing", (key_digest(MARKETING_KEY), key_digest(MARKETING_OLD_KEY)), 1
            ),
            TeamSettings("research", (key_digest(RESEARCH_KEY),)),
        ]
    )


def authenticate(directory: TeamDirectory, **headers: str):
    return directory.authenticate(Headers({k.replace("_", "-"): v for k, v in headers.items()}))


def assert_refused(directory: TeamDirectory, **headers: str) -> None:
    with pytest.raises(GatewayError) as caught:
        authenticate(directory, **headers)
    error = caught.value
    assert error.status == 401
    assert error.code == "invalid_api_key"
    assert error.envelope()["error"]["type"] == "authentication_error"
    for value in headers.values():  # the presented key is never echoed
        for word in value.split():
            assert word not in error.message or word.lower() == "bearer"


def test_key_digest_is_plain_sha256_hex():
    assert key_digest("sgw-abc") == hashlib.sha256(b"sgw-abc").hexdigest()


def test_new_keys_are_long_random_and_prefixed():
    keys = {new_key() for _ in range(50)}
    assert len(keys) == 50
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        assert len(key) >= len(KEY_PREFIX) + 43  # 256 bits, url-safe base64
        assert key.strip() == key
        assert " " not in key


def test_bearer_key_finds_its_team(directory):
    team = authenticate(directory, authorization=f"Bearer {MARKETING_KEY}")
    assert (team.name, team.max_in_flight) == ("marketing", 1)
    assert authenticate(directory, authorization=f"Bearer {RESEARCH_KEY}").name == "research"


@pytest.mark.parametrize("value", ["bearer {k}", "BEARER {k}", "  Bearer   {k}  "])
def test_bearer_scheme_is_case_insensitive_and_whitespace_tolerant(directory, value):
    team = authenticate(directory, authorization=value.format(k=MARKETING_KEY))
    assert team.name == "marketing"


def test_api_key_header_finds_its_team(directory):
    assert authenticate(directory, api_key=RESEARCH_KEY).name == "research"
    assert authenticate(directory, api_key=f" {RESEARCH_KEY} ").name == "research"


def test_every_listed_digest_of_a_team_works_during_rotation(directory):
    assert authenticate(directory, authorization=f"Bearer {MARKETING_OLD_KEY}").name == "marketing"


def test_authorization_wins_over_api_key(directory):
    both = {"authorization": f"Bearer {MARKETING_KEY}", "api_key": RESEARCH_KEY}
    assert authenticate(directory, **both).name == "marketing"
    assert presented_key(Headers({"authorization": "Bearer x", "api-key": "y"})) == "x"


def test_a_wrong_bearer_is_not_rescued_by_a_valid_api_key(directory):
    assert_refused(directory, authorization="Bearer sgw-unknown", api_key=RESEARCH_KEY)


def test_no_key_is_refused(directory):
    assert_refused(directory)


@pytest.mark.parametrize(
    "headers",
    [
        {"authorization": "Bearer sgw-not-a-configured-key"},
        {"api_key": "sgw-not-a-configured-key"},
        {"authorization": f"Bearer {MARKETING_KEY}x"},
        {"authorization": f"Bearer {MARKETING_KEY[:-1]}"},
        # The digest itself is not a key.
        {"authorization": f"Bearer {key_digest(MARKETING_KEY)}"},
    ],
)
def test_unknown_keys_are_refused(directory, headers):
    assert_refused(directory, **headers)


@pytest.mark.parametrize(
    "authorization",
    [
        "",
        "Bearer",
        "Bearer ",
        "Basic " + MARKETING_KEY,
        MARKETING_KEY,
        "Token " + MARKETING_KEY,
        "Bearer" + MARKETING_KEY,
    ],
)
def test_malformed_authorization_is_refused(directory, authorization):
    assert_refused(directory, authorization=authorization)


@pytest.mark.parametrize("api_key", ["", "   "])
def test_empty_api_key_is_refused(directory, api_key):
    assert_refused(directory, api_key=api_key)


# -- through the middleware: auth before routing --------------------------------------------


@pytest.fixture
async def client(directory):
    async def whoami(request: Request) -> JSONResponse:
        team = getattr(request.state, "team", None)
        return JSONResponse({"team": team.name if team else None})

    app = Starlette(
        routes=[
            Route("/v1/videos", whoami),
            Route("/healthz", whoami),
            Route("/admin/jobs", whoami),
            Route("/administrator", whoami),
        ],
    )
    wrapped = GatewayMiddleware(
        app,
        directory,
        RequestRecorder(GatewayMetrics(["research"])),
        AdminKeys([key_digest(ADMIN_KEY)]),
    )
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        yield c


async def test_middleware_attaches_the_team(client):
    reply = await client.get("/v1/videos", headers={"api-key": RESEARCH_KEY})
    assert reply.status_code == 200
    assert reply.json() == {"team": "research"}


@pytest.mark.parametrize("path", ["/v1/videos", "/v1/no-such-route", "/v1", "/v1/"])
async def test_no_valid_key_is_401_on_every_v1_path_even_unknown_ones(client, path):
    reply = await client.get(path, headers={"authorization": "Bearer nope"})
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "invalid_api_key"
    assert reply.headers["x-request-id"]


async def test_an_unknown_v1_route_with_a_valid_key_is_not_401(client):
    reply = await client.get("/v1/no-such-route", headers={"api-key": RESEARCH_KEY})
    assert reply.status_code == 404


async def test_operational_routes_need_no_key(client):
    reply = await client.get("/healthz")
    assert reply.status_code == 200
    assert reply.json() == {"team": None}


async def test_a_v1_lookalike_path_is_not_a_v1_path(client):
    reply = await client.get("/v1videos")
    assert reply.status_code == 404  # routed (and unknown), not refused with 401


def test_a_blank_authorization_header_counts_as_not_sent(directory):
    assert authenticate(directory, authorization="  ", api_key=RESEARCH_KEY).name == "research"


async def test_a_client_request_id_with_spaces_is_echoed():
    async def ok(request: Request) -> JSONResponse:
        return JSONResponse({})

    app = GatewayMiddleware(
        Starlette(routes=[Route("/x", ok)]), TeamDirectory([]), RequestRecorder(GatewayMetrics([]))
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as c:
        echoed = await c.get("/x", headers={"x-request-id": "batch 7 / item 3"})
        fresh = await c.get("/x", headers={"x-request-id": "x" * 129})
    assert echoed.headers["x-request-id"] == "batch 7 / item 3"
    assert fresh.headers["x-request-id"].startswith("req_")


# -- admin keys: /admin only, never a team key ----------------------------------------------


def test_admin_keys_are_prefixed_and_random():
    keys = {new_admin_key() for _ in range(20)}
    assert len(keys) == 20
    assert all(key.startswith(ADMIN_KEY_PREFIX) and len(key) > 40 for key in keys)


async def test_an_admin_key_opens_admin_routes_without_a_team(client):
    reply = await client.get("/admin/jobs", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert reply.status_code == 200
    assert reply.json() == {"team": None}


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": f"Bearer {RESEARCH_KEY}"},
        {"api-key": RESEARCH_KEY},
        {"authorization": "Bearer nope"},
        {"authorization": f"Basic {ADMIN_KEY}"},
    ],
)
@pytest.mark.parametrize("path", ["/admin/jobs", "/admin/no-such-route", "/admin"])
async def test_no_admin_key_is_401_on_every_admin_path(client, headers, path):
    reply = await client.get(path, headers=headers)
    assert reply.status_code == 401
    error = reply.json()["error"]
    assert error["code"] == "invalid_api_key"
    assert RESEARCH_KEY not in error["message"]
    assert ADMIN_KEY not in error["message"]
    assert reply.headers["x-request-id"]


async def test_an_admin_key_is_no_team_key(client):
    reply = await client.get("/v1/videos", headers={"authorization": f"Bearer {ADMIN_KEY}"})
    assert reply.status_code == 401


async def test_an_admin_lookalike_path_needs_no_admin_key(client):
    assert (await client.get("/administrator")).status_code == 200


def test_without_admin_keys_every_admin_request_is_refused():
    with pytest.raises(GatewayError) as caught:
        AdminKeys(()).authenticate(Headers({"authorization": f"Bearer {ADMIN_KEY}"}))
    assert caught.value.status == 401
