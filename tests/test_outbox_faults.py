"""The outbox attacked the way production breaks things.

Cancellation from every side of ``async with bus:`` while its relay runs handlers, and at
every await of ``await session.commit()``; the database dropping the relay's connections;
a handler slower than its lease; a pool smaller than the load; bad input at ``record``; and
the bus on trio.

Each test states what is guaranteed (the stored deliveries' states and attempts, what the
handlers were given, what reached the caller), never how long anything took: waits poll
with generous deadlines. PostgreSQL tests use tables of their own (a random prefix, dropped
afterwards) and engines with application names of their own: the only backends they
terminate are their own relay's. Run with ``-s`` to see the counts (duplicates, attempts).
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import anyio
import anyio.lowlevel
import pytest
import pytest_asyncio
from sqlalchemy import (
    Column,
    Integer,
    MetaData,
    Table,
    create_engine,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column
from sqlalchemy.pool import NullPool

from aioevents import BusStateError, ConfigurationError, Durable, EventBus
from aioevents.outbox import Codec, Outbox, Relay, current_delivery
from aioevents.sqlalchemy import Recorded, TransactionalEvents

DEADLINE = 120.0  # seconds for what must happen: generous, for a loaded 2-core machine
HANDLER = "outbox-faults.handle-ping"


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    __event_name__ = "outbox-faults.ping"

    n: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Note:
    """An event with a free text field (the codec must refuse what cannot be stored)."""

    __event_name__ = "outbox-faults.note"

    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Opaque:
    """An event with a field the codec cannot encode."""

    __event_name__ = "outbox-faults.opaque"

    payload: object


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyedByMissingField:
    __event_name__ = "outbox-faults.keyed-by-missing-field"
    __event_key__ = "tenant"

    n: int


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyedByNumber:
    __event_name__ = "outbox-faults.keyed-by-number"
    __event_key__ = 5

    n: int


class SiblingFailed(Exception):
    """What the owner's sibling task raises."""


class Base(DeclarativeBase):
    pass


class Document(Base):
    """A business row added through the ORM: flushed at commit, after before_commit."""

    __tablename__ = "outbox_faults_documents"

    id: Mapped[int] = mapped_column(primary_key=True)


# -- the database of one test -----------------------------------------------------------------


@dataclass
class Database:
    """One test's database: a table prefix and an application name of its own, the engines
    it made (disposed afterwards) and an admin engine that reads, terminates and drops."""

    url: str
    prefix: str
    name: str
    engines: list[AsyncEngine] = field(default_factory=list)
    business: MetaData = field(default_factory=MetaData)

    @property
    def postgres(self) -> bool:
        return self.url.startswith("postgresql")

    def engine(self, *, application_name: str | None = None, **options: Any) -> AsyncEngine:
        """An engine whose PostgreSQL backends carry ``application_name`` (the test's own)."""
        if self.postgres:
            settings = {"application_name": application_name or self.name}
            connect_args: dict[str, Any] = {"server_settings": settings}
        else:
            connect_args = {"timeout": options.pop("sqlite_busy_timeout", 30.0)}
        engine = create_async_engine(self.url, connect_args=connect_args, **options)
        self.engines.append(engine)
        return engine

    def admin(self) -> AsyncEngine:
        return self.engine(application_name=f"{self.name}-admin", poolclass=NullPool)

    def outbox(self, engine: AsyncEngine, **settings: Any) -> Outbox:
        return Outbox(engine, table_prefix=self.prefix, **settings)

    def business_table(self) -> Table:
        return Table(
            f"{self.prefix}business",
            self.business,
            Column("id", Integer, primary_key=True),
        )


