"""The outbox on the set-ups applications have: SQLAlchemy's SQLite recipe, a schema, Alembic."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import pytest_asyncio
from sqlalchemy import event as sa_event
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker, create_async_engine

from aioevents import EventBus
from aioevents.outbox import DeliveryStatus, Outbox
from aioevents.sqlalchemy import TransactionalEvents

DEADLINE = 60.0


@dataclass(frozen=True, slots=True)
class Indexed:
    number: int


async def _deliver(engine: AsyncEngine, outbox: Outbox, count: int) -> list[int]:
    """Record ``count`` events in one transaction while the bus runs; wait for their runs."""
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=outbox)
    ran: list[int] = []

    @bus.on(Indexed, durable=True, name="index")
    async def index(event: Indexed) -> None:
        ran.append(event.number)

    sessions = async_sessionmaker(engine)
    async with bus:
        async with sessions.begin() as session:
            for number in range(count):
                events.record(session, Indexed(number))
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while len(await outbox.deliveries(status=DeliveryStatus.COMPLETED)) < count:
            assert asyncio.get_running_loop().time() < deadline, "deliveries not completed"
            await asyncio.sleep(0.05)
    return ran


def _begin_immediate(engine: AsyncEngine) -> None:
    """SQLAlchemy's documented recipe for SQLite: the driver's own transaction handling off,
    SQLAlchemy's "begin" event issues BEGIN itself (here BEGIN IMMEDIATE)."""

    @sa_event.listens_for(engine.sync_engine, "connect")
    def connect(dbapi_connection: Any, _: object) -> None:
        dbapi_connection.isolation_level = None

    @sa_event.listens_for(engine.sync_engine, "begin")
    def begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_the_relay_writes_outcomes_under_sqlalchemys_sqlite_recipe(tmp_path: Path) -> None:
    # The recipe's BEGIN also runs on the relay's autocommit connections: its writes must be
    # committed all the same, not rolled back when the connection goes back to the pool.
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'recipe.sqlite3'}")
    _begin_immediate(engine)
    outbox = Outbox(engine, poll_interval=0.05)
    await outbox.create_tables()
    try:
        assert sorted(await _deliver(engine, outbox, 5)) == list(range(5))
        left = await outbox.deliveries(status=DeliveryStatus.PENDING)
        assert left == []
    finally:
        await engine.dispose()


@pytest_asyncio.fixture
async def schema_engine(database_url: str) -> AsyncIterator[tuple[AsyncEngine, str]]:
    engine = create_async_engine(database_url)
    schema = f"outbox_{uuid4().hex[:10]}"
    async with engine.begin() as connection:
        await connection.execute(text(f"CREATE SCHEMA {schema}"))
    try:
        yield engine, schema
    finally:
        async with engine.begin() as connection:
            await connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        await engine.dispose()


@pytest.mark.postgres
@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_tables_in_a_schema_deliver_and_wake_relays(
    schema_engine: tuple[AsyncEngine, str],
) -> None:
    engine, schema = schema_engine
    outbox = Outbox(engine, schema=schema, poll_interval=0.05)
    await outbox.create_tables()
    await outbox.create_tables()  # a second time: nothing to do, no error
    async with engine.connect() as connection:
        tables = await connection.execute(
            select(func.count())
            .select_from(text("information_schema.tables"))
            .where(text("table_schema = :schema"))
            .params(schema=schema)
        )
        triggers = await connection.execute(
            text("SELECT count(*) FROM information_schema.triggers WHERE trigger_schema = :s"),
            {"s": schema},
        )
        # events, deliveries, attempts, inbox
        assert (tables.scalar(), triggers.scalar()) == (4, 1)
    assert sorted(await _deliver(engine, outbox, 3)) == [0, 1, 2]
    await outbox.drop_tables()
    async with engine.connect() as connection:
        functions = await connection.execute(
            text(
                "SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
                "WHERE n.nspname = :s"
            ),
            {"s": schema},
        )
        assert functions.scalar() == 0  # the wake-up function went with the tables


def test_the_tables_are_in_the_metadata_for_alembic() -> None:
    outbox = Outbox(create_async_engine("sqlite+aiosqlite://"), table_prefix="app_")
    assert sorted(outbox.metadata.tables) == [
        "app_attempts",
        "app_deliveries",
        "app_events",
        "app_inbox",
    ]
    deliveries = outbox.metadata.tables["app_deliveries"]
    assert {index.name for index in deliveries.indexes} >= {
        "app_deliveries_pending",
        "app_deliveries_key",
    }
