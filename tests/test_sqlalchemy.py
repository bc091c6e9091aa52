"""aioevents.sqlalchemy: delivery after commit, against a real PostgreSQL.

Every database test makes its own tables (random names) and drops them afterwards, so it
can share the database with other tests running at the same time.
"""

from __future__ import annotations

import asyncio
import contextvars
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated
from uuid import uuid4

import httpx
import pytest
import pytest_asyncio
from fastapi import Depends, FastAPI, Request
from sqlalchemy import Column, Integer, MetaData, String, Table, func, insert, select, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from aioevents import AioEventsError, EmitResult, EventBus
from aioevents.sqlalchemy import NoTransactionError, Outcome, Recorded, TransactionalEvents


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemAdded:
    name: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SpecialItemAdded(ItemAdded):
    pass


@dataclass(frozen=True, slots=True, kw_only=True)
class Tables:
    items: Table
    audit: Table


@pytest_asyncio.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_async_engine(database_url)
    yield engine
    await engine.dispose()


@pytest_asyncio.fixture
async def tables(engine: AsyncEngine) -> AsyncIterator[Tables]:
    suffix = uuid4().hex[:12]
    metadata = MetaData()
    items = Table(
        f"aioevents_sa_items_{suffix}",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("name", String, nullable=False, unique=True),
    )
    audit = Table(
        f"aioevents_sa_audit_{suffix}",
        metadata,
        Column("id", Integer, primary_key=True),
        Column("item_name", String, nullable=False),
        Column("txid", String, nullable=False),
    )
    async with engine.begin() as conn:
        await conn.run_sync(metadata.create_all)
    yield Tables(items=items, audit=audit)
    async with engine.begin() as conn:
        await conn.run_sync(metadata.drop_all)


@pytest.fixture
def factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def events(bus: EventBus) -> TransactionalEvents:
    return TransactionalEvents(bus)


@pytest.fixture
def delivered(bus: EventBus) -> list[object]:
    received: list[object] = []

    @bus.on(object)
    async def collect(event: object) -> None:
        received.append(event)

    return received


@pytest.fixture
def rolled_back(events: TransactionalEvents) -> list[object]:
    received: list[object] = []

    @events.after_rollback(object)
    async def collect(event: object) -> None:
        received.append(event)

    return received


async def add_item(session: AsyncSession, tables: Tables, name: str) -> None:
    await session.execute(insert(tables.items).values(name=name))


