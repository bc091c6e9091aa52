"""aioevents.outbox: durable delivery, against a real PostgreSQL and a SQLite file.

Each test runs on both databases unless it tests something only PostgreSQL does (row locks,
advisory locks); each makes its own tables (a random prefix) and drops them afterwards.

Two ways of recording are used on purpose. A bus that runs (``async with bus:``) gets its own
deliveries handed to its relay right after COMMIT; a *recorder* bus that never runs stands for
another process, whose deliveries a relay must claim from the table. Tests wait for rows and
calls to reach a state, with a generous deadline; none measures time.

The numbered sections are the issue's "must show" items (2: nothing from what does not
commit, 3: out-of-order commits and keys, 5: a poison event, 6: relays sharing the work,
7: what cannot be decoded); the rest covers the operator API and the relay's life.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sized
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import Column, ForeignKey, Integer, Table, insert, select, text, update
from sqlalchemy import event as sa_event
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from aioevents import (
    AioEventsError,
    BusStateError,
    ConfigurationError,
    Durable,
    EventBus,
    SubscriptionError,
)
from aioevents.outbox import (
    Codec,
    Delivery,
    DeliveryRecord,
    DeliveryStatus,
    NotInDeliveryError,
    Outbox,
    current_delivery,
)
from aioevents.sqlalchemy import Outcome, Recorded, TransactionalEvents

from .outbox_support import (
    DEADLINE,
    Database,
    RelayTask,
    StatementHold,
    eventually,
    happens_within,
    is_set,
    not_taking_work,
    open_database,
    pause_before_commit,
    record,
    record_in_batches,
)

# Retried at once: these tests count attempts, they do not wait for backoff.
AT_ONCE = {"wait_initial": 0, "wait_max": 0, "wait_jitter": 0}


# -- events ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentWasCreated:
    number: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AccountWasDebited:
    __event_key__ = "account"  # a handler gets one account's debits in commit order

    account: str
    sequence: int


@dataclass(frozen=True, slots=True, kw_only=True)
class NoteWasTaken:
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TitleWasChangedV1:
    """How a title change was stored before version 2: an old process records these."""

    __event_name__ = "title-was-changed"

    doc_id: int
    title: str


@dataclass(frozen=True, slots=True, kw_only=True)
class TitleWasChanged:
    __event_name__ = "title-was-changed"
    __event_version__ = 2

    document_id: int
    title: str
    language: str


@dataclass(frozen=True, slots=True, kw_only=True)
class WronglyKeyed(DocumentWasCreated):
    __event_key__ = "account"  # a field it does not have


class IndexingFailed(Exception):
    pass


# -- fixtures --------------------------------------------------------------------------------

BACKENDS = [pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"]


@pytest.fixture(params=BACKENDS)
def database_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def database_address(database_kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if database_kind == "postgresql":
        return str(request.getfixturevalue("database_url"))
    return f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}"


@pytest_asyncio.fixture
async def db(database_kind: str, database_address: str) -> AsyncIterator[Database]:
    """The outbox's tables on PostgreSQL, then on SQLite."""
    async with open_database(database_kind, database_address) as database:
        yield database


@pytest_asyncio.fixture
async def pg(database_url: str) -> AsyncIterator[Database]:
    """The outbox's tables on PostgreSQL only."""
    async with open_database("postgresql", database_url) as database:
        yield database


# -- helpers ---------------------------------------------------------------------------------


def stored_id(recorded: Recorded[Any]) -> uuid.UUID:
    """The id of a recorded event that has durable handlers (those are stored)."""
    assert recorded.event_id is not None
    return recorded.event_id


def documents(count: int, start: int = 0) -> list[DocumentWasCreated]:
    return [DocumentWasCreated(number=n) for n in range(start, start + count)]


async def wait_for_calls(calls: Sized, expected: int, what: str, within: float = DEADLINE) -> None:
    async def enough() -> bool:
        return len(calls) >= expected

    await eventually(enough, f"{expected} call(s) of {what}", within)


async def row_of(db: Database, delivery_id: int) -> Any:
    rows = {row.id: row for row in await db.delivery_rows()}
    return rows[delivery_id]


async def delivery_ids_by_number(db: Database) -> dict[int, int]:
    """Each DocumentWasCreated's delivery id (one durable handler), by its number."""
    d, e = db.deliveries, db.events
    query = select(d.c.id, e.c.payload).join(e, e.c.id == d.c.event_id)
    async with db.engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    return {json.loads(payload)["number"]: delivery_id for delivery_id, payload in rows}


async def backend_pid(session: AsyncSession) -> int:
    return int((await session.execute(text("SELECT pg_backend_pid()"))).scalar_one())


async def is_waiting_for_a_lock(engine: AsyncEngine, pid: int) -> bool:
    query = text("SELECT count(*) FROM pg_locks WHERE pid = :pid AND NOT granted")
    async with engine.connect() as connection:
        return bool((await connection.execute(query, {"pid": pid})).scalar_one())


# -- 2. what does not commit leaves nothing --------------------------------------------------


@pytest.mark.asyncio
async def test_rollback_leaves_no_rows_and_delivers_nothing(db: Database) -> None:
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=db.outbox)
    received: list[int] = []

    @bus.on(DocumentWasCreated, durable=True)
    async def index(event: DocumentWasCreated) -> None:
        received.append(event.number)

    async with bus:
        with pytest.raises(RuntimeError):
            async with db.sessions.begin() as session:
                rolled_back = events.record(session, DocumentWasCreated(number=1))
                raise RuntimeError("the request failed")
        async with db.sessions() as session:
            await session.begin()
            events.record(session, DocumentWasCreated(number=2))
            await session.rollback()

        assert rolled_back.outcome is Outcome.DISCARDED
        assert await db.count(db.events) == 0
        assert await db.count(db.deliveries) == 0
        # A committed event afterwards is delivered: the relay ran, and had nothing else.
        await record(db, events, DocumentWasCreated(number=3))
        await wait_for_calls(received, 1, "index")
    assert received == [3]


@pytest.mark.asyncio
async def test_savepoint_rollback_leaves_no_rows_for_its_events(db: Database) -> None:
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=db.outbox)
    received: list[int] = []

    @bus.on(DocumentWasCreated, durable=True)
    async def index(event: DocumentWasCreated) -> None:
        received.append(event.number)

    async with bus:
        async with db.sessions.begin() as session:
            savepoint = await session.begin_nested()
            events.record(session, DocumentWasCreated(number=0))
            await savepoint.rollback()
        assert await db.count(db.events) == 0
        assert await db.count(db.deliveries) == 0

        async with db.sessions.begin() as session:
            events.record(session, DocumentWasCreated(number=1))
            savepoint = await session.begin_nested()
            events.record(session, DocumentWasCreated(number=2))
            await savepoint.rollback()
            async with session.begin_nested():  # released: its event commits with the rest
                events.record(session, DocumentWasCreated(number=3))
        assert sorted(await delivery_ids_by_number(db)) == [1, 3]
        assert await db.count(db.events) == 2
        await wait_for_calls(received, 2, "index")
    assert sorted(received) == [1, 3]


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_commit_that_fails_leaves_no_rows_and_delivers_nothing(pg: Database) -> None:
    # A deferred foreign key is checked at COMMIT, after the outbox wrote its rows into the
    # transaction: the COMMIT itself fails. (PostgreSQL only: SQLite keeps a transaction
    # whose COMMIT failed open, and aiosqlite hands it back to the pool that way.)
    parents = Table(f"{pg.prefix}parents", pg.business, Column("id", Integer, primary_key=True))
    children = Table(
        f"{pg.prefix}children",
        pg.business,
        Column("id", Integer, primary_key=True),
        Column(
            "parent_id",
            ForeignKey(parents.c.id, deferrable=True, initially="DEFERRED"),
            nullable=False,
        ),
    )
    async with pg.engine.begin() as connection:
        await connection.run_sync(pg.business.create_all)
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=pg.outbox)
    received: list[int] = []

    @bus.on(DocumentWasCreated, durable=True)
    async def index(event: DocumentWasCreated) -> None:
        received.append(event.number)

    async with bus:
        async with pg.sessions() as session:
            await session.begin()
            await session.execute(insert(children).values(id=1, parent_id=404))
            failed = events.record(session, DocumentWasCreated(number=1))
            with pytest.raises(IntegrityError):
                await session.commit()
        assert failed.outcome is Outcome.DISCARDED
        assert await pg.count(pg.events) == 0
        assert await pg.count(pg.deliveries) == 0
        # A committed event afterwards is delivered: the relay ran, and had nothing else.
        await record(pg, events, DocumentWasCreated(number=2))
        await wait_for_calls(received, 1, "index")
    assert received == [2]


