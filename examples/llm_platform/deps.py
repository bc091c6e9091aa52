"""What handlers need from the application, handed to them when they are wired."""

from __future__ import annotations

from dataclasses import dataclass

from .cache import Cache
from .db import SessionFactory


@dataclass(frozen=True, slots=True)
class Deps:
    sessions: SessionFactory
    cache: Cache
