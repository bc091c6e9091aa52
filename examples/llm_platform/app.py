"""Assembling the platform: engine, cache, bus with its handlers, outbox, services.

`build_bus` is the one place handlers are wired; `wire_platform` puts everything together
without opening or creating anything (what a worker process imports, see `worker`);
`open_platform` is what the demo, the web app and the tests start from.

The durable handlers' events go through an `aioevents.outbox.Outbox` on the platform's own
database: its tables are created with the platform's, and the bus must run
(``async with platform.bus:``) for this process's relay to deliver them. A process that
records without running its bus leaves its deliveries to the relays of other processes
(``python -m aioevents relay examples.llm_platform.worker:bus``).

Given ``streams``, the platform leaves its heavy handlers to worker processes: their events are
externalized to the streams, through the outbox, instead (see `offload`).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

from sqlalchemy.ext.asyncio import AsyncEngine

from aioevents import EventBus, Hook
from aioevents.outbox import Outbox
from aioevents.sqlalchemy import TransactionalEvents
from aioevents.streams import Streams, externalize

from . import handlers
from .cache import Cache, open_cache
from .db import DEFAULT_DATABASE_URL, SessionFactory, create_engine, create_schema, session_factory
from .deps import Deps
from .services import Services
from .throttling import PlatformThrottle, open_throttle

LEASE = 30.0
"""Seconds a relay holds a delivery without renewing it: how long the deliveries of a process
that died wait before another process runs them."""


def build_bus(
    deps: Deps,
    *,
    hooks: Iterable[Hook] = (),
    indexing_pause: float = 0.0,
    streams: Streams | None = None,
) -> EventBus:
    """The bus with every handler of the platform subscribed (``indexing_pause``: see
    `handlers.create_document_index.CreateDocumentIndex`); with ``streams``, the heavy ones
    replaced by durable handlers that externalize their events to the streams."""
    bus = EventBus(hooks=hooks)
    bus.include(handlers.router(deps, indexing_pause=indexing_pause, heavy=streams is None))
    bus.include(handlers.provider_usage_router(deps))
    if streams is not None:
        externalize(bus, *handlers.HEAVY_EVENTS, streams=streams, durable=handlers.DURABLE)
    return bus


@dataclass(frozen=True, slots=True)
class Platform:
    engine: AsyncEngine
    sessions: SessionFactory
    cache: Cache
    bus: EventBus
    outbox: Outbox
    services: Services


def wire_platform(
    engine: AsyncEngine,
    cache: Cache,
    throttle: PlatformThrottle,
    *,
    hooks: Iterable[Hook] = (),
    lease: float = LEASE,
    indexing_pause: float = 0.0,
    streams: Streams | None = None,
) -> Platform:
    """Everything wired on ``engine``; nothing opened, created or started."""
    sessions = session_factory(engine)
    deps = Deps(sessions, cache, throttle)
    bus = build_bus(deps, hooks=hooks, indexing_pause=indexing_pause, streams=streams)
    outbox = Outbox(engine, lease=lease)
    events = TransactionalEvents(bus, outbox=outbox)
    return Platform(engine, sessions, cache, bus, outbox, Services(sessions, events))


@asynccontextmanager
async def open_platform(
    engine: AsyncEngine,
    cache: Cache,
    *,
    throttle: PlatformThrottle | None = None,
    hooks: Iterable[Hook] = (),
    lease: float = LEASE,
    streams: Streams | None = None,
) -> AsyncIterator[Platform]:
    """Create the platform's and the outbox's tables and wire everything on ``engine``;
    close the cache, throttle (in memory unless given) and engine after.

    The bus is not started here: run it with ``async with platform.bus:`` inside the block
    (its relay must stop before the engine is disposed).
    """
    if throttle is None:
        throttle = PlatformThrottle.memory()
    try:
        await create_schema(engine)
        platform = wire_platform(engine, cache, throttle, hooks=hooks, lease=lease, streams=streams)
        await platform.outbox.create_tables()
        yield platform
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