# -- 3. commits out of recording order -------------------------------------------------------

RECORDED_ON = ["the running bus", "another process"]


class OneAtATime:
    """A handler of debits that notes the order it starts them in, and whether two ever ran
    at once; it lingers in each so that a wrong concurrent start has every chance."""

    def __init__(self, linger: float = 0.0) -> None:
        self.order: list[int] = []
        self.overlapped = False
        self._running = 0
        self._linger = linger

    async def __call__(self, event: AccountWasDebited) -> None:
        self._running += 1
        self.overlapped |= self._running > 1
        self.order.append(event.sequence)
        try:
            await asyncio.sleep(self._linger)
        finally:
            self._running -= 1


def recording_setup(
    db: Database, recorded_on: str, **handlers: Callable[[AccountWasDebited], Any]
) -> tuple[EventBus, TransactionalEvents]:
    """The bus whose relay runs ``handlers`` (by name), and where events are recorded: on
    that bus (its deliveries are handed over at COMMIT) or on a bus that never runs, as
    another process would (they are claimed from the table)."""

    def bus_with_handlers() -> EventBus:
        bus = EventBus()
        for name, handler in handlers.items():
            bus.subscribe(AccountWasDebited, handler, durable=True, name=name)
        return bus

    running = bus_with_handlers()
    local = TransactionalEvents(running, outbox=db.outbox)
    if recorded_on == "the running bus":
        return running, local
    return running, TransactionalEvents(bus_with_handlers(), outbox=db.new_outbox())


@pytest.mark.asyncio
@pytest.mark.parametrize("recorded_on", RECORDED_ON)
@pytest.mark.parametrize("same_key", [True, False], ids=["same key", "other keys"])
async def test_a_transaction_committing_after_a_later_one_is_delivered(
    db: Database, recorded_on: str, same_key: bool
) -> None:
    post_debit = OneAtATime(linger=0.1)
    received = post_debit.order
    bus, events = recording_setup(db, recorded_on, post_debit=post_debit)
    async with bus, db.sessions() as session_a, db.sessions() as session_b:
        await session_a.begin()
        await session_a.execute(select(1))  # a transaction in progress on the database
        a = events.record(session_a, AccountWasDebited(account="acc-1", sequence=1))
        await session_b.begin()
        account_b = "acc-1" if same_key else "acc-2"
        b = events.record(session_b, AccountWasDebited(account=account_b, sequence=2))
        await session_b.commit()
        await session_a.commit()  # at once: the relay may not have run b yet
        await wait_for_calls(received, 2, "post_debit")

    assert stored_id(a) < stored_id(b)  # recorded first, committed last
    if same_key:
        assert received == [2, 1]  # one account's debits in commit order
        assert not post_debit.overlapped  # and one at a time
    else:
        assert sorted(received) == [1, 2]
    statuses = await db.statuses()
    assert statuses == Counter(completed=2)


@pytest.mark.postgres
@pytest.mark.asyncio
@pytest.mark.parametrize("recorded_on", RECORDED_ON)
async def test_rows_written_but_not_yet_committed_hold_nothing_back(
    pg: Database, recorded_on: str
) -> None:
    # A has written its delivery (a smaller id) but not committed; B, committed after, is
    # delivered meanwhile, and A once it commits: a relay does not stop at the first gap.
    received: list[int] = []

    async def post_debit(event: AccountWasDebited) -> None:
        received.append(event.sequence)

    bus, events = recording_setup(pg, recorded_on, post_debit=post_debit)
    async with bus, pg.sessions() as session_a, pg.sessions() as session_b:
        await session_a.begin()
        events.record(session_a, AccountWasDebited(account="acc-1", sequence=1))
        written, release = pause_before_commit(session_a)
        committing_a = asyncio.create_task(session_a.commit())
        try:
            await eventually(is_set(written), "A to write its rows")
            async with session_b.begin():
                events.record(session_b, AccountWasDebited(account="acc-2", sequence=2))
            await wait_for_calls(received, 1, "post_debit")
            assert received == [2]
        finally:
            release.set()
            await committing_a
        await wait_for_calls(received, 2, "post_debit")

    assert received == [2, 1]
    by_event = {row.event_id: row.id for row in await pg.delivery_rows()}
    event_ids = sorted(by_event)  # uuid7: recording order, A first
    assert by_event[event_ids[0]] < by_event[event_ids[1]]  # and A wrote first


@pytest.mark.postgres
@pytest.mark.asyncio
@pytest.mark.parametrize("recorded_on", RECORDED_ON)
async def test_one_key_recorded_by_concurrent_transactions_commits_one_at_a_time(
    pg: Database, recorded_on: str
) -> None:
    # A writes its keyed delivery and holds its COMMIT; B records the same key: B's write
    # waits for A's COMMIT, so ids, commits and deliveries of one key follow the same order.
    received: list[int] = []

    async def post_debit(event: AccountWasDebited) -> None:
        received.append(event.sequence)

    bus, events = recording_setup(pg, recorded_on, post_debit=post_debit)
    async with bus, pg.sessions() as session_a, pg.sessions() as session_b:
        await session_a.begin()
        events.record(session_a, AccountWasDebited(account="acc-1", sequence=1))
        written, release = pause_before_commit(session_a)
        committing_a = asyncio.create_task(session_a.commit())
        committing_b: asyncio.Task[None] | None = None
        try:
            await eventually(is_set(written), "A to write its rows")
            await session_b.begin()
            pid_b = await backend_pid(session_b)
            events.record(session_b, AccountWasDebited(account="acc-1", sequence=2))
            committing_b = asyncio.create_task(session_b.commit())
            await eventually(
                lambda: is_waiting_for_a_lock(pg.engine, pid_b), "B to wait for A's key lock"
            )
            assert not committing_b.done()
        finally:
            release.set()
            await committing_a
            if committing_b is not None:
                await committing_b
        await wait_for_calls(received, 2, "post_debit")

    assert received == [1, 2]
    rows = await pg.delivery_rows()
    assert [row.status for row in rows] == ["completed", "completed"]
    by_event = {row.event_id: row.id for row in rows}
    event_ids = sorted(by_event)  # uuid7: recording order, A first
    assert by_event[event_ids[0]] < by_event[event_ids[1]]


@pytest.mark.asyncio
@pytest.mark.parametrize("recorded_on", RECORDED_ON)
async def test_one_keys_events_recorded_together_are_delivered_in_recording_order(
    db: Database, recorded_on: str
) -> None:
    post_debit, audit = OneAtATime(), OneAtATime()
    bus, events = recording_setup(db, recorded_on, post_debit=post_debit, audit=audit)
    debits = [AccountWasDebited(account="acc-1", sequence=n) for n in range(30)]
    async with bus:
        await record(db, events, *debits)
        await db.wait_for_statuses({"completed": 60})
    assert post_debit.order == audit.order == list(range(30))
    assert not post_debit.overlapped
    assert not audit.overlapped


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_transactions_locking_keys_through_two_buses_do_not_deadlock(pg: Database) -> None:
    # Each transaction records through two buses (two TransactionalEvents on one session, as
    # documented), one key each, in crossed order: a key's lock taken per bus, in recording
    # order, would have each transaction of a pair wait for the other's second key.
    async def post_debit(event: AccountWasDebited) -> None: ...

    buses = [EventBus(), EventBus()]
    for n, bus in enumerate(buses):
        bus.subscribe(AccountWasDebited, post_debit, durable=True, name=f"post-debit-{n}")
    first, second = (TransactionalEvents(bus, outbox=pg.outbox) for bus in buses)

    async def debit(pair: int, accounts: tuple[str, str]) -> None:
        async with pg.sessions.begin() as session:
            first.record(session, AccountWasDebited(account=accounts[0], sequence=pair))
            second.record(session, AccountWasDebited(account=accounts[1], sequence=pair))

    pairs = 30  # 60 transactions at once, as many running as the pool has connections
    crossed = [
        debit(pair, accounts)
        for pair in range(pairs)
        for accounts in ((f"a{pair}", f"b{pair}"), (f"b{pair}", f"a{pair}"))
    ]
    outcomes = await asyncio.gather(*crossed, return_exceptions=True)
    failures = [repr(outcome) for outcome in outcomes if isinstance(outcome, BaseException)]
    assert failures == []
    assert await pg.count(pg.deliveries) == 4 * pairs


