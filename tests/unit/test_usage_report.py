"""The usage report's pure parts: a day hash parsed, the range, the budget, JSON and CSV."""

from __future__ import annotations

import csv
import io
from datetime import UTC, date, datetime

import pytest

from gateway.errors import GatewayError
from gateway.usage_report import (
    CSV_HEADER,
    Current,
    DayUsage,
    TeamUsage,
    budget_report,
    csv_text,
    dates,
    parse_day,
    parse_range,
    team_report,
    today_utc,
    usd_text,
)

TODAY = date(2026, 12, 15)
# Two sora-2 jobs (4 s completed at $0.10/s, one failed), one sora-2-pro job of 8 s at $0.30/s.
DAY_FIELDS = {
    "spent": "2800000",
    "reserved": "400000",
    "sora-2|seconds": "4",
    "sora-2|cost": "400000",
    "sora-2|jobs|completed": "1",
    "sora-2|jobs|failed": "1",
    "sora-2-pro|seconds": "8",
    "sora-2-pro|cost": "2400000",
    "sora-2-pro|jobs|completed": "1",
    "something|else|entirely|here": "9",  # not a field of the format: ignored
}


def test_a_day_hash_is_parsed_by_model_and_outcome():
    day = parse_day("2026-12-01", DAY_FIELDS)
    assert (day.spent_micro, day.reserved_micro) == (2_800_000, 400_000)
    assert set(day.models) == {"sora-2", "sora-2-pro"}
    assert day.models["sora-2"].jobs == {"completed": 1, "failed": 1}
    assert day.models["sora-2-pro"].cost_micro == 2_400_000
    assert day.jobs == {"completed": 2, "failed": 1}
    assert day.video_seconds == 12


def test_bytes_and_float_text_from_the_store_are_read():
    day = parse_day("2026-12-01", {b"spent": b"5", b"m|seconds": b"2.0", b"m|jobs|failed": b"x"})
    assert day.spent_micro == 5
    assert day.models["m"].seconds == 2
    assert day.models["m"].jobs == {"failed": 0}  # an unreadable count is no job


def test_an_empty_day_is_zeros():
    day = parse_day("2026-12-02", {})
    assert (day.spent_micro, day.jobs, day.video_seconds, day.models) == (0, {}, 0, {})


# -- the range ------------------------------------------------------------------------------


def test_the_default_range_is_the_current_month_so_far():
    assert parse_range(None, None, TODAY) == (date(2026, 12, 1), TODAY)


def test_an_end_alone_starts_at_the_first_of_its_month():
    assert parse_range(None, "2026-02-10", TODAY) == (date(2026, 2, 1), date(2026, 2, 10))


def test_a_start_alone_ends_today():
    assert parse_range("2026-11-20", None, TODAY) == (date(2026, 11, 20), TODAY)


@pytest.mark.parametrize(
    ("start", "end", "param"),
    [
        ("2026-13-01", None, "start"),
        ("2026-02-30", None, "start"),
        ("20261201", None, "start"),  # fromisoformat would take it
        ("2026-W49-1", None, "start"),
        (None, "yesterday", "end"),
        (None, "2026-12-1", "end"),
        ("2026-12-16", None, "start"),  # after today, the default end
        ("2026-12-10", "2026-12-09", "start"),
        ("2025-12-13", "2026-12-14", "start"),  # 367 days, inclusive
    ],
)
def test_a_bad_range_is_400_naming_the_param(start, end, param):
    with pytest.raises(GatewayError) as caught:
        parse_range(start, end, TODAY)
    assert (caught.value.status, caught.value.code, caught.value.param) == (
        400,
        "invalid_request",
        param,
    )


def test_366_days_is_allowed():
    first, last = parse_range("2025-12-15", "2026-12-15", TODAY)
    assert len(dates(first, last)) == 366


def test_dates_cover_the_range_inclusively_across_a_leap_day():
    assert dates(date(2028, 2, 28), date(2028, 3, 1)) == ["2028-02-28", "2028-02-29", "2028-03-01"]


def test_today_is_the_utc_date():
    late = datetime(2026, 12, 31, 23, 59, 59, tzinfo=UTC).timestamp()
    assert today_utc(late) == date(2026, 12, 31)
    assert today_utc(late + 1) == date(2027, 1, 1)


# -- the budget -----------------------------------------------------------------------------


def midnight(day: date) -> int:
    return int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp())


def test_no_budget_is_null():
    assert budget_report((None, None), Current(1, 2, 3, 4), TODAY) is None


