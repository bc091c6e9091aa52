"""aioevents: a typed asyncio event dispatcher.

``await bus.emit(event)`` runs every handler subscribed to the event's class (or a base class
of it) concurrently, each isolated from the others' failures, and returns an `EmitResult`
saying what ran and what failed.
"""

from __future__ import annotations

from ._background import DrainReport
from ._bus import EventBus
from ._dispatch import Hook
from ._exceptions import (
    AioEventsError,
    BusStateError,
    ConfigurationError,
    HandlerCancelledError,
    QueueFullError,
    SubscriptionError,
)
from ._names import event_name, event_version
from ._policies import BatchPolicy, Durable, Retry
from ._result import EmitResult, HandlerError
from ._router import Router
from ._subscription import Subscription

__all__ = [
    "AioEventsError",
    "BatchPolicy",
    "BusStateError",
    "ConfigurationError",
    "DrainReport",
    "Durable",
    "EmitResult",
    "EventBus",
    "HandlerCancelledError",
    "HandlerError",
    "Hook",
    "QueueFullError",
    "Retry",
    "Router",
    "Subscription",
    "SubscriptionError",
    "event_name",
    "event_version",
]

__version__ = "0.1.0.dev0"