# -- 5. a poison event -----------------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_a_poison_event_ends_dead_and_the_rest_complete(db: Database) -> None:
    total = 1000 if db.kind == "postgresql" else 200
    poison = total // 2
    fixed = False
    calls: Counter[int] = Counter()
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=db.outbox)

    @bus.on(DocumentWasCreated, durable=Durable(max_attempts=3, **AT_ONCE))
    async def index(event: DocumentWasCreated) -> None:
        calls[event.number] += 1
        if event.number == poison and not fixed:
            raise IndexingFailed(f"cannot index document {event.number}")

    async with bus:
        recorded = await record_in_batches(db, events, documents(total))
        await db.wait_for_statuses({"completed": total - 1, "dead": 1})

        [dead] = await db.outbox.deliveries(status="dead")
        assert dead.event_id == recorded[poison].event_id
        assert dead.attempts == 3
        assert dead.error_type == f"{__name__}.IndexingFailed"
        assert dead.error_message == f"cannot index document {poison}"
        assert dead.error_traceback is not None
        assert "IndexingFailed" in dead.error_traceback
        assert "in index" in dead.error_traceback  # the handler's frame
        assert dead.finished_at is not None
        assert dead.leased_until is None
        assert calls[poison] == 3
        assert all(calls[n] == 1 for n in range(total) if n != poison)

        fixed = True
        assert await db.outbox.resubmit([dead.id]) == 1
        await db.wait_for_statuses({"completed": total})
        assert calls[poison] == 4  # exactly once more
        assert (await row_of(db, dead.id)).attempts == 1  # counted afresh

        assert await db.outbox.resubmit([dead.id]) == 0  # completed now, not dead
        other = (await db.outbox.deliveries(status="completed", limit=1))[0]
        assert await db.outbox.resubmit([other.id]) == 0
    assert calls[poison] == 4
    assert sum(calls.values()) == total + 3


@pytest.mark.asyncio
@pytest.mark.parametrize("remedy", ["discard", "resubmit"])
async def test_a_dead_keyed_delivery_holds_back_its_key_until_dealt_with(
    db: Database, remedy: str
) -> None:
    failing = {1}
    received: list[tuple[str, int]] = []

    async def post_debit(event: AccountWasDebited) -> None:
        received.append((event.account, event.sequence))
        if event.sequence in failing:
            raise IndexingFailed(f"cannot post debit {event.sequence}")

    policy = Durable(max_attempts=3, **AT_ONCE)
    running = EventBus()
    running.subscribe(AccountWasDebited, post_debit, durable=policy, name="post-debit")
    local = TransactionalEvents(running, outbox=db.outbox)
    elsewhere = EventBus()  # another process: its deliveries are claimed, not handed over
    elsewhere.subscribe(AccountWasDebited, post_debit, durable=policy, name="post-debit")
    remote = TransactionalEvents(elsewhere, outbox=db.new_outbox())

    async with running:
        await record(db, remote, AccountWasDebited(account="acc-1", sequence=1))
        await db.wait_for_statuses({"dead": 1})
        # Recorded while its key is dead (and nothing else of it is pending): not handed
        # over to the running relay, which would run it at once.
        await record(db, local, AccountWasDebited(account="acc-1", sequence=2))
        await record(db, remote, AccountWasDebited(account="acc-1", sequence=3))
        # Another key, claimed after the key died: a claim that passed over 2 and 3.
        await record(db, remote, AccountWasDebited(account="acc-2", sequence=4))
        await wait_for_calls(received, 4, "post_debit")
        await db.wait_for_statuses({"dead": 1, "pending": 2, "completed": 1})
        dead, *held = await db.outbox.deliveries(key="acc-1")
        assert dead.status is DeliveryStatus.DEAD
        assert [(d.status, d.attempts, d.leased_until) for d in held] == [
            (DeliveryStatus.PENDING, 0, None),
            (DeliveryStatus.PENDING, 0, None),
        ]
        assert received == [("acc-1", 1)] * 3 + [("acc-2", 4)]

        if remedy == "discard":
            assert await db.outbox.discard([dead.id]) == 1
            await db.wait_for_statuses({"discarded": 1, "completed": 3})
        else:
            failing.clear()
            assert await db.outbox.resubmit([dead.id]) == 1
            await db.wait_for_statuses({"completed": 4})
    rerun = [("acc-1", 1)] if remedy == "resubmit" else []
    assert received[4:] == [*rerun, ("acc-1", 2), ("acc-1", 3)]  # the key's order kept


# -- 6. relays sharing the work --------------------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.timeout(180)
async def test_two_relays_run_each_delivery_exactly_once(db: Database) -> None:
    total = 1000
    runs: Counter[uuid.UUID] = Counter()

    async def index(event: DocumentWasCreated) -> None:
        delivery = current_delivery()
        assert delivery is not None
        runs[delivery.event_id] += 1
        await asyncio.sleep(0)  # let the other relay's tasks in between

    # Recorded while no relay ran: every delivery is in the table, none leased.
    recorder = EventBus()
    recorder.subscribe(DocumentWasCreated, index, durable=True, name="index")
    recorded = await record_in_batches(
        db, TransactionalEvents(recorder, outbox=db.outbox), documents(total)
    )
    assert await db.statuses() == Counter(pending=total)

    relays = []
    for _ in range(2):  # two processes: a bus and an Outbox each, on the same tables
        bus = EventBus()
        bus.subscribe(DocumentWasCreated, index, durable=True, name="index")
        relays.append(db.new_outbox().relay(bus))
    async with AsyncExitStack() as stack:
        for relay in relays:
            await stack.enter_async_context(relay)
        await db.wait_for_statuses({"completed": total})

    assert set(runs) == {r.event_id for r in recorded}
    assert set(runs.values()) == {1}
    assert sum(relay.delivered for relay in relays) == total
    assert all(row.attempts == 1 for row in await db.delivery_rows())


# -- 7. what a relay cannot decode -----------------------------------------------------------


UNDECODABLE: dict[str, tuple[dict[str, Any], list[str]]] = {
    # what an operator or a later release did to the stored event -> what the reason says
    "unknown name": (
        {"name": "document-was-drafted"},
        ["unknown event name 'document-was-drafted'", "document-was-created"],
    ),
    "payload of another shape": (
        {"payload": '{"number": "seven"}'},
        ["payload does not match DocumentWasCreated", "number"],
    ),
    "newer version": (
        {"version": 2},
        ["version 2 is newer than DocumentWasCreated's version 1"],
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("change", list(UNDECODABLE))
async def test_an_event_that_cannot_be_decoded_ends_dead_without_retrying(
    db: Database, change: str
) -> None:
    values, reasons = UNDECODABLE[change]
    received: list[int] = []

    async def index(event: DocumentWasCreated) -> None:
        received.append(event.number)

    policy = Durable(max_attempts=5, **AT_ONCE)
    recorder = EventBus()
    recorder.subscribe(DocumentWasCreated, index, durable=policy, name="index")
    remote = TransactionalEvents(recorder, outbox=db.new_outbox())
    [changed] = await record(db, remote, DocumentWasCreated(number=1))
    async with db.engine.begin() as connection:
        e = db.events
        await connection.execute(update(e).where(e.c.id == changed.event_id).values(**values))

    bus = EventBus()
    bus.subscribe(DocumentWasCreated, index, durable=policy, name="index")
    async with db.outbox.relay(bus) as relay:
        await db.wait_for_statuses({"dead": 1})
        # A later event is delivered: the relay went on, and did not retry the dead one.
        await record(db, remote, DocumentWasCreated(number=2))
        await db.wait_for_statuses({"dead": 1, "completed": 1})

    [dead] = await db.outbox.deliveries(status="dead")
    assert dead.event_id == changed.event_id
    assert dead.attempts == 1  # of 5: retrying cannot help
    assert dead.error_type == "aioevents._codec.EventDecodeError"
    assert dead.error_message is not None
    for reason in reasons:
        assert reason in dead.error_message
    assert received == [2]
    assert relay.dead == 1


@pytest.mark.asyncio
async def test_an_upcaster_lifts_a_stored_payload_to_the_current_class(db: Database) -> None:
    # An old process records version 1; the current one relays it as version 2.
    async def project_title(event: object) -> None:
        received.append(event)

    received: list[object] = []
    old = EventBus()
    old.subscribe(TitleWasChangedV1, project_title, durable=True, name="project-title")
    old_events = TransactionalEvents(old, outbox=db.new_outbox())
    [stored] = await record(db, old_events, TitleWasChangedV1(doc_id=7, title="Draft"))
    [row] = await db.event_rows()
    assert (row.name, row.version) == ("title-was-changed", 1)

    codec = Codec()

    @codec.upcaster(TitleWasChanged, from_version=1)
    def rename_the_id_and_add_the_language(payload: dict[str, Any]) -> dict[str, Any]:
        payload["document_id"] = payload.pop("doc_id")
        payload["language"] = "en"
        return payload

    current = EventBus()
    current.subscribe(TitleWasChanged, project_title, durable=True, name="project-title")
    async with db.new_outbox(codec=codec).relay(current):
        await db.wait_for_statuses({"completed": 1})
    assert received == [TitleWasChanged(document_id=7, title="Draft", language="en")]
    assert stored.event_id == row.id


# -- inside a durable handler ----------------------------------------------------------------


@pytest.mark.asyncio
async def test_current_delivery_tells_the_handler_its_event_attempt_and_headers(
    db: Database,
) -> None:
    seen: list[Delivery] = []
    seen_by_volatile: list[Delivery | None] = []
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=db.outbox)

    @bus.on(DocumentWasCreated, durable=Durable(max_attempts=3, **AT_ONCE), name="index")
    async def index(event: DocumentWasCreated) -> None:
        delivery = current_delivery()
        assert delivery is not None
        seen.append(delivery)
        if delivery.attempt < 3:
            raise IndexingFailed("not yet")

    @bus.on(DocumentWasCreated)
    async def log(event: DocumentWasCreated) -> None:
        seen_by_volatile.append(current_delivery())

    headers = {"trace-id": "4bf92f3577b34da6", "tenant": "t-1"}
    async with bus:
        [recorded] = await record(
            db, events, DocumentWasCreated(number=1), key="doc-1", headers=headers
        )
        await db.wait_for_statuses({"completed": 1})

    assert stored_id(recorded).version == 7
    # The first attempt was handed over at COMMIT; the next two were claimed from the table.
    assert [d.attempt for d in seen] == [1, 2, 3]
    assert {d.event_id for d in seen} == {recorded.event_id}
    assert len({d.id for d in seen}) == 1
    assert all(dict(d.headers) == headers for d in seen)
    assert all(d.handler == "index" for d in seen)
    assert all(d.key == "doc-1" for d in seen)
    assert all(d.event_name == "document-was-created" for d in seen)
    assert len({d.recorded_at for d in seen}) == 1
    assert seen[0].recorded_at.tzinfo is not None
    assert seen_by_volatile == [None]
    assert current_delivery() is None


@pytest.mark.asyncio
async def test_a_plain_function_handler_sees_its_delivery_too(db: Database) -> None:
    seen: list[Delivery | None] = []
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=db.outbox)

    @bus.on(DocumentWasCreated, durable=True)
    def index(event: DocumentWasCreated) -> None:  # runs in a worker thread
        seen.append(current_delivery())

    async with bus:
        [recorded] = await record(db, events, DocumentWasCreated(number=1))
        await db.wait_for_statuses({"completed": 1})
    assert [d.event_id if d else None for d in seen] == [recorded.event_id]