@pytest_asyncio.fixture(
    params=[pytest.param("postgresql", marks=pytest.mark.postgres), pytest.param("sqlite")]
)
async def database(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    if request.param == "postgresql":
        url = str(request.getfixturevalue("database_url"))
    else:
        url = f"sqlite+aiosqlite:///{tmp_path / 'outbox.sqlite'}"
    async for db in _database(url):
        yield db


@pytest_asyncio.fixture
async def postgres(database_url: str) -> AsyncIterator[Database]:
    async for db in _database(database_url):
        yield db


async def _database(url: str) -> AsyncIterator[Database]:
    tag = uuid.uuid4().hex[:10]
    db = Database(url, prefix=f"aioevents_faults_{tag}_", name=f"aioevents-faults-{tag}")
    try:
        yield db
    finally:
        for engine in db.engines:
            await engine.dispose()
        if db.postgres:  # SQLite's file goes with tmp_path
            await _drop_tables(db)


async def _drop_tables(db: Database) -> None:
    admin = create_async_engine(db.url, poolclass=NullPool)
    try:
        async with admin.begin() as connection:
            await connection.run_sync(db.business.drop_all)
            await connection.run_sync(Outbox(admin, table_prefix=db.prefix).metadata.drop_all)
    finally:
        await admin.dispose()


# -- the durable handler and what it was given ----------------------------------------------


@dataclass
class Runs:
    """What the durable handler was given, by stored event id (from `current_delivery`).

    An event whose ``n`` has a gate waits in the handler until the gate opens.
    """

    started: Counter[uuid.UUID] = field(default_factory=Counter)
    finished: Counter[uuid.UUID] = field(default_factory=Counter)
    started_n: list[int] = field(default_factory=list)
    gates: dict[int, asyncio.Event] = field(default_factory=dict)
    running: int = 0
    most_running: int = 0

    def gate(self, n: int) -> asyncio.Event:
        return self.gates.setdefault(n, asyncio.Event())

    def duplicates(self) -> int:
        return sum(count - 1 for count in self.started.values())


def subscribe_handler(
    bus: EventBus,
    runs: Runs,
    *,
    durable: Durable | bool = True,
    sleep: float = 0.0,
    effect: Callable[[], Awaitable[None]] | None = None,
) -> None:
    async def handle_ping(event: Ping) -> None:
        delivery = current_delivery()
        assert delivery is not None
        runs.started[delivery.event_id] += 1
        runs.started_n.append(event.n)
        runs.running += 1
        runs.most_running = max(runs.most_running, runs.running)
        try:
            gate = runs.gates.get(event.n)
            if gate is not None:
                await gate.wait()
            if sleep:
                await asyncio.sleep(sleep)
            if effect is not None:
                await effect()
        finally:
            runs.running -= 1
        runs.finished[delivery.event_id] += 1

    bus.subscribe(Ping, handle_ping, name=HANDLER, durable=durable)


def event_id(recorded: Recorded[Any]) -> uuid.UUID:
    assert recorded.event_id is not None
    return recorded.event_id


async def record(
    sessions: async_sessionmaker[AsyncSession], events: TransactionalEvents, pings: Sequence[Ping]
) -> list[uuid.UUID]:
    """Record ``pings`` in one transaction; their stored event ids, in order."""
    async with sessions.begin() as session:
        recorded = [events.record(session, ping) for ping in pings]
    return [event_id(r) for r in recorded]


# -- reading what is stored -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stored:
    """One stored delivery (one durable handler: one per event)."""

    event_id: uuid.UUID
    status: str
    attempts: int
    leased: bool
    error_type: str | None


async def stored(engine: AsyncEngine, outbox: Outbox) -> dict[uuid.UUID, Stored]:
    deliveries = _table(outbox, "deliveries")
    columns = [
        deliveries.c.event_id,
        deliveries.c.status,
        deliveries.c.attempts,
        deliveries.c.lease_token.is_not(None),
        deliveries.c.error_type,
    ]
    async with engine.connect() as connection:
        rows = (await connection.execute(select(*columns))).all()
    return {row[0]: Stored(*row) for row in rows}


async def stored_event_ids(engine: AsyncEngine, outbox: Outbox) -> set[uuid.UUID]:
    events = _table(outbox, "events")
    async with engine.connect() as connection:
        return set((await connection.execute(select(events.c.id))).scalars())


def _table(outbox: Outbox, name: str) -> Table:
    (table,) = (t for t in outbox.metadata.tables.values() if t.name.endswith(f"_{name}"))
    assert isinstance(table, Table)
    return table


def given_back(row: Stored) -> bool:
    """Pending, leased by nobody, the attempt not counted: due again at once, anywhere."""
    return (row.status, row.leased, row.attempts) == ("pending", False, 0)


def describe(rows: dict[uuid.UUID, Stored]) -> str:
    return "\n".join(map(repr, rows.values()))


async def wait_until(
    check: Callable[[], Awaitable[bool]], what: str, deadline: float = DEADLINE
) -> None:
    give_up = time.monotonic() + deadline
    while not await check():
        if time.monotonic() > give_up:
            pytest.fail(f"not within {deadline}s: {what}")
        await asyncio.sleep(0.05)


async def wait_for(predicate: Callable[[], bool], what: str, deadline: float = DEADLINE) -> None:
    async def check() -> bool:
        return predicate()

    await wait_until(check, what, deadline)


async def all_completed(engine: AsyncEngine, outbox: Outbox, ids: Sequence[uuid.UUID]) -> None:
    async def check() -> bool:
        rows = await stored(engine, outbox)
        return all(rows[i].status == "completed" for i in ids if i in rows)

    await wait_until(check, f"{len(ids)} deliveries completed")


def tasks_left() -> list[asyncio.Task[Any]]:
    """Tasks other than this one still running: a relay's or a bus's that outlived it.

    SQLAlchemy's aiosqlite adapter closes a connection cut short by a cancellation in a task
    of its own: that one is not the library's.
    """
    current = asyncio.current_task()
    return [
        task
        for task in asyncio.all_tasks()
        if task is not current and not task.done() and not _sqlalchemys(task)
    ]


def _sqlalchemys(task: asyncio.Task[Any]) -> bool:
    code = getattr(task.get_coro(), "cr_code", None)
    return code is not None and f"{os.sep}sqlalchemy{os.sep}" in code.co_filename


# -- cancellation around `async with bus:` --------------------------------------------------


CANCELLATIONS = [
    "task.cancel",
    "asyncio.timeout",
    "anyio.move_on_after",
    "anyio.fail_after",
    "failing sibling",
]

RunBus = Callable[[Callable[[], object]], Coroutine[Any, Any, None]]


async def cancel_around(how: str, run_bus: RunBus, started: asyncio.Event) -> None:
    """Run ``run_bus(cancel)`` so that ``cancel()`` cancels it the way ``how`` says, and check
    that the cancellation reaches this caller as its source intends."""
    if how == "task.cancel":

        def cancel_own_task() -> None:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()

        owner = asyncio.create_task(run_bus(cancel_own_task))
        with pytest.raises(asyncio.CancelledError):
            await owner
        assert owner.cancelled()
    elif how == "asyncio.timeout":
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(None) as timeout:
                await run_bus(lambda: timeout.reschedule(loop.time()))
    elif how == "anyio.move_on_after":
        with anyio.move_on_after(3600) as scope:
            await run_bus(expire(scope))
        assert scope.cancelled_caught
    elif how == "anyio.fail_after":
        with pytest.raises(TimeoutError):
            with anyio.fail_after(3600) as scope:
                await run_bus(expire(scope))
    else:
        assert how == "failing sibling"

        async def sibling() -> None:
            await started.wait()
            raise SiblingFailed

        with pytest.RaisesGroup(SiblingFailed):
            async with anyio.create_task_group() as group:
                group.start_soon(sibling)
                await run_bus(lambda: None)


def expire(scope: anyio.CancelScope) -> Callable[[], None]:
    """What makes ``scope`` pass its deadline now (as move_on_after's or fail_after's)."""

    def cancel() -> None:
        scope.deadline = anyio.current_time()

    return cancel


@dataclass
class Setup:
    engine: AsyncEngine
    admin: AsyncEngine
    outbox: Outbox
    bus: EventBus
    events: TransactionalEvents
    sessions: async_sessionmaker[AsyncSession]
    runs: Runs


async def set_up(
    db: Database, *, durable: Durable | bool = True, sleep: float = 0.0, **settings: Any
) -> Setup:
    engine = db.engine()
    outbox = db.outbox(engine, **settings)
    await outbox.create_tables()
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=outbox)
    runs = Runs()
    subscribe_handler(bus, runs, durable=durable, sleep=sleep)
    return Setup(engine, db.admin(), outbox, bus, events, async_sessionmaker(engine), runs)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("how", CANCELLATIONS)
