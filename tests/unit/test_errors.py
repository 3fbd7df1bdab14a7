"""The OpenAI error envelope, and upstream answers turned into it (CONTRACT §2 errors)."""

from __future__ import annotations

import json

import pytest

from gateway import errors
from gateway.errors import (
    QUEUE_TIMEOUT,
    GatewayError,
    UpstreamError,
    budget_exceeded,
    concurrency_limit_exceeded,
    invalid_request,
    model_not_allowed,
    queue_full,
    seconds_not_allowed,
    size_not_allowed,
    store_unavailable,
    team_concurrency_limit_exceeded,
    team_queue_full,
    video_not_found,
)
from gateway.upstream import Reply, error_from_reply

TOKEN = "sk-upstream-secret-123"
ENVELOPE_FIELDS = {"message", "type", "param", "code"}


def scrub(text: str) -> str:
    return text.replace(TOKEN, "***")


def rendered(error: GatewayError) -> tuple[int, dict, dict[str, str]]:
    response = error.response()
    body = json.loads(response.body)
    assert list(body) == ["error"]
    assert set(body["error"]) == ENVELOPE_FIELDS
    return response.status_code, body["error"], dict(response.headers)


def reply(status: int, body: bytes | dict, **headers: str) -> Reply:
    raw = json.dumps(body).encode() if isinstance(body, dict) else body
    return Reply(status, {k.replace("_", "-").lower(): v for k, v in headers.items()}, raw)


def test_the_envelope_has_exactly_the_four_openai_fields():
    error = GatewayError(400, "invalid_request", "prompt is required.", param="prompt")
    status, body, headers = rendered(error)
    assert status == 400
    assert body == {
        "message": "prompt is required.",
        "type": "invalid_request_error",
        "param": "prompt",
        "code": "invalid_request",
    }
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(error.response().body)


def test_param_and_code_may_be_null_but_are_always_present():
    status, body, _ = rendered(GatewayError(500, None, "boom"))
    assert status == 500
    assert body["param"] is None
    assert body["code"] is None
    assert body["type"] == "server_error"


@pytest.mark.parametrize(
    ("status", "type_"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "invalid_request_error"),
        (405, "invalid_request_error"),
        (413, "invalid_request_error"),
        (429, "rate_limit_error"),
        (502, "server_error"),
        (503, "server_error"),
        (504, "server_error"),
    ],
)
def test_the_type_follows_the_status(status, type_):
    assert rendered(GatewayError(status, "x", "m"))[1]["type"] == type_


def test_an_explicit_type_and_headers_are_kept():
    error = GatewayError(
        429, "concurrency_limit_exceeded", "full", type="custom", headers={"retry-after": "3"}
    )
    status, body, headers = rendered(error)
    assert (status, body["type"]) == (429, "custom")
    assert headers["retry-after"] == "3"


def test_helpers():
    status, body, _ = rendered(invalid_request("limit must be 1..100", "limit"))
    assert (status, body["code"], body["param"]) == (400, "invalid_request", "limit")

    status, body, _ = rendered(video_not_found())
    assert (status, body["code"], body["param"]) == (404, "video_not_found", None)

    status, body, headers = rendered(store_unavailable())
    assert (status, body["code"]) == (503, "store_unavailable")
    assert headers["retry-after"].isdigit()


@pytest.mark.parametrize(
    ("factory", "code"),
    [
        (concurrency_limit_exceeded, "concurrency_limit_exceeded"),
        (team_concurrency_limit_exceeded, "team_concurrency_limit_exceeded"),
        (queue_full, "queue_full"),
        (team_queue_full, "team_queue_full"),
    ],
)
def test_not_now_refusals_are_429_with_both_retry_hints(factory, code):
    status, body, headers = rendered(factory(2.4))
    assert (status, body["code"], body["type"], body["param"]) == (
        429,
        code,
        "rate_limit_error",
        None,
    )
    # Whole seconds rounded up (never "retry now"), and the SDKs' millisecond hint.
    assert (headers["retry-after"], headers["retry-after-ms"]) == ("3", "2400")
    assert "x-should-retry" not in headers  # nothing was started: a retry is welcome
    assert body["message"].endswith(".")


def test_the_two_queue_refusals_say_which_queue_is_full():
    assert "team" not in queue_full(1).message.lower()
    assert "team" in team_queue_full(1).message.lower()


def test_queue_timeout_is_a_code_in_the_catalogue_not_an_answer():
    assert QUEUE_TIMEOUT == "queue_timeout"
    catalogue = errors.__doc__ or ""
    assert "QUEUE_TIMEOUT" in catalogue
    assert "quota.max_queue_s" in catalogue
    for code in ("queue_full(retry_s)", "team_queue_full(retry_s)"):
        assert code in catalogue