@pytest.mark.asyncio
async def test_first_time_is_true_once_per_handler_and_event(db: Database) -> None:
    outcomes: list[bool] = []
    other_outcomes: list[bool] = []
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=db.outbox)

    @bus.on(DocumentWasCreated, durable=Durable(max_attempts=3, **AT_ONCE))
    async def index(event: DocumentWasCreated) -> None:
        delivery = current_delivery()
        assert delivery is not None
        async with db.sessions.begin() as session:
            outcomes.append(await db.outbox.first_time(session))
            if delivery.attempt == 1:  # its transaction rolls back: the inbox row too
                raise IndexingFailed("the index write failed")
        if delivery.attempt == 2:  # committed, then the process "crashed": run again
            raise IndexingFailed("crashed after committing")

    @bus.on(DocumentWasCreated, durable=True)
    async def notify(event: DocumentWasCreated) -> None:
        async with db.sessions.begin() as session:
            other_outcomes.append(await db.outbox.first_time(session))

    async with bus:
        [recorded] = await record(db, events, DocumentWasCreated(number=1))
        await db.wait_for_statuses({"completed": 2})

    assert outcomes == [True, True, False]
    assert other_outcomes == [True]  # the inbox is per handler
    i = db.inbox
    async with db.engine.connect() as connection:
        inbox = (await connection.execute(select(i.c.handler, i.c.event_id))).all()
    assert sorted(inbox) == sorted([(name, recorded.event_id) for name in bus.durable_handlers])
    async with db.sessions.begin() as session:
        with pytest.raises(NotInDeliveryError):
            await db.outbox.first_time(session)


# -- waking, retrying, decoding --------------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_a_relay_is_woken_by_a_commit_elsewhere_in_a_schema(database_url: str) -> None:
    # PostgreSQL: an insert NOTIFYs the relays; with a poll every 10 minutes only that can
    # bring this delivery, recorded by another process, to the relay in time.
    schema = f"s{uuid.uuid4().hex[:8]}"
    engine = create_async_engine(database_url)
    try:
        async with engine.begin() as connection:
            await connection.execute(text(f"CREATE SCHEMA {schema}"))
        prefix = f"t{uuid.uuid4().hex[:8]}_"
        outbox = Outbox(engine, schema=schema, table_prefix=prefix, poll_interval=600)
        await outbox.create_tables()
        received: list[int] = []

        async def index(event: DocumentWasCreated) -> None:
            received.append(event.number)

        recorder = EventBus()
        recorder.subscribe(DocumentWasCreated, index, durable=True, name="index")
        elsewhere = TransactionalEvents(recorder, outbox=outbox)
        bus = EventBus()
        bus.subscribe(DocumentWasCreated, index, durable=True, name="index")
        async with outbox.relay(bus):

            async def listening() -> bool:
                query = text("SELECT count(*) FROM pg_stat_activity WHERE query = :listen")
                listen = f'LISTEN "{prefix}deliveries"'
                async with engine.connect() as connection:
                    return bool((await connection.execute(query, {"listen": listen})).scalar_one())

            await eventually(listening, "the relay to LISTEN")
            async with AsyncSession(engine) as session, session.begin():
                elsewhere.record(session, DocumentWasCreated(number=1))
            await wait_for_calls(received, 1, "index")
        assert received == [1]
        assert f"{prefix}deliveries" in await _table_names(engine, schema)
    finally:
        async with engine.begin() as connection:
            await connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        await engine.dispose()


async def _table_names(engine: AsyncEngine, schema: str) -> set[str]:
    query = text("SELECT tablename FROM pg_tables WHERE schemaname = :schema")
    async with engine.connect() as connection:
        return set((await connection.execute(query, {"schema": schema})).scalars())


@pytest.mark.asyncio
async def test_a_failed_attempt_is_retried_when_it_is_due(db: Database) -> None:
    attempts: list[int] = []

    async def index(event: DocumentWasCreated) -> None:
        delivery = current_delivery()
        assert delivery is not None
        attempts.append(delivery.attempt)
        if event.number == 1 and delivery.attempt == 1:
            raise IndexingFailed("the index is rebuilding")

    policy = Durable(max_attempts=3, wait_initial=3600, wait_max=7200, wait_jitter=0)
    recorder = EventBus()
    recorder.subscribe(DocumentWasCreated, index, durable=policy, name="index")
    remote = TransactionalEvents(recorder, outbox=db.new_outbox())
    bus = EventBus()
    bus.subscribe(DocumentWasCreated, index, durable=policy, name="index")
    async with db.outbox.relay(bus):
        [retried] = await record(db, remote, DocumentWasCreated(number=1))
        await wait_for_calls(attempts, 1, "index")
        # A later event is delivered: a claim passed over the failed one, not yet due.
        await record(db, remote, DocumentWasCreated(number=2))
        await db.wait_for_statuses({"pending": 1, "completed": 1})
        [waiting] = await db.outbox.deliveries(status="pending")
        assert waiting.event_id == retried.event_id
        assert (waiting.attempts, waiting.leased_until) == (1, None)
        assert waiting.due_at > datetime.now(UTC) + timedelta(minutes=59)
        # The last failure is kept while it waits, for an operator to see.
        assert waiting.error_type == f"{__name__}.IndexingFailed"
        assert waiting.error_message == "the index is rebuilding"

        d = db.deliveries
        async with db.engine.begin() as connection:  # an hour later
            await connection.execute(
                update(d).where(d.c.id == waiting.id).values(due_at=datetime.now(UTC))
            )
        await db.wait_for_statuses({"completed": 2})
    assert attempts == [1, 1, 2]


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentEvent:
    number: int


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentWasShared(DocumentEvent):
    with_whom: str


