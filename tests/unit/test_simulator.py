"""The bundled upstream simulator, in process: the API as SDKs speak it, its rules, its knobs.

Time is a fake clock moved by hand, so no test sleeps for a job to progress.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import socket
import time
import tracemalloc
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import uvicorn

from gateway.simulator import SimulatorSettings, create_simulator_app, fingerprint
from gateway.simulator.media import BLOCK, NoiseContent, RangeNotSatisfiable, parse_range

AUTH = {"Authorization": "Bearer test-key"}
VIDEO_ID = re.compile(r"^video_[0-9a-f]{32}$")


class FakeClock:
    def __init__(self, start: float = 1_700_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make_client(settings: SimulatorSettings, clock: FakeClock) -> httpx.AsyncClient:
    app = create_simulator_app(settings, clock=clock)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


@pytest.fixture
async def client(clock: FakeClock) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(SimulatorSettings(queue_s=1, run_s=4, expire_s=100), clock) as c:
        yield c


async def create(client: httpx.AsyncClient, prompt: str = "a cat", **fields: str) -> dict:
    response = await client.post("/v1/videos", json={"prompt": prompt, **fields}, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


async def completed_video(client: httpx.AsyncClient, clock: FakeClock, **fields: str) -> dict:
    video = await create(client, **fields)
    clock.advance(5)
    return video


def assert_error(response: httpx.Response, status: int, code: str | None, param=None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    if param is not None:
        assert error["param"] == param
    return error


# --- create and the video object ----------------------------------------------------------


async def test_create_json_returns_queued_video_with_every_field(client, clock):
    video = await create(client, "a fox", seconds="8", size="1280x720", model="sora-2-pro")
    assert VIDEO_ID.match(video["id"])
    assert video == {
        "id": video["id"],
        "object": "video",
        "model": "sora-2-pro",
        "status": "queued",
        "progress": 0,
        "created_at": int(clock.now),
        "completed_at": None,
        "expires_at": None,
        "seconds": "8",
        "size": "1280x720",
        "prompt": "a fox",
        "remixed_from_video_id": None,
        "error": None,
    }


async def test_create_multipart_prompt_only_and_with_input_reference(client):
    plain = await client.post("/v1/videos", files={"prompt": (None, "a dog")}, headers=AUTH)
    assert plain.status_code == 200
    assert (plain.json()["model"], plain.json()["seconds"], plain.json()["size"]) == (
        "sora-2",
        "4",
        "720x1280",
    )
    with_file = await client.post(
        "/v1/videos",
        data={"prompt": "a dog", "seconds": "12", "size": "1024x1792"},
        files={"input_reference": ("ref.jpg", b"\xff\xd8jpeg", "image/jpeg")},
        headers=AUTH,
    )
    assert with_file.status_code == 200
    assert with_file.json()["seconds"] == "12"


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({}, "prompt", "missing_required_parameter"),
        ({"prompt": "  "}, "prompt", "missing_required_parameter"),
        ({"prompt": "x" * 32001}, "prompt", "string_above_max_length"),
        ({"prompt": "p", "seconds": "5"}, "seconds", "invalid_value"),
        ({"prompt": "p", "size": "640x480"}, "size", "invalid_value"),
        ({"prompt": "p", "model": ""}, "model", "invalid_value"),
    ],
)
async def test_create_refuses_bad_values_naming_the_param(client, body, param, code):
    response = await client.post("/v1/videos", json=body, headers=AUTH)
    error = assert_error(response, 400, code, param)
    assert error["type"] == "invalid_request_error"
    assert (await client.get("/_sim/stats")).json()["jobs_created"] == 0


async def test_create_accepts_longest_prompt_and_numeric_seconds(client):
    assert (await create(client, "x" * 32000))["prompt"] == "x" * 32000
    response = await client.post("/v1/videos", json={"prompt": "p", "seconds": 8}, headers=AUTH)
    assert response.json()["seconds"] == "8"


async def test_malformed_json_is_a_400(client):
    response = await client.post(
        "/v1/videos", content=b"{nope", headers={**AUTH, "content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_json")


# --- lifecycle by the clock ---------------------------------------------------------------


async def test_job_moves_queued_in_progress_completed_by_the_clock(client, clock):
    created_at = clock.now
    video = await create(client)
    url = f"/v1/videos/{video['id']}"
    clock.advance(0.5)
    assert (await client.get(url, headers=AUTH)).json()["status"] == "queued"
    clock.advance(1.5)  # 1 s into a 4 s run
    running = (await client.get(url, headers=AUTH)).json()
    assert (running["status"], running["progress"]) == ("in_progress", 25)
    clock.advance(3)
    done = (await client.get(url, headers=AUTH)).json()
    assert done["status"] == "completed"
    assert done["progress"] == 100
    assert done["completed_at"] == int(created_at + 5)
    assert done["expires_at"] == int(created_at + 5 + 100)


@pytest.mark.parametrize(("marker", "status"), [("#fail", "failed"), ("#cancel", "cancelled")])
async def test_markers_end_a_job_failed_or_cancelled(client, clock, marker, status):
    video = await create(client, f"a cat {marker}")
    clock.advance(5)
    ended = (await client.get(f"/v1/videos/{video['id']}", headers=AUTH)).json()
    assert ended["status"] == status
    assert ended["completed_at"] is not None
    assert ended["expires_at"] is None
    if status == "failed":
        assert ended["error"]["code"] == "content_policy_violation"
        assert ended["error"]["message"]


async def test_retrieve_unknown_is_404_video_not_found(client):
    response = await client.get("/v1/videos/video_nope", headers=AUTH)
    error = assert_error(response, 404, "video_not_found")
    assert error["type"] == "invalid_request_error"


# --- the concurrency limit ----------------------------------------------------------------


async def test_third_running_job_is_refused_with_429_until_one_ends(client, clock):
    await create(client)
    await create(client)
    refused = await client.post("/v1/videos", json={"prompt": "third"}, headers=AUTH)
    error = assert_error(refused, 429, "too_many_running_tasks")
    assert error == {
        "message": "Too many running tasks",
        "type": "rate_limit_error",
        "param": None,
        "code": "too_many_running_tasks",
    }
    assert refused.headers["retry-after"] == "1"
    clock.advance(5)
    await create(client)
    stats = (await client.get("/_sim/stats")).json()
    assert (stats["limit_hits"], stats["max_concurrency"], stats["running"]) == (1, 2, 1)
    assert stats["jobs_created"] == 3


async def test_deleting_a_running_job_frees_its_place(client):
    first = await create(client)
    await create(client)
    response = await client.request(
        "DELETE",
        f"/v1/videos/{first['id']}",
        headers={**AUTH, "Content-Type": "application/json"},
        content=b"",
    )
    assert response.json() == {"id": first["id"], "object": "video.deleted", "deleted": True}
    assert_error(
        await client.get(f"/v1/videos/{first['id']}", headers=AUTH), 404, "video_not_found"
    )
    assert_error(
        await client.delete(f"/v1/videos/{first['id']}", headers=AUTH), 404, "video_not_found"
    )
    await create(client)
    assert (await client.get("/_sim/stats")).json()["max_concurrency"] == 2


async def test_concurrent_creates_never_exceed_the_limit(client):
    async def attempt(i: int) -> int:
        response = await client.post("/v1/videos", data={"prompt": f"p{i}"}, headers=AUTH)
        return response.status_code

    codes = await asyncio.gather(*(attempt(i) for i in range(12)))
    assert sorted(codes) == [200, 200] + [429] * 10
    stats = (await client.get("/_sim/stats")).json()
    assert (stats["max_concurrency"], stats["limit_hits"], stats["running"]) == (2, 10, 2)


async def test_max_concurrency_counts_only_jobs_running_at_admission(clock):
    settings = SimulatorSettings(queue_s=1, run_s=1, max_running=3)
    async with make_client(settings, clock) as c:
        await create(c)
        clock.advance(1.5)
        await create(c)
        clock.advance(1.5)  # the first has ended
        await create(c)
        assert (await c.get("/_sim/stats")).json()["max_concurrency"] == 2


# --- list ---------------------------------------------------------------------------------


async def test_list_is_newest_first_and_pages_with_after(client, clock):
    ids = []
    for i in range(5):
        ids.append((await create(client, f"p{i}"))["id"])
        clock.advance(5)
    page = (await client.get("/v1/videos?limit=2", headers=AUTH)).json()
    assert [v["id"] for v in page["data"]] == [ids[4], ids[3]]
    assert (page["object"], page["first_id"], page["last_id"], page["has_more"]) == (
        "list",
        ids[4],
        ids[3],
        True,
    )
    rest = (await client.get(f"/v1/videos?after={ids[3]}&limit=100", headers=AUTH)).json()
    assert [v["id"] for v in rest["data"]] == [ids[2], ids[1], ids[0]]
    assert rest["has_more"] is False
    ascending = (await client.get("/v1/videos?order=asc", headers=AUTH)).json()
    assert [v["id"] for v in ascending["data"]] == ids


async def test_list_ties_keep_creation_order(client):
    first, second = await create(client), await create(client)
    page = (await client.get("/v1/videos", headers=AUTH)).json()
    assert [v["id"] for v in page["data"]] == [second["id"], first["id"]]


async def test_list_empty_and_bad_params(client):
    empty = (await client.get("/v1/videos", headers=AUTH)).json()
    assert empty == {
        "object": "list",
        "data": [],
        "first_id": None,
        "last_id": None,
        "has_more": False,
    }
    for query, param in [("limit=0", "limit"), ("limit=101", "limit"), ("order=up", "order")]:
        assert_error(
            await client.get(f"/v1/videos?{query}", headers=AUTH), 400, "invalid_value", param
        )
    assert_error(
        await client.get("/v1/videos?after=video_x", headers=AUTH), 400, "invalid_value", "after"
    )


# --- remix, edits, extensions -------------------------------------------------------------


async def test_remix_by_path_inherits_size_and_seconds(client, clock):
    source = await completed_video(client, clock, seconds="12", size="1792x1024")
    response = await client.post(
        f"/v1/videos/{source['id']}/remix", json={"prompt": "teal"}, headers=AUTH
    )
    remix = response.json()
    assert (remix["status"], remix["seconds"], remix["size"]) == ("queued", "12", "1792x1024")
    assert remix["remixed_from_video_id"] == source["id"]
    assert remix["prompt"] == "teal"


async def test_remix_by_body_and_multipart(client, clock):
    source = await completed_video(client, clock)
    by_body = await client.post(
        "/v1/videos/remix", json={"video_id": source["id"], "prompt": "rust"}, headers=AUTH
    )
    assert by_body.json()["remixed_from_video_id"] == source["id"]
    multipart = await client.post(
        f"/v1/videos/{source['id']}/remix", files={"prompt": (None, "sand")}, headers=AUTH
    )
    assert multipart.json()["remixed_from_video_id"] == source["id"]
    missing = await client.post("/v1/videos/remix", json={"prompt": "x"}, headers=AUTH)
    assert_error(missing, 400, "missing_required_parameter", "video_id")


async def test_remix_source_rules(client, clock):
    async def remix(video_id: str) -> httpx.Response:
        return await client.post(
            "/v1/videos/remix", json={"video_id": video_id, "prompt": "p"}, headers=AUTH
        )

    assert_error(await remix("video_unknown"), 400, "invalid_video_id", "video_id")
    running = await create(client)
    assert_error(await remix(running["id"]), 400, "video_not_completed")
    failed = await create(client, "#fail")
    clock.advance(5)
    assert_error(await remix(failed["id"]), 400, "video_not_completed")
    assert (await remix(running["id"])).status_code == 200
    clock.advance(5 + 100 + 1)  # past expires_at of `running`
    assert_error(await remix(running["id"]), 400, "video_expired")
    stats = (await client.get("/_sim/stats")).json()
    assert stats["jobs_created"] == 3


async def test_remix_counts_against_the_limit(client, clock):
    source = await completed_video(client, clock)
    await create(client)
    await create(client)
    response = await client.post(
        f"/v1/videos/{source['id']}/remix", json={"prompt": "p"}, headers=AUTH
    )
    assert_error(response, 429, "too_many_running_tasks")


async def test_edit_by_json_id_multipart_id_and_file(client, clock):
    source = await completed_video(client, clock, size="1280x720", seconds="8")
    by_json = await client.post(
        "/v1/videos/edits", json={"prompt": "e", "video": {"id": source["id"]}}, headers=AUTH
    )
    assert (by_json.json()["size"], by_json.json()["seconds"]) == ("1280x720", "8")
    by_form = await client.post(
        "/v1/videos/edits", data={"prompt": "e", "video[id]": source["id"]}, headers=AUTH
    )
    assert by_form.json()["size"] == "1280x720"
    clock.advance(5)
    by_file = await client.post(
        "/v1/videos/edits",
        data={"prompt": "e"},
        files={"video": ("in.mp4", b"\x00\x00\x00\x18ftypmp42", "video/mp4")},
        headers=AUTH,
    )
    assert by_file.status_code == 200
    assert by_file.json()["size"] == "720x1280"


async def test_edit_and_extension_source_errors(client):
    for path in ("/v1/videos/edits", "/v1/videos/extensions"):
        unknown = await client.post(
            path, json={"prompt": "p", "video": {"id": "video_zz"}}, headers=AUTH
        )
        assert_error(unknown, 400, "invalid_video_id", "video.id")
        missing = await client.post(path, json={"prompt": "p"}, headers=AUTH)
        assert_error(missing, 400, "missing_required_parameter", "video")
        bare = await client.post(path, json={"prompt": "p", "video": "video_zz"}, headers=AUTH)
        assert_error(bare, 400, "invalid_type", "video")


async def test_extension_reports_the_stitched_total(client, clock):
    source = await completed_video(client, clock, seconds="8")
    response = await client.post(
        "/v1/videos/extensions",
        data={"prompt": "more", "seconds": "16", "video[id]": source["id"]},
        headers=AUTH,
    )
    assert response.json()["seconds"] == "24"
    bad = await client.post(
        "/v1/videos/extensions",
        json={"prompt": "more", "seconds": "7", "video": {"id": source["id"]}},
        headers=AUTH,
    )
    assert_error(bad, 400, "invalid_value", "seconds")


# --- content ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("variant", "media_type", "magic"),
    [
        ("video", "video/mp4", b"ftyp"),
        ("thumbnail", "image/webp", b"WEBP"),
        ("spritesheet", "image/jpeg", b"\xff\xd8\xff"),
    ],
)
async def test_content_variants_are_real_media(client, clock, variant, media_type, magic):
    video = await completed_video(client, clock)
    response = await client.get(
        f"/v1/videos/{video['id']}/content",
        params={"variant": variant},
        headers={**AUTH, "Accept": "application/binary"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == media_type
    assert response.headers["accept-ranges"] == "bytes"
    assert int(response.headers["content-length"]) == len(response.content)
    assert 1000 < len(response.content) < 50_000
    assert magic in response.content[:12]


async def test_content_refusals(client, clock):
    video = await create(client)
    url = f"/v1/videos/{video['id']}/content"
    assert_error(await client.get(url, headers=AUTH), 400, "video_not_completed")
    clock.advance(5)
    bad = await client.get(url, params={"variant": "gif"}, headers=AUTH)
    assert_error(bad, 400, "invalid_value", "variant")
    gone = await client.get("/v1/videos/video_x/content", headers=AUTH)
    assert_error(gone, 404, "video_not_found")


async def test_content_ranges(client, clock):
    video = await completed_video(client, clock)
    url = f"/v1/videos/{video['id']}/content"
    full = (await client.get(url, headers=AUTH)).content
    size = len(full)

    async def ranged(spec: str) -> httpx.Response:
        return await client.get(url, headers={**AUTH, "Range": spec})

    cases = {
        "bytes=0-9": (0, 10),
        "bytes=100-": (100, size),
        "bytes=-50": (size - 50, size),
        f"bytes=10-{size + 500}": (10, size),
        f"bytes=-{size + 5}": (0, size),
    }
    for spec, (start, stop) in cases.items():
        response = await ranged(spec)
        assert response.status_code == 206, spec
        assert response.content == full[start:stop], spec
        assert response.headers["content-range"] == f"bytes {start}-{stop - 1}/{size}"
        assert response.headers["content-length"] == str(stop - start)
    unsatisfiable = await ranged(f"bytes={size}-")
    assert unsatisfiable.status_code == 416
    assert unsatisfiable.headers["content-range"] == f"bytes */{size}"
    for ignored in ("bytes=0-1,5-6", "items=0-1", "bytes=9-3"):
        response = await ranged(ignored)
        assert (response.status_code, response.content) == (200, full), ignored


async def test_noise_content_is_deterministic_and_range_consistent(clock):
    length = 2 * BLOCK + 12345
    settings = SimulatorSettings(queue_s=0, run_s=0, content_bytes=length, max_running=5)
    async with make_client(settings, clock) as c:
        one, two = await create(c), await create(c)
        url = f"/v1/videos/{one['id']}/content"
        first = (await c.get(url, headers=AUTH)).content
        again = (await c.get(url, headers=AUTH)).content
        other = (await c.get(f"/v1/videos/{two['id']}/content", headers=AUTH)).content
        assert len(first) == length
        assert first == again
        assert first != other
        assert first[:BLOCK] != first[BLOCK : 2 * BLOCK]  # every block carries its own stamp
        start, stop = BLOCK - 100, 2 * BLOCK + 7
        part = await c.get(url, headers={**AUTH, "Range": f"bytes={start}-{stop - 1}"})
        assert part.content == first[start:stop]
        thumb = await c.get(url, params={"variant": "thumbnail"}, headers=AUTH)
        assert thumb.content[8:12] == b"WEBP"  # only the video variant is noise


def test_noise_of_a_gibibyte_costs_no_memory():
    content = NoiseContent("video_big", 1 << 30)
    digest = hashlib.sha256()
    tracemalloc.start()
    try:
        total = 0
        for chunk in content.chunks(0, content.length):
            total += len(chunk)
            digest.update(chunk[:64])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total == 1 << 30
    assert peak < 4 * BLOCK


def test_parse_range_edges():
    assert parse_range(None, 10) is None
    assert parse_range("bytes=0-0", 10).stop == 1
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=-0", 10)
    with pytest.raises(RangeNotSatisfiable):
        parse_range("bytes=0-", 0)
    assert parse_range("bytes=²-3", 10) is None


# --- characters ---------------------------------------------------------------------------


async def test_characters_create_and_get(client):
    response = await client.post(
        "/v1/videos/characters",
        data={"name": "Ada"},
        files={"video": ("ada.mp4", b"\x00" * 64, "video/mp4")},
        headers=AUTH,
    )
    character = response.json()
    assert character["id"].startswith("char_")
    assert (character["object"], character["name"]) == ("character", "Ada")
    fetched = await client.get(f"/v1/videos/characters/{character['id']}", headers=AUTH)
    assert fetched.json() == character
    missing = await client.get("/v1/videos/characters/char_nope", headers=AUTH)
    assert_error(missing, 404, "character_not_found")
    no_file = await client.post("/v1/videos/characters", data={"name": "Bo"}, headers=AUTH)
    assert_error(no_file, 400, "missing_required_parameter", "video")


# --- auth, routing, headers ---------------------------------------------------------------


async def test_auth_with_a_configured_token(clock):
    async with make_client(SimulatorSettings(token="sk-up"), clock) as c:
        ok_bearer = await c.get("/v1/videos", headers={"Authorization": "Bearer sk-up"})
        ok_api_key = await c.get("/v1/videos", headers={"api-key": "sk-up"})
        assert (ok_bearer.status_code, ok_api_key.status_code) == (200, 200)
        for headers in (
            {},
            {"Authorization": "Bearer team-key"},
            {"api-key": "team-key"},
            {"Authorization": "sk-up"},
            {"Authorization": "Bearer team-key", "api-key": "sk-up"},  # Authorization wins
        ):
            assert_error(await c.get("/v1/videos", headers=headers), 401, "invalid_api_key")
        stats = (await c.get("/_sim/stats")).json()
        assert stats["auth_rejected"] == 5
        assert stats["requests"] == 7
        assert stats["credentials_seen"] == [fingerprint("sk-up"), fingerprint("team-key")]


async def test_any_credential_without_a_token_but_never_none(client):
    assert (await client.get("/v1/videos", headers={"api-key": "whatever"})).status_code == 200
    assert_error(await client.get("/v1/videos"), 401, "invalid_api_key")
    assert_error(
        await client.get("/v1/videos", headers={"Authorization": "Bearer "}), 401, "invalid_api_key"
    )


async def test_unknown_v1_routes_and_methods_answer_in_the_envelope(client):
    assert_error(await client.get("/v1/models", headers=AUTH), 404, None)
    assert_error(await client.get("/v1/nope"), 401, "invalid_api_key")  # auth comes first
    not_allowed = await client.put("/v1/videos", headers=AUTH)
    assert_error(not_allowed, 405, "method_not_allowed")
    assert {"GET", "POST"} <= set(not_allowed.headers["allow"].split(", "))
    assert (await client.get("/healthz")).status_code == 200


async def test_every_v1_answer_has_a_request_id(client):
    ok = await client.get("/v1/videos", headers=AUTH)
    refused = await client.get("/v1/videos")
    assert ok.headers["x-request-id"].startswith("req_")
    assert refused.headers["x-request-id"] != ok.headers["x-request-id"]


async def test_poll_after_header_only_when_configured(client):
    assert (
        "openai-poll-after-ms"
        not in (await client.post("/v1/videos", json={"prompt": "p"}, headers=AUTH)).headers
    )
    await client.post("/_sim/config", json={"poll_after_ms": 250})
    video = await client.post("/v1/videos", json={"prompt": "p"}, headers=AUTH)
    assert video.headers["openai-poll-after-ms"] == "250"
    again = await client.get(f"/v1/videos/{video.json()['id']}", headers=AUTH)
    assert again.headers["openai-poll-after-ms"] == "250"


async def test_request_log_keeps_lowercased_headers(client):
    await client.get("/v1/videos?limit=5", headers={**AUTH, "X-Custom": "1"})
    await client.get("/healthz")  # not /v1: not logged
    await client.post("/v1/videos", json={"prompt": "p"}, headers=AUTH)
    log = (await client.get("/_sim/requests")).json()
    assert [(r["method"], r["path"]) for r in log] == [
        ("GET", "/v1/videos"),
        ("POST", "/v1/videos"),
    ]
    assert log[0]["query"] == "limit=5"
    assert log[0]["headers"]["x-custom"] == "1"
    assert log[0]["headers"]["authorization"] == f"Bearer {fingerprint('test-key')}"
    assert (await client.get("/_sim/requests?limit=1")).json() == log[-1:]


# --- simulated time, unequal jobs, the create log -----------------------------------------


async def test_time_scale_runs_minutes_of_job_in_seconds_and_reports_simulated_times(clock):
    t0 = clock.now
    settings = SimulatorSettings(queue_s=0, run_s=180, expire_s=3600, time_scale=60)
    async with make_client(settings, clock) as c:
        video = await create(c)
        assert (video["status"], video["created_at"]) == ("in_progress", int(t0))
        clock.advance(1.5)  # 90 simulated seconds: half of the run
        half = (await c.get(f"/v1/videos/{video['id']}", headers=AUTH)).json()
        assert (half["status"], half["progress"]) == ("in_progress", 50)
        clock.advance(1.5)
        done = (await c.get(f"/v1/videos/{video['id']}", headers=AUTH)).json()
        assert (done["status"], done["progress"]) == ("completed", 100)
        assert done["completed_at"] == int(t0 + 180)
        assert done["expires_at"] == int(t0 + 180 + 3600)
        later = await create(c)  # the clock the jobs see has moved 180 s, not 3 s
        assert later["created_at"] == int(t0 + 180)
        character = await c.post(
            "/v1/videos/characters",
            data={"name": "c"},
            files={"video": ("v.mp4", b"x")},
            headers=AUTH,
        )
        assert character.json()["created_at"] == int(t0 + 180)
        clock.advance(3600 / 60 + 0.1)  # one simulated hour later the content has expired
        expired = await c.get(f"/v1/videos/{video['id']}/content", headers=AUTH)
        assert_error(expired, 400, "video_expired")


async def test_time_scale_set_at_runtime_applies_from_then_without_a_jump(clock):
    t0 = clock.now
    async with make_client(SimulatorSettings(queue_s=0, run_s=60), clock) as c:
        video = await create(c)
        url = f"/v1/videos/{video['id']}"
        clock.advance(12)  # 12 of 60 s at the default scale 1
        assert (await c.get(url, headers=AUTH)).json()["progress"] == 20
        config = (await c.post("/_sim/config", json={"time_scale": 10})).json()
        assert config["time_scale"] == 10.0
        assert (await c.get(url, headers=AUTH)).json()["progress"] == 20  # no jump
        clock.advance(1.5)  # 15 more simulated seconds
        assert (await c.get(url, headers=AUTH)).json()["progress"] == 45
        assert (await create(c))["created_at"] == int(t0 + 27)
        await c.post("/_sim/reset")  # back to scale 1, and the clock goes on from 27 s
        assert (await c.get("/_sim/config")).json()["time_scale"] == 1.0
        clock.advance(2)
        assert (await create(c))["created_at"] == int(t0 + 29)


async def test_time_scale_spread_and_seed_refuse_bad_values(client):
    for body, param in [
        ({"time_scale": 0}, "time_scale"),
        ({"time_scale": -2}, "time_scale"),
        ({"run_s_spread": 1.5}, "run_s_spread"),
        ({"run_s_spread": -0.1}, "run_s_spread"),
        ({"seed": 1.5}, "seed"),
        ({"seed": "x"}, "seed"),
    ]:
        assert_error(await client.post("/_sim/config", json=body), 400, "invalid_value", param)
    config = (await client.get("/_sim/config")).json()
    assert (config["time_scale"], config["run_s_spread"], config["seed"]) == (1.0, 0.0, 0)


async def run_times(c: httpx.AsyncClient, count: int) -> list[float]:
    for i in range(count):
        await create(c, f"job {i}")
    records = (await c.get("/_sim/creates")).json()[-count:]
    return [r["finished"] - r["started"] for r in records]


async def test_run_s_spread_draws_unequal_run_times_reproducibly_from_the_seed(clock):
    settings = SimulatorSettings(queue_s=0, run_s=10, max_running=100, run_s_spread=0.5, seed=7)
    async with make_client(settings, clock) as c:
        first = await run_times(c, 30)
        assert all(5 <= run <= 15 for run in first)
        assert len({round(run, 6) for run in first}) == 30
        assert min(first) < 7
        assert max(first) > 13
        # The job itself runs for its drawn time.
        video = (await c.get("/_sim/creates")).json()[0]
        shown = (await c.get(f"/v1/videos/{video['video_id']}", headers=AUTH)).json()
        clock.advance(first[0] + 0.01)
        done = (await c.get(f"/v1/videos/{video['video_id']}", headers=AUTH)).json()
        assert (shown["status"], done["status"]) == ("in_progress", "completed")
        assert done["completed_at"] == int(video["finished"])
        await c.post("/_sim/reset")
        assert await run_times(c, 30) == first  # a reset starts the draws over
        await c.post("/_sim/config", json={"seed": 8})
        assert await run_times(c, 30) != first
        await c.post("/_sim/config", json={"run_s_spread": 0})
        assert await run_times(c, 3) == [10.0, 10.0, 10.0]


async def test_create_log_records_each_job_creating_request_and_its_job(client, clock):
    source = await completed_video(client, clock, seconds="8")
    sid = source["id"]
    await client.post(f"/v1/videos/{sid}/remix", json={"prompt": "by path"}, headers=AUTH)
    clock.advance(5)
    await client.post("/v1/videos/remix", json={"video_id": sid, "prompt": "body"}, headers=AUTH)
    await client.post("/v1/videos/edits", json={"prompt": "ed", "video": {"id": sid}}, headers=AUTH)
    full = await client.post(
        "/v1/videos/extensions", json={"prompt": "ext", "video": {"id": sid}}, headers=AUTH
    )
    assert_error(full, 429, "too_many_running_tasks")
    await client.post("/v1/videos", json={"prompt": "x", "seconds": "7"}, headers=AUTH)  # 400
    await client.post("/_sim/faults", json={"fail_next": 1})
    await client.post("/v1/videos", json={"prompt": "gate"}, headers=AUTH)  # never reaches it
    clock.advance(5)
    await client.post("/_sim/faults", json={"rate_limit_next": 1})
    await client.post("/v1/videos", json={"prompt": "limited"}, headers=AUTH)
    await client.post("/_sim/faults", json={"create_then_500_next": 1})
    await client.post("/v1/videos", json={"prompt": "lost answer"}, headers=AUTH)
    log = (await client.get("/_sim/creates")).json()
    assert [(r["n"], r["kind"], r["status"], r["code"]) for r in log] == [
        (1, "create", 200, None),
        (2, "remix", 200, None),
        (3, "remix", 200, None),
        (4, "edit", 200, None),
        (5, "extension", 429, "too_many_running_tasks"),
        (6, "create", 400, "invalid_value"),
        (7, "create", 429, "rate_limit_exceeded"),
        (8, "create", 500, "internal_error"),
    ]
    assert [r["path"] for r in log[:3]] == [
        "/v1/videos",
        f"/v1/videos/{sid}/remix",
        "/v1/videos/remix",
    ]
    made = [r for r in log if r["video_id"] is not None]
    assert [r["n"] for r in made] == [1, 2, 3, 4, 8]  # the 500 made a job too
    listed = (await client.get("/v1/videos", params={"limit": 100}, headers=AUTH)).json()["data"]
    assert sorted(r["video_id"] for r in made) == sorted(v["id"] for v in listed)
    assert log[0]["video_id"] == sid
    assert log[1]["remixed_from_video_id"] == sid
    assert log[0]["remixed_from_video_id"] is None
    assert log[1]["prompt"] == "by path"
    assert log[1]["prompt_sha256"] == hashlib.sha256(b"by path").hexdigest()
    assert log[5]["prompt"] is None  # refused while its body was read
    assert log[6]["prompt"] == "limited"
    first = log[0]
    assert first["at"] == first["admitted"] == clock.now - 15
    assert (first["started"], first["finished"]) == (clock.now - 14, clock.now - 10)
    long = "p" * 5000
    await client.post("/v1/videos", json={"prompt": long}, headers=AUTH)
    last = (await client.get("/_sim/creates", params={"limit": 1})).json()
    assert len(last[0]["prompt"]) == 200
    assert last[0]["prompt_sha256"] == hashlib.sha256(long.encode()).hexdigest()
    assert_error(await client.get("/_sim/creates?limit=-1"), 400, "invalid_value", "limit")


async def test_create_log_marks_a_deletion_and_clears_on_reset(client, clock):
    video = await create(client)
    clock.advance(2)
    await client.delete(f"/v1/videos/{video['id']}", headers=AUTH)
    await client.delete(f"/v1/videos/{video['id']}", headers=AUTH)  # a 404 changes nothing
    (record,) = (await client.get("/_sim/creates")).json()
    assert record["deleted"] == clock.now
    await client.post("/_sim/reset")
    assert (await client.get("/_sim/creates")).json() == []
    await create(client)
    assert [r["n"] for r in (await client.get("/_sim/creates")).json()] == [1]


async def test_polls_push_creates_out_of_the_request_log_but_not_the_create_log(client, clock):
    ids = []
    for i in range(3):
        ids.append((await create(client, f"job {i}"))["id"])
        clock.advance(5)
    for _ in range(1000):
        await client.get(f"/v1/videos/{ids[0]}", headers=AUTH)
    requests = (await client.get("/_sim/requests")).json()
    assert all(r["method"] == "GET" for r in requests)
    assert [r["video_id"] for r in (await client.get("/_sim/creates")).json()] == ids


def test_create_log_is_bounded_and_forgets_whole_records():
    from gateway.simulator.creates import CreateLog
    from gateway.simulator.jobs import Job, JobSpec

    log = CreateLog(capacity=3)
    for n in range(5):
        record = log.open("create", "/v1/videos", float(n))
        job = Job(
            f"video_{n}", n, JobSpec(prompt="p"), float(n), n + 1.0, n + 2.0, 9.0, "completed"
        )
        log.created(record, job)
    assert [r["n"] for r in log.recent(10)] == [3, 4, 5]
    log.deleted("video_0", 9.0)  # gone from the log: nothing to mark
    log.deleted("video_4", 9.0)
    assert [r["deleted"] for r in log.recent(10)] == [None, None, 9.0]
    assert log.recent(0) == []


# --- faults, config, reset ----------------------------------------------------------------


async def test_fail_next_answers_500_without_doing_anything(client):
    await client.post("/_sim/faults", json={"fail_next": 2})
    for _ in range(2):
        response = await client.post("/v1/videos", json={"prompt": "p"}, headers=AUTH)
        assert assert_error(response, 500, "internal_error")["type"] == "server_error"
    assert (await client.get("/_sim/stats")).json()["jobs_created"] == 0
    await create(client)


async def test_rate_limit_next_refuses_without_creating(client):
    await client.post("/_sim/faults", json={"rate_limit_next": 1})
    refused = await client.post("/v1/videos", json={"prompt": "p"}, headers=AUTH)
    assert_error(refused, 429, "rate_limit_exceeded")
    assert refused.headers["retry-after"] == "1"
    stats = (await client.get("/_sim/stats")).json()
    assert (stats["jobs_created"], stats["limit_hits"]) == (0, 0)
    await create(client)


async def test_create_then_500_creates_the_job(client):
    await client.post("/_sim/faults", json={"create_then_500_next": 1})
    response = await client.post("/v1/videos", json={"prompt": "p"}, headers=AUTH)
    assert_error(response, 500, "internal_error")
    listed = (await client.get("/v1/videos", headers=AUTH)).json()["data"]
    assert len(listed) == 1
    assert (await client.get("/_sim/stats")).json()["running"] == 1


async def test_create_then_hang_holds_the_answer_until_reset(client):
    await client.post("/_sim/faults", json={"create_then_hang_next": 1})
    hung = asyncio.create_task(client.post("/v1/videos", json={"prompt": "p"}, headers=AUTH))
    for _ in range(200):
        if (await client.get("/_sim/stats")).json()["jobs_created"] == 1:
            break
        await asyncio.sleep(0.005)
    assert (await client.get("/_sim/stats")).json()["running"] == 1
    assert not hung.done()
    await client.post("/_sim/reset")
    response = await asyncio.wait_for(hung, 2)
    assert response.status_code == 500
    assert (await client.get("/_sim/stats")).json()["jobs_created"] == 0


async def test_other_id_next_answers_a_retrieve_under_another_videos_id(client):
    first, second = await create(client, "first"), await create(client, "second")
    await client.post("/_sim/faults", json={"other_id_next": 1})
    confused = (await client.get(f"/v1/videos/{first['id']}", headers=AUTH)).json()
    assert (confused["id"], confused["prompt"]) == (second["id"], "first")
    again = (await client.get(f"/v1/videos/{first['id']}", headers=AUTH)).json()
    assert again["id"] == first["id"]


async def test_latency_is_added_to_v1_answers(client):
    await client.post("/_sim/faults", json={"latency_ms": 60})
    started = time.perf_counter()
    await client.get("/v1/videos", headers=AUTH)
    assert time.perf_counter() - started >= 0.06
    faults = (await client.get("/_sim/faults")).json()
    assert faults["latency_ms"] == 60


async def test_flap_alternates_failing_and_served_requests(client):
    snapshot = (await client.post("/_sim/faults", json={"flap": 2})).json()
    assert snapshot["flap"] == 2
    statuses = [(await client.get("/v1/videos", headers=AUTH)).status_code for _ in range(8)]
    assert statuses == [500, 500, 200, 200, 500, 500, 200, 200]
    # Set again: the pattern starts over with its failing half, which does nothing.
    await client.post("/_sim/faults", json={"flap": 1})
    failed = await client.post("/v1/videos", json={"prompt": "p"}, headers=AUTH)
    assert_error(failed, 500, "internal_error")
    assert (await client.get("/_sim/stats")).json()["jobs_created"] == 0
    await create(client)
    # 0 turns it off; a reset too.
    await client.post("/_sim/faults", json={"flap": 0})
    assert {(await client.get("/v1/videos", headers=AUTH)).status_code for _ in range(3)} == {200}
    await client.post("/_sim/faults", json={"flap": 1})
    await client.post("/_sim/reset")
    assert (await client.get("/v1/videos", headers=AUTH)).status_code == 200


async def asgi_get(
    app: Any, path: str, *, headers: dict[str, str] | None = None, sent: list | None = None
) -> list[dict[str, Any]]:
    """The ASGI messages the app sends for one GET, as a server would receive them."""
    sent = [] if sent is None else sent
    raw = {"host": "sim", "authorization": AUTH["Authorization"], **(headers or {})}
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(k.encode(), v.encode()) for k, v in raw.items()],
        "server": ("sim", 80),
        "client": ("127.0.0.1", 5000),
    }
    disconnected = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if not sent:
            return {"type": "http.request", "body": b"", "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


def body_of(messages: list[dict[str, Any]]) -> tuple[int, int, bytes, bool]:
    """Status, announced length, bytes sent, and whether the answer was completed."""
    start = messages[0]
    assert start["type"] == "http.response.start"
    length = int(dict(start["headers"])[b"content-length"])
    bodies = [m for m in messages[1:] if m["type"] == "http.response.body"]
    data = b"".join(m.get("body", b"") for m in bodies)
    complete = bool(bodies) and not bodies[-1].get("more_body", False)
    return start["status"], length, data, complete


@pytest.fixture
async def sim_app(clock: FakeClock) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    """The app itself (for raw ASGI calls) and a client on it (for the knobs)."""
    settings = SimulatorSettings(queue_s=1, run_s=4, expire_s=100, content_bytes=3 * BLOCK + 7)
    app = create_simulator_app(settings, clock=clock)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        yield app, c


async def test_truncate_next_sends_half_a_download_then_ends_it_unfinished(sim_app, clock):
    app, client = sim_app
    video = await completed_video(client, clock)
    path = f"/v1/videos/{video['id']}/content"
    await client.post("/_sim/faults", json={"truncate_next": 1})
    # A JSON answer does not use the download knob up.
    assert (await client.get(f"/v1/videos/{video['id']}", headers=AUTH)).status_code == 200
    assert (await client.get("/_sim/faults")).json()["truncate_next"] == 1
    status, length, data, complete = body_of(await asgi_get(app, path))
    assert (status, length) == (200, 3 * BLOCK + 7)
    assert len(data) == length // 2  # cut inside the second 1 MiB block
    assert not complete  # the app returned without its last message: the server hangs up
    assert (await client.get("/_sim/faults")).json()["truncate_next"] == 0
    whole = (await client.get(path, headers=AUTH)).content
    assert data == whole[: len(data)]
    # A range is cut at half of what it announces; the next download is whole.
    await client.post("/_sim/faults", json={"truncate_next": 1})
    ranged = await asgi_get(app, path, headers={"range": "bytes=100-1099"})
    assert body_of(ranged) == (206, 1000, whole[100:600], False)
    assert body_of(await asgi_get(app, path)) == (200, len(whole), whole, True)


async def test_stall_next_holds_half_a_download_until_reset(sim_app, clock):
    app, client = sim_app
    video = await completed_video(client, clock)
    await client.post("/_sim/faults", json={"stall_next": 1})
    messages: list[dict[str, Any]] = []
    task = asyncio.create_task(asgi_get(app, f"/v1/videos/{video['id']}/content", sent=messages))
    for _ in range(400):
        if len(messages) > 1 and len(body_of(messages)[2]) == body_of(messages)[1] // 2:
            break
        await asyncio.sleep(0.005)
    done, _ = await asyncio.wait({task}, timeout=0.1)
    assert not done  # half sent, then the connection is held with nothing more
    await client.post("/_sim/reset")
    await asyncio.wait_for(task, 2)
    status, length, data, complete = body_of(messages)
    assert (status, len(data), complete) == (200, length // 2, False)


async def test_truncate_json_next_cuts_a_json_answer_mid_body(sim_app, clock):
    app, client = sim_app
    video = await create(client)
    await client.post("/_sim/faults", json={"truncate_json_next": 1})
    status, length, data, complete = body_of(await asgi_get(app, f"/v1/videos/{video['id']}"))
    assert (status, len(data), complete) == (200, length // 2, False)
    assert (await client.get(f"/v1/videos/{video['id']}", headers=AUTH)).json()["id"] == video["id"]


async def test_garble_json_next_frames_half_a_json_body_as_complete(client, clock):
    video = await create(client)
    url = f"/v1/videos/{video['id']}"
    whole = (await client.get(url, headers=AUTH)).content
    await client.post("/_sim/faults", json={"garble_json_next": 1})
    garbled = await client.get(url, headers=AUTH)
    assert garbled.status_code == 200
    assert garbled.content == whole[: len(whole) // 2]
    assert garbled.headers["content-length"] == str(len(whole) // 2)
    # json.loads's two ValueErrors: bad JSON, or bytes cut inside a character.
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
        json.loads(garbled.content)
    assert (await client.get(url, headers=AUTH)).content == whole
    # On a create the job exists upstream although its answer is unreadable.
    await client.post("/_sim/faults", json={"garble_json_next": 1})
    created = await client.post("/v1/videos", json={"prompt": "p"}, headers=AUTH)
    # json.loads's two ValueErrors: bad JSON, or bytes cut inside a character.
    with pytest.raises((json.JSONDecodeError, UnicodeDecodeError)):
        json.loads(created.content)
    assert (await client.get("/_sim/stats")).json()["jobs_created"] == 2


async def test_a_cut_answer_closes_the_connection_on_a_real_server(clock):
    """What a client of the running simulator sees: the connection closed mid-body."""
    settings = SimulatorSettings(queue_s=0, run_s=0, content_bytes=BLOCK)
    app = create_simulator_app(settings, clock=clock)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    serving = asyncio.create_task(server.serve())
    try:
        for _ in range(400):
            if server.started:
                break
            await asyncio.sleep(0.005)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=AUTH) as c:
            video = (await c.post("/v1/videos", json={"prompt": "p"})).json()
            await c.post("/_sim/faults", json={"truncate_next": 1, "truncate_json_next": 1})
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(f"/v1/videos/{video['id']}/content")
            with pytest.raises(httpx.RemoteProtocolError):
                await c.get(f"/v1/videos/{video['id']}")
            whole = await c.get(f"/v1/videos/{video['id']}/content")
            assert len(whole.content) == BLOCK
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, 10)


async def test_bad_fault_and_config_values_are_refused(client):
    for body, param in [
        ({"fail_next": -1}, "fail_next"),
        ({"bogus": 1}, "bogus"),
        ({"flap": 1.5}, "flap"),
        ({"truncate_next": True}, "truncate_next"),
        ({"garble_json_next": -2}, "garble_json_next"),
    ]:
        assert_error(await client.post("/_sim/faults", json=body), 400, "invalid_value", param)
    for body, param in [({"run_s": "x"}, "run_s"), ({"max_running": 1.5}, "max_running")]:
        assert_error(await client.post("/_sim/config", json=body), 400, "invalid_value", param)


async def test_config_changes_apply_to_new_jobs_and_reset_restores_them(client, clock):
    config = (await client.post("/_sim/config", json={"queue_s": 0, "run_s": 10})).json()
    assert (config["queue_s"], config["run_s"], config["token_set"]) == (0.0, 10.0, False)
    assert "token" not in config
    video = await create(client)
    assert video["status"] == "in_progress"
    clock.advance(5)
    assert (await client.get(f"/v1/videos/{video['id']}", headers=AUTH)).json()["progress"] == 50
    await client.post("/_sim/faults", json={"fail_next": 3, "latency_ms": 5})
    await client.post("/_sim/reset")
    assert (await client.get("/_sim/config")).json()["run_s"] == 4.0
    assert (await client.get("/_sim/faults")).json()["fail_next"] == 0
    stats = (await client.get("/_sim/stats")).json()
    assert stats == {
        "max_concurrency": 0,
        "limit_hits": 0,
        "running": 0,
        "jobs_created": 0,
        "requests": 0,
        "auth_rejected": 0,
        "credentials_seen": [],
        "content_bytes_sent": 0,
    }
    assert_error(
        await client.get(f"/v1/videos/{video['id']}", headers=AUTH), 404, "video_not_found"
    )


async def test_no_control_route_shows_a_credential(clock):
    """`/_sim/*` needs no credential, so it shows none: only fingerprints of them."""
    token, other = "sk-real-" + "x" * 24, "sgw-team-" + "y" * 24
    async with make_client(SimulatorSettings(token=token), clock) as c:
        await c.get("/v1/videos", headers={"Authorization": f"Bearer {token}"})
        await c.get(
            "/v1/videos", headers={"api-key": other, "Proxy-Authorization": f"Basic {other}"}
        )
        await c.post("/_sim/config", json={"token": token})
        shown = [
            (await c.request(method, path)).text
            for method, path in [
                ("GET", "/_sim/stats"),
                ("GET", "/_sim/requests"),
                ("GET", "/_sim/config"),
                ("POST", "/_sim/config"),
                ("GET", "/_sim/faults"),
            ]
        ]
        log = (await c.get("/_sim/requests")).json()
        stats = (await c.get("/_sim/stats")).json()
    for text in shown:
        assert token not in text
        assert other not in text
    assert log[0]["headers"]["authorization"] == f"Bearer {fingerprint(token)}"
    assert log[1]["headers"]["api-key"] == fingerprint(other)
    assert log[1]["headers"]["proxy-authorization"] == f"Basic {fingerprint(other)}"
    assert stats["credentials_seen"] == [fingerprint(token), fingerprint(other)]


async def test_quote_credential_next_quotes_it_in_every_field(client):
    await client.post("/_sim/faults", json={"quote_credential_next": 1})
    quoted = assert_error(await client.get("/v1/videos", headers=AUTH), 400, "test-key")
    assert "test-key" in quoted["message"]
    assert quoted["type"] == quoted["param"] == "test-key"
    assert (await client.get("/v1/videos", headers=AUTH)).status_code == 200  # used up


async def test_token_can_be_set_at_runtime(client):
    await client.post("/_sim/config", json={"token": "sk-new"})
    assert_error(await client.get("/v1/videos", headers=AUTH), 401, "invalid_api_key")
    ok = await client.get("/v1/videos", headers={"Authorization": "Bearer sk-new"})
    assert ok.status_code == 200


# --- the official SDK, in process ---------------------------------------------------------


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the SDK marks Sora deprecated
async def test_official_sdk_round_trip(clock):
    openai = pytest.importorskip("openai")
    httpx2 = pytest.importorskip("httpx2")
    app = create_simulator_app(SimulatorSettings(queue_s=0, run_s=0), clock=clock)
    transport = httpx2.ASGITransport(app=app)
    async with httpx2.AsyncClient(transport=transport, base_url="http://sim/v1") as http:
        sdk = openai.AsyncOpenAI(base_url="http://sim/v1", api_key="x", http_client=http)
        video = await sdk.videos.create(prompt="a cat", seconds="8")
        assert video.status == "completed"
        with_ref = await sdk.videos.create(
            prompt="a cat", input_reference=("ref.jpg", b"\xff\xd8", "image/jpeg")
        )
        remix = await sdk.videos.remix(video.id, prompt="teal")
        assert remix.remixed_from_video_id == video.id
        # openai 3.57 refuses video={"id": ...} client-side (it expects a file there), so
        # the reference goes in extra_body, which the SDK flattens to the part `video[id]`.
        by_id = {"extra_body": {"video": {"id": video.id}}}
        edit = await sdk.videos.edit(prompt="edit", video=openai.omit, **by_id)
        extension = await sdk.videos.extend(prompt="more", seconds="4", video=openai.omit, **by_id)
        assert extension.seconds == "12"
        listed = [v.id async for v in sdk.videos.list(limit=2)]
        assert listed == [extension.id, edit.id, remix.id, with_ref.id, video.id]
        data = await (await sdk.videos.download_content(video.id)).aread()
        assert data[4:8] == b"ftyp"
        thumb = await sdk.videos.download_content(video.id, variant="thumbnail")
        assert (await thumb.aread())[8:12] == b"WEBP"
        deleted = await sdk.videos.delete(video.id)
        assert deleted.deleted is True
        with pytest.raises(openai.NotFoundError):
            await sdk.videos.retrieve(video.id)


async def test_result_seconds_makes_a_completed_job_report_another_length(client, clock):
    """An upstream that produced (and billed) 8 s for a request of 4: the job reports the
    asked length while it runs, the knob's once completed; a failed one keeps the asked."""
    config = (await client.post("/_sim/config", json={"result_seconds": 8})).json()
    assert config["result_seconds"] == 8
    video = await create(client, seconds="4")
    failed = await create(client, "a cat #fail", seconds="4")
    assert video["seconds"] == "4"
    clock.advance(2)
    running = (await client.get(f"/v1/videos/{video['id']}", headers=AUTH)).json()
    assert (running["status"], running["seconds"]) == ("in_progress", "4")
    clock.advance(4)
    done = (await client.get(f"/v1/videos/{video['id']}", headers=AUTH)).json()
    assert (done["status"], done["seconds"]) == ("completed", "8")
    listed = (await client.get("/v1/videos", headers=AUTH)).json()["data"]
    assert {v["id"]: v["seconds"] for v in listed} == {video["id"]: "8", failed["id"]: "4"}
    # Off again (null): later jobs report what they asked; a reset clears it as well.
    await client.post("/_sim/config", json={"result_seconds": None})
    plain = await completed_video(client, clock, seconds="4")
    assert (await client.get(f"/v1/videos/{plain['id']}", headers=AUTH)).json()["seconds"] == "4"
    await client.post("/_sim/config", json={"result_seconds": 12})
    await client.post("/_sim/reset")
    assert (await client.get("/_sim/config")).json()["result_seconds"] is None


@pytest.mark.parametrize("value", [0, -4, 2.5, "8", True])
async def test_result_seconds_refuses_what_is_not_a_positive_integer(client, value):
    reply = await client.post("/_sim/config", json={"result_seconds": value})
    assert_error(reply, 400, "invalid_value", "result_seconds")
    assert (await client.get("/_sim/config")).json()["result_seconds"] is None
