"""The parsers for text from outside: bounded, and failing the way callers handle."""

from __future__ import annotations

import pytest

from gateway.parse import MAX_JSON_DEPTH, JsonTooDeep, loads_json, whole_number


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_json_nested_to_the_bound_is_parsed_and_past_it_refused() -> None:
    assert loads_json(nested(MAX_JSON_DEPTH)) is not None
    with pytest.raises(JsonTooDeep):
        loads_json(nested(MAX_JSON_DEPTH + 1))
    with pytest.raises(ValueError):  # noqa: PT011  what every caller already catches
        loads_json(nested(5000).encode())


def test_many_brackets_side_by_side_are_not_depth() -> None:
    wide = "[" + ",".join(["{}"] * (4 * MAX_JSON_DEPTH)) + "]"
    assert len(loads_json(wide)) == 4 * MAX_JSON_DEPTH
    assert loads_json(wide.encode()) == loads_json(wide)


@pytest.mark.parametrize(
    ("text", "number"),
    [("0", 0), ("20", 20), ("9" * 18, int("9" * 18)), ("9" * 19, None), ("1" * 5000, None),
     ("²", None), ("٣", None), ("", None), ("-1", None), ("1.0", None)],
)  # fmt: skip
def test_whole_number_takes_only_short_ascii_digits(text: str, number: int | None) -> None:
    assert whole_number(text) == number