@pytest.mark.asyncio
async def test_a_handler_of_a_base_class_gets_the_stored_subclass(db: Database) -> None:
    received: list[DocumentEvent] = []

    async def audit(event: DocumentEvent) -> None:
        received.append(event)

    recorder = EventBus()
    recorder.subscribe(DocumentEvent, audit, durable=True, name="audit")
    remote = TransactionalEvents(recorder, outbox=db.new_outbox())
    bus = EventBus()
    bus.subscribe(DocumentEvent, audit, durable=True, name="audit")
    async with db.outbox.relay(bus):
        await record(db, remote, DocumentWasShared(number=1, with_whom="ada"))
        await record(db, remote, DocumentEvent(number=2))
        await db.wait_for_statuses({"completed": 2})
    assert received == [DocumentWasShared(number=1, with_whom="ada"), DocumentEvent(number=2)]
    assert [type(event) for event in received] == [DocumentWasShared, DocumentEvent]


@dataclass(frozen=True, slots=True, kw_only=True)
class InvoiceWasIssued:
    invoice_id: uuid.UUID
    issued_at: datetime
    amount: Decimal
    lines: tuple[str, ...]
    note: str


@pytest.mark.asyncio
async def test_a_stored_event_comes_back_equal_with_its_headers(db: Database) -> None:
    received: list[tuple[InvoiceWasIssued, dict[str, str]]] = []

    async def book(event: InvoiceWasIssued) -> None:
        delivery = current_delivery()
        assert delivery is not None
        received.append((event, dict(delivery.headers)))

    remote = TransactionalEvents(EventBus(), outbox=db.new_outbox())  # decoded, not handed over
    remote.bus.subscribe(InvoiceWasIssued, book, durable=True, name="book")
    bus = EventBus()
    bus.subscribe(InvoiceWasIssued, book, durable=True, name="book")
    invoice = InvoiceWasIssued(
        invoice_id=uuid.uuid4(),
        issued_at=datetime(2026, 3, 29, 1, 30, 15, 123456, tzinfo=UTC),
        amount=Decimal("1234.5600"),
        lines=("Straße 1", "東京", "🧾"),
        note='quotes " and \\ and a NUL \x00 and a newline \n',
    )
    headers = {"traceparent": "00-4bf92f35-01", "user": "Zoë"}
    async with db.outbox.relay(bus):
        await record(db, remote, invoice, headers=headers)
        await db.wait_for_statuses({"completed": 1})
    assert received == [(invoice, headers)]


# -- operators -------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_deliveries_filters_and_pages_by_id(db: Database) -> None:
    async def index(event: DocumentWasCreated) -> None: ...

    async def post_debit(event: AccountWasDebited) -> None: ...

    recorder = EventBus()  # never runs: every delivery stays pending until discarded
    recorder.subscribe(DocumentWasCreated, index, durable=True, name="index")
    recorder.subscribe(AccountWasDebited, post_debit, durable=True, name="post-debit")
    events = TransactionalEvents(recorder, outbox=db.outbox)
    documents_recorded = await record_in_batches(db, events, documents(250))
    debits = [AccountWasDebited(account=f"acc-{n % 2}", sequence=n) for n in range(5)]
    debits_recorded = await record(db, events, *debits)
    acc_1 = await db.outbox.deliveries(key="acc-1")
    assert await db.outbox.discard([d.id for d in acc_1]) == 2

    pages: list[list[DeliveryRecord]] = []
    after: int | None = None
    while page := await db.outbox.deliveries(handler="index", after=after, limit=100):
        pages.append(page)
        after = page[-1].id
    assert [len(page) for page in pages] == [100, 100, 50]
    listed = [d.id for page in pages for d in page]
    assert listed == sorted(set(listed))  # oldest first, no overlap
    assert [d.event_id for page in pages for d in page] == [r.event_id for r in documents_recorded]

    first = pages[0][0]
    assert (first.event_name, first.handler, first.key) == ("document-was-created", "index", None)
    assert (first.status, first.attempts, first.leased_until) == (DeliveryStatus.PENDING, 0, None)
    assert first.finished_at is None and first.error_type is None
    assert first.created_at.tzinfo is not None

    debit_ids = {r.event_id for r in debits_recorded}
    by_name = await db.outbox.deliveries(event_name="account-was-debited")
    assert {d.event_id for d in by_name} == debit_ids
    assert {d.handler for d in by_name} == {"post-debit"}
    assert [d.key for d in await db.outbox.deliveries(key="acc-0")] == ["acc-0"] * 3
    discarded = await db.outbox.deliveries(status="discarded")
    assert [(d.key, d.status) for d in discarded] == [("acc-1", DeliveryStatus.DISCARDED)] * 2
    pending_debits = await db.outbox.deliveries(status=DeliveryStatus.PENDING, handler="post-debit")
    assert [d.key for d in pending_debits] == ["acc-0"] * 3
    assert await db.outbox.deliveries(status="dead") == []
    assert await db.outbox.deliveries(handler="index", key="acc-0") == []

    later = datetime.now(UTC) + timedelta(hours=1)
    assert await db.outbox.deliveries(since=later) == []
    assert len(await db.outbox.deliveries(until=later, limit=1000)) == 255
    earlier = datetime.now(UTC) - timedelta(hours=1)
    assert await db.outbox.deliveries(until=earlier) == []

    with pytest.raises(ValueError, match="sleeping"):
        await db.outbox.deliveries(status="sleeping")
    with pytest.raises(ConfigurationError):
        await db.outbox.deliveries(limit=0)


@pytest.mark.asyncio
async def test_discard_gives_up_a_dead_delivery_and_nothing_finished(db: Database) -> None:
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=db.outbox)

    @bus.on(DocumentWasCreated, durable=Durable(max_attempts=1))
    async def index(event: DocumentWasCreated) -> None:
        if event.number == 1:
            raise IndexingFailed("no")

    async with bus:
        await record(db, events, DocumentWasCreated(number=1))
        await record(db, events, DocumentWasCreated(number=2))
        await db.wait_for_statuses({"dead": 1, "completed": 1})
    [dead] = await db.outbox.deliveries(status="dead")
    [completed] = await db.outbox.deliveries(status="completed")

    assert await db.outbox.discard([dead.id, completed.id]) == 1
    [discarded] = await db.outbox.deliveries(status="discarded")
    assert discarded.id == dead.id
    assert discarded.finished_at is not None and dead.finished_at is not None
    assert discarded.finished_at >= dead.finished_at
    assert await db.outbox.discard([dead.id]) == 0
    assert await db.outbox.resubmit([dead.id]) == 0  # only dead ones are resubmitted
    assert await db.statuses() == Counter(discarded=1, completed=1)

    with pytest.raises(TypeError):
        await db.outbox.discard(dead.id)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        await db.outbox.resubmit([str(dead.id)])  # type: ignore[list-item]


@pytest.mark.postgres
@pytest.mark.asyncio
@pytest.mark.parametrize("remedy", ["discard", "resubmit"])
async def test_an_operator_unblocking_a_key_wakes_the_relays(pg: Database, remedy: str) -> None:
    # With a poll every 10 minutes, only a NOTIFY brings the key's next delivery on in time.
    failing = {1}
    received: list[int] = []

    async def post_debit(event: AccountWasDebited) -> None:
        received.append(event.sequence)
        if event.sequence in failing:
            raise IndexingFailed("no")

    outbox = pg.new_outbox(poll_interval=600)
    policy = Durable(max_attempts=1)
    bus = EventBus()
    bus.subscribe(AccountWasDebited, post_debit, durable=policy, name="post-debit")
    events = TransactionalEvents(bus, outbox=outbox)
    async with bus:
        await record(pg, events, AccountWasDebited(account="acc-1", sequence=1))
        await record(pg, events, AccountWasDebited(account="acc-1", sequence=2))
        await pg.wait_for_statuses({"dead": 1, "pending": 1})
        [dead] = await outbox.deliveries(status="dead")
        failing.clear()
        if remedy == "discard":
            assert await outbox.discard([dead.id]) == 1
        else:
            assert await outbox.resubmit([dead.id]) == 1
        expected = 3 if remedy == "resubmit" else 2
        await wait_for_calls(received, expected, "post_debit", within=20)  # ms, when woken
    assert received[-1] == 2


