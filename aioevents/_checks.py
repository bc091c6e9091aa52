"""Checks of arguments at the public boundary: a clear error at once, naming what was wrong.

They take ``object`` on purpose: they guard against what the type hints promise but the caller
did not keep to (untyped code, data read from configuration).
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from ._exceptions import ConfigurationError

__all__ = ["check_event_type", "check_flag", "check_positive_int", "check_seconds"]


def check_event_type(event_type: object) -> None:
    if not isinstance(event_type, type) or event_type is Any:
        hint = (
            " (did you write @bus.on instead of @bus.on(EventType)?)"
            if inspect.isroutine(event_type)
            else ""
        )
        raise TypeError(f"an event type must be a class, got {event_type!r}{hint}")
    if getattr(event_type, "_is_protocol", False):
        # Dispatch follows the MRO; a Protocol is never in an event's MRO, so it would
        # silently receive nothing.
        raise TypeError(
            f"{event_type.__qualname__} is a Protocol, which no event has in its MRO; "
            f"subscribe to a base class of the events instead"
        )


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_seconds(name: str, value: object, *, zero: bool = False, none: bool = False) -> None:
    """A duration: a number > 0 (>= 0 with ``zero``), or None where ``none`` allows it."""
    if value is None and none:
        return
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not number or not math.isfinite(value) or value < 0 or (value == 0 and not zero):  # type: ignore[arg-type,operator]
        bound = ">= 0" if zero else "> 0"
        alternative = " or None" if none else ""
        raise ConfigurationError(
            f"{name} must be a number of seconds {bound}{alternative}, got {value!r}"
        )


def check_positive_int(name: str, value: object, *, none: bool = False) -> None:
    if value is None and none:
        return
    if type(value) is not int or value < 1:
        alternative = " or None" if none else ""
        raise ConfigurationError(f"{name} must be an int >= 1{alternative}, got {value!r}")
