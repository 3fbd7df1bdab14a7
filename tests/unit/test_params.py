"""CONTRACT §9's syntax of `size` and `seconds`, and a model name's, as `check_job_params`
enforces them."""

from __future__ import annotations

import pytest

from gateway.errors import GatewayError
from gateway.params import check_job_params


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"prompt": "only a prompt"},
        {"size": "1280x720"},
        {"size": "99x99999"},
        {"size": "99999x10"},
        {"seconds": "4"},
        {"seconds": "1"},
        {"seconds": "600"},
        {"seconds": 12},
        {"size": "720x1280", "seconds": "8"},
        {"model": "sora-2"},
        {"model": "sora-2-pro-2025-10-06"},
        {"model": "org/sora-2:latest"},
        {"model": "m" * 128},
    ],
)
def test_well_formed_or_absent_fields_pass(fields):
    check_job_params(fields)


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"size": "10x10x"}, "size"),
        ({"size": "1x10"}, "size"),
        ({"size": "123456x10"}, "size"),
        ({"size": "1280X720"}, "size"),
        ({"size": "1280x720\n"}, "size"),
        ({"size": " 1280x720"}, "size"),
        ({"size": "١٢٨٠x720"}, "size"),  # noqa: RUF001  digits, but not ASCII ones
        ({"size": ""}, "size"),
        ({"size": None}, "size"),
        ({"size": 1280}, "size"),
        ({"size": ["1280x720"]}, "size"),
        ({"seconds": "0"}, "seconds"),
        ({"seconds": "601"}, "seconds"),
        ({"seconds": "4.0"}, "seconds"),
        ({"seconds": "-4"}, "seconds"),
        ({"seconds": "4 "}, "seconds"),
        ({"seconds": "٤"}, "seconds"),
        ({"seconds": ""}, "seconds"),
        ({"seconds": "1000"}, "seconds"),
        ({"seconds": 0}, "seconds"),
        ({"seconds": 601}, "seconds"),
        ({"seconds": 4.0}, "seconds"),
        ({"seconds": True}, "seconds"),
        ({"seconds": None}, "seconds"),
        ({"size": "1280x720", "seconds": "0"}, "seconds"),
        ({"model": "m" * 129}, "model"),
        ({"model": "m" * 1_000_000}, "model"),
        ({"model": ""}, "model"),
        ({"model": "-sora"}, "model"),
        ({"model": "sora 2"}, "model"),
        ({"model": "sora-2\n"}, "model"),
        ({"model": "sóra-2"}, "model"),
        ({"model": None}, "model"),
        ({"model": 2}, "model"),
        ({"model": ["sora-2"]}, "model"),
        ({"model": "sora-2", "size": "1x1"}, "size"),
    ],
)
def test_malformed_fields_are_invalid_request_naming_the_param(fields, param):
    with pytest.raises(GatewayError) as raised:
        check_job_params(fields)
    error = raised.value
    assert (error.status, error.code, error.param) == (400, "invalid_request", param)
    assert error.type == "invalid_request_error"
