"""The llm_platform under test: on SQLite in a temporary file, and on PostgreSQL with Redis.

The PostgreSQL platform lives in a schema of its own (dropped afterwards) and its Redis keys
under a prefix of their own: other tests share the same database and server.

The harness's bus runs, as in the web app, in a task of its own: its relay delivers the
durable handlers' events right after each COMMIT, concurrently with the test. A test that
reads their work first waits for their deliveries (`Harness.deliveries_done`).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import pytest_asyncio
from fastapi import FastAPI
from redis.asyncio import Redis
from sqlalchemy import select, text

from aioevents import EventBus
from aioevents.outbox import Outbox
from examples.llm_platform.app import Platform, open_platform
from examples.llm_platform.cache import Cache, MemoryCache, RedisCache
from examples.llm_platform.changes import ChangeRecorder, count_rows
from examples.llm_platform.db import create_engine
from examples.llm_platform.deliveries import settled
from examples.llm_platform.models import Row
from examples.llm_platform.services import Services
from examples.llm_platform.throttling import PlatformThrottle
from examples.llm_platform.web import create_web_app

R = TypeVar("R", bound=Row)

BACKENDS = [
    "sqlite",
    pytest.param("postgres", marks=[pytest.mark.postgres, pytest.mark.redis]),
]


@dataclass
class Harness:
    """A running platform, what its handlers changed, and the ids of a tenant and account."""

    platform: Platform
    recorder: ChangeRecorder
    tenant_id: str = ""
    account_id: str = ""

    @property
    def services(self) -> Services:
        return self.platform.services

    @property
    def bus(self) -> EventBus:
        return self.platform.bus

    @property
    def cache(self) -> Cache:
        return self.platform.cache

    @property
    def outbox(self) -> Outbox:
        return self.platform.outbox

    async def deliveries_done(self) -> None:
        """Wait until the durable handlers have run every delivery; fail if one failed."""
        await deliveries_done(self.outbox)

    async def rows(self, model: type[R], **where: Any) -> list[R]:
        async with self.platform.sessions() as session:
            query = select(model).filter_by(**where).order_by(model.created_at, model.id)
            return list(await session.scalars(query))

    async def emit_again(self, event: object) -> dict[str, dict[str, int]]:
        """Emit ``event`` a second time, once its durable deliveries are done; what each
        handler changed in that run, by name."""
        await self.deliveries_done()
        seen = len(self.recorder.runs)
        result = await self.bus.emit(event)
        assert result.ok, result.errors
        return {run.handler.rsplit(".", 1)[-1]: run.changes for run in self.recorder.runs[seen:]}


async def deliveries_done(outbox: Outbox) -> None:
    """Wait until no durable delivery is pending (60 s at most); fail if one failed."""
    failed = await settled(outbox, within=60.0)
    assert failed == [], [(d.handler, d.error_type, d.error_message) for d in failed]


@pytest_asyncio.fixture(params=BACKENDS)
async def harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    async with _harness(request, tmp_path, running=True) as harness:
        yield harness


@pytest_asyncio.fixture(params=BACKENDS)
async def idle_harness(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Harness]:
    """A harness whose bus does not run: no relay delivers until the test runs one."""
    async with _harness(request, tmp_path, running=False) as harness:
        yield harness


@asynccontextmanager
async def _harness(
    request: pytest.FixtureRequest, tmp_path: Path, *, running: bool
) -> AsyncIterator[Harness]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'platform.sqlite3'}"
        async with _platform(url, running=running) as harness:
            yield harness
        return
    database_url: str = request.getfixturevalue("database_url")
    redis_url: str = request.getfixturevalue("redis_url")
    async with _postgres_schema(database_url) as schema, _redis_prefix(redis_url) as prefix:
        cache = RedisCache(redis_url, prefix=prefix)
        throttle = PlatformThrottle.redis(redis_url, prefix=prefix)
        async with _platform(
            database_url, schema=schema, cache=cache, throttle=throttle, running=running
        ) as harness:
            yield harness


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite+aiosqlite:///{tmp_path / 'platform.sqlite3'}"


@asynccontextmanager
async def _platform(
    url: str,
    *,
    schema: str | None = None,
    cache: Cache | None = None,
    throttle: PlatformThrottle | None = None,
    running: bool = True,
) -> AsyncIterator[Harness]:
    engine = create_engine(url, search_path=schema)
    count_rows(engine)
    recorder = ChangeRecorder()
    cache = cache or MemoryCache()
    async with open_platform(engine, cache, throttle=throttle, hooks=[recorder]) as platform:
        harness = Harness(platform, recorder)
        tenant = (await platform.services.tenants.create_tenant("Acme")).value
        account = await platform.services.tenants.create_account(
            tenant.id, "Ann", "ann@acme.test", "de-DE"
        )
        harness.tenant_id, harness.account_id = tenant.id, account.value.id
        if not running:
            yield harness
            return
        async with in_a_task(platform.bus):  # stopped before the engine is disposed
            yield harness


@asynccontextmanager
async def _postgres_schema(database_url: str) -> AsyncIterator[str]:
    schema = f"llm_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(database_url)
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f"CREATE SCHEMA {schema}"))
        yield schema
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        await admin.dispose()


@asynccontextmanager
async def _redis_prefix(redis_url: str) -> AsyncIterator[str]:
    prefix = f"llm_test_{uuid.uuid4().hex[:12]}:"
    try:
        yield prefix
    finally:
        redis = Redis.from_url(redis_url)
        try:
            keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
            if keys:
                await redis.delete(*keys)
        finally:
            await redis.aclose()


@asynccontextmanager
async def web_app_on_sqlite(database: Path) -> AsyncIterator[tuple[httpx.AsyncClient, Platform]]:
    """The web app on a SQLite file, its lifespan running: a client of it (httpx's ASGI
    transport) and the platform the lifespan opened."""

    def opener() -> AbstractAsyncContextManager[Platform]:
        return open_platform(create_engine(f"sqlite+aiosqlite:///{database}"), MemoryCache())

    web = create_web_app(opener)
    async with lifespan_in_a_task(web):
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http, web.state.platform


def lifespan_in_a_task(web: FastAPI) -> AbstractAsyncContextManager[None]:
    """Run ``web``'s lifespan around the block, in a task of its own, as a server does."""
    return in_a_task(web.router.lifespan_context(web))


@asynccontextmanager
async def in_a_task(context: AbstractAsyncContextManager[object]) -> AsyncIterator[None]:
    """Enter ``context`` before the block and leave it after, in a task of its own.

    A running bus (a lifespan runs one) must be left by the task that entered it; pytest-
    asyncio runs an async fixture's setup and its teardown in different tasks.
    """
    started, stop = asyncio.Event(), asyncio.Event()

    async def serve() -> None:
        async with context:
            started.set()
            await stop.wait()

    server = asyncio.ensure_future(serve())
    try:
        starting = asyncio.ensure_future(started.wait())
        await asyncio.wait({server, starting}, return_when=asyncio.FIRST_COMPLETED)
        starting.cancel()
        if server.done():
            server.result()  # the start failed: raise its error
        yield
    finally:
        stop.set()
        await server