async def item_names(engine: AsyncEngine, table: Table) -> list[str]:
    """Read on a connection of its own: what other sessions can see."""
    column = table.c.name if "name" in table.c else table.c.item_name
    async with engine.connect() as conn:
        return list((await conn.execute(select(column).order_by(table.c.id))).scalars())


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A FastAPI dependency: one session per request, closed after it."""
    async with request.app.state.sessions() as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session)]


# -- after commit ------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_commit_delivers_after_the_rows_are_visible_to_other_connections(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    bus: EventBus,
    events: TransactionalEvents,
) -> None:
    seen_by_handler: list[list[str]] = []

    @bus.on(ItemAdded)
    async def read_committed(event: ItemAdded) -> None:
        seen_by_handler.append(await item_names(engine, tables.items))

    async with factory() as session:
        await add_item(session, tables, "apple")
        recorded = events.record(session, ItemAdded(name="apple"))
        outcome_before_commit = recorded.outcome
        assert seen_by_handler == []
        await session.commit()

    assert outcome_before_commit is Outcome.PENDING
    assert seen_by_handler == [["apple"]]
    assert recorded.outcome is Outcome.DELIVERED
    assert recorded.result is not None
    assert recorded.result.ok
    assert recorded.result.handled == 1


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_begin_block_delivers_in_recording_order(
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
) -> None:
    names = [f"item-{n}" for n in range(10)]
    async with factory() as session, session.begin():
        for name in names:
            await add_item(session, tables, name)
            events.record(session, ItemAdded(name=name))
        assert delivered == []

    assert delivered == [ItemAdded(name=name) for name in names]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_sessionmaker_begin_unit_of_work_delivers(
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
) -> None:
    async with factory.begin() as session:
        await add_item(session, tables, "pear")
        events.record(session, ItemAdded(name="pear"))

    assert delivered == [ItemAdded(name="pear")]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_fastapi_handler_delivers_before_the_response(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
) -> None:
    app = FastAPI()
    app.state.sessions = factory

    @app.post("/items/{name}")
    async def create_item(name: str, session: SessionDep) -> dict[str, int]:
        async with session.begin():
            await add_item(session, tables, name)
            events.record(session, ItemAdded(name=name))
        return {"delivered": len(delivered)}

    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.post("/items/kiwi")

    assert response.json() == {"delivered": 1}
    assert delivered == [ItemAdded(name="kiwi")]
    assert await item_names(engine, tables.items) == ["kiwi"]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_handler_failure_after_commit_is_reported_and_logged(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    bus: EventBus,
    events: TransactionalEvents,
    delivered: list[object],
    caplog: pytest.LogCaptureFixture,
) -> None:
    @bus.on(ItemAdded)
    async def broken(event: ItemAdded) -> None:
        raise RuntimeError("mail server down")

    async with factory() as session, session.begin():
        await add_item(session, tables, "fig")
        recorded = events.record(session, ItemAdded(name="fig"))

    assert await item_names(engine, tables.items) == ["fig"]
    assert delivered == [ItemAdded(name="fig")]
    assert recorded.outcome is Outcome.DELIVERED
    assert recorded.result is not None
    assert [str(error.exception) for error in recorded.result.errors] == ["mail server down"]
    assert "failed on event item-added" in caplog.text


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_instances_sharing_a_session_deliver_in_recording_order(
    factory: async_sessionmaker[AsyncSession], tables: Tables
) -> None:
    order: list[str] = []
    first_bus, second_bus = EventBus(), EventBus()
    first, second = TransactionalEvents(first_bus), TransactionalEvents(second_bus)

    @first_bus.on(ItemAdded)
    async def on_first(event: ItemAdded) -> None:
        order.append(f"first:{event.name}")

    @second_bus.on(ItemAdded)
    async def on_second(event: ItemAdded) -> None:
        order.append(f"second:{event.name}")

    async with factory() as session, session.begin():
        await add_item(session, tables, "a")
        first.record(session, ItemAdded(name="a"))
        second.record(session, ItemAdded(name="b"))
        first.record(session, ItemAdded(name="c"))

    assert order == ["first:a", "second:b", "first:c"]


# -- rollback ----------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_rollback_delivers_nothing_and_tells_after_rollback_handlers(
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
    rolled_back: list[object],
) -> None:
    async with factory() as session:
        await add_item(session, tables, "plum")
        recorded = events.record(session, ItemAdded(name="plum"))
        await session.rollback()

    assert delivered == []
    assert rolled_back == [ItemAdded(name="plum")]
    assert recorded.outcome is Outcome.DISCARDED
    assert isinstance(recorded.result, EmitResult)
    assert recorded.result.handled == 1


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_exception_in_begin_block_delivers_nothing(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
    rolled_back: list[object],
) -> None:
    with pytest.raises(LookupError, match="no such plan"):
        async with factory() as session, session.begin():
            await add_item(session, tables, "lime")
            events.record(session, ItemAdded(name="lime"))
            raise LookupError("no such plan")

    assert delivered == []
    assert rolled_back == [ItemAdded(name="lime")]
    assert await item_names(engine, tables.items) == []


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_session_closed_without_commit_discards(
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
) -> None:
    async with factory() as session:
        await add_item(session, tables, "date")
        recorded = events.record(session, ItemAdded(name="date"))

    assert delivered == []
    assert recorded.outcome is Outcome.DISCARDED


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_failed_commit_delivers_nothing(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
) -> None:
    async with factory() as session:
        await session.execute(
            # A deferred constraint fails at COMMIT itself, after every statement succeeded.
            text("CREATE TEMP TABLE guard (x int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
        )
        await session.execute(text("INSERT INTO guard VALUES (1), (1)"))
        recorded = events.record(session, ItemAdded(name="never"))
        with pytest.raises(Exception, match="duplicate key"):
            await session.commit()
        await session.rollback()

    assert delivered == []
    assert recorded.outcome is Outcome.DISCARDED


# -- savepoints --------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_savepoint_rollback_drops_only_its_own_events(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
    rolled_back: list[object],
) -> None:
    async with factory() as session, session.begin():
        await add_item(session, tables, "outer")
        events.record(session, ItemAdded(name="outer"))
        with pytest.raises(ValueError, match="out of stock"):
            async with session.begin_nested():
                await add_item(session, tables, "dropped")
                events.record(session, ItemAdded(name="dropped"))
                raise ValueError("out of stock")
        async with session.begin_nested():
            await add_item(session, tables, "kept")
            events.record(session, ItemAdded(name="kept"))
        events.record(session, ItemAdded(name="last"))

    assert delivered == [ItemAdded(name=name) for name in ("outer", "kept", "last")]
    assert rolled_back == [ItemAdded(name="dropped")]
    assert await item_names(engine, tables.items) == ["outer", "kept"]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_rolling_back_a_savepoint_drops_the_released_savepoints_inside_it(
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
    rolled_back: list[object],
) -> None:
    async with factory() as session, session.begin():
        events.record(session, ItemAdded(name="outer"))
        savepoint = await session.begin_nested()
        async with session.begin_nested():
            await add_item(session, tables, "inner")
            events.record(session, ItemAdded(name="inner"))
        events.record(session, ItemAdded(name="middle"))
        await savepoint.rollback()

    assert delivered == [ItemAdded(name="outer")]
    assert rolled_back == [ItemAdded(name="inner"), ItemAdded(name="middle")]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_savepoint_with_failed_flush_drops_its_events(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
) -> None:
    async with factory() as session, session.begin():
        await add_item(session, tables, "taken")
        events.record(session, ItemAdded(name="taken"))
        with pytest.raises(Exception, match="unique"):
            async with session.begin_nested():
                events.record(session, ItemAdded(name="duplicate"))
                await add_item(session, tables, "taken")

    assert delivered == [ItemAdded(name="taken")]
    assert await item_names(engine, tables.items) == ["taken"]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_rolling_back_after_a_savepoint_rollback_reports_each_event_once(
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
    rolled_back: list[object],
) -> None:
    async with factory() as session:
        async with session.begin():
            events.record(session, ItemAdded(name="outer"))
            savepoint = await session.begin_nested()
            events.record(session, ItemAdded(name="inner"))
            await savepoint.rollback()
            await session.rollback()

    assert delivered == []
    assert rolled_back == [ItemAdded(name="outer"), ItemAdded(name="inner")]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_sessions_that_record_nothing_are_left_alone(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
    rolled_back: list[object],
) -> None:
    async with factory() as session:
        async with session.begin():
            await add_item(session, tables, "quiet")
        await add_item(session, tables, "discarded")
        await session.rollback()

    assert delivered == rolled_back == []
    assert await item_names(engine, tables.items) == ["quiet"]


# -- before commit -----------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_before_commit_handler_writes_in_the_same_transaction(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    bus: EventBus,
) -> None:
    audit_at_delivery: list[list[str]] = []

    @events.before_commit(ItemAdded)
    async def write_audit(event: ItemAdded, session: AsyncSession) -> None:
        txid = (await session.execute(select(func.txid_current()))).scalar_one()
        await session.execute(insert(tables.audit).values(item_name=event.name, txid=str(txid)))

    @bus.on(ItemAdded)
    async def after(event: ItemAdded) -> None:
        audit_at_delivery.append(await item_names(engine, tables.audit))

    async with factory() as session:
        async with session.begin():
            txid = (await session.execute(select(func.txid_current()))).scalar_one()
            await add_item(session, tables, "melon")
            events.record(session, ItemAdded(name="melon"))

    assert audit_at_delivery == [["melon"]]
    async with engine.connect() as conn:
        assert (await conn.execute(select(tables.audit.c.txid))).scalar_one() == str(txid)


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_before_commit_handlers_run_in_order_and_match_subclasses(
    factory: async_sessionmaker[AsyncSession], tables: Tables, events: TransactionalEvents
) -> None:
    calls: list[str] = []

    @events.before_commit(ItemAdded)
    async def first(event: ItemAdded, session: AsyncSession) -> None:
        calls.append(f"first:{event.name}")

    @events.before_commit(SpecialItemAdded)
    async def second(event: SpecialItemAdded, session: AsyncSession) -> None:
        calls.append(f"second:{event.name}")

    async with factory() as session, session.begin():
        events.record(session, ItemAdded(name="a"))
        events.record(session, SpecialItemAdded(name="b"))
        events.record(session, ItemAdded(name="c"))
        assert calls == []

    assert calls == ["first:a", "first:b", "second:b", "first:c"]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_before_commit_failure_rolls_the_transaction_back(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
    rolled_back: list[object],
) -> None:
    @events.before_commit(ItemAdded)
    async def write_audit(event: ItemAdded, session: AsyncSession) -> None:
        await session.execute(insert(tables.audit).values(item_name=event.name, txid="-"))

    @events.before_commit(ItemAdded)
    async def check_quota(event: ItemAdded, session: AsyncSession) -> None:
        raise PermissionError("quota exceeded")

    with pytest.raises(PermissionError, match="quota exceeded") as raised:
        async with factory() as session, session.begin():
            await add_item(session, tables, "grape")
            recorded = events.record(session, ItemAdded(name="grape"))

    assert any("check_quota" in note for note in raised.value.__notes__)
    assert delivered == []
    assert rolled_back == [ItemAdded(name="grape")]
    assert recorded.outcome is Outcome.DISCARDED
    assert await item_names(engine, tables.items) == []
    assert await item_names(engine, tables.audit) == []


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_before_commit_failure_on_plain_commit_leaves_the_transaction_to_roll_back(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
) -> None:
    @events.before_commit(ItemAdded)
    async def refuse(event: ItemAdded, session: AsyncSession) -> None:
        raise PermissionError("refused")

    async with factory() as session:
        await add_item(session, tables, "cherry")
        events.record(session, ItemAdded(name="cherry"))
        with pytest.raises(PermissionError, match="refused"):
            await session.commit()
        assert session.in_transaction()
        await session.rollback()

    assert delivered == []
    assert await item_names(engine, tables.items) == []


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_commit_after_a_before_commit_failure_resumes_at_the_failed_handler(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
) -> None:
    calls: list[str] = []

    @events.before_commit(ItemAdded)
    async def flaky(event: ItemAdded, session: AsyncSession) -> None:
        calls.append(event.name)
        if calls.count(event.name) == 1 and event.name == "b":
            raise ConnectionError("try again")

    async with factory() as session:
        await add_item(session, tables, "a")
        events.record(session, ItemAdded(name="a"))
        events.record(session, ItemAdded(name="b"))
        with pytest.raises(ConnectionError):
            await session.commit()
        await session.commit()

    assert calls == ["a", "b", "b"]
    assert delivered == [ItemAdded(name="a"), ItemAdded(name="b")]
    assert await item_names(engine, tables.items) == ["a"]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_commit_after_a_before_commit_failure_does_not_rerun_the_handlers_that_succeeded(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
) -> None:
    calls: list[str] = []

    @events.before_commit(ItemAdded)
    async def write_audit(event: ItemAdded, session: AsyncSession) -> None:
        calls.append(f"audit:{event.name}")
        await session.execute(insert(tables.audit).values(item_name=event.name, txid="-"))

    @events.before_commit(ItemAdded)
    async def check_quota(event: ItemAdded, session: AsyncSession) -> None:
        calls.append(f"quota:{event.name}")
        if calls.count(f"quota:{event.name}") == 1:
            raise ConnectionError("quota service unreachable, try again")

    async with factory() as session:
        await add_item(session, tables, "kiwi")
        events.record(session, ItemAdded(name="kiwi"))
        with pytest.raises(ConnectionError):
            await session.commit()
        await session.commit()

    assert calls == ["audit:kiwi", "quota:kiwi", "quota:kiwi"]
    assert await item_names(engine, tables.audit) == ["kiwi"]  # one audit row, not two
    assert delivered == [ItemAdded(name="kiwi")]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_events_recorded_by_before_commit_handlers_are_delivered(
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
) -> None:
    @events.before_commit(SpecialItemAdded)
    async def announce(event: SpecialItemAdded, session: AsyncSession) -> None:
        events.record(session, ItemAdded(name=f"{event.name}-audit"))

    async with factory() as session, session.begin():
        events.record(session, SpecialItemAdded(name="gold"))

    assert delivered == [SpecialItemAdded(name="gold"), ItemAdded(name="gold-audit")]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_releasing_a_savepoint_does_not_run_before_commit_handlers(
    factory: async_sessionmaker[AsyncSession], tables: Tables, events: TransactionalEvents
) -> None:
    calls: list[str] = []

    @events.before_commit(ItemAdded)
    async def count(event: ItemAdded, session: AsyncSession) -> None:
        calls.append(event.name)

    async with factory() as session, session.begin():
        async with session.begin_nested():
            events.record(session, ItemAdded(name="inner"))
        assert calls == []

    assert calls == ["inner"]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_committing_the_outer_transaction_over_an_open_savepoint_logs_skipped_handlers(
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    events: TransactionalEvents,
    delivered: list[object],
    caplog: pytest.LogCaptureFixture,
) -> None:
    @events.before_commit(ItemAdded)
    async def never(event: ItemAdded, session: AsyncSession) -> None:
        raise AssertionError("not reached")

    async with factory() as session:
        outer = await session.begin()
        await session.begin_nested()
        events.record(session, ItemAdded(name="x"))
        await outer.commit()

    assert delivered == [ItemAdded(name="x")]
    assert "before-commit handlers did not run for event item-added" in caplog.text


# -- concurrency and cancellation ----------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_concurrent_sessions_each_deliver_exactly_their_own_events(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    bus: EventBus,
    events: TransactionalEvents,
) -> None:
    current_task: contextvars.ContextVar[int] = contextvars.ContextVar("current_task")
    received: list[tuple[int, str]] = []

    @bus.on(ItemAdded)
    async def collect(event: ItemAdded) -> None:
        await asyncio.sleep(0)  # let the other tasks interleave
        received.append((current_task.get(), event.name))

    async def transaction(task: int) -> list[Recorded[ItemAdded]]:
        current_task.set(task)
        async with factory() as session, session.begin():
            recorded = []
            for n in range(3):
                await add_item(session, tables, f"{task}-{n}")
                recorded.append(events.record(session, ItemAdded(name=f"{task}-{n}")))
                await asyncio.sleep(0)
            if task % 5 == 0:
                await session.rollback()
        return recorded

    results = await asyncio.gather(*(transaction(task) for task in range(50)))

    committed = [task for task in range(50) if task % 5]
    expected = sorted((task, f"{task}-{n}") for task in committed for n in range(3))
    assert sorted(received) == expected  # each event once, delivered in its own task
    for task in committed:
        assert [name for owner, name in received if owner == task] == [
            f"{task}-{n}" for n in range(3)
        ]
    assert all(
        recorded.outcome is (Outcome.DELIVERED if task % 5 else Outcome.DISCARDED)
        for task, records in enumerate(results)
        for recorded in records
    )
    assert len(await item_names(engine, tables.items)) == len(expected)


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_cancelled_delivery_marks_and_logs_the_undelivered_events(
    engine: AsyncEngine,
    factory: async_sessionmaker[AsyncSession],
    tables: Tables,
    bus: EventBus,
    events: TransactionalEvents,
    caplog: pytest.LogCaptureFixture,
) -> None:
    started = asyncio.Event()
    records: list[Recorded[ItemAdded]] = []

    @bus.on(ItemAdded)
    async def slow(event: ItemAdded) -> None:
        started.set()
        await asyncio.sleep(60)

    async def commit() -> None:
        async with factory() as session, session.begin():
            await add_item(session, tables, "slow")
            records.append(events.record(session, ItemAdded(name="slow")))
            records.append(events.record(session, ItemAdded(name="next")))

    task = asyncio.create_task(commit())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert [recorded.outcome for recorded in records] == [Outcome.UNDELIVERED] * 2
    assert "2 committed event(s) not delivered, delivery was cancelled" in caplog.text
    assert await item_names(engine, tables.items) == ["slow"]  # the commit stands


# -- refused input and the edges --------------------------------------------------------


@pytest.mark.asyncio
async def test_recording_outside_a_transaction_raises() -> None:
    events = TransactionalEvents(EventBus())
    async with AsyncSession() as session:
        with pytest.raises(NoTransactionError, match="no transaction in progress"):
            events.record(session, ItemAdded(name="orphan"))
    assert issubclass(NoTransactionError, AioEventsError)


@pytest.mark.asyncio
async def test_transaction_ended_outside_the_greenlet_logs_what_it_could_not_deliver(
    caplog: pytest.LogCaptureFixture,
) -> None:
    events = TransactionalEvents(EventBus())
    session = AsyncSession()
    await session.begin()  # no statement yet: no connection, so no I/O to close it
    recorded = events.record(session, ItemAdded(name="lost"))
    session.sync_session.close()  # plain synchronous code, as close_all_sessions() runs

    assert recorded.outcome is Outcome.DISCARDED
    assert "1 discarded event(s) not delivered" in caplog.text


def test_record_refuses_a_class_and_a_non_async_session() -> None:
    events = TransactionalEvents(EventBus())
    with pytest.raises(TypeError, match="event instance, got the class ItemAdded"):
        events.record(AsyncSession(), ItemAdded)
    with pytest.raises(TypeError, match="takes an AsyncSession"):
        events.record(object(), ItemAdded(name="x"))  # type: ignore[arg-type]


def test_constructor_and_before_commit_refuse_bad_input() -> None:
    with pytest.raises(TypeError, match="takes an EventBus"):
        TransactionalEvents(object())  # type: ignore[arg-type]
    events = TransactionalEvents(EventBus())
    with pytest.raises(TypeError, match="takes an event class"):
        events.before_commit(ItemAdded(name="x"))  # type: ignore[arg-type]

    def sync_handler(event: ItemAdded, session: AsyncSession) -> None: ...

    with pytest.raises(TypeError, match="must be an async function"):
        events.before_commit(ItemAdded)(sync_handler)  # type: ignore[arg-type]


def test_a_rollback_bus_that_is_not_a_bus_is_refused() -> None:
    with pytest.raises(TypeError, match=r"rollback_bus=\.\.\.\) takes an EventBus or None, got 5"):
        TransactionalEvents(EventBus(), rollback_bus=5)  # type: ignore[arg-type]


def test_importing_without_sqlalchemy_names_the_extra_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['sqlalchemy'] = None  # as if the extra were not installed\n"
        "try:\n"
        "    import aioevents.sqlalchemy\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc.name, '|', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.startswith("sqlalchemy | aioevents.sqlalchemy needs SQLAlchemy")
    assert "pip install 'aioevents[sqlalchemy]'" in done.stdout


def test_reprs_name_what_they_hold() -> None:
    bus = EventBus()
    events = TransactionalEvents(bus, rollback_bus=bus)
    assert events.rollback_bus is bus
    assert repr(events) == f"<TransactionalEvents bus={bus!r} before_commit=0>"
    recorded = Recorded(ItemAdded(name="x"), events, ())
    assert repr(recorded) == "<Recorded item-added pending>"
