"""The record of one handler subscribed to one event type on one bus."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ._policies import BatchPolicy, Durable, Retry

__all__ = ["Handler", "Invoke", "Subscription"]

Handler = Callable[[Any], object]
# What a subscription awaits to run its handler: the handler itself, or a wrapper that adds
# the thread offload, the timeout and the retries (built by aioevents._dispatch).
Invoke = Callable[[Any], Coroutine[Any, Any, object]]


@dataclass(frozen=True, eq=False, slots=True, kw_only=True)
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
    # Delivered through an outbox when recorded in a transaction (see aioevents.outbox).
    durable: Durable | None = None
    order: int = field(default=0, repr=False)
    # The registry that made it: unsubscribing it from another bus is a mistake to report.
    owner: object = field(default=None, repr=False, compare=False)
    # For the stand-in that hands a batch handler a batch of one: the batch subscription.
    origin: Subscription | None = field(default=None, repr=False, compare=False)
    # The awaitable call that runs the handler, built once, at subscription.
    invoke: Invoke = field(repr=False, compare=False)
