"""The video objects of queued jobs, and answers in the client's ids (CONTRACT §8.2-8.3)."""

from __future__ import annotations

import json

from gateway.answers import client_reply, failed_object, in_client_ids, queued_object
from gateway.upstream import Reply

DEFAULTS = {"model": "m-default", "size": "720x1280", "seconds": "4"}


def test_a_queued_create_shows_what_it_asked_for_and_the_defaults_for_the_rest() -> None:
    video = queued_object(
        "video_" + "a" * 32,
        kind="create",
        fields={"prompt": "a cat", "seconds": 8},
        inherited={},
        defaults=DEFAULTS,
        source=None,
        created_at=1_700_000_000,
    )
    assert video == {
        "id": "video_" + "a" * 32,
        "object": "video",
        "status": "queued",
        "progress": 0,
        "created_at": 1_700_000_000,
        "model": "m-default",
        "size": "720x1280",
        "seconds": "8",
        "prompt": "a cat",
        "remixed_from_video_id": None,
        "completed_at": None,
        "expires_at": None,
        "error": None,
    }


def test_a_queued_remix_inherits_its_sources_size_and_seconds_and_names_it() -> None:
    video = queued_object(
        "video_q",
        kind="remix",
        fields={"prompt": "again", "size": "1x1"},  # a remix body fixes no size
        inherited={"model": "m-src", "size": "1280x720", "seconds": "12"},
        defaults=DEFAULTS,
        source="video_src",
        created_at=1,
    )
    assert (video["model"], video["size"], video["seconds"]) == ("m-src", "1280x720", "12")
    assert video["remixed_from_video_id"] == "video_src"


def test_with_no_defaults_configured_an_omitted_field_is_null() -> None:
    video = queued_object(
        "video_q",
        kind="create",
        fields={"prompt": "p"},
        inherited={},
        defaults={"model": None, "size": None, "seconds": None},
        source=None,
        created_at=1,
    )
    assert (video["model"], video["size"], video["seconds"]) == (None, None, None)


def test_answers_name_gateway_ids_for_jobs_and_sources_known_by_them() -> None:
    ids = {"up_job": "video_gw_job", "up_src": "video_gw_src"}
    video = {"id": "up_job", "remixed_from_video_id": "up_src", "status": "in_progress"}
    assert in_client_ids(video, ids) == {
        "id": "video_gw_job",
        "remixed_from_video_id": "video_gw_src",
        "status": "in_progress",
    }
    reply = Reply(200, {"openai-poll-after-ms": "500"}, json.dumps(video).encode())
    rewritten = client_reply(reply, video, ids)
    assert json.loads(rewritten.body)["id"] == "video_gw_job"
    assert rewritten.headers == reply.headers


def test_an_answer_naming_no_gateway_id_keeps_upstreams_bytes() -> None:
    body = b'{"id":"up_job","status":"completed"}'
    reply = Reply(200, {}, body)
    assert client_reply(reply, json.loads(body), {"up_other": "video_gw"}) is reply


def test_a_job_that_failed_before_it_started_says_why() -> None:
    failed = failed_object({"id": "video_q", "status": "queued"}, "queue_timeout", "too long")
    assert failed["status"] == "failed"
    assert failed["error"] == {"code": "queue_timeout", "message": "too long"}
