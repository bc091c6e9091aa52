"""Shared pieces of the outbox tests: a database holding one outbox's tables, and waiting.

Each test gets tables of its own (a random prefix), on PostgreSQL or in a SQLite file, and
drops them at the end, so tests can share the PostgreSQL database with others running at the
same time. Tests wait for states (rows, calls), never for durations: a loaded machine only
makes them slower.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from uuid import uuid4

import pytest
from sqlalchemy import MetaData, Row, Table, func, select
from sqlalchemy import event as sa_event
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import Session

from aioevents.outbox import Outbox, Relay
from aioevents.sqlalchemy import Recorded, TransactionalEvents

__all__ = [
    "DEADLINE",
    "POLL",
    "Database",
    "RelayTask",
    "StatementHold",
    "eventually",
    "happens_within",
    "is_set",
    "not_taking_work",
    "open_database",
    "pause_before_commit",
    "record",
    "record_in_batches",
]

try:
    from sqlalchemy.util.concurrency import await_ as await_only
except ImportError:  # pragma: no cover  (SQLAlchemy 2.0 only has the name 2.1 deprecates)
    from sqlalchemy.util.concurrency import await_only

POLL = 0.05  # the relays' poll interval here: a missed wake-up costs little
DEADLINE = 60.0  # seconds a test waits for a state before it fails


@dataclass(frozen=True, slots=True)
class Database:
    """An engine, a table prefix of the test's own, and the outbox made on them."""

    kind: str  # "postgresql" or "sqlite"
    url: str
    engine: AsyncEngine
    prefix: str
    outbox: Outbox  # polls every POLL seconds; the tables are its
    sessions: async_sessionmaker[AsyncSession]
    business: MetaData  # the test's own tables, dropped with the outbox's

    def new_outbox(self, **options: Any) -> Outbox:
        """Another Outbox on the same tables: another process, or other settings."""
        options.setdefault("poll_interval", POLL)
        return Outbox(self.engine, table_prefix=self.prefix, **options)

    @property
    def deliveries(self) -> Table:
        return self._table("deliveries")

    @property
    def events(self) -> Table:
        return self._table("events")

    @property
    def inbox(self) -> Table:
        return self._table("inbox")

    def _table(self, name: str) -> Table:
        table: Table = self.outbox.metadata.tables[f"{self.prefix}{name}"]
        return table

    async def delivery_rows(self) -> list[Row[Any]]:
        """Every delivery row, by id, read on a connection of its own (what is committed)."""
        d = self.deliveries
        async with self.engine.connect() as connection:
            return list((await connection.execute(select(d).order_by(d.c.id))).all())

    async def event_rows(self) -> list[Row[Any]]:
        e = self.events
        async with self.engine.connect() as connection:
            return list((await connection.execute(select(e).order_by(e.c.id))).all())

    async def count(self, table: Table) -> int:
        async with self.engine.connect() as connection:
            counted = await connection.scalar(select(func.count()).select_from(table))
        return int(counted or 0)

    async def statuses(self) -> Counter[str]:
        """How many deliveries are in each status."""
        d = self.deliveries
        query = select(d.c.status, func.count()).group_by(d.c.status)
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return Counter({str(status): int(count) for status, count in rows})

    async def wait_for_statuses(self, expected: Mapping[str, int]) -> None:
        """Wait until the deliveries are in exactly these statuses."""
        seen: Counter[str] = Counter()

        async def reached() -> bool:
            nonlocal seen
            seen = await self.statuses()
            return seen == Counter(expected)

        await eventually(reached, lambda: f"statuses {dict(expected)} (last seen {dict(seen)})")