@pytest.mark.asyncio
async def test_a_cancelled_owner_drains_the_running_delivery_and_gives_back_the_rest(
    database: Database, how: str
) -> None:
    # One worker: the first delivery runs (held at its gate), ten wait in the relay's queue.
    # One attempt allowed: a cancellation counted as a failed attempt would make it dead.
    s = await set_up(database, durable=Durable(max_attempts=1), concurrency=1, lease=60.0)
    gate = s.runs.gate(0)
    started = asyncio.Event()
    ids: list[uuid.UUID] = []

    async def run_bus(cancel: Callable[[], object]) -> None:
        async with s.bus:
            try:
                ids.extend(await record(s.sessions, s.events, [Ping(n=n) for n in range(11)]))
                await wait_for(lambda: bool(s.runs.started), "the first delivery started")
                started.set()
                cancel()
                await anyio.sleep_forever()
            finally:
                gate.set()  # the running handler can finish: the drain waits for it
                # The application's own cleanup inside the block awaits (closing a server,
                # a pool) before the bus's exit runs.
                with anyio.CancelScope(shield=True):
                    await anyio.lowlevel.checkpoint()

    await cancel_around(how, run_bus, started)

    assert tasks_left() == []
    rows = await stored(s.admin, s.outbox)
    first, *queued = ids
    # Stopping, the relay lets the running handler finish within drain_timeout...
    assert s.runs.started[first] == 1
    assert rows[first].status == "completed", describe(rows)
    # ...and gives back what it held but had not started, leased by nobody, not counted.
    assert all(given_back(rows[i]) or rows[i].status == "completed" for i in queued), describe(rows)
    # None lost: the bus run again delivers the rest.
    async with s.bus:
        await all_completed(s.admin, s.outbox, ids)
    assert all(s.runs.finished[i] >= 1 for i in ids)


@pytest.mark.timeout(240)
@pytest.mark.asyncio
async def test_a_handler_past_the_drain_timeout_is_given_back_uncounted(
    database: Database,
) -> None:
    s = await set_up(
        database, durable=Durable(max_attempts=1), concurrency=2, lease=60.0, drain_timeout=0.2
    )
    s.runs.gate(0)  # never opened in the first run: the drain timeout cancels it
    ids: list[uuid.UUID] = []

    async def owner() -> None:
        async with s.bus:
            ids.extend(await record(s.sessions, s.events, [Ping(n=n) for n in range(5)]))
            await anyio.sleep_forever()

    task = asyncio.create_task(owner())
    await wait_for(lambda: 0 in s.runs.started_n, "the stuck delivery started")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert tasks_left() == []
    rows = await stored(s.admin, s.outbox)
    stuck = ids[0]
    assert s.runs.finished[stuck] == 0
    assert given_back(rows[stuck]), describe(rows)
    assert all(given_back(row) or row.status == "completed" for row in rows.values())
    s.runs.gate(0).set()
    async with s.bus:
        await all_completed(s.admin, s.outbox, ids)
    assert all(s.runs.finished[i] >= 1 for i in ids)


@pytest.mark.timeout(300)
@pytest.mark.asyncio
async def test_a_second_cancellation_during_the_drain_ends_the_owner(database: Database) -> None:
    """A supervisor's shutdown: cancel, wait a grace period, cancel again. The owner ends;
    no relay task is left; nothing is lost."""
    s = await set_up(database, concurrency=2, lease=60.0)
    s.runs.gate(0)
    ids: list[uuid.UUID] = []

    async def owner() -> None:
        async with s.bus:
            ids.extend(await record(s.sessions, s.events, [Ping(n=n) for n in range(4)]))
            await anyio.sleep_forever()

    task = asyncio.create_task(owner())
    await wait_for(lambda: 0 in s.runs.started_n, "the held delivery started")
    task.cancel()
    for _ in range(10):  # the owner is in the relay's drain, waiting for the held handler
        await asyncio.sleep(0)
    task.cancel()
    s.runs.gate(0).set()
    done, _ = await asyncio.wait([task], timeout=60)
    if not done:
        await _force_end(task)
        pytest.fail("the owner did not end after a second cancellation: its relay hangs")
    assert task.cancelled()
    assert tasks_left() == []
    rows = await stored(s.admin, s.outbox)
    assert all(given_back(row) or row.status == "completed" for row in rows.values()), describe(
        rows
    )
    async with s.bus:
        await all_completed(s.admin, s.outbox, ids)
    assert all(s.runs.finished[i] >= 1 for i in ids)