@pytest.mark.asyncio
async def test_purge_deletes_finished_deliveries_and_their_events_only(db: Database) -> None:
    async def index(event: DocumentWasCreated) -> None: ...

    async def fail(event: AccountWasDebited) -> None:
        raise IndexingFailed("no")

    async def annotate(event: NoteWasTaken) -> None: ...

    recorder = EventBus()  # another process, with a handler no running relay has
    recorder.subscribe(DocumentWasCreated, index, durable=True, name="index")
    recorder.subscribe(AccountWasDebited, fail, durable=Durable(max_attempts=1), name="fail")
    recorder.subscribe(NoteWasTaken, annotate, durable=True, name="annotate")
    recorder.subscribe(NoteWasTaken, annotate, durable=True, name="annotate-elsewhere")
    events = TransactionalEvents(recorder, outbox=db.outbox)
    await record(db, events, *documents(3))
    await record(db, events, AccountWasDebited(account="acc-1", sequence=1))
    [kept_note, dropped_note] = await record(
        db, events, NoteWasTaken(text="kept"), NoteWasTaken(text="dropped")
    )

    relaying = EventBus()
    relaying.subscribe(DocumentWasCreated, index, durable=True, name="index")
    relaying.subscribe(AccountWasDebited, fail, durable=Durable(max_attempts=1), name="fail")
    relaying.subscribe(NoteWasTaken, annotate, durable=True, name="annotate")
    async with db.outbox.relay(relaying):
        await db.wait_for_statuses({"completed": 5, "dead": 1, "pending": 2})
    [to_drop] = [
        d
        for d in await db.outbox.deliveries(status="pending")
        if d.event_id == dropped_note.event_id
    ]
    assert await db.outbox.discard([to_drop.id]) == 1

    assert await db.outbox.purge() == 0  # kept a week by default
    purged = await db.new_outbox(keep_completed=timedelta(0)).purge()
    assert purged == 6  # 5 completed, 1 discarded
    rows = await db.delivery_rows()
    assert sorted(row.status for row in rows) == ["dead", "pending"]
    kept_events = {row.id for row in await db.event_rows()}
    assert kept_events == {row.event_id for row in rows}  # the rest had no deliveries left
    assert kept_note.event_id in kept_events  # one delivery completed, one still pending


@pytest.mark.asyncio
async def test_keep_completed_none_deletes_a_delivery_when_it_completes(db: Database) -> None:
    async def index(event: DocumentWasCreated) -> None: ...

    outbox = db.new_outbox(keep_completed=None)
    recorder = EventBus()
    recorder.subscribe(DocumentWasCreated, index, durable=True, name="index")
    await record(db, TransactionalEvents(recorder, outbox=outbox), *documents(3))
    assert await db.statuses() == Counter(pending=3)
    bus = EventBus()
    bus.subscribe(DocumentWasCreated, index, durable=True, name="index")
    async with outbox.relay(bus) as relay:

        async def all_delivered() -> bool:
            return relay.delivered == 3

        await eventually(all_delivered, "3 deliveries")
        assert await db.count(db.deliveries) == 0
    await outbox.purge()  # the events go with the retention sweep
    assert await db.count(db.events) == 0


# -- what is stored, and what is not ---------------------------------------------------------


@pytest.mark.asyncio
async def test_handlers_that_are_not_durable_run_after_commit_and_are_not_stored(
    db: Database,
) -> None:
    notes: list[str] = []
    volatile: list[int] = []
    durable: list[int] = []
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=db.outbox)

    @bus.on(NoteWasTaken)
    async def show(event: NoteWasTaken) -> None:
        notes.append(event.text)

    @bus.on(DocumentWasCreated)
    async def count(event: DocumentWasCreated) -> None:
        volatile.append(event.number)

    @bus.on(DocumentWasCreated, durable=True, name="index")
    async def index(event: DocumentWasCreated) -> None:
        durable.append(event.number)

    async with bus:
        [note] = await record(db, events, NoteWasTaken(text="hello"))
        assert notes == ["hello"]  # in memory, before the commit returned
        assert note.outcome is Outcome.DELIVERED
        assert note.event_id is None
        assert await db.count(db.events) == 0

        [document] = await record(db, events, DocumentWasCreated(number=1))
        assert volatile == [1]
        assert document.result is not None
        assert document.result.handlers == (f"{__name__}.{count.__qualname__}",)
        assert [row.handler for row in await db.delivery_rows()] == ["index"]
        await db.wait_for_statuses({"completed": 1})
    assert durable == [1]
    assert volatile == [1]


@pytest.mark.asyncio
async def test_durable_handlers_need_an_outbox_to_record(db: Database) -> None:
    bus = EventBus()
    events = TransactionalEvents(bus)  # no outbox

    @bus.on(DocumentWasCreated, durable=True)
    async def index(event: DocumentWasCreated) -> None: ...

    async with db.sessions.begin() as session:
        with pytest.raises(ConfigurationError, match="no outbox"):
            events.record(session, DocumentWasCreated(number=1))
        events.record(session, NoteWasTaken(text="no durable handler: fine"))


@pytest.mark.asyncio
async def test_emit_runs_durable_handlers_in_memory_and_stores_nothing(db: Database) -> None:
    # The documented choice: emit delivers now, to every handler; only record() stores.
    received: list[tuple[DocumentWasCreated, Delivery | None]] = []
    bus = EventBus()
    TransactionalEvents(bus, outbox=db.outbox)

    @bus.on(DocumentWasCreated, durable=True)
    async def index(event: DocumentWasCreated) -> None:
        received.append((event, current_delivery()))

    event = DocumentWasCreated(number=1)
    async with bus:
        result = await bus.emit(event)
    assert result.ok
    assert received == [(event, None)]
    assert await db.count(db.events) == 0
    assert await db.count(db.deliveries) == 0


@pytest.mark.asyncio
async def test_the_committing_process_runs_its_deliveries_without_claiming(
    db: Database,
) -> None:
    # A poll a minute, and the recorded object itself reaches the handler: no relay found it
    # in the table and decoded it; the committer handed it over.
    received: list[tuple[DocumentWasCreated, int]] = []
    outbox = db.new_outbox(poll_interval=60)
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=outbox)

    @bus.on(DocumentWasCreated, durable=True)
    async def index(event: DocumentWasCreated) -> None:
        delivery = current_delivery()
        assert delivery is not None
        received.append((event, delivery.attempt))

    event = DocumentWasCreated(number=1)
    async with bus:
        await record(db, events, event)
        await wait_for_calls(received, 1, "index")
    [(handled, attempt)] = received
    assert handled is event
    assert attempt == 1
    await db.wait_for_statuses({"completed": 1})
    [row] = await db.delivery_rows()
    assert row.attempts == 1


# -- relays starting -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_bus_runs_a_relay_each_time_it_runs(db: Database) -> None:
    received: list[int] = []
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=db.outbox)

    @bus.on(DocumentWasCreated, durable=True)
    async def index(event: DocumentWasCreated) -> None:
        received.append(event.number)

    remote = TransactionalEvents(EventBus(), outbox=db.new_outbox())
    remote.bus.subscribe(DocumentWasCreated, index, durable=True)
    for run in range(2):
        async with bus:
            await record(db, events, DocumentWasCreated(number=2 * run))  # handed over
            await record(db, remote, DocumentWasCreated(number=2 * run + 1))  # claimed
            await wait_for_calls(received, 2 * run + 2, "index", within=20)
    assert sorted(received) == [0, 1, 2, 3]


@pytest.mark.asyncio
async def test_an_outbox_refused_by_a_running_bus_can_be_given_to_it_later(db: Database) -> None:
    # TransactionalEvents(bus, outbox=...) attaches a relay to the bus, which is refused while
    # the bus runs; made again once it stopped, it must attach one.
    received: list[int] = []
    bus = EventBus()

    @bus.on(DocumentWasCreated, durable=True)
    async def index(event: DocumentWasCreated) -> None:
        received.append(event.number)

    async with bus:
        with pytest.raises(BusStateError):
            TransactionalEvents(bus, outbox=db.outbox)
    events = TransactionalEvents(bus, outbox=db.outbox)
    async with bus:
        await record(db, events, DocumentWasCreated(number=1))
        await wait_for_calls(received, 1, "index", within=20)  # no other relay runs
    assert received == [1]


@pytest.mark.asyncio
async def test_a_relay_entered_again_runs_again_or_refuses(db: Database) -> None:
    received: list[int] = []

    async def index(event: DocumentWasCreated) -> None:
        received.append(event.number)

    remote = TransactionalEvents(EventBus(), outbox=db.outbox)
    remote.bus.subscribe(DocumentWasCreated, index, durable=True, name="index")
    bus = EventBus()
    bus.subscribe(DocumentWasCreated, index, durable=True, name="index")
    relay = db.outbox.relay(bus)
    async with relay:
        await record(db, remote, DocumentWasCreated(number=1))
        await wait_for_calls(received, 1, "index")
    await record(db, remote, DocumentWasCreated(number=2))  # due when it starts again
    try:
        async with relay:
            await wait_for_calls(received, 2, "index", within=20)
            await record(db, remote, DocumentWasCreated(number=3))  # due while it runs
            await wait_for_calls(received, 3, "index", within=20)
    except AioEventsError:
        assert received == [1]  # refused, loudly: fine too
    else:
        assert received == [1, 2, 3]


