"""The exceptions aioevents raises.

Every error the library raises on its own account derives from `AioEventsError`::

    AioEventsError
     ├── BusStateError
     ├── ConfigurationError (also a ValueError)
     ├── HandlerCancelledError
     ├── QueueFullError
     ├── SubscriptionError
     ├── aioevents.outbox.EventDecodeError
     ├── aioevents.outbox.NotInDeliveryError
     └── aioevents.sqlalchemy.NoTransactionError

Bad input types are refused with a plain `TypeError`; failures *inside* handlers are never
raised as these: they are reported in `EmitResult.errors` (or raised as an `ExceptionGroup`
of the handlers' own exceptions with ``emit(..., strict=True)``).
"""

from __future__ import annotations

__all__ = [
    "AioEventsError",
    "BusStateError",
    "ConfigurationError",
    "HandlerCancelledError",
    "QueueFullError",
    "SubscriptionError",
]


class AioEventsError(Exception):
    """The root of every error aioevents raises on its own account."""


class ConfigurationError(AioEventsError, ValueError):
    """Raised when a bus, subscription or event type is given a value out of its range.

    For example ``EventBus(max_concurrency=0)`` or ``bus.on(E, timeout=-1)``.
    """


class SubscriptionError(AioEventsError):
    """Raised when a subscription cannot be made, found or undone as asked.

    For example unsubscribing a `Subscription` made on another bus, including one `Router`
    twice, or muting a handler that is not subscribed.
    """


class BusStateError(AioEventsError):
    """Raised when the bus is not in the state an operation needs.

    For example publishing to a bus that is not running (outside ``async with bus:``), or
    entering a bus that is already running.
    """


class QueueFullError(AioEventsError):
    """Raised by `EventBus.publish_nowait` when the background queue has no free place."""


class HandlerCancelledError(AioEventsError):
    """Recorded in `EmitResult.errors` when a handler ended with a cancellation its emit did
    not ask for, for example by awaiting a future that something else cancelled.

    The cancellation itself is the ``__cause__``. Cancelling the emitter is not this: it
    cancels the handlers and is raised from ``emit``.
    """
