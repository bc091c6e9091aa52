"""A schedule node's settings as a cron expression: as given, or from the visual form.

The visual form is the original's: ``frequency`` hourly/daily/weekly/monthly with a
``visual_config`` of ``on_minute`` (hourly), ``time`` such as "2:30 PM" (daily, weekly,
monthly), ``weekdays`` such as ["mon", "fri"] (weekly) and ``monthly_days`` of 1..31 or
"last" (monthly; "last" is the month's last day, cron's ``L``). Anything invalid gives None.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
_CRON_FIELD = re.compile(r"^[0-9A-Za-z*/,\-?#]+$")
_TIME = re.compile(r"^(\d{1,2}):(\d{2})\s*(AM|PM)$", re.IGNORECASE)


def cron_expression(data: Mapping[str, Any]) -> str | None:
    """The cron expression a schedule node's ``data`` describes, or None if it is invalid."""
    if data.get("mode") == "cron":
        return _valid_cron(data.get("cron_expression"))
    config = data.get("visual_config")
    if data.get("mode", "visual") != "visual" or not isinstance(config, Mapping):
        return None
    try:
        return _VISUAL[str(data.get("frequency"))](config)
    except (KeyError, TypeError, ValueError):
        return None


def _valid_cron(expression: object) -> str | None:
    if not isinstance(expression, str):
        return None
    fields = expression.split()
    if len(fields) != 5 or not all(_CRON_FIELD.match(field) for field in fields):
        return None
    return " ".join(fields)


def _hourly(config: Mapping[str, Any]) -> str:
    return f"{_bounded(config['on_minute'], 0, 59)} * * * *"


def _daily(config: Mapping[str, Any]) -> str:
    hour, minute = _time(config["time"])
    return f"{minute} {hour} * * *"


def _weekly(config: Mapping[str, Any]) -> str:
    hour, minute = _time(config["time"])
    days = sorted({_WEEKDAYS[str(day).lower()[:3]] for day in config["weekdays"]})
    if not days:
        raise ValueError("no weekday")
    return f"{minute} {hour} * * {','.join(map(str, days))}"


def _monthly(config: Mapping[str, Any]) -> str:
    hour, minute = _time(config["time"])
    days = {"L" if day == "last" else str(_bounded(day, 1, 31)) for day in config["monthly_days"]}
    if not days:
        raise ValueError("no day of the month")
    ordered = sorted(days, key=lambda day: 32 if day == "L" else int(day))
    return f"{minute} {hour} {','.join(ordered)} * *"


def _time(value: object) -> tuple[int, int]:
    match = _TIME.match(str(value).strip())
    if match is None:
        raise ValueError(f"not a time like '2:30 PM': {value!r}")
    hour, minute = _bounded(match[1], 1, 12) % 12, _bounded(match[2], 0, 59)
    return (hour + 12 if match[3].upper() == "PM" else hour), minute


def _bounded(value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise TypeError(f"not a number: {value!r}")
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"{number} is not within {low}..{high}")
    return number


_VISUAL = {"hourly": _hourly, "daily": _daily, "weekly": _weekly, "monthly": _monthly}
