"""The application the relay processes of tests/test_outbox_crash.py run.

``python -m aioevents relay tests.outbox_relay_app:bus`` imports this module and reads ``bus``:
it is built on first access from the environment (`DATABASE_URL_VARIABLE`,
`TABLE_PREFIX_VARIABLE`), so each test gets relays on tables of its own. The test process
calls `build` itself, with the same handlers: its bus records the events (and never runs),
and stored deliveries are addressed by handler name, which both sides share.

The handlers write to tables of their own, which is how the test sees what ran and in which
order without asking the library:

- ``runs``: one row per run of the payment handler, in a transaction of its own, so a run
  whose effect was lost (its process killed) still counts;
- ``ledger``: the payment's effect, written with `Outbox.first_time` in one transaction;
- ``steps``: the keyed handler's effect, in handling order (a serial id), also guarded by
  the inbox; ``failures``: the first run of a step marked to fail, which then raises.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    Column,
    Identity,
    Integer,
    MetaData,
    String,
    Table,
    Uuid,
    insert,
)
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from aioevents import Durable, EventBus
from aioevents.outbox import Delivery, Outbox, current_delivery
from aioevents.sqlalchemy import TransactionalEvents

__all__ = [
    "DATABASE_URL_VARIABLE",
    "PAYMENT_HANDLER",
    "STEP_HANDLER",
    "TABLE_PREFIX_VARIABLE",
    "PaymentWasTaken",
    "RelayApp",
    "StepWasTaken",
    "build",
]

DATABASE_URL_VARIABLE = "AIOEVENTS_TEST_DATABASE_URL"
TABLE_PREFIX_VARIABLE = "AIOEVENTS_TEST_RELAY_TABLE_PREFIX"
PAYMENT_HANDLER = "crash-test.book-payment"
STEP_HANDLER = "order-test.log-step"
LEASE = 2.0  # short: a killed relay's deliveries are claimed again within seconds
CONCURRENCY = 4


@dataclass(frozen=True, slots=True, kw_only=True)
class PaymentWasTaken:
    __event_name__ = "crash-test.payment-was-taken"

    number: int
    amount: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StepWasTaken:
    """Step ``n`` of ``key``: ``n`` is the key's commit order, counted by the recording test."""

    __event_name__ = "order-test.step-was-taken"
    __event_key__ = "key"

    key: str
    n: int
    fail_first: bool = False


class FailedOnPurpose(Exception):
    """The first run of a step marked ``fail_first``."""


@dataclass(frozen=True, slots=True)
class Tables:
    metadata: MetaData
    runs: Table
    ledger: Table
    key_counter: Table
    steps: Table
    failures: Table


@dataclass(frozen=True, slots=True)
class RelayApp:
    table_prefix: str
    engine: AsyncEngine
    outbox: Outbox
    bus: EventBus
    events: TransactionalEvents
    tables: Tables


def make_tables(prefix: str) -> Tables:
    metadata = MetaData()
    runs = Table(
        f"{prefix}runs",
        metadata,
        Column("id", BigInteger, Identity(), primary_key=True),
        Column("event_id", Uuid, nullable=False),
        Column("pid", Integer, nullable=False),
    )
    ledger = Table(  # no unique event id: the inbox, not a constraint, keeps it exact
        f"{prefix}ledger",
        metadata,
        Column("id", BigInteger, Identity(), primary_key=True),
        Column("event_id", Uuid, nullable=False),
        Column("amount", Integer, nullable=False),
    )
    key_counter = Table(
        f"{prefix}key_counter",
        metadata,
        Column("key", String(32), primary_key=True),
        Column("n", Integer, nullable=False),
    )
    steps = Table(
        f"{prefix}steps",
        metadata,
        Column("id", BigInteger, Identity(), primary_key=True),
        Column("key", String(32), nullable=False),
        Column("n", Integer, nullable=False),
        Column("pid", Integer, nullable=False),
    )
    failures = Table(
        f"{prefix}failures",
        metadata,
        Column("event_id", Uuid, primary_key=True),
    )
    return Tables(metadata, runs, ledger, key_counter, steps, failures)


