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
from .throttling import PlatformThrottle, open_throttle


def build_bus(deps: Deps, *, hooks: Iterable[Hook] = (), running: bool = False) -> EventBus:
    """The bus with every handler of the platform subscribed.

    ``running``: the bus will run (``async with bus:``), as in the web app. Message-was-created
    then goes to the batch variant of the provider update, which sums each provider's quota
    and writes it once per batch; a bus that only emits (the demo, scripts, most tests) cannot
    collect batches and gets the per-message variant. Never both: each would charge.
    """
    bus = EventBus(hooks=hooks)
    bus.include(handlers.router(deps))
    bus.include(handlers.provider_usage_router(deps, batched=running))
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
    engine: AsyncEngine,
    cache: Cache,
    *,
    throttle: PlatformThrottle | None = None,
    hooks: Iterable[Hook] = (),
    running: bool = False,
) -> AsyncIterator[Platform]:
    """Create the schema and wire everything on ``engine``; close the cache, throttle (in
    memory unless given) and engine after. ``running``: see `build_bus`."""
    if throttle is None:
        throttle = PlatformThrottle.memory()
    try:
        await create_schema(engine)
        sessions = session_factory(engine)
        bus = build_bus(Deps(sessions, cache, throttle), hooks=hooks, running=running)
        yield Platform(engine, sessions, cache, bus, Services(sessions, TransactionalEvents(bus)))
    finally:
        await cache.aclose()
        await throttle.aclose()
        await engine.dispose()


def engine_and_cache_from_env() -> tuple[AsyncEngine, Cache]:
    """``DATABASE_URL`` and ``REDIS_URL``, or SQLite in a local file and the in-memory cache.

    ``DATABASE_SCHEMA`` puts the tables in that PostgreSQL schema (it must exist).
    """
    url = os.environ.get("DATABASE_URL") or DEFAULT_DATABASE_URL
    engine = create_engine(url, search_path=os.environ.get("DATABASE_SCHEMA") or None)
    return engine, open_cache(os.environ.get("REDIS_URL") or None)


def throttle_from_env() -> PlatformThrottle:
    """On ``REDIS_URL`` if set, shared by every process there; else in memory."""
    return open_throttle(os.environ.get("REDIS_URL") or None)