async def _force_end(task: asyncio.Task[None]) -> None:
    for _ in range(5):
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=10)
        if done:
            return


@pytest.mark.timeout(240)
@pytest.mark.asyncio
async def test_a_stopping_relay_claims_nothing_more_and_holds_nothing_after(
    database: Database,
) -> None:
    """Stopping, a relay stops claiming: what it holds when it returns is nothing."""
    s = await set_up(
        database, concurrency=2, batch_size=2, lease=60.0, poll_interval=0.05, drain_timeout=1.0
    )
    # Recorded by a bus that does not run: stored unleased, for any relay to claim.
    recorder = EventBus()
    subscribe_handler(recorder, Runs())
    recording = TransactionalEvents(recorder, outbox=s.outbox)
    ids = await record(s.sessions, recording, [Ping(n=n) for n in range(20)])
    s.runs.gate(0)  # opened once the relay stops
    s.runs.gate(1)  # never opened: the drain timeout ends it
    stop = asyncio.Event()
    stopping = asyncio.Event()

    async def run_relay() -> None:
        async with s.outbox.relay(s.bus):
            await stop.wait()
            stopping.set()  # the relay stops claiming from here on (same step: no await)

    task = asyncio.create_task(run_relay())
    await wait_for(lambda: {0, 1} <= set(s.runs.started_n), "deliveries 0 and 1 running")
    stop.set()
    await stopping.wait()
    s.runs.gate(0).set()  # a worker is free again, and the writer wakes the fetcher
    await task

    assert tasks_left() == []
    assert set(s.runs.started_n) == {0, 1}, "a delivery started after the relay stopped"
    rows = await stored(s.admin, s.outbox)
    assert rows[ids[0]].status == "completed"
    assert all(given_back(rows[i]) for i in ids[1:]), describe(rows)


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_a_relay_entered_again_runs_cleanly_or_is_refused(database: Database) -> None:
    """A supervisor restarting the same `Relay` object: it runs as the first time did
    (outcomes written, nothing left leased when it returns), or refuses at once."""
    s = await set_up(database, lease=60.0, poll_interval=0.05)
    recorder = EventBus()
    subscribe_handler(recorder, Runs())
    recording = TransactionalEvents(recorder, outbox=s.outbox)
    relay = s.outbox.relay(s.bus)
    for n in range(2):
        (recorded,) = await record(s.sessions, recording, [Ping(n=n)])
        s.runs.gate(n)
        try:
            async with relay:
                await wait_for(lambda: bool(s.runs.running), f"delivery {n} running")
                s.runs.gate(n).set()  # finishes while the relay stops
        except BusStateError:
            assert n == 1, "the first entry is refused"
            return
        rows = await stored(s.admin, s.outbox)
        assert rows[recorded].status == "completed", describe(rows)
        assert not any(row.leased for row in rows.values()), describe(rows)


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_deliveries_leased_at_commit_to_a_relay_that_stopped_meanwhile_are_given_back(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Written leased to the bus's relay just before COMMIT; the relay stops during the
    COMMIT: the committer gives them back at once, for any relay (no wait for the lease)."""
    s = await set_up(database, lease=60.0, poll_interval=0.1)
    taken: list[bool] = []  # what the hand-overs after COMMIT found
    take = Relay.take

    def watched_take(relay: Relay, jobs: Sequence[Any]) -> bool:
        taken.append(take(relay, jobs))
        return taken[-1]

    monkeypatch.setattr(Relay, "take", watched_take)
    stop_now = asyncio.Event()
    committing: list[asyncio.Task[Any]] = []

    def stop_the_bus(*_: object) -> None:  # engine "commit": just before COMMIT is sent
        if asyncio.current_task() in committing:
            stop_now.set()

    entered = asyncio.Event()

    async def owner() -> None:
        async with s.bus:  # its relay runs once the block is entered
            entered.set()
            await stop_now.wait()

    running = asyncio.create_task(owner())
    await entered.wait()
    event.listen(s.engine.sync_engine, "commit", stop_the_bus)
    try:
        session = s.sessions()
        try:
            await session.begin()
            recorded = event_id(s.events.record(session, Ping(n=0)))
            committing.append(asyncio.create_task(session.commit()))
            await committing[0]
        finally:
            await session.close()
    finally:
        event.remove(s.engine.sync_engine, "commit", stop_the_bus)
    await running
    rows = await stored(s.admin, s.outbox)
    assert taken == [False]  # leased to the relay at COMMIT, which had stopped since
    assert s.runs.started[recorded] == 0
    assert given_back(rows[recorded]), describe(rows)


# -- cancellation of the committing task ----------------------------------------------------


@dataclass(eq=False)  # hashable: SQLAlchemy keys its listeners by them
class Canceller:
    """Cancels ``target`` from inside the commit, at the point a listener marks."""

    target: asyncio.Task[Any] | None = None

    def __call__(self, *_: object) -> None:
        task = asyncio.current_task()
        if task is not None and task is self.target:
            self.target = None
            task.cancel()


CANCEL_POINTS = [
    "deliveries INSERT sent",
    "deliveries INSERT returned",
    "COMMIT sent",
    "COMMIT returned",
    "commit ended",
]


@contextmanager
def cancel_at(point: str, engine: AsyncEngine, prefix: str, canceller: Canceller) -> Iterator[None]:
    target: Any = engine.sync_engine
    if point in ("deliveries INSERT sent", "deliveries INSERT returned"):
        name = "before_cursor_execute" if point.endswith("sent") else "after_cursor_execute"
        insert_sql = f"INSERT INTO {prefix}deliveries"

        def listener(*args: Any) -> None:
            if insert_sql in args[2]:  # the statement
                canceller()

    elif point == "COMMIT sent":
        name, listener = "commit", canceller
    else:  # after aioevents' own listeners, registered when TransactionalEvents was made
        target = Session
        name = "after_commit" if point == "COMMIT returned" else "after_transaction_end"
        listener = canceller
    event.listen(target, name, listener)
    try:
        yield
    finally:
        event.remove(target, name, listener)


@dataclass
class Commit:
    ids: list[uuid.UUID]
    returned: bool  # the commit returned without being cancelled


async def commit_cancelled(
    s: Setup, n: int, cancel: Callable[[asyncio.Task[None]], Awaitable[None]]
) -> Commit:
    """Record two pings in a transaction and commit it in a task that ``cancel`` cancels."""
    session = s.sessions()
    try:
        await session.begin()
        ids = [event_id(s.events.record(session, Ping(n=n * 2 + i))) for i in range(2)]
        committing = asyncio.create_task(session.commit())
        await cancel(committing)
        try:
            await committing
        except asyncio.CancelledError:
            return Commit(ids, returned=False)
        return Commit(ids, returned=True)
    finally:
        await session.close()


async def check_committed_are_delivered(s: Setup, commits: Sequence[Commit]) -> None:
    """Every committed event is delivered (handed over, or claimed after its lease), and
    nothing that was not committed ran."""

    async def delivered() -> bool:
        rows = await stored(s.admin, s.outbox)
        committed = await stored_event_ids(s.admin, s.outbox)
        done = all(row.status == "completed" for row in rows.values())
        return done and set(s.runs.finished) >= committed

    async with s.bus:  # the relay that was handed the deliveries, or its successor
        await wait_until(delivered, "every committed event delivered")
    committed = await stored_event_ids(s.admin, s.outbox)
    assert set(s.runs.finished) == committed
    for commit in commits:
        if commit.returned:
            assert set(commit.ids) <= committed
    print(
        f"{len(commits)} commits, {sum(c.returned for c in commits)} returned, "
        f"{len(committed) // 2} committed, {s.runs.duplicates()} duplicate runs"
    )


@pytest.mark.timeout(180)
@pytest.mark.parametrize("point", CANCEL_POINTS)
@pytest.mark.asyncio
async def test_a_commit_cancelled_at_each_step_loses_no_committed_delivery(
    database: Database, point: str
) -> None:
    s = await set_up(database, lease=1.0, poll_interval=0.1)
    volatile: list[int] = []
    s.bus.subscribe(Ping, lambda ping: volatile.append(ping.n))  # a plain handler too
    canceller = Canceller()

    async def arm(task: asyncio.Task[None]) -> None:
        canceller.target = task

    commits = []
    async with s.bus:
        with cancel_at(point, s.engine, database.prefix, canceller):
            commits.append(await commit_cancelled(s, 0, arm))
    assert canceller.target is None, f"the commit never reached {point}"
    await check_committed_are_delivered(s, commits)


def at_suspension(number: int) -> Callable[[asyncio.Task[None]], Awaitable[None]]:
    """Cancel the task while it waits at its ``number``-th await (0: before it starts).

    A task's awaits are told apart by the future it waits for (asyncio's ``_fut_waiter``):
    watched at every step of the event loop, each new one is the next await.
    """

    async def cancel(task: asyncio.Task[None]) -> None:
        seen, waiting_for = 0, None
        while seen < number and not task.done():
            await asyncio.sleep(0)
            waiter = getattr(task, "_fut_waiter", None)
            if waiter is not None and waiter is not waiting_for:
                seen, waiting_for = seen + 1, waiter
        task.cancel()

    return cancel


@pytest.mark.postgres
@pytest.mark.timeout(300)
@pytest.mark.asyncio
async def test_commits_cancelled_at_every_await_lose_nothing(postgres: Database) -> None:
    """Cancel the committing task at its first, second, third... await, until commits end
    before the cancellation comes.

    PostgreSQL only: on SQLite, a statement cancelled inside aiosqlite can leave its
    connection holding the database lock until it is garbage-collected (SQLAlchemy and
    aiosqlite do this for a plain ORM insert too), and the next write then fails with
    "database is locked": upstream behaviour, not the outbox's. SQLite is still cancelled
    at each named step of the commit in the test above."""
    s = await set_up(postgres, lease=1.0, poll_interval=0.1)
    commits: list[Commit] = []
    async with s.bus:
        while not commits or not commits[-1].returned:
            commits.append(await commit_cancelled(s, len(commits), at_suspension(len(commits))))
            assert len(commits) < 1000, "no commit ended before its cancellation"
    await check_committed_are_delivered(s, commits)


# -- the database failing under a running relay ----------------------------------------------


async def terminate_backends(admin: AsyncEngine, application_name: str) -> int:
    """Terminate the backends of ``application_name`` (this test's relay engine's alone)."""
    statement = text(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE application_name = :name AND pid <> pg_backend_pid()"
    )
    async with admin.connect() as connection:
        result = await connection.execute(statement, {"name": application_name})
        return sum(bool(terminated) for (terminated,) in result)


@pytest.mark.postgres
@pytest.mark.timeout(400)
@pytest.mark.asyncio
async def test_the_relay_outlives_its_connections_being_terminated(
    postgres: Database, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="aioevents.outbox")
    relay_engine = postgres.engine()  # the only backends this test terminates
    outbox = postgres.outbox(relay_engine, lease=2.0, poll_interval=0.1, concurrency=4)
    await outbox.create_tables()
    admin = postgres.admin()
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=outbox)
    runs = Runs()
    subscribe_handler(bus, runs, sleep=0.005)
    recording = postgres.engine(application_name=f"{postgres.name}-recorder")
    sessions = async_sessionmaker(recording)
    ids: list[uuid.UUID] = []

    async def record_over_time() -> None:
        for batch in range(40):
            ids.extend(await record(sessions, events, [Ping(n=batch * 10 + i) for i in range(10)]))
            await asyncio.sleep(0.02)

    terminated = 0
    async with bus:
        recorder = asyncio.create_task(record_over_time())
        while not recorder.done():
            await asyncio.sleep(0.15)
            terminated += await terminate_backends(admin, postgres.name)
        await recorder
        terminated += await terminate_backends(admin, postgres.name)
        await all_completed(admin, outbox, ids)
    assert terminated > 0, "the attack never hit a connection"
    rows = await stored(admin, outbox)
    assert len(rows) == len(ids) == 400
    assert all(row.status == "completed" and not row.leased for row in rows.values())
    assert set(runs.finished) == set(ids)
    assert any(r.name == "aioevents.outbox" for r in caplog.records), "the relay logged nothing"
    print(
        f"{terminated} backends terminated; {runs.duplicates()} duplicate runs; "
        f"{sum(row.attempts > 1 for row in rows.values())} deliveries claimed again"
    )


# -- leases -----------------------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.timeout(180)
@pytest.mark.asyncio
async def test_a_handler_slower_than_its_lease_runs_once_with_two_relays(
    postgres: Database,
) -> None:
    s = await set_up(postgres, sleep=3.0, lease=1.0, poll_interval=0.1)
    other = EventBus()  # another process's bus: the same handler name, its own relay
    subscribe_handler(other, s.runs, sleep=3.0)
    recorder = EventBus()  # records unleased deliveries, for either relay to claim
    subscribe_handler(recorder, Runs())
    unleased = TransactionalEvents(recorder, outbox=s.outbox)
    async with s.outbox.relay(other), s.bus:
        ids = await record(s.sessions, s.events, [Ping(n=n) for n in range(3)])
        ids += await record(s.sessions, unleased, [Ping(n=n) for n in range(3, 6)])
        await all_completed(s.admin, s.outbox, ids)
    rows = await stored(s.admin, s.outbox)
    assert {i: s.runs.started[i] for i in ids} == dict.fromkeys(ids, 1)
    assert all(row.attempts == 1 for row in rows.values()), describe(rows)


@pytest.mark.postgres
@pytest.mark.timeout(180)
@pytest.mark.asyncio
async def test_a_relay_whose_lease_ran_out_under_a_running_handler_keeps_running(
    postgres: Database,
) -> None:
    """The lease passes while the handler still runs (a stalled event loop, the renewer
    unable to reach the database for longer than the lease): the delivery may run again
    (at least once), and the relay goes on; its bus leaves cleanly."""
    s = await set_up(postgres, lease=3.0, poll_interval=0.05)
    gate = s.runs.gate(0)
    deliveries = _table(s.outbox, "deliveries")
    async with s.bus:
        (first,) = await record(s.sessions, s.events, [Ping(n=0)])
        await wait_for(lambda: s.runs.started[first] == 1, "the delivery started")
        async with s.admin.begin() as connection:
            past = datetime.now(UTC) - timedelta(seconds=1)
            await connection.execute(update(deliveries).values(lease_expires=past))

        async def leased_again() -> bool:
            async with s.admin.connect() as connection:
                query = select(deliveries.c.lease_expires)
                expires = (await connection.execute(query)).scalar_one()
            return expires is not None and expires > datetime.now(UTC)

        await wait_until(leased_again, "the delivery leased again (renewed or claimed)")
        with anyio.move_on_after(2.0):  # a relay claiming it again starts it at once
            await wait_for(lambda: s.runs.started[first] == 2, "")
        gate.set()
        await all_completed(s.admin, s.outbox, [first])
        await wait_for(lambda: s.runs.running == 0, "every run of the handler ended")
    assert s.runs.finished[first] >= 1
    assert tasks_left() == []


# -- load past the pool ----------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.timeout(600)
@pytest.mark.asyncio
async def test_load_past_the_pool_completes_without_deadlock(postgres: Database) -> None:
    engine = postgres.engine(pool_size=2, max_overflow=0, pool_timeout=300)
    outbox = postgres.outbox(engine, concurrency=8, poll_interval=0.1)
    await outbox.create_tables()
    admin = postgres.admin()
    sessions = async_sessionmaker(engine)
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=outbox)
    runs = Runs()
    effects: list[uuid.UUID] = []

    async def effect() -> None:  # the handler's own transaction on the same small pool
        async with sessions.begin() as session:
            if await outbox.first_time(session):
                delivery = current_delivery()
                assert delivery is not None
                effects.append(delivery.event_id)

    subscribe_handler(bus, runs, effect=effect)
    ids: list[uuid.UUID] = []

    async def requests(first: int) -> None:
        for n in range(first, first + 50):
            ids.extend(await record(sessions, events, [Ping(n=n)]))

    async with bus:
        async with anyio.create_task_group() as group:
            for request in range(10):
                group.start_soon(requests, request * 50)
        await all_completed(admin, outbox, ids)
    assert len(ids) == 500
    assert set(runs.finished) == set(ids)
    assert sorted(effects) == sorted(ids)  # the inbox let each effect through once
    rows = await stored(admin, outbox)
    assert all(row.status == "completed" for row in rows.values())
    print(f"{runs.duplicates()} duplicate runs, at most {runs.most_running} at once")


@pytest.mark.postgres
@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_a_running_bus_leaves_a_pool_of_one_to_the_application(postgres: Database) -> None:
    """With listen=False the relay keeps no pooled connection for itself (LISTEN holds one,
    as documented): the application's commits share the pool's only connection with it."""
    engine = postgres.engine(pool_size=1, max_overflow=0, pool_timeout=30)
    outbox = postgres.outbox(engine, poll_interval=0.1, listen=False)
    await outbox.create_tables()
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=outbox)
    runs = Runs()
    subscribe_handler(bus, runs)
    sessions = async_sessionmaker(engine)
    async with bus:
        await asyncio.sleep(0.5)  # the relay's services have started (LISTEN among them)
        ids = await record(sessions, events, [Ping(n=0)])
        await all_completed(postgres.admin(), outbox, ids)
    assert runs.finished[ids[0]] == 1


# -- bad input at the boundary ----------------------------------------------------------------


def _engine() -> AsyncEngine:
    return create_async_engine("sqlite+aiosqlite://")  # never connects here


BAD_OUTBOX_SETTINGS: list[tuple[dict[str, Any], type[Exception]]] = [
    ({"table_prefix": "bad-prefix"}, ConfigurationError),
    ({"table_prefix": ""}, ConfigurationError),
    ({"table_prefix": "x; DROP TABLE users; --"}, ConfigurationError),
    ({"table_prefix": 5}, TypeError),
    ({"schema": "a.b"}, ConfigurationError),
    ({"codec": object()}, TypeError),
    ({"lease": 0}, ConfigurationError),
    ({"lease": -1.0}, ConfigurationError),
    ({"lease": math.nan}, ConfigurationError),
    ({"lease": math.inf}, ConfigurationError),
    ({"lease": "30"}, TypeError),
    ({"lease": True}, TypeError),
    ({"poll_interval": 0}, ConfigurationError),
    ({"drain_timeout": -1}, ConfigurationError),
    ({"concurrency": 0}, ConfigurationError),
    ({"concurrency": 1.5}, TypeError),
    ({"concurrency": True}, TypeError),
    ({"batch_size": 0}, ConfigurationError),
    ({"keep_completed": 5}, TypeError),
]


@pytest.mark.parametrize(("settings", "error"), BAD_OUTBOX_SETTINGS)
def test_outbox_refuses_bad_settings_at_once(settings: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        Outbox(_engine(), **settings)


@pytest.mark.parametrize(
    "engine",
    [
        pytest.param("postgresql+asyncpg://x/y", id="a URL"),
        pytest.param(create_engine("sqlite://"), id="a sync engine"),
        pytest.param(None, id="None"),
    ],
)
def test_outbox_refuses_what_is_not_an_async_engine(engine: object) -> None:
    with pytest.raises(TypeError):
        Outbox(engine)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"keep_completed": timedelta(seconds=-1)}, id="negative keep_completed"),
        pytest.param({"lease": 1e12}, id="lease overflowing datetime"),
    ],
)
def test_outbox_refuses_settings_that_would_only_fail_later(settings: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        Outbox(_engine(), **settings)


def test_relays_and_transactional_events_refuse_bad_arguments() -> None:
    outbox = Outbox(_engine())
    with pytest.raises(TypeError):
        outbox.relay("bus")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError):
        outbox.relay(EventBus(), concurrency=0)
    with pytest.raises(TypeError):
        TransactionalEvents(EventBus(), outbox="outbox")  # type: ignore[arg-type]


BAD_RECORDS = [
    pytest.param(Ping(n=1), {"key": 5}, TypeError, id="key=5"),
    pytest.param(Ping(n=1), {"key": b"k"}, TypeError, id="key=bytes"),
    pytest.param(Ping(n=1), {"key": ""}, ValueError, id="key=''"),
    pytest.param(Ping(n=1), {"key": "k" * 256}, ValueError, id="key too long"),
    pytest.param(Ping(n=1), {"headers": {"a": 1}}, TypeError, id="header value an int"),
    pytest.param(Ping(n=1), {"headers": {1: "a"}}, TypeError, id="header name an int"),
    pytest.param(Ping(n=1), {"headers": [("a", "b")]}, TypeError, id="headers a list"),
    pytest.param(Ping(n=1), {"headers": "a=b"}, TypeError, id="headers a str"),
    pytest.param(Opaque(payload=asyncio.Lock()), {}, TypeError, id="unencodable field"),
    pytest.param(Ping, {}, TypeError, id="an event class"),
    pytest.param(KeyedByMissingField(n=1), {}, ConfigurationError, id="key field missing"),
    pytest.param(KeyedByNumber(n=1), {}, ConfigurationError, id="__event_key__ not a str"),
]

Expected = type[Exception] | tuple[type[Exception], ...]


async def _boundary_setup(db: Database) -> tuple[Setup, Table]:
    s = await set_up(db, poll_interval=0.1)
    for event_type in (Note, Opaque, KeyedByMissingField, KeyedByNumber):
        s.bus.subscribe(event_type, _ignore, name=f"{HANDLER}.{event_type.__name__}", durable=True)
    business = db.business_table()
    async with s.engine.begin() as connection:
        await connection.run_sync(db.business.create_all)
    return s, business


async def _ignore(event: object) -> None:
    pass


async def _commit_around_bad_records(
    s: Setup, business: Table, bad: Callable[[AsyncSession], object], error: Expected
) -> uuid.UUID:
    """A transaction that writes a business row and a good event, and tries ``bad``: it
    raises ``error`` at record; the transaction commits the rest. The good event's id."""
    async with s.sessions.begin() as session:
        await session.execute(insert(business).values(id=1))
        good = event_id(s.events.record(session, Ping(n=0)))
        with pytest.raises(error):
            bad(session)
    return good


