"""A schedule node's settings as cron: given, or from the visual form."""

from __future__ import annotations

from typing import Any

import pytest

from examples.llm_platform.schedule import cron_expression


@pytest.mark.parametrize(
    ("data", "cron"),
    [
        ({"mode": "cron", "cron_expression": "0  9 * * 1-5"}, "0 9 * * 1-5"),
        ({"frequency": "hourly", "visual_config": {"on_minute": 7}}, "7 * * * *"),
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
