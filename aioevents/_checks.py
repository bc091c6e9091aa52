"""Checks of arguments at the public boundary: a clear error at once, naming what was wrong.

They take ``object`` on purpose: they guard against what the type hints promise but the caller
did not keep to (untyped code, data read from configuration). A wrong type is a `TypeError`; a
value of the right type out of its range is a `ConfigurationError` (also a `ValueError`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

from ._exceptions import ConfigurationError
from ._names import event_name, handler_name

__all__ = [
    "check_callable",
    "check_event_class",
    "check_event_type",
    "check_flag",
    "check_instance",
    "check_positive_int",
    "check_seconds",
    "check_subscription",
    "is_async_handler",
]

# Values of these types say nothing about what happened: an event is an instance of a class
# of the application's own (a dataclass, typically), whose name is the event's name.
_NOT_EVENT_TYPES = frozenset(
    {
        int, float, complex, bool, str, bytes, bytearray, memoryview,
        list, tuple, dict, set, frozenset, range, type(None),
    }
)  # fmt: skip


def check_event_type(event_type: object) -> None:
    """What may be subscribed to: a class that events can be instances of (``object`` too)."""
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
    check_event_class(event_type)


def check_event_class(event_type: type) -> None:
    """Refuse builtin scalars and containers as event types, and a bad ``__event_name__``.

    Checked when a type is subscribed to and when a route is first built for it, so that it
    costs nothing per emit.
    """
    if event_type in _NOT_EVENT_TYPES:
        raise TypeError(
            f"{event_type.__qualname__} is not an event type: define an event class, e.g. "
            f"@dataclass(frozen=True) class SomethingHappened: ..., and emit its instances"
        )
    event_name(event_type)  # a bad __event_name__ is found here, before any handler runs


def check_subscription(event_type: object, handler: object) -> None:
    """Refuse, with a message that says what to fix, what could never be dispatched."""
    check_event_type(event_type)
    check_callable("a handler", handler)
    call = getattr(type(handler), "__call__", None)  # noqa: B004  (the class's, as Python calls it)
    if any(
        inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f) for f in (handler, call)
    ):
        raise TypeError(
            f"handler {handler_name(handler)} is a generator function: calling it only makes "
            f"a generator, its body would never run; use a plain or async def function"
        )
    try:
        signature = inspect.signature(handler)  # type: ignore[arg-type]
    except (TypeError, ValueError):  # some builtins and C callables have no signature to read
        return
    try:
        signature.bind(object())
    except TypeError:
        raise TypeError(
            f"handler {handler_name(handler)}{signature} cannot take the event as its one "
            f"positional argument"
        ) from None


def is_async_handler(handler: Callable[..., object]) -> bool:
    """True for an ``async def`` function, a partial of one, or an object with one as __call__."""
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(type(handler), "__call__", None)  # noqa: B004  (the class's, not the object's)
    return not inspect.isroutine(handler) and inspect.iscoroutinefunction(call)


def check_instance(value: object, kind: type, message: str, *, none: bool = False) -> None:
    """Refuse a value that is not a ``kind`` (or None, where ``none`` allows it)."""
    if not isinstance(value, kind) and not (value is None and none):
        raise TypeError(f"{message}, got {value!r}")


def check_callable(what: str, value: object, *, none: bool = False) -> None:
    if value is None and none:
        return
    if not callable(value):
        alternative = " or None" if none else ""
        raise TypeError(f"{what} must be callable{alternative}, got {value!r}")


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {value!r}")


def check_seconds(name: str, value: object, *, zero: bool = False, none: bool = False) -> None:
    """A duration: a number > 0 (>= 0 with ``zero``), or None where ``none`` allows it."""
    if value is None and none:
        return
    if not isinstance(value, int | float) or isinstance(value, bool):
        alternative = " or None" if none else ""
        raise TypeError(f"{name} must be a number of seconds{alternative}, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        bound = ">= 0" if zero else "> 0"
        raise ConfigurationError(f"{name} must be a number of seconds {bound}, got {value!r}")


def check_positive_int(name: str, value: object, *, none: bool = False) -> None:
    if value is None and none:
        return
    if type(value) is not int:
        alternative = " or None" if none else ""
        raise TypeError(f"{name} must be an int{alternative}, got {value!r}")
    if value < 1:
        raise ConfigurationError(f"{name} must be an int >= 1, got {value!r}")