async def _check_only_the_good_was_written(s: Setup, business: Table, good: uuid.UUID) -> None:
    async with s.engine.connect() as connection:
        assert (await connection.execute(select(func.count()).select_from(business))).scalar() == 1
    assert await stored_event_ids(s.admin, s.outbox) == {good}
    async with s.bus:
        await all_completed(s.admin, s.outbox, [good])
    assert s.runs.finished == Counter({good: 1})


@pytest.mark.timeout(120)
@pytest.mark.parametrize(("event", "options", "error"), BAD_RECORDS)
@pytest.mark.asyncio
async def test_bad_input_is_refused_at_record_and_the_transaction_goes_on(
    database: Database, event: object, options: dict[str, Any], error: Expected
) -> None:
    s, business = await _boundary_setup(database)
    good = await _commit_around_bad_records(
        s, business, lambda session: s.events.record(session, event, **options), error
    )
    await _check_only_the_good_was_written(s, business, good)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"key": "a\x00b"}, marks=pytest.mark.postgres, id="NUL in the key"),
        pytest.param({"key": "\ud800"}, id="lone surrogate in the key"),
    ],
)
@pytest.mark.asyncio
async def test_a_key_the_database_cannot_store_is_refused_at_record(
    database: Database, options: dict[str, Any]
) -> None:
    """Not at COMMIT, where it would fail the application's whole transaction."""
    if "\x00" in options["key"] and not database.postgres:
        pytest.skip("SQLite stores NUL in text")
    s, business = await _boundary_setup(database)
    good = await _commit_around_bad_records(
        s,
        business,
        lambda session: s.events.record(session, Ping(n=1), **options),
        (TypeError, ValueError),
    )
    await _check_only_the_good_was_written(s, business, good)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("event", "options"),
    [
        pytest.param(Note(text="\ud800"), {}, id="lone surrogate in a field"),
        pytest.param(Ping(n=1), {"headers": {"\ud800": "x"}}, id="lone surrogate in a header"),
    ],
)
@pytest.mark.asyncio
async def test_unencodable_text_is_a_type_error_at_record(
    database: Database, event: object, options: dict[str, Any]
) -> None:
    """The codec's promise: what it cannot encode is a TypeError naming the event."""
    s, business = await _boundary_setup(database)
    good = await _commit_around_bad_records(
        s, business, lambda session: s.events.record(session, event, **options), TypeError
    )
    await _check_only_the_good_was_written(s, business, good)


