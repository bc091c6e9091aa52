"""A schedule node's settings as cron: given, or from the visual form."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from examples.llm_platform.schedule import cron_expression, next_run_at, time_zone


@pytest.mark.parametrize(
    ("data", "cron"),
    [
        ({"mode": "cron", "cron_expression": "0  9 * * 1-5"}, "0 9 * * 1-5"),
        ({"frequency": "hourly", "visual_config": {"on_minute": 7}}, "7 * * * *"),
        ({"frequency": "hourly", "visual_config": {}}, "0 * * * *"),  # as the original
        ({"frequency": "daily", "visual_config": {"time": "12:05 AM"}}, "5 0 * * *"),
        ({"frequency": "daily", "visual_config": {"time": "12:30 PM"}}, "30 12 * * *"),
        (
            {
                "frequency": "weekly",
                "visual_config": {"time": "8:00 AM", "weekdays": ["fri", "mon"]},
            },
            "0 8 * * 1,5",
        ),
        (
            {
                "frequency": "monthly",
                "visual_config": {"time": "6:00 PM", "monthly_days": ["last", 1]},
            },
            "0 18 1,L * *",
        ),
    ],
)
def test_schedules_convert_to_cron(data: dict[str, Any], cron: str) -> None:
    assert cron_expression({"mode": "visual", **data}) == cron


@pytest.mark.parametrize(
    "data",
    [
        {"mode": "cron", "cron_expression": "0 9 * *"},
        {"mode": "cron", "cron_expression": None},
        {"mode": "cron", "cron_expression": "99 * * * *"},
        {"mode": "cron", "cron_expression": "0 0 31 2 *"},  # February has no 31st
        {"mode": "visual", "frequency": "hourly", "visual_config": {"on_minute": 60}},
        {"mode": "visual", "frequency": "daily", "visual_config": {"time": "25:00"}},
        {
            "mode": "visual",
            "frequency": "weekly",
            "visual_config": {"time": "8:00 AM", "weekdays": []},
        },
        {
            "mode": "visual",
            "frequency": "weekly",
            "visual_config": {"time": "8:00 AM", "weekdays": ["someday"]},
        },
        {
            "mode": "visual",
            "frequency": "monthly",
            "visual_config": {"time": "8:00 AM", "monthly_days": [32]},
        },
        {"mode": "visual", "frequency": "yearly", "visual_config": {}},
        {"mode": "visual"},
    ],
)
def test_invalid_schedules_give_none(data: dict[str, Any]) -> None:
    assert cron_expression(data) is None


@pytest.mark.parametrize(
    ("cron", "zone", "after", "expected"),
    [
        # 9:15 in Paris is 8:15 UTC in winter, 7:15 UTC in summer
        ("15 9 * * *", "Europe/Paris", datetime(2026, 1, 10, 12, 0, tzinfo=UTC),
         datetime(2026, 1, 11, 8, 15, tzinfo=UTC)),
        ("15 9 * * *", "Europe/Paris", datetime(2026, 7, 10, 7, 0, tzinfo=UTC),
         datetime(2026, 7, 10, 7, 15, tzinfo=UTC)),
        ("15 9 * * *", "UTC", datetime(2026, 7, 10, 9, 15, tzinfo=UTC),
         datetime(2026, 7, 11, 9, 15, tzinfo=UTC)),  # strictly after
        ("45 23 15,L * *", "UTC", datetime(2026, 2, 16, tzinfo=UTC),
         datetime(2026, 2, 28, 23, 45, tzinfo=UTC)),
        ("0 9 * * 1", "America/New_York", datetime(2026, 3, 7, tzinfo=UTC),
         datetime(2026, 3, 9, 13, 0, tzinfo=UTC)),  # the Monday after the switch to EDT
    ],
)  # fmt: skip
def test_the_next_run_is_the_next_cron_time_in_the_plans_zone_given_in_utc(
    cron: str, zone: str, after: datetime, expected: datetime
) -> None:
    next_run = next_run_at(cron, zone, after)

    assert next_run == expected
    assert next_run.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize(
    ("data", "zone"),
    [
        ({}, "UTC"),
        ({"timezone": ""}, "UTC"),
        ({"timezone": "Asia/Tokyo"}, "Asia/Tokyo"),
        ({"timezone": "Mars/Olympus_Mons"}, None),
        ({"timezone": "../../etc/passwd"}, None),
        ({"timezone": 5}, None),
    ],
)
def test_a_schedules_time_zone_is_utc_by_default_and_none_if_unknown(
    data: dict[str, Any], zone: str | None
) -> None:
    assert time_zone(data) == zone
