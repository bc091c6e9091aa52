"""Who is subscribed to what, and the handler list each concrete event type resolves to.

Subscriptions are kept per event type in subscription order. An emit needs, for the concrete
type of its event, every subscription made to that type or to any class in its MRO, in
subscription order: that list is computed once per type and cached until the next change.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable

from ._checks import check_event_class
from ._result import EmitResult
from ._subscription import Subscription

__all__ = ["Registry", "Route"]


class Route:
    """The dispatch plan for one concrete event type, cached by the registry."""

    __slots__ = (
        "batches",
        "durable",
        "handlers",
        "needs_preparation",
        "ok_result",
        "subscriptions",
        "volatile",
    )

    def __init__(
        self, subscriptions: tuple[Subscription, ...], *, observed: bool, batching: bool
    ) -> None:
        # While the bus runs, batch handlers collect events; otherwise an emit hands each
        # of them a batch of one and waits for it like for any handler: none is skipped.
        if batching:
            self.subscriptions = tuple(sub for sub in subscriptions if sub.batch is None)
            self.batches = tuple(sub for sub in subscriptions if sub.batch is not None)
        else:
            self.subscriptions = tuple(map(_one_event_batch, subscriptions))
            self.batches = ()
        self.handlers = tuple(sub.name for sub in self.subscriptions)
        # For an event recorded with an outbox: the durable handlers get stored deliveries,
        # the others (volatile) run after commit, in memory.
        self.durable = tuple(sub for sub in self.subscriptions if sub.durable is not None)
        self.volatile = tuple(sub for sub in self.subscriptions if sub.durable is None)
        # Shared by every emit of this type that has no failure: immutable, so safe to reuse.
        self.ok_result = EmitResult(self.handlers)
        # One flag keeps the hot path to a single check for the rare cases.
        once = any(sub.once for sub in subscriptions)
        self.needs_preparation = observed or once or bool(self.batches)


def _one_event_batch(sub: Subscription) -> Subscription:
    if sub.batch is None:
        return sub
    batch_invoke = sub.invoke  # with the batch handler's thread offload, timeout and retry

    async def deliver_one(event: object) -> None:
        await batch_invoke([event])

    return Subscription(
        event_type=sub.event_type,
        handler=deliver_one,
        name=sub.name,
        order=sub.order,
        owner=sub.owner,
        origin=sub,
        invoke=deliver_one,
    )


class Registry:
    """Subscriptions of one bus and the routes resolved from them."""

    def __init__(self) -> None:
        self._by_type: dict[type, list[Subscription]] = {}
        self._order = itertools.count()
        self._muted: set[Subscription] = set()
        self.observed = False
        self.batching = False
        self.version = 0  # counts changes of who is subscribed: caches of it compare this
        # Read directly by the bus's hot path; changed in place so that reference stays valid.
        self.routes: dict[type, Route] = {}
        # For each class, the cached concrete types whose MRO holds it: a change to the
        # subscriptions of one class drops only the routes it is part of.
        self._dependents: dict[type, set[type]] = {}

    def next_order(self) -> int:
        """The position of the next subscription: dispatch order follows it."""
        return next(self._order)

    def add(self, sub: Subscription) -> None:
        self.version += 1
        self._by_type.setdefault(sub.event_type, []).append(sub)
        self._invalidate(sub.event_type)

    def remove(self, sub: Subscription) -> bool:
        subs = self._by_type.get(sub.event_type, [])
        if sub not in subs:
            return False
        subs.remove(sub)
        self.version += 1
        if not subs:
            del self._by_type[sub.event_type]
        self._muted.discard(sub)
        self._invalidate(sub.event_type)
        return True

    def __contains__(self, sub: Subscription) -> bool:
        return sub in self._by_type.get(sub.event_type, ())

    def set_muted(self, subs: Iterable[Subscription], muted: bool) -> None:
        subs = tuple(subs)
        if muted:
            self._muted.update(subs)
        else:
            self._muted.difference_update(subs)
        for sub in subs:
            self._invalidate(sub.event_type)

    def set_observed(self, observed: bool) -> None:
        self.observed = observed
        self._invalidate_all()

    def set_batching(self, batching: bool) -> None:
        self.batching = batching
        self._invalidate_all()

    def all(self) -> tuple[Subscription, ...]:
        """Every subscription, in subscription order."""
        return tuple(sorted(itertools.chain(*self._by_type.values()), key=_order_key))

    def matching(self, event_type: type) -> tuple[Subscription, ...]:
        """What an event of exactly ``event_type`` dispatches to, muted handlers included."""
        subs = itertools.chain(*(self._by_type.get(cls, ()) for cls in event_type.__mro__))
        return tuple(sorted(subs, key=_order_key))

    def route(self, event_type: type) -> Route:
        """Resolve and cache the route of a concrete type; refuse a type that is no event's."""
        check_event_class(event_type)
        subs = tuple(sub for sub in self.matching(event_type) if sub not in self._muted)
        route = Route(subs, observed=self.observed, batching=self.batching)
        self.routes[event_type] = route
        for cls in event_type.__mro__:
            self._dependents.setdefault(cls, set()).add(event_type)
        return route

    def _invalidate(self, changed: type) -> None:
        # A type in the set may have been dropped already through another base: harmless.
        for event_type in self._dependents.pop(changed, ()):
            self.routes.pop(event_type, None)

    def _invalidate_all(self) -> None:
        self.routes.clear()
        self._dependents.clear()


def _order_key(sub: Subscription) -> int:
    return sub.order
