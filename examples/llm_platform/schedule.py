"""A schedule node's settings as a cron expression and a time zone, and when it runs next.

The cron expression is as given, or from the visual form, the original's: ``frequency``
hourly/daily/weekly/monthly with a ``visual_config`` of ``on_minute`` (hourly, 0 if not
given), ``time`` such as "2:30 PM" (daily, weekly, monthly), ``weekdays`` such as
["mon", "fri"] (weekly) and ``monthly_days`` of 1..31 or "last" (monthly; "last" is the
month's last day, cron's ``L``). The time zone is an IANA name, UTC if not given. Anything
invalid gives None. Cron expressions are parsed by `cronsim`, as the original used a library.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

_WEEKDAYS = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
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


def time_zone(data: Mapping[str, Any]) -> str | None:
    """The schedule's time zone (UTC if not given), or None if it is not a known zone."""
    name = data.get("timezone") or "UTC"
    if not isinstance(name, str):
        return None
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):  # ValueError: not a zone key, e.g. a path
        return None
    return name


def next_run_at(cron: str, zone: str, after: datetime) -> datetime:
    """The first time strictly after ``after`` that ``cron`` matches on the clocks of
    ``zone``, in UTC: the original's ``next_run_at``."""
    local = after.astimezone(ZoneInfo(zone))
    return next(CronSim(cron, local)).astimezone(UTC)


def _valid_cron(expression: object) -> str | None:
    if not isinstance(expression, str):
        return None
    fields = expression.split()
    if len(fields) != 5:
        return None
    normalized = " ".join(fields)
    try:
        CronSim(normalized, datetime.now(UTC))  # parses it: a field out of range is refused
    except CronSimError:
        return None
    return normalized


def _hourly(config: Mapping[str, Any]) -> str:
    # No minute given is minute 0, as in the original.
    return f"{_bounded(config.get('on_minute', 0), 0, 59)} * * * *"


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
