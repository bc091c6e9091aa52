"""Router: handlers grouped in a module, wired into a bus in one visible place.

The original registered handlers as a side effect of importing their modules, and a missed
import silently disabled them. A router only records; nothing is subscribed until the
application calls ``bus.include(router)``, and the bus can then list what it has.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ._checks import check_subscription
from ._decorators import HandlerDecorators
from ._exceptions import SubscriptionError
from ._policies import BatchPolicy, Durable, Options, Retry, durable_policy

__all__ = ["Router", "RouterEntry"]

E = TypeVar("E")


@dataclass(frozen=True, slots=True)
class RouterEntry:
    """One recorded handler: what `EventBus.include` subscribes."""

    event_type: type
    handler: Callable[[Any], object]
    options: Options


class Router(HandlerDecorators):
    """Records handlers for later inclusion into a bus with `EventBus.include`.

    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Pinged: ...
    >>> router = Router()
    >>> @router.on(Pinged)
    ... async def on_ping(event: Pinged) -> None: ...
    >>> from aioevents import EventBus
    >>> bus = EventBus()
    >>> [sub.name for sub in bus.include(router)]
    ['aioevents._router.on_ping']
    """

    def __init__(self, *routers: Router) -> None:
        self._entries: list[RouterEntry] = []
        self._included_in: weakref.WeakSet[Any] = weakref.WeakSet()  # the buses
        for router in routers:
            self.add_router(router)

    def __repr__(self) -> str:
        return f"<Router handlers={len(self._entries)}>"

    def __len__(self) -> int:
        return len(self._entries)

    def add(
        self,
        event_type: type[E],
        handler: Callable[[E], object],
        *,
        timeout: float | None = None,
        once: bool = False,
        retry: Retry | None = None,
        name: str | None = None,
        durable: bool | Durable = False,
    ) -> None:
        """Record ``handler`` for ``event_type``, checked now as `EventBus.subscribe` would."""
        durability = durable_policy(durable)
        options = Options(timeout=timeout, once=once, retry=retry, name=name, durable=durability)
        self._add(event_type, handler, options)

    def add_batch(
        self,
        event_type: type[E],
        handler: Callable[[Sequence[E]], object],
        *,
        max_size: int = 100,
        max_wait: float = 1.0,
        timeout: float | None = None,
        retry: Retry | None = None,
        name: str | None = None,
    ) -> None:
        """Record a batch handler, as `EventBus.subscribe_batch` would subscribe it."""
        batch = BatchPolicy(max_size, max_wait)
        self._add(
            event_type, handler, Options(timeout=timeout, retry=retry, batch=batch, name=name)
        )

    def _add(
        self, event_type: type[Any], handler: Callable[[Any], object], options: Options
    ) -> None:
        check_subscription(event_type, handler)
        self._entries.append(RouterEntry(event_type, handler, options))

    def add_router(self, router: Router) -> None:
        """Record every handler of another router after this one's."""
        _require_router(router, "add_router()")
        self._entries.extend(router._entries)

    def entries_for(self, bus: object) -> tuple[RouterEntry, ...]:
        """What ``bus`` is to subscribe; refused when it has included this router already."""
        if bus in self._included_in:
            raise SubscriptionError(
                f"{self!r} is already included in {bus!r}; including it again would run "
                f"each of its handlers twice per event"
            )
        self._included_in.add(bus)
        return tuple(self._entries)


def _require_router(value: object, what: str) -> None:
    if not isinstance(value, Router):
        raise TypeError(f"{what} takes a Router, got {value!r}")
