"""Helpers for testing code that emits events or subscribes handlers.

`capture` records what a bus emits within a block and asserts on it; `muted` runs a bus with
some of its handlers switched off, for a test that wants the emitter without their effects.

`TransportConformance` is the test kit every stream transport runs (see `aioevents.streams`):
a pytest test class to subclass with a factory of the transport under test, which inherits
tests of publishing, consumer groups, retries, reclaiming, dead letters, retention and per-key
order. It needs pytest and msgspec (the extra ``streams``), so it is imported only when asked
for (``from aioevents.testing import TransportConformance``): this module needs neither.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any, TypeVar, overload

from ._bus import EventBus
from ._checks import check_instance
from ._exceptions import SubscriptionError
from ._subscription import Subscription

if TYPE_CHECKING:
    from ._streams_kit import TransportConformance as TransportConformance

# TransportConformance is left out of __all__: a star import must not pull in pytest.
__all__ = ["CapturedEvents", "capture", "muted"]

E = TypeVar("E")
_MISSING = object()


class CapturedEvents(Sequence[object]):
    """The events a bus emitted within `capture`, in emit order."""

    def __init__(self) -> None:
        self._events: list[object] = []

    def _record(self, event: object) -> None:
        self._events.append(event)

    @overload
    def __getitem__(self, index: int) -> object: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[object]: ...
    def __getitem__(self, index: int | slice) -> object | Sequence[object]:
        return self._events[index]

    def __len__(self) -> int:
        return len(self._events)

    def __repr__(self) -> str:
        return f"CapturedEvents({self._events!r})"

    def of_type(self, event_type: type[E]) -> list[E]:
        """The captured events that are instances of ``event_type`` (subclasses included)."""
        return [event for event in self._events if isinstance(event, event_type)]

    def assert_emitted(self, event_type: type[E], *, count: int | None = None, **fields: Any) -> E:
        """Assert an ``event_type`` event with these field values was emitted; return the last.

        With ``count``, assert exactly that many such events were emitted.
        """
        matches: list[E] = [e for e in self.of_type(event_type) if _has_fields(e, fields)]
        wanted = f"{event_type.__qualname__} event" + (f" with {fields}" if fields else "")
        if count is not None and len(matches) != count:
            raise AssertionError(f"expected {count} {wanted}, got {len(matches)}: {self._events!r}")
        if not matches:
            raise AssertionError(f"expected a {wanted}, got {self._events!r}")
        return matches[-1]

    def assert_not_emitted(self, event_type: type[object], **fields: Any) -> None:
        """Assert no ``event_type`` event (with these field values, if given) was emitted."""
        matches = [e for e in self.of_type(event_type) if _has_fields(e, fields)]
        if matches:
            raise AssertionError(f"expected no {event_type.__qualname__} event, got {matches!r}")


def _has_fields(event: object, fields: dict[str, Any]) -> bool:
    return all(getattr(event, name, _MISSING) == value for name, value in fields.items())


def capture(bus: EventBus) -> AbstractContextManager[CapturedEvents]:
    """Record every event emitted on ``bus`` within the block; handlers still run.

    >>> import anyio
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Pinged:
    ...     number: int
    >>> bus = EventBus()
    >>> with capture(bus) as events:
    ...     _ = anyio.run(bus.emit, Pinged(42))
    >>> events.assert_emitted(Pinged)
    Pinged(number=42)
    """
    check_instance(bus, EventBus, "capture() takes an EventBus")  # now, not in the block
    return _capture(bus)


@contextmanager
def _capture(bus: EventBus) -> Iterator[CapturedEvents]:
    captured = CapturedEvents()
    bus._add_tap(captured._record)
    try:
        yield captured
    finally:
        bus._remove_tap(captured._record)


def muted(
    bus: EventBus, *handlers: Subscription | Callable[..., object]
) -> AbstractContextManager[None]:
    """Within the block, the given handlers (functions or subscriptions) do not run.

    A function mutes every subscription of it on ``bus``. Naming a handler that is not
    subscribed raises `SubscriptionError`: a typo must not pass as a muted handler.
    """
    check_instance(bus, EventBus, "muted() takes an EventBus")
    for handler in handlers:
        if not isinstance(handler, Subscription) and not callable(handler):
            raise TypeError(f"muted() takes handlers or subscriptions, got {handler!r}")
    return _muted(bus, handlers)


@contextmanager
def _muted(
    bus: EventBus, handlers: tuple[Subscription | Callable[..., object], ...]
) -> Iterator[None]:
    subs = [sub for handler in handlers for sub in _subscriptions_of(bus, handler)]
    bus._set_muted(subs, True)
    try:
        yield
    finally:
        bus._set_muted(subs, False)


def _subscriptions_of(
    bus: EventBus, handler: Subscription | Callable[..., object]
) -> list[Subscription]:
    if isinstance(handler, Subscription):
        return [handler]
    subs = [sub for sub in bus.subscriptions if sub.handler == handler]
    if not subs:
        raise SubscriptionError(f"{handler!r} is not subscribed on {bus!r}")
    return subs


def __getattr__(name: str) -> Any:
    """`TransportConformance`, imported on first access (it needs pytest and msgspec)."""
    if name == "TransportConformance":
        from ._streams_kit import TransportConformance

        return TransportConformance
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), "TransportConformance"])
