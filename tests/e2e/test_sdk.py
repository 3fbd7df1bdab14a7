"""The official `openai` SDK, sync and async, against a real gateway and simulator.

Plus the raw-HTTP forms no SDK sends but curl users do: the seed's body-form remix, the
`api-key` header, JSON creates, and edits/extensions by `{"video": {"id"}}` or
`video[id]`. The SDK runs with `max_retries=0` so a failure is never hidden by a retry.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from support.api import assert_error, completed, create, multipart, ok, settle
from support.simulator import sim_config

# The Videos API methods are marked deprecated in the SDK; they still are the API.
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API:DeprecationWarning")

POLL_AFTER_MS = 20
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(4096)


@pytest.fixture(autouse=True)
def fast_poll(stack: Any) -> Any:
    """Short jobs, and upstream tells pollers to come back after 20 ms (SDK default: 1 s).

    The `stack` fixture restores the simulator's startup settings before the next test.
    """
    sim_config(stack, queue_s=0.05, run_s=0.15, poll_after_ms=POLL_AFTER_MS)
    return stack


@pytest.fixture
def sdk(fast_poll: Any) -> Iterator[OpenAI]:
    client = OpenAI(base_url=fast_poll.base_url, api_key=fast_poll.keys["alpha"], max_retries=0)
    yield client
    client.close()


@pytest.fixture
async def async_sdk(fast_poll: Any) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(
        base_url=fast_poll.base_url, api_key=fast_poll.keys["alpha"], max_retries=0
    )
    yield client
    await client.close()


def upstream_posts(stack: Any) -> list[dict[str, Any]]:
    return [r for r in stack.sim_requests() if r["method"] == "POST"]


def assert_mp4(data: bytes) -> None:
    assert len(data) > 8, data[:16]
    assert data[4:8] == b"ftyp", data[:16]


def assert_webp(data: bytes) -> None:
    assert data[:4] == b"RIFF", data[:16]
    assert data[8:12] == b"WEBP", data[:16]


def assert_jpeg(data: bytes) -> None:
    assert data[:3] == b"\xff\xd8\xff", data[:16]


# -- the sync SDK -----------------------------------------------------------------------------


def test_sdk_create_sends_multipart_and_returns_upstreams_video(stack, sdk):
    sim_config(stack, queue_s=0.2, run_s=0.6)  # long enough to see the job queued
    video = sdk.videos.create(prompt="a paper boat on a puddle", seconds="8", size="1280x720")
    assert video.id.startswith("video_")
    assert video.status in ("queued", "in_progress")
    assert (video.seconds, video.size, video.prompt) == (
        "8",
        "1280x720",
        "a paper boat on a puddle",
    )
    (post,) = upstream_posts(stack)
    assert post["path"] == "/v1/videos"
    assert post["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    # The same id upstream knows: the gateway hands back upstream's object as it is.
    assert sdk.videos.retrieve(video.id).id == video.id
    assert sdk.videos.poll(video.id).status == "completed"


def test_sdk_create_with_an_input_reference_file(stack, sdk):
    video = sdk.videos.create(
        prompt="a kite over dunes", input_reference=("ref.png", PNG_BYTES, "image/png")
    )
    assert video.id.startswith("video_")
    (post,) = upstream_posts(stack)
    assert post["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    # The file part went upstream whole, not dropped or truncated.
    assert int(post["headers"]["content-length"]) > len(PNG_BYTES)
    assert stack.sim_stats()["jobs_created"] == 1
    assert sdk.videos.poll(video.id).status == "completed"


def test_json_create_as_older_sdks_send_it(stack):
    with stack.client("alpha") as client:
        video = ok(client.post("/v1/videos", json={"prompt": "a glass of milk", "seconds": "4"}))
        assert video["id"].startswith("video_")
        assert video["object"] == "video"
        (post,) = upstream_posts(stack)
        assert post["headers"]["content-type"].startswith("application/json")
        assert settle(client, video["id"])["status"] == "completed"


def test_sdk_retrieve_and_create_and_poll(stack, sdk):
    video = sdk.videos.create_and_poll(prompt="a heron in reeds")
    assert video.status == "completed"
    assert video.progress == 100
    assert video.expires_at is not None
    assert video.completed_at is not None
    raw = sdk.videos.with_raw_response.retrieve(video.id)
    # Upstream's poll hint is passed through, so the SDK's poll follows it.
    assert raw.headers["openai-poll-after-ms"] == str(POLL_AFTER_MS)
    assert raw.headers["x-request-id"]
    again = raw.parse()
    assert again.id == video.id
    assert again.status == "completed"


def test_sdk_list_auto_paginates_this_teams_videos_newest_first(stack, sdk):
    with stack.client("beta") as beta:
        other = completed(beta, "beta's own video")["id"]
    ids = []
    for _ in range(5):
        ids.append(sdk.videos.create(prompt=f"clip {len(ids)}").id)
        if len(ids) % 2 == 0 or len(ids) == 5:  # keep within the two-job account limit
            for video_id in ids[-2:]:
                assert sdk.videos.poll(video_id).status == "completed"
    listed_before = len(stack.sim_requests())

    first_page = sdk.videos.list(limit=2)
    assert [v.id for v in first_page.data] == ids[::-1][:2]
    assert first_page.has_more is True
    pages = list(first_page.iter_pages())
    assert [len(page.data) for page in pages] == [2, 2, 1]
    assert pages[-1].has_more is False

    newest_first = [v.id for v in sdk.videos.list(limit=2)]
    assert newest_first == ids[::-1]
    oldest_first = [v.id for v in sdk.videos.list(limit=2, order="asc")]
    assert oldest_first == ids
    assert other not in newest_first
    assert [v.id for v in sdk.videos.list()] == ids[::-1]
    # The list is served from the gateway's own records: nothing was asked upstream.
    assert len(stack.sim_requests()) == listed_before


def test_sdk_remix_of_a_completed_video(stack, sdk):
    source = sdk.videos.create_and_poll(prompt="a tram in the rain", seconds="8")
    remix = sdk.videos.remix(source.id, prompt="the same tram, at night")
    assert remix.id != source.id
    assert remix.remixed_from_video_id == source.id
    assert remix.seconds == "8"  # inherited from the source
    assert upstream_posts(stack)[-1]["path"] == f"/v1/videos/{source.id}/remix"
    assert sdk.videos.poll(remix.id).remixed_from_video_id == source.id


def test_sdk_download_content_every_variant(stack, sdk):
    video = sdk.videos.create_and_poll(prompt="a windmill")
    assert_mp4(sdk.videos.download_content(video.id).content)
    assert_mp4(sdk.videos.download_content(video.id, variant="video").content)
    assert_webp(sdk.videos.download_content(video.id, variant="thumbnail").content)
    assert_jpeg(sdk.videos.download_content(video.id, variant="spritesheet").content)


def test_sdk_delete_then_retrieve_is_not_found(stack, sdk):
    video = sdk.videos.create_and_poll(prompt="a sandcastle")
    deleted = sdk.videos.delete(video.id)
    assert (deleted.id, deleted.deleted) == (video.id, True)
    with pytest.raises(openai.NotFoundError) as raised:
        sdk.videos.retrieve(video.id)
    assert raised.value.status_code == 404
    assert raised.value.code == "video_not_found"
    assert raised.value.request_id
    assert [v.id for v in sdk.videos.list()] == []
    with pytest.raises(openai.NotFoundError):
        sdk.videos.delete(video.id)


def test_sdk_errors_map_to_its_exception_classes(stack, sdk):
    with pytest.raises(openai.BadRequestError) as raised:
        sdk.videos.remix("video_unknown", prompt="anything")
    assert raised.value.code == "invalid_video_id"
    stranger = OpenAI(base_url=stack.base_url, api_key="sgw-not-a-key", max_retries=0)
    with stranger, pytest.raises(openai.AuthenticationError) as raised_auth:
        stranger.videos.list()
    assert raised_auth.value.code == "invalid_api_key"
    assert upstream_posts(stack) == []


# -- the async SDK ----------------------------------------------------------------------------


async def test_async_sdk_full_round_trip(stack, async_sdk):
    video = await async_sdk.videos.create(prompt="a comet over a lake")
    assert video.status in ("queued", "in_progress")
    assert (await async_sdk.videos.retrieve(video.id)).id == video.id
    video = await async_sdk.videos.poll(video.id)
    assert video.status == "completed"

    second = await async_sdk.videos.create_and_poll(
        prompt="a second comet", input_reference=("ref.png", PNG_BYTES, "image/png")
    )
    assert second.status == "completed"

    listed = [v.id async for v in async_sdk.videos.list(limit=1)]
    assert listed == [second.id, video.id]
    listed_asc = [v.id async for v in async_sdk.videos.list(limit=1, order="asc")]
    assert listed_asc == [video.id, second.id]

    remix = await async_sdk.videos.remix(video.id, prompt="the comet, closer")
    assert remix.remixed_from_video_id == video.id
    assert (await async_sdk.videos.poll(remix.id)).status == "completed"

    assert_mp4((await async_sdk.videos.download_content(video.id)).content)
    thumbnail = await async_sdk.videos.download_content(video.id, variant="thumbnail")
    assert_webp(thumbnail.content)
    sprites = await async_sdk.videos.download_content(video.id, variant="spritesheet")
    assert_jpeg(sprites.content)

    assert (await async_sdk.videos.delete(video.id)).deleted is True
    with pytest.raises(openai.NotFoundError) as raised:
        await async_sdk.videos.retrieve(video.id)
    assert raised.value.code == "video_not_found"


# -- raw HTTP forms ---------------------------------------------------------------------------


def test_seed_body_form_remix(stack):
    with stack.client("alpha") as client:
        source = completed(client, "a harbour at dawn")
        remix = ok(
            client.post(
                "/v1/videos/remix", json={"video_id": source["id"], "prompt": "at dusk instead"}
            )
        )
        assert remix["remixed_from_video_id"] == source["id"]
        assert remix["prompt"] == "at dusk instead"
        post = upstream_posts(stack)[-1]
        assert (post["path"], post["headers"]["content-type"]) == (
            f"/v1/videos/{source['id']}/remix",
            "application/json",
        )
        assert settle(client, remix["id"])["status"] == "completed"


def test_api_key_header_authenticates(stack):
    with stack.client("alpha") as client:
        video_id = create(client, "made with a bearer key")["id"]
    with stack.client("alpha") as plain:
        plain.headers.pop("authorization")
        plain.headers["api-key"] = stack.keys["alpha"]
        assert ok(plain.get(f"/v1/videos/{video_id}"))["id"] == video_id
        assert [v["id"] for v in ok(plain.get("/v1/videos"))["data"]] == [video_id]
        plain.headers["api-key"] = "sgw-bogus"
        assert_error(plain.get("/v1/videos"), 401, "invalid_api_key")


def test_authorization_wins_over_api_key(stack):
    with stack.client("alpha") as client:
        client.headers["api-key"] = "sgw-bogus"
        assert ok(client.get("/v1/videos"))["object"] == "list"
        client.headers["authorization"] = "Bearer sgw-bogus"
        client.headers["api-key"] = stack.keys["alpha"]
        assert_error(client.get("/v1/videos"), 401, "invalid_api_key")
        # A valid api-key of another team does not rescue an unknown bearer either.
        client.headers["api-key"] = stack.keys["beta"]
        assert_error(client.get("/v1/videos"), 401, "invalid_api_key")


@pytest.mark.parametrize("route", ["edits", "extensions"])
def test_edits_and_extensions_by_video_id_json_and_multipart(stack, route):
    with stack.client("alpha") as client:
        source = completed(client, "a bonfire on a beach")
        by_json = ok(
            client.post(
                f"/v1/videos/{route}",
                json={"prompt": "make it snow", "video": {"id": source["id"]}},
            )
        )
        by_form = ok(
            client.post(
                f"/v1/videos/{route}",
                **multipart({"prompt": "make it rain", "video[id]": source["id"]}),
            )
        )
        assert settle(client, by_json["id"])["status"] == "completed"
        assert settle(client, by_form["id"])["status"] == "completed"
        posts = upstream_posts(stack)
        assert [p["path"] for p in posts] == ["/v1/videos"] + [f"/v1/videos/{route}"] * 2
        assert posts[1]["headers"]["content-type"] == "application/json"
        assert posts[2]["headers"]["content-type"].startswith("multipart/form-data")
        if route == "extensions":
            # Upstream resolved the source: the stitched length is source + segment.
            assert by_json["seconds"] == by_form["seconds"] == "8"
        listed = [v["id"] for v in ok(client.get("/v1/videos"))["data"]]
        assert listed == [by_form["id"], by_json["id"], source["id"]]


def test_every_response_carries_a_request_id(stack):
    ours = "e2e-" + secrets.token_hex(8)
    with stack.client("alpha") as client:
        video = completed(client, "a quiet street")
        replies = {
            "create": client.post(
                "/v1/videos", json={"prompt": "another"}, headers={"x-request-id": ours}
            ),
            "retrieve": client.get(f"/v1/videos/{video['id']}", headers={"x-request-id": ours}),
            "list": client.get("/v1/videos", headers={"x-request-id": ours}),
            "content": client.get(
                f"/v1/videos/{video['id']}/content", headers={"x-request-id": ours}
            ),
            "404": client.get("/v1/videos/video_nope", headers={"x-request-id": ours}),
            "400": client.post("/v1/videos", json={}, headers={"x-request-id": ours}),
            "401": client.get(
                "/v1/videos", headers={"x-request-id": ours, "authorization": "Bearer sgw-no"}
            ),
            "unknown route": client.get("/v1/nothing-here", headers={"x-request-id": ours}),
        }
        for name, reply in replies.items():
            assert reply.headers.get("x-request-id") == ours, name
        settle(client, replies["create"].json()["id"])
        generated = [
            client.get("/v1/videos").headers.get("x-request-id"),
            client.get("/v1/videos/video_nope").headers.get("x-request-id"),
            client.get("/healthz").headers.get("x-request-id"),
            client.get("/readyz").headers.get("x-request-id"),
        ]
    assert all(generated), generated
    assert len(set(generated)) == len(generated), generated