async def eventually(
    check: Callable[[], Awaitable[bool]],
    what: str | Callable[[], str],
    within: float = DEADLINE,
) -> None:
    """Poll ``check`` until it is true; fail naming ``what`` after ``within`` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not await check():
        if loop.time() > deadline:
            described = what if isinstance(what, str) else what()
            pytest.fail(f"still waiting after {within:.0f} s for {described}")
        await asyncio.sleep(0.02)


@asynccontextmanager
async def open_database(kind: str, url: str) -> AsyncIterator[Database]:
    """Make an outbox's tables under a random prefix; drop them (and the test's own) after."""
    engine = create_async_engine(url)
    prefix = f"t{uuid4().hex[:8]}_"
    outbox = Outbox(engine, table_prefix=prefix, poll_interval=POLL)
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    database = Database(kind, url, engine, prefix, outbox, sessions, MetaData())
    try:
        await outbox.create_tables()
        yield database
    finally:
        try:
            async with engine.begin() as connection:
                await connection.run_sync(database.business.drop_all)
            await outbox.drop_tables()
        finally:
            await engine.dispose()


async def record(
    database: Database,
    events: TransactionalEvents,
    *items: object,
    key: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> list[Recorded[Any]]:
    """Record ``items`` in one committed transaction."""
    async with database.sessions.begin() as session:
        return [events.record(session, item, key=key, headers=headers) for item in items]


async def record_in_batches(
    database: Database, events: TransactionalEvents, items: Iterable[object], size: int = 100
) -> list[Recorded[Any]]:
    """Record ``items``, ``size`` to a transaction."""
    pending = list(items)
    recorded: list[Recorded[Any]] = []
    for start in range(0, len(pending), size):
        recorded += await record(database, events, *pending[start : start + size])
    return recorded


async def happens_within(check: Callable[[], Awaitable[bool]], seconds: float) -> bool:
    """Whether ``check`` becomes true within ``seconds``: for what must NOT happen, given
    ample time to happen (on a very slow machine a false pass is possible, never a false
    failure)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while loop.time() < deadline:
        if await check():
            return True
        await asyncio.sleep(0.02)
    return await check()


def not_taking_work(relay: Relay) -> Callable[[], Awaitable[bool]]:
    async def stopping() -> bool:
        return not relay.has_room()

    return stopping


def is_set(flag: asyncio.Event) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        return flag.is_set()

    return check


def pause_before_commit(session: AsyncSession) -> tuple[asyncio.Event, asyncio.Event]:
    """Hold ``session``'s next COMMIT after the outbox wrote its rows: (written, release).

    An instance listener runs after the class listener aioevents.sqlalchemy installs, so the
    rows (and a keyed event's advisory lock) are in the transaction when ``written`` is set.
    """
    written, release = asyncio.Event(), asyncio.Event()

    async def hold() -> None:
        written.set()
        await release.wait()

    def before_commit(_: Session) -> None:
        await_only(hold())

    sa_event.listen(session.sync_session, "before_commit", before_commit, once=True)
    return written, release


class StatementHold:
    """Holds the first statement that ``matches`` before it is sent, until released.

    It waits in the greenlet that runs the statement, as network I/O would: what cancels
    the task running it cancels it there. ``cancelled`` tells whether that happened.
    """

    def __init__(self, engine: AsyncEngine, matches: Callable[[str], bool]) -> None:
        self.reached, self.release = asyncio.Event(), asyncio.Event()
        self.cancelled = False
        self._matches = matches
        self._engine = engine
        sa_event.listen(engine.sync_engine, "before_cursor_execute", self._before)

    def remove(self) -> None:
        self.release.set()
        sa_event.remove(self._engine.sync_engine, "before_cursor_execute", self._before)

    def _before(self, *args: Any) -> None:
        statement = args[2]
        if not self.reached.is_set() and self._matches(statement):
            await_only(self._hold())

    async def _hold(self) -> None:
        self.reached.set()
        try:
            await self.release.wait()
        except BaseException:
            self.cancelled = True
            raise


class RelayTask:
    """A relay run in a task of its own, so that a test can stop it while handlers run."""

    def __init__(self, relay: Relay) -> None:
        self.relay = relay
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RelayTask:
        self._task = asyncio.create_task(self._run())
        await eventually(self._started, "the relay to start")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.stop()
        await self.stopped()

    async def _started(self) -> bool:
        assert self._task is not None
        if self._task.done():
            self._task.result()  # its failure, if it failed
        return bool(self.relay.has_room())

    async def _run(self) -> None:
        async with self.relay:
            await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    async def stopped(self) -> None:
        assert self._task is not None
        await self._task