@pytest.mark.asyncio
async def test_a_durable_handler_subscribed_while_the_relay_runs_gets_its_events(
    db: Database,
) -> None:
    received: list[str] = []

    async def show(event: NoteWasTaken) -> None:
        received.append(event.text)

    remote = TransactionalEvents(EventBus(), outbox=db.new_outbox())  # another process
    remote.bus.subscribe(NoteWasTaken, show, durable=True, name="show")
    bus = EventBus()

    @bus.on(DocumentWasCreated, durable=True)
    async def index(event: DocumentWasCreated) -> None: ...

    async with db.outbox.relay(bus):
        bus.subscribe(NoteWasTaken, show, durable=True, name="show")  # a type new to it
        await record(db, remote, NoteWasTaken(text="hello"))
        await eventually(nothing_pending(db), "the delivery to finish")
    failed = [(d.error_type, d.error_message) for d in await db.outbox.deliveries(status="dead")]
    assert failed == []
    assert received == ["hello"]


def nothing_pending(db: Database) -> Callable[[], Awaitable[bool]]:
    async def finished() -> bool:
        return "pending" not in await db.statuses()

    return finished


# -- relays stopping -------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_stopping_relay_gives_back_what_it_has_not_started(db: Database) -> None:
    started, finish = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    async def index(event: DocumentWasCreated) -> None:
        calls.append(event.number)
        started.set()
        await finish.wait()

    recorder = EventBus()
    recorder.subscribe(DocumentWasCreated, index, durable=True, name="index")
    await record(db, TransactionalEvents(recorder, outbox=db.outbox), *documents(5))
    bus = EventBus()
    bus.subscribe(DocumentWasCreated, index, durable=True, name="index")

    relay = db.outbox.relay(bus, concurrency=1)
    async with RelayTask(relay) as running:
        await eventually(is_set(started), "the first delivery to start")
        running.stop()

        await eventually(not_taking_work(relay), "the relay to stop taking work")
        finish.set()  # the running handler finishes within the drain
        await running.stopped()

    [first] = calls
    rows = await db.delivery_rows()
    assert [(row.status, row.attempts) for row in rows if row.status == "completed"] == [
        ("completed", 1)
    ]
    given_back = [row for row in rows if row.status != "completed"]
    assert [
        (row.status, row.attempts, row.lease_token, row.lease_expires) for row in given_back
    ] == [("pending", 0, None, None)] * 4
    assert (relay.delivered, relay.failed) == (1, 0)
    assert first == 0


@pytest.mark.asyncio
async def test_a_handler_cancelled_by_the_drain_timeout_is_given_back(db: Database) -> None:
    started = asyncio.Event()
    cancelled: list[int] = []
    attempts: list[int] = []

    async def stuck(event: DocumentWasCreated) -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(event.number)
            raise

    async def index(event: DocumentWasCreated) -> None:
        delivery = current_delivery()
        assert delivery is not None
        attempts.append(delivery.attempt)

    recorder = EventBus()
    recorder.subscribe(DocumentWasCreated, index, durable=True, name="index")
    await record(db, TransactionalEvents(recorder, outbox=db.outbox), *documents(3))
    stuck_bus = EventBus()
    stuck_bus.subscribe(DocumentWasCreated, stuck, durable=True, name="index")

    relay = db.new_outbox(drain_timeout=0.1).relay(stuck_bus, concurrency=1)
    async with RelayTask(relay):
        await eventually(is_set(started), "the stuck handler to start")
    assert cancelled == [0]
    rows = await db.delivery_rows()
    assert [(row.status, row.attempts, row.lease_token, row.error_type) for row in rows] == [
        ("pending", 0, None, None)
    ] * 3
    assert (relay.delivered, relay.failed, relay.dead) == (0, 0, 0)

    # Another relay runs them at once, each as its first attempt.
    bus = EventBus()
    bus.subscribe(DocumentWasCreated, index, durable=True, name="index")
    async with db.outbox.relay(bus):
        await db.wait_for_statuses({"completed": 3})
    assert attempts == [1, 1, 1]


def is_claim(db: Database) -> Callable[[str], bool]:
    return lambda sql: f"UPDATE {db.prefix}deliveries SET" in sql and "RETURNING" in sql


def is_sweep(db: Database) -> Callable[[str], bool]:
    return lambda sql: sql.startswith(f"DELETE FROM {db.prefix}deliveries")


@pytest.mark.asyncio
async def test_a_stopping_relay_claims_nothing_more(db: Database) -> None:
    started, finish = asyncio.Event(), asyncio.Event()
    calls: list[int] = []

    async def index(event: DocumentWasCreated) -> None:
        calls.append(event.number)
        started.set()
        await finish.wait()

    recorder = EventBus()
    recorder.subscribe(DocumentWasCreated, index, durable=True, name="index")
    remote = TransactionalEvents(recorder, outbox=db.outbox)
    await record(db, remote, DocumentWasCreated(number=0))
    bus = EventBus()
    bus.subscribe(DocumentWasCreated, index, durable=True, name="index")

    async def claimed() -> bool:
        return (await db.delivery_rows())[-1].lease_token is not None

    relay = db.outbox.relay(bus, concurrency=1)
    async with RelayTask(relay) as running:
        try:
            await eventually(is_set(started), "the first delivery to start")
            running.stop()
            await eventually(not_taking_work(relay), "the relay to stop taking work")
            # Committed while it drains: due, but for another relay to run.
            await record(db, remote, DocumentWasCreated(number=1))
            claimed_while_stopping = await happens_within(claimed, 1.0)  # it polls every 0.05 s
        finally:
            finish.set()
    assert not claimed_while_stopping
    assert calls == [0]
    rows = await db.delivery_rows()
    assert [(row.status, row.attempts, row.lease_token) for row in rows] == [
        ("completed", 1, None),
        ("pending", 0, None),
    ]


@pytest.mark.asyncio
async def test_a_claim_in_flight_when_a_relay_stops_is_given_back(db: Database) -> None:
    calls: list[int] = []

    async def index(event: DocumentWasCreated) -> None:
        calls.append(event.number)

    recorder = EventBus()
    recorder.subscribe(DocumentWasCreated, index, durable=True, name="index")
    await record(db, TransactionalEvents(recorder, outbox=db.outbox), DocumentWasCreated(number=0))
    bus = EventBus()
    bus.subscribe(DocumentWasCreated, index, durable=True, name="index")

    hold = StatementHold(db.engine, is_claim(db))
    relay = db.outbox.relay(bus)
    try:
        async with RelayTask(relay) as running:
            await eventually(is_set(hold.reached), "the relay's first claim")
            running.stop()
            await eventually(not_taking_work(relay), "the relay to stop taking work")
            hold.release.set()  # the claim ends after the relay began to stop
    finally:
        hold.remove()
    assert calls == []
    [row] = await db.delivery_rows()
    assert (row.status, row.attempts, row.lease_token, row.lease_expires) == (
        "pending",
        0,
        None,
        None,
    )


@pytest.mark.asyncio
async def test_a_stopping_relay_lets_its_database_work_finish(db: Database) -> None:
    # Its retention sweep runs when it starts; stopping meanwhile must not cancel the sweep's
    # statement: SQLAlchemy would throw the connection away (and on aiosqlite leave a close
    # task that never ends, which hangs the event loop's shutdown).
    invalidated: list[BaseException | None] = []

    def on_invalidate(_: object, __: object, exception: BaseException | None) -> None:
        invalidated.append(exception)

    sa_event.listen(db.engine.sync_engine, "invalidate", on_invalidate)
    bus = EventBus()

    @bus.on(DocumentWasCreated, durable=True)
    async def index(event: DocumentWasCreated) -> None: ...

    hold = StatementHold(db.engine, is_sweep(db))
    relay = db.outbox.relay(bus)
    try:
        async with RelayTask(relay) as running:
            await eventually(is_set(hold.reached), "the relay's first sweep")
            running.stop()
            await eventually(not_taking_work(relay), "the relay to stop taking work")

            async def sweep_cancelled() -> bool:
                return hold.cancelled

            await happens_within(sweep_cancelled, 1.0)
            hold.release.set()
    finally:
        hold.remove()
        sa_event.remove(db.engine.sync_engine, "invalidate", on_invalidate)
    assert not hold.cancelled
    assert invalidated == []


