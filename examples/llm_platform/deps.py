"""What handlers need from the application, handed to them when they are wired."""

from __future__ import annotations

from dataclasses import dataclass, field

from aioevents.throttle import MemoryThrottle, Throttle

from .cache import Cache
from .db import SessionFactory


@dataclass(frozen=True, slots=True)
class Deps:
    sessions: SessionFactory
    cache: Cache
    throttle: Throttle = field(default_factory=MemoryThrottle)