def test_a_daily_budget_resets_at_the_next_utc_midnight():
    budget = budget_report((2.0, None), Current(1_200_000, 400_000, 9_000_000, 0), TODAY)
    assert budget == {
        "period": "day",
        "limit_usd": 2.0,
        "spent_usd": 1.2,
        "reserved_usd": 0.4,
        "resets_at": midnight(date(2026, 12, 16)),
    }


def test_a_monthly_budget_resets_on_the_first_of_next_month_even_in_december():
    budget = budget_report((None, 100.0), Current(0, 0, 5_000_000, 1_000_000), TODAY)
    assert budget is not None
    assert budget["period"] == "month"
    assert (budget["spent_usd"], budget["reserved_usd"]) == (5.0, 1.0)
    assert budget["resets_at"] == midnight(date(2027, 1, 1))


def test_with_both_the_one_with_less_remaining_is_shown():
    # The day has $1.50 left of $2; the month $0.50 of $50 (spent over earlier days).
    current = Current(400_000, 100_000, 49_000_000, 500_000)
    assert budget_report((2.0, 50.0), current, TODAY)["period"] == "month"  # type: ignore[index]
    # Early in the month the day is the tighter one.
    current = Current(1_900_000, 0, 1_900_000, 0)
    assert budget_report((2.0, 50.0), current, TODAY)["period"] == "day"  # type: ignore[index]


# -- the reports ----------------------------------------------------------------------------


def usage(team: str = "marketing") -> TeamUsage:
    days = [
        parse_day("2026-12-01", DAY_FIELDS),
        DayUsage("2026-12-02"),
        parse_day("2026-12-03", {"spent": "1", "sora-2|cost": "1", "sora-2|jobs|vanished": "1"}),
    ]
    return TeamUsage(team, days, Current(1, 0, 2_800_001, 400_000))


def test_the_team_report_has_every_day_and_exact_totals():
    report = team_report(usage(), date(2026, 12, 1), date(2026, 12, 3), (None, None), TODAY)
    assert report["object"] == "usage"
    assert (report["team"], report["start"], report["end"]) == (
        "marketing",
        "2026-12-01",
        "2026-12-03",
    )
    assert report["days"] == [
        {
            "date": "2026-12-01",
            "jobs": {"completed": 2, "failed": 1},
            "video_seconds": 12,
            "cost_usd": 2.8,
        },
        {"date": "2026-12-02", "jobs": {}, "video_seconds": 0, "cost_usd": 0.0},
        {"date": "2026-12-03", "jobs": {"vanished": 1}, "video_seconds": 0, "cost_usd": 0.000001},
    ]
    assert report["total"] == {"jobs": 4, "video_seconds": 12, "cost_usd": 2.800001}
    assert report["budget"] is None


def test_the_team_report_carries_its_budget():
    report = team_report(usage(), date(2026, 12, 1), date(2026, 12, 3), (None, 10.0), TODAY)
    assert report["budget"]["period"] == "month"
    assert report["budget"]["spent_usd"] == 2.800001


def test_usd_text_is_exact():
    assert [usd_text(n) for n in (0, 1, 400_000, 12_345_678_901, -5)] == [
        "0.000000",
        "0.000001",
        "0.400000",
        "12345.678901",
        "-0.000005",
    ]


def test_the_csv_has_one_row_per_date_team_and_model_with_usage():
    text = csv_text([usage("research"), usage("marketing")])
    assert text.startswith(",".join(CSV_HEADER) + "\r\n")
    rows = list(csv.DictReader(io.StringIO(text)))
    keys = [(row["date"], row["team"], row["model"]) for row in rows]
    assert keys == [
        ("2026-12-01", "marketing", "sora-2"),
        ("2026-12-01", "marketing", "sora-2-pro"),
        ("2026-12-01", "research", "sora-2"),
        ("2026-12-01", "research", "sora-2-pro"),
        ("2026-12-03", "marketing", "sora-2"),
        ("2026-12-03", "research", "sora-2"),
    ]
    first = rows[0]
    assert (first["jobs"], first["video_seconds"], first["cost_usd"]) == ("2", "4", "0.400000")
    assert rows[-1]["cost_usd"] == "0.000001"


def test_an_empty_csv_is_its_header():
    assert csv_text([TeamUsage("a", [DayUsage("2026-12-01")], Current())]) == (
        "date,team,model,jobs,video_seconds,cost_usd\r\n"
    )