@pytest.mark.parametrize(
    ("factory", "code", "param"),
    [
        (model_not_allowed, "model_not_allowed", "model"),
        (size_not_allowed, "size_not_allowed", "size"),
        (seconds_not_allowed, "seconds_not_allowed", "seconds"),
    ],
)
def test_policy_refusals_are_400_naming_their_param(factory, code, param):
    status, body, headers = rendered(factory("Not for this team."))
    assert (status, body["code"], body["param"], body["type"]) == (
        400,
        code,
        param,
        "invalid_request_error",
    )
    assert body["message"] == "Not for this team."
    assert "x-should-retry" not in headers
    assert "retry-after" not in headers
    assert f"{code}(message)" in (errors.__doc__ or "")


def test_budget_exceeded_is_429_that_the_sdks_must_not_retry():
    status, body, headers = rendered(budget_exceeded("This job costs $0.40; ..."))
    assert (status, body["code"], body["type"], body["param"]) == (
        429,
        "budget_exceeded",
        "rate_limit_error",
        None,
    )
    assert headers["x-should-retry"] == "false"
    # Retrying at once would be refused again: no hint to come back in a few seconds.
    assert "retry-after" not in headers
    assert "retry-after-ms" not in headers
    assert body["message"] == "This job costs $0.40; ..."
    assert "budget_exceeded(message)" in (errors.__doc__ or "")


def test_video_not_found_never_says_whose_it_is():
    assert video_not_found().envelope() == video_not_found().envelope()
    assert "team" not in video_not_found().message.lower()


def test_upstream_errors_are_gateway_errors_in_the_envelope():
    error = UpstreamError(504, "upstream_timeout", "slow", maybe_sent=True)
    status, body, _ = rendered(error)
    assert (status, body["code"], body["type"]) == (504, "upstream_timeout", "upstream_error")
    assert error.maybe_sent is True


# -- upstream answers -----------------------------------------------------------------------


def test_upstream_4xx_keeps_status_code_param_type_and_message():
    upstream = {
        "error": {
            "message": "Invalid 'seconds': '7'.",
            "type": "invalid_request_error",
            "param": "seconds",
            "code": "invalid_value",
        }
    }
    status, body, _ = rendered(error_from_reply(reply(400, upstream), scrub))
    assert status == 400
    assert body == upstream["error"]


@pytest.mark.parametrize("status", [404, 409, 416, 422])
def test_every_upstream_4xx_status_is_kept(status):
    upstream = {"error": {"message": "m", "type": "t", "param": None, "code": "c"}}
    assert rendered(error_from_reply(reply(status, upstream), scrub))[0] == status


def test_upstream_4xx_not_in_the_envelope_is_rewrapped():
    status, body, _ = rendered(error_from_reply(reply(422, {"detail": "bad size"}), scrub))
    assert status == 422
    assert body["message"] == "bad size"
    assert body["code"] is None
    assert body["param"] is None

    status, body, _ = rendered(error_from_reply(reply(400, b"<html>Bad Request</html>"), scrub))
    assert status == 400
    assert "Bad Request" in body["message"]

    status, body, _ = rendered(error_from_reply(reply(400, b""), scrub))
    assert status == 400
    assert "400" in body["message"]


def test_upstream_4xx_with_odd_field_types_still_gives_a_valid_envelope():
    upstream = {"error": {"message": 12, "code": ["x"], "param": {"a": 1}, "type": None}}
    status, body, _ = rendered(error_from_reply(reply(400, upstream), scrub))
    assert status == 400
    assert isinstance(body["message"], str)
    assert body["message"]
    assert body["code"] is None
    assert body["param"] is None
    assert isinstance(body["type"], str)


def test_upstream_retry_after_is_kept():
    upstream = {"error": {"message": "slow down", "code": "rate_limit_exceeded"}}
    error = error_from_reply(reply(429, upstream, **{"retry-after": "7"}), scrub)
    assert rendered(error)[2]["retry-after"] == "7"


@pytest.mark.parametrize("status", [500, 502, 503, 504, 599])
def test_upstream_5xx_is_502_upstream_error(status):
    upstream = {"error": {"message": "internal", "code": "internal_error"}}
    got, body, _ = rendered(error_from_reply(reply(status, upstream), scrub))
    assert (got, body["code"]) == (502, "upstream_error")


@pytest.mark.parametrize("status", [401, 403])
def test_upstream_refusing_the_gateways_credentials_is_502_without_quoting_it(status):
    upstream = {"error": {"message": f"Incorrect API key provided: {TOKEN}", "code": "x"}}
    got, body, _ = rendered(error_from_reply(reply(status, upstream), scrub))
    assert (got, body["code"]) == (502, "upstream_error")
    assert TOKEN not in json.dumps(body)


def test_the_token_is_scrubbed_from_upstream_messages():
    upstream = {"error": {"message": f"key {TOKEN} has no access to sora-2-pro", "code": "c"}}
    _, body, _ = rendered(error_from_reply(reply(400, upstream), scrub))
    assert TOKEN not in body["message"]
    assert "***" in body["message"]