@pytest.mark.postgres
@pytest.mark.asyncio
async def test_deliveries_leased_to_a_relay_that_stopped_before_commit_are_given_back(
    pg: Database,
) -> None:
    # Leased to the bus's relay when written, just before COMMIT; the bus stops before the
    # COMMIT returns, so the hand-over finds its relay gone and gives the deliveries back.
    attempts: list[int] = []
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=pg.outbox)

    @bus.on(DocumentWasCreated, durable=True, name="index")
    async def index(event: DocumentWasCreated) -> None:
        delivery = current_delivery()
        assert delivery is not None
        attempts.append(delivery.attempt)

    async with pg.sessions() as session:
        async with bus:
            await session.begin()
            events.record(session, DocumentWasCreated(number=1))
            written, release = pause_before_commit(session)
            committing = asyncio.create_task(session.commit())
            await eventually(is_set(written), "the rows to be written")
            [leased] = await _rows_seen_by(session, pg)
            assert leased.lease_token is not None  # leased to the running bus's relay
        release.set()
        await committing
    [row] = await pg.delivery_rows()
    assert (row.status, row.attempts, row.lease_token) == ("pending", 0, None)
    assert attempts == []

    other = EventBus()
    other.subscribe(DocumentWasCreated, index, durable=True, name="index")
    async with pg.outbox.relay(other):
        await pg.wait_for_statuses({"completed": 1})
    assert attempts == [1]


async def _rows_seen_by(session: AsyncSession, db: Database) -> list[Any]:
    """The delivery rows as the session's own (uncommitted) transaction sees them."""
    connection = await session.connection()
    return list((await connection.execute(select(db.deliveries))).all())


# -- leases: a relay that died, a handler that runs long -------------------------------------------


@pytest.mark.asyncio
async def test_a_delivery_whose_lease_ran_out_is_run_by_another_relay(db: Database) -> None:
    # Its relay died while running it: the lease is left to run out, then it runs again.
    attempts: dict[int, int] = {}

    async def index(event: DocumentWasCreated) -> None:
        delivery = current_delivery()
        assert delivery is not None
        attempts[event.number] = delivery.attempt

    recorder = EventBus()
    recorder.subscribe(DocumentWasCreated, index, durable=True, name="index")
    await record(db, TransactionalEvents(recorder, outbox=db.outbox), *documents(2))
    now = datetime.now(UTC)
    d = db.deliveries
    by_number = await delivery_ids_by_number(db)
    async with db.engine.begin() as connection:
        for number, expires in ((0, now - timedelta(seconds=1)), (1, now + timedelta(hours=1))):
            await connection.execute(
                update(d)
                .where(d.c.id == by_number[number])
                .values(attempts=1, lease_token=uuid.uuid4(), lease_expires=expires)
            )
    bus = EventBus()
    bus.subscribe(DocumentWasCreated, index, durable=True, name="index")
    async with db.outbox.relay(bus):
        await record(db, TransactionalEvents(recorder, outbox=db.outbox), *documents(1, start=2))
        await db.wait_for_statuses({"completed": 2, "pending": 1})
    assert attempts == {0: 2, 2: 1}  # the one still leased elsewhere was left alone
    held = await row_of(db, by_number[1])
    assert (held.status, held.attempts) == ("pending", 1)
    assert await db.outbox.discard([by_number[1]]) == 0  # it may be running: left to finish


@pytest.mark.asyncio
async def test_a_handler_running_longer_than_the_lease_keeps_its_delivery(db: Database) -> None:
    calls: list[int] = []
    finish = asyncio.Event()

    async def index(event: DocumentWasCreated) -> None:
        calls.append(event.number)
        await finish.wait()

    outbox = db.new_outbox(lease=3.0)  # renewed every second
    recorder = EventBus()
    recorder.subscribe(DocumentWasCreated, index, durable=True, name="index")
    await record(db, TransactionalEvents(recorder, outbox=outbox), DocumentWasCreated(number=1))
    buses = [EventBus(), EventBus()]
    for bus in buses:
        bus.subscribe(DocumentWasCreated, index, durable=True, name="index")
    expiries: set[datetime] = set()

    async def renewed_twice() -> bool:
        [row] = await db.delivery_rows()
        if row.lease_expires is not None:
            expiries.add(row.lease_expires)
        return len(expiries) >= 3

    try:
        async with outbox.relay(buses[0]), outbox.relay(buses[1]):
            await eventually(renewed_twice, "the lease to be renewed twice")
            finish.set()
            await db.wait_for_statuses({"completed": 1})
    finally:
        finish.set()
    assert calls == [1]  # the other relay, polling all along, never took it


# -- configuration ---------------------------------------------------------------------------


def test_durable_handler_names_are_unique_on_a_bus() -> None:
    bus = EventBus()

    async def index(event: object) -> None: ...

    async def reindex(event: object) -> None: ...

    bus.subscribe(DocumentWasCreated, index, durable=True)
    with pytest.raises(SubscriptionError, match="already subscribed"):
        bus.subscribe(DocumentWasCreated, index, durable=True)
    bus.subscribe(DocumentWasCreated, reindex, durable=True, name="index-v2")
    with pytest.raises(SubscriptionError, match="index-v2"):  # another event type, too
        bus.subscribe(AccountWasDebited, index, durable=True, name="index-v2")
    bus.subscribe(AccountWasDebited, index, name="index-v2")  # not durable: not addressed
    assert sorted(bus.durable_handlers) == sorted([f"{__name__}.{index.__qualname__}", "index-v2"])


def test_a_durable_handler_cannot_be_once() -> None:
    bus = EventBus()
    with pytest.raises(ConfigurationError, match="once"):

        @bus.on(DocumentWasCreated, durable=True, once=True)
        async def index(event: DocumentWasCreated) -> None: ...

    with pytest.raises(TypeError, match="durable"):
        bus.on(DocumentWasCreated, durable="yes")  # type: ignore[arg-type]
    assert bus.subscriptions == ()


@pytest.fixture
def engine_never_connected() -> Iterator[AsyncEngine]:
    engine = create_async_engine("sqlite+aiosqlite://")
    yield engine
    engine.sync_engine.dispose()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        ({"table_prefix": "my-events_"}, ConfigurationError),
        ({"table_prefix": "1events_"}, ConfigurationError),
        ({"table_prefix": ""}, ConfigurationError),
        ({"table_prefix": 5}, TypeError),
        ({"schema": 5}, TypeError),
        ({"schema": "app; DROP TABLE users"}, ConfigurationError),
        ({"codec": "json"}, TypeError),
        ({"lease": 0}, ConfigurationError),
        ({"lease": "30"}, TypeError),
        ({"poll_interval": -1.0}, ConfigurationError),
        ({"poll_interval": float("nan")}, ConfigurationError),
        ({"concurrency": 0}, ConfigurationError),
        ({"concurrency": 2.0}, TypeError),
        ({"batch_size": 0}, ConfigurationError),
        ({"keep_completed": 7}, TypeError),
        ({"drain_timeout": 0}, ConfigurationError),
    ],
)
def test_bad_outbox_arguments_are_refused(
    engine_never_connected: AsyncEngine, options: dict[str, Any], error: type[Exception]
) -> None:
    with pytest.raises(error):
        Outbox(engine_never_connected, **options)


def test_outbox_needs_an_async_engine_and_relays_a_bus(engine_never_connected: AsyncEngine) -> None:
    with pytest.raises(TypeError, match="AsyncEngine"):
        Outbox(engine_never_connected.sync_engine)  # type: ignore[arg-type]
    outbox = Outbox(engine_never_connected)
    with pytest.raises(TypeError, match="EventBus"):
        outbox.relay("bus")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="concurrency"):
        outbox.relay(EventBus(), concurrency=0)
    with pytest.raises(TypeError, match="Outbox"):
        TransactionalEvents(EventBus(), outbox="outbox")  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_what_cannot_be_stored_is_refused_where_it_is_recorded(db: Database) -> None:
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=db.outbox)

    @bus.on(DocumentWasCreated, durable=True)
    async def index(event: DocumentWasCreated) -> None: ...

    async with db.sessions.begin() as session:
        event = DocumentWasCreated(number=1)
        with pytest.raises(TypeError):
            events.record(session, event, key=7)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            events.record(session, event, key="")
        with pytest.raises(ValueError):
            events.record(session, event, key="k" * 256)
        with pytest.raises(ValueError):
            events.record(session, event, key="a\x00b")
        with pytest.raises(TypeError):
            events.record(session, event, headers={"attempt": 1})  # type: ignore[dict-item]
        with pytest.raises(TypeError, match="cannot encode"):
            events.record(session, DocumentWasCreated(number=object()))  # type: ignore[arg-type]
        with pytest.raises(ConfigurationError, match="lacks"):
            events.record(session, WronglyKeyed(number=1))
    assert await db.count(db.events) == 0
