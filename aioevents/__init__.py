"""aioevents: a typed asyncio event dispatcher.

``await bus.emit(event)`` runs every handler subscribed to the event's class (or a base class
of it) concurrently, each isolated from the others' failures, and returns an `EmitResult`
saying what ran and what failed.
"""

from __future__ import annotations

from ._bus import EventBus
from ._dispatch import Hook
from ._exceptions import AioEventsError, ConfigurationError, SubscriptionError
from ._names import event_name, event_version
from ._registry import Subscription
from ._result import EmitResult, HandlerError
from ._router import Router

__all__ = [
    "AioEventsError",
    "ConfigurationError",
    "EmitResult",
    "EventBus",
    "HandlerError",
    "Hook",
    "Router",
    "Subscription",
    "SubscriptionError",
    "event_name",
    "event_version",
]

__version__ = "0.1.0.dev0"
