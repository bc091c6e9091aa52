"""Assembling the platform: engine, cache, bus with its handlers, services.

`build_bus` is the one place handlers are wired; `open_platform` is what the demo, the web
app and the tests start from.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from aioevents import EventBus, Hook
from aioevents.sqlalchemy import TransactionalEvents

from . import handlers
from .cache import Cache, open_cache
from .db import DEFAULT_DATABASE_URL, SessionFactory, create_engine, create_schema, session_factory
from .deps import Deps
from .services import Services


def build_bus(deps: Deps, *, hooks: Iterable[Hook] = ()) -> EventBus:
    """The bus with every handler of the platform subscribed."""
    bus = EventBus(hooks=hooks)
    bus.include(handlers.router(deps))
    return bus


@dataclass(frozen=True, slots=True)
class Platform:
    engine: AsyncEngine
    sessions: SessionFactory
    cache: Cache
    bus: EventBus
    services: Services


@asynccontextmanager
async def open_platform(
    engine: AsyncEngine, cache: Cache, *, hooks: Iterable[Hook] = ()
) -> AsyncIterator[Platform]:
    """Create the schema and wire everything on ``engine``; close the cache and engine after."""
    try:
        await create_schema(engine)
        sessions = session_factory(engine)
        bus = build_bus(Deps(sessions, cache), hooks=hooks)
        yield Platform(engine, sessions, cache, bus, Services(sessions, TransactionalEvents(bus)))
    finally:
        await cache.aclose()
        await engine.dispose()


def engine_and_cache_from_env() -> tuple[AsyncEngine, Cache]:
    """``DATABASE_URL`` and ``REDIS_URL``, or SQLite in a local file and the in-memory cache.

    ``DATABASE_SCHEMA`` puts the tables in that PostgreSQL schema (it must exist).
    """
    url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    engine = create_engine(url, search_path=os.environ.get("DATABASE_SCHEMA") or None)
    return engine, open_cache(os.environ.get("REDIS_URL") or None)