def build(database_url: str, table_prefix: str) -> RelayApp:
    """The engine, outbox, bus and durable handlers of one test's relays (or its recorder)."""
    # A small pool: a relay needs about 8 connections (listener, claims, writes, renewals
    # and one per running handler), and several relays share the server with other tests.
    engine = create_async_engine(database_url, pool_size=8, max_overflow=4)
    outbox = Outbox(
        engine, table_prefix=table_prefix, concurrency=CONCURRENCY, lease=LEASE, poll_interval=0.1
    )
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=outbox)
    tables = make_tables(table_prefix)
    sessions = async_sessionmaker(engine)
    subscribe_payment_handler(bus, outbox, sessions, tables)
    subscribe_step_handler(bus, outbox, sessions, tables)
    return RelayApp(table_prefix, engine, outbox, bus, events, tables)


def subscribe_payment_handler(
    bus: EventBus, outbox: Outbox, sessions: async_sessionmaker[AsyncSession], tables: Tables
) -> None:
    async def book_payment(event: PaymentWasTaken) -> None:
        delivery = running_delivery()
        # Its own transaction, committed before the effect: a run cut short by a kill counts.
        async with sessions.begin() as session:
            run = {"event_id": delivery.event_id, "pid": os.getpid()}
            await session.execute(insert(tables.runs).values(run))
        # The inbox row and the effect commit together: a second run finds the row and stops.
        async with sessions.begin() as session:
            if await outbox.first_time(session):
                entry = {"event_id": delivery.event_id, "amount": event.amount}
                await session.execute(insert(tables.ledger).values(entry))

    bus.subscribe(
        PaymentWasTaken,
        book_payment,
        name=PAYMENT_HANDLER,
        durable=Durable(max_attempts=20, wait_initial=0.1, wait_max=1.0, wait_jitter=0.1),
    )


def subscribe_step_handler(
    bus: EventBus, outbox: Outbox, sessions: async_sessionmaker[AsyncSession], tables: Tables
) -> None:
    async def log_step(event: StepWasTaken) -> None:
        delivery = running_delivery()
        if event.fail_first and await first_failure(sessions, tables, delivery.event_id):
            raise FailedOnPurpose(f"step {event.n} of {event.key} fails its first run")
        # Guarded by the inbox: a run repeated after a lease ran out logs the step once.
        async with sessions.begin() as session:
            if await outbox.first_time(session):
                step = {"key": event.key, "n": event.n, "pid": os.getpid()}
                await session.execute(insert(tables.steps).values(step))

    # Retried at once: the order must hold when a key's delivery fails and runs again.
    retry_at_once = Durable(max_attempts=5, wait_initial=0.0, wait_max=0.0, wait_jitter=0.0)
    bus.subscribe(StepWasTaken, log_step, name=STEP_HANDLER, durable=retry_at_once)


async def first_failure(
    sessions: async_sessionmaker[AsyncSession], tables: Tables, event_id: uuid.UUID
) -> bool:
    """Record that this event's step failed; False if it had failed before."""
    async with sessions.begin() as session:
        statement = postgresql_insert(tables.failures).values(event_id=event_id)
        result = await session.execute(statement.on_conflict_do_nothing())
        return bool(result.rowcount)  # type: ignore[attr-defined]


def running_delivery() -> Delivery:
    delivery = current_delivery()
    if delivery is None:
        raise RuntimeError("a durable handler runs in a delivery")
    return delivery


_app: RelayApp | None = None


def __getattr__(name: str) -> EventBus:
    """``bus``, for ``python -m aioevents relay tests.outbox_relay_app:bus``: built from the
    environment on first access, so that importing this module (as the test does) needs none."""
    global _app
    if name != "bus":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = build(os.environ[DATABASE_URL_VARIABLE], os.environ[TABLE_PREFIX_VARIABLE])
    return _app.bus
