"""The delivery a durable handler runs for, readable from inside the handler."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime

__all__ = ["Delivery", "current_delivery"]


@dataclass(frozen=True, slots=True)
class Delivery:
    """The stored delivery a durable handler is running: read it with `current_delivery`.

    A handler is run at least once per delivery: ``event_id`` is what makes it idempotent
    (see `Outbox.first_time`); ``attempt`` counts from 1.
    """

    id: int
    event_id: uuid.UUID
    event_name: str
    handler: str
    attempt: int
    key: str | None
    headers: Mapping[str, str]
    recorded_at: datetime


_current: ContextVar[Delivery | None] = ContextVar("aioevents_delivery", default=None)


def current_delivery() -> Delivery | None:
    """The delivery the calling durable handler runs for; None outside one."""
    return _current.get()