def test_codec_refuses_a_lone_surrogate_with_a_type_error() -> None:
    codec = Codec()
    codec.register(Note)
    with pytest.raises(TypeError, match="Note"):
        codec.encode(Note(text="\ud800"))


# -- a commit retried after its outbox write failed (SQLite) ------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.asyncio
async def test_a_commit_retried_after_the_outbox_write_failed_writes_the_event(
    tmp_path: Path,
) -> None:
    """SQLite: another writer holds the lock when the outbox writes, before COMMIT ("database
    is locked"); the application retries the commit. Its business rows and its event commit
    together, or neither does."""
    path = tmp_path / "outbox.sqlite"
    db = Database(f"sqlite+aiosqlite:///{path}", prefix="faults_", name="unused")
    engine = db.engine(sqlite_busy_timeout=0.1)
    outbox = db.outbox(engine)
    await outbox.create_tables()
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=outbox)
    subscribe_handler(bus, Runs())
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        async with async_sessionmaker(engine)() as session:
            await session.begin()
            session.add(Document(id=1))  # flushed at commit: the outbox writes first
            recorded = events.record(session, Ping(n=1))
            blocker.execute("BEGIN IMMEDIATE")
            with pytest.raises(OperationalError, match="locked"):
                await session.commit()
            blocker.execute("ROLLBACK")
            await session.commit()  # the retry
        async with engine.connect() as connection:
            documents = (await connection.execute(select(func.count(Document.id)))).scalar()
        stored_ids = await stored_event_ids(engine, outbox)
        assert (documents, stored_ids) == (1, {event_id(recorded)})
    finally:
        blocker.close()
        await engine.dispose()


# -- trio -------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_a_bus_with_an_outbox_on_trio_is_refused_at_once(tmp_path: Path) -> None:
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'trio.sqlite'}")
    outbox = Outbox(engine)
    bus = EventBus()
    TransactionalEvents(bus, outbox=outbox)
    subscribe_handler(bus, Runs())

    async def main() -> None:
        with anyio.fail_after(30):  # a hang fails here, with a TimeoutError
            with pytest.raises(BusStateError, match="asyncio"):
                async with bus:
                    await anyio.sleep_forever()
            assert not bus.running
            with pytest.raises(BusStateError, match="asyncio"):
                async with outbox.relay(bus):
                    await anyio.sleep_forever()

    anyio.run(main, backend="trio")
