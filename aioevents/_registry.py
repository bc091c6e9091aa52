"""Who is subscribed to what, and the handler list each concrete event type resolves to.

Subscriptions are kept per event type in subscription order. An emit needs, for the concrete
type of its event, every subscription made to that type or to any class in its MRO, in
subscription order: that list is computed once per type and cached until the next change.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ._background import BatchPolicy
from ._checks import check_event_type, check_flag, check_seconds
from ._dispatch import Invoke, make_invoke
from ._names import event_name
from ._result import EmitResult
from ._retry import Retry

__all__ = [
    "Options",
    "Registry",
    "Route",
    "Subscription",
    "check_subscription",
    "handler_name",
]

Handler = Callable[[Any], object]


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """How a handler is to be run; checked when made, so a router fails where it records."""

    timeout: float | None = None
    once: bool = False
    retry: Retry | None = None
    batch: BatchPolicy | None = None
    name: str | None = None  # the handler's qualified name unless given

    def __post_init__(self) -> None:
        check_seconds("timeout", self.timeout, none=True)
        check_flag("once", self.once)
        if self.retry is not None and not isinstance(self.retry, Retry):
            raise TypeError(f"retry must be a Retry(...), got {self.retry!r}")
        _check_name(self.name)


@dataclass(frozen=True, eq=False, slots=True)
class Subscription:
    """A handler subscribed to an event type on one bus; pass it to `EventBus.unsubscribe`.

    ``name`` is the handler's qualified name as it appears in logs and reports.
    """

    event_type: type
    handler: Handler
    name: str
    timeout: float | None = None
    once: bool = False
    is_async: bool = True
    retry: Retry | None = None
    batch: BatchPolicy | None = None
    order: int = field(default=0, repr=False)
    # The registry that made it: unsubscribing it from another bus is a mistake to report.
    owner: object = field(default=None, repr=False, compare=False)
    # For the stand-in that hands a batch handler a batch of one: the batch subscription.
    origin: Subscription | None = field(default=None, repr=False, compare=False)
    # The awaitable call that runs the handler: the handler itself, or a wrapper that adds
    # the thread offload and the timeout. Built once, at subscription.
    invoke: Invoke = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "invoke", make_invoke(self))


def _check_name(name: object) -> None:
    if name is not None and (not isinstance(name, str) or not name):
        raise TypeError(f"name must be a non-empty str, got {name!r}")


class Route:
    """The dispatch plan for one concrete event type, cached by the registry."""

    __slots__ = ("batches", "handlers", "needs_preparation", "ok_result", "subscriptions")

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
        sub.event_type, deliver_one, sub.name, order=sub.order, owner=sub.owner, origin=sub
    )


def handler_name(handler: object) -> str:
    """The qualified name a handler is known by in logs, reports and listings."""
    qualname = getattr(handler, "__qualname__", None) or type(handler).__qualname__
    module = getattr(handler, "__module__", None) or type(handler).__module__
    return f"{module}.{qualname}"


def is_async_handler(handler: Handler) -> bool:
    if inspect.iscoroutinefunction(handler):
        return True
    call = getattr(type(handler), "__call__", None)  # noqa: B004  (the class's, not the object's)
    return not inspect.isroutine(handler) and inspect.iscoroutinefunction(call)


def check_subscription(event_type: object, handler: object) -> None:
    """Refuse, with a message that says what to fix, what could never be dispatched."""
    check_event_type(event_type)
    event_name(event_type)  # a bad __event_name__ is found here, not when a failure is logged
    if not callable(handler):
        raise TypeError(f"a handler must be callable, got {handler!r}")
    call = getattr(type(handler), "__call__", None)  # noqa: B004  (the class's, as Python calls it)
    if any(
        inspect.isgeneratorfunction(f) or inspect.isasyncgenfunction(f) for f in (handler, call)
    ):
        raise TypeError(
            f"handler {handler_name(handler)} is a generator function: calling it only makes "
            f"a generator, its body would never run; use a plain or async def function"
        )
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):  # some builtins and C callables have no signature to read
        return
    try:
        signature.bind(object())
    except TypeError:
        raise TypeError(
            f"handler {handler_name(handler)}{signature} cannot take the event as its one "
            f"positional argument"
        ) from None


class Registry:
    """Subscriptions of one bus and the routes resolved from them."""

    def __init__(self) -> None:
        self._by_type: dict[type, list[Subscription]] = {}
        self._order = itertools.count()
        self._muted: set[Subscription] = set()
        self.observed = False
        self.batching = False
        # Read directly by the bus's hot path; cleared in place so that reference stays valid.
        self.routes: dict[type, Route] = {}

    def next_order(self) -> int:
        """The position of the next subscription: dispatch order follows it."""
        return next(self._order)

    def add(self, sub: Subscription) -> None:
        self._by_type.setdefault(sub.event_type, []).append(sub)
        self.routes.clear()

    def remove(self, sub: Subscription) -> bool:
        subs = self._by_type.get(sub.event_type, [])
        if sub not in subs:
            return False
        subs.remove(sub)
        if not subs:
            del self._by_type[sub.event_type]
        self._muted.discard(sub)
        self.routes.clear()
        return True

    def __contains__(self, sub: Subscription) -> bool:
        return sub in self._by_type.get(sub.event_type, ())

    def set_muted(self, subs: Iterable[Subscription], muted: bool) -> None:
        if muted:
            self._muted.update(subs)
        else:
            self._muted.difference_update(subs)
        self.routes.clear()

    def set_observed(self, observed: bool) -> None:
        self.observed = observed
        self.routes.clear()

    def set_batching(self, batching: bool) -> None:
        self.batching = batching
        self.routes.clear()

    def all(self) -> tuple[Subscription, ...]:
        """Every subscription, in subscription order."""
        return tuple(sorted(itertools.chain(*self._by_type.values()), key=_order_key))

    def matching(self, event_type: type) -> tuple[Subscription, ...]:
        """What an event of exactly ``event_type`` dispatches to, muted handlers included."""
        subs = itertools.chain(*(self._by_type.get(cls, ()) for cls in event_type.__mro__))
        return tuple(sorted(subs, key=_order_key))

    def route(self, event_type: type) -> Route:
        subs = tuple(sub for sub in self.matching(event_type) if sub not in self._muted)
        route = Route(subs, observed=self.observed, batching=self.batching)
        self.routes[event_type] = route
        return route


def _order_key(sub: Subscription) -> int:
    return sub.order
