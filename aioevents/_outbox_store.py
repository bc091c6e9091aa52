"""The outbox's tables and every statement run on them.

Two tables and an inbox. ``events`` holds one row per recorded event (id, name, version, key,
payload, headers, time); ``deliveries`` one row per event and durable handler, which is what
relays claim, complete and fail. A delivery is ``pending`` until it is ``completed``, ``dead``
(out of attempts, or undecodable) or ``discarded`` by an operator; while a relay runs it, it
holds a lease: its relay's token and an expiry, renewed while the handler runs. A relay that
dies stops renewing, the lease runs out and another relay claims the delivery again.

Order per key: a delivery with a key is claimable only when no earlier delivery (smaller id)
of the same handler and key is ``pending`` or ``dead``, so at most one runs at a time and they
complete in id order. Ids follow commit order within a key because a keyed event's rows are
written under a transaction-scoped advisory lock on the key, taken just before COMMIT
(PostgreSQL); SQLite serialises all writing transactions anyway.

Times are the relays' clocks, in UTC: machines that share an outbox keep their clocks in step
(NTP), as a lease of tens of seconds allows.
"""

from __future__ import annotations

import hashlib
import traceback
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    DDL,
    BigInteger,
    Column,
    DateTime,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
    and_,
    any_,
    bindparam,
    delete,
    exists,
    func,
    insert,
    or_,
    select,
    text,
    update,
)
from sqlalchemy import event as sa_event
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = [
    "Claimed",
    "Failure",
    "NewDelivery",
    "NewEvent",
    "Store",
    "lock_keys",
    "now",
    "traceback_text",
]

PENDING, COMPLETED, DEAD, DISCARDED = "pending", "completed", "dead", "discarded"
UNFINISHED = (PENDING, DEAD)  # what holds back the later deliveries of its handler and key
_TRACEBACK_LIMIT = 16_000  # characters of a failure's traceback kept in its row
_MESSAGE_LIMIT = 4_000  # characters of a failure's message kept (once per attempt)
_ERROR_TYPE_LIMIT = 255  # the error_type column's length


def now() -> datetime:
    return datetime.now(UTC)


def traceback_text(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(exc))
    return text if len(text) <= _TRACEBACK_LIMIT else "...\n" + text[-_TRACEBACK_LIMIT:]


class Instant(TypeDecorator[datetime]):
    """An aware UTC datetime on every database: SQLite has no time zones, so it keeps naive
    UTC there (which also compares correctly as text)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and dialect.name == "sqlite":
            return value.astimezone(UTC).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


@dataclass(frozen=True, slots=True)
class NewEvent:
    id: uuid.UUID
    name: str
    version: int
    key: str | None
    payload: str
    headers: str
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class NewDelivery:
    event_id: uuid.UUID
    handler: str
    key: str | None


@dataclass(frozen=True, slots=True)
class Claimed:
    """A delivery a relay holds the lease of, with what its handler needs."""

    id: int
    handler: str
    attempt: int
    event_id: uuid.UUID
    event_name: str
    event_version: int
    key: str | None
    payload: str
    headers: str
    recorded_at: datetime


@dataclass(frozen=True, slots=True)
class Failure:
    id: int
    dead: bool
    due_at: datetime
    error: BaseException
    attempt: int = 0  # the delivery's attempt that failed (its history's row)
    duration: float | None = None  # seconds its handler ran (None: it did not run)


def _tables(
    metadata: MetaData, prefix: str, schema: str | None
) -> tuple[Table, Table, Table, Table]:
    events = Table(
        f"{prefix}events",
        metadata,
        Column("id", Uuid, primary_key=True),
        Column("name", String(255), nullable=False),
        Column("version", Integer, nullable=False),
        Column("key", String(255)),
        Column("payload", Text, nullable=False),
        Column("headers", Text, nullable=False),
        Column("recorded_at", Instant, nullable=False),
        schema=schema,
    )
    deliveries = Table(
        f"{prefix}deliveries",
        metadata,
        # Integer on SQLite: only an INTEGER PRIMARY KEY is its autoincrementing rowid.
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column("event_id", Uuid, ForeignKey(events.c.id, ondelete="CASCADE"), nullable=False),
        Column("handler", String(255), nullable=False),
        Column("key", String(255)),
        Column("status", String(16), nullable=False),
        Column("attempts", Integer, nullable=False),
        Column("due_at", Instant, nullable=False),
        Column("lease_token", Uuid),
        Column("lease_expires", Instant),
        Column("created_at", Instant, nullable=False),
        Column("finished_at", Instant),
        Column("error_type", String(255)),
        Column("error_message", Text),
        Column("error_traceback", Text),
        Column("duration", Float),  # seconds the last attempt's handler ran
        UniqueConstraint("event_id", "handler", name=f"{prefix}deliveries_once"),
        schema=schema,
    )
    pending = deliveries.c.status == PENDING
    unfinished = deliveries.c.status.in_(UNFINISHED)
    # Claims scan pending deliveries in id order: this index holds only those, so completed
    # rows kept for days cost a claim nothing.
    Index(
        f"{prefix}deliveries_pending",
        deliveries.c.id,
        postgresql_where=pending,
        sqlite_where=pending,
    )
    Index(
        f"{prefix}deliveries_key",
        deliveries.c.handler,
        deliveries.c.key,
        deliveries.c.id,
        postgresql_where=unfinished,
        sqlite_where=unfinished,
    )
    # Operators' queries page by (status, id); the retention sweep finds old finished rows.
    Index(f"{prefix}deliveries_status", deliveries.c.status, deliveries.c.id)
    Index(f"{prefix}deliveries_handler", deliveries.c.handler, deliveries.c.status)
    # The panel's dead letters, newest first, and one handler's: small (dead rows are few),
    # so planners take them over walking the primary key through completed rows.
    dead = deliveries.c.status == DEAD
    Index(f"{prefix}deliveries_dead", deliveries.c.id, postgresql_where=dead, sqlite_where=dead)
    Index(
        f"{prefix}deliveries_dead_handler",
        deliveries.c.handler,
        deliveries.c.id,
        postgresql_where=dead,
        sqlite_where=dead,
    )
    inbox = Table(
        f"{prefix}inbox",
        metadata,
        Column("handler", String(255), primary_key=True),
        Column("event_id", Uuid, primary_key=True),
        Column("processed_at", Instant, nullable=False),
        schema=schema,
    )
    _listen_for_new_deliveries(deliveries, schema, prefix)
    return events, deliveries, inbox, _attempts(metadata, prefix, schema, deliveries)


def _attempts(metadata: MetaData, prefix: str, schema: str | None, deliveries: Table) -> Table:
    """The failed attempts' history: one row per failure, written with it (a success writes
    only its delivery's ``duration``: the hot path stays one statement)."""
    attempts = Table(
        f"{prefix}attempts",
        metadata,
        Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True),
        Column(
            "delivery_id",
            deliveries.c.id.type,
            ForeignKey(deliveries.c.id, ondelete="CASCADE"),
            nullable=False,
        ),
        Column("attempt", Integer, nullable=False),
        Column("started_at", Instant, nullable=False),
        Column("finished_at", Instant, nullable=False),
        Column("duration", Float),
        Column("error_type", String(255)),
        Column("error_message", Text),
        Column("error_traceback", Text),
        schema=schema,
    )
    Index(f"{prefix}attempts_delivery", attempts.c.delivery_id, attempts.c.id)
    Index(f"{prefix}attempts_finished", attempts.c.finished_at)
    return attempts


def _listen_for_new_deliveries(deliveries: Table, schema: str | None, prefix: str) -> None:
    """PostgreSQL: a NOTIFY on the channel for each transaction that adds deliveries no relay
    holds yet, so that sleeping relays wake at COMMIT (polling still runs: a NOTIFY is lost
    while a relay reconnects). Part of the metadata: create_all and create_tables make it."""
    function = f"{schema}.{prefix}notify" if schema else f"{prefix}notify"
    for statement in (
        f"CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_notify('{prefix}deliveries', ''); RETURN NULL; END $$",
        f"CREATE TRIGGER {prefix}deliveries_notify AFTER INSERT ON %(fullname)s FOR EACH ROW "
        f"WHEN (NEW.lease_token IS NULL) EXECUTE FUNCTION {function}()",
    ):
        sa_event.listen(deliveries, "after_create", DDL(statement).execute_if(dialect="postgresql"))  # type: ignore[no-untyped-call]
    sa_event.listen(
        deliveries,
        "after_drop",
        DDL(f"DROP FUNCTION IF EXISTS {function}()").execute_if(  # type: ignore[no-untyped-call]
            dialect="postgresql"
        ),
    )


def lock_keys(connection: Connection, keys: Iterable[str]) -> None:
    """PostgreSQL: take the transaction-scoped advisory locks of ``keys``, held to COMMIT.

    All of a transaction's keys in one statement, in one order: two transactions never wait
    for each other's locks (a deadlock). Ids then follow commit order within a key.
    """
    locks = sorted({key_lock_id(key) for key in keys})
    if locks and connection.dialect.name == "postgresql":
        connection.execute(_LOCK_KEYS, {"locks": locks})


def key_lock_id(key: str) -> int:
    """A signed 64-bit advisory lock id for a key: two keys that collide merely share it."""
    digest = hashlib.blake2b(key.encode(), digest_size=8, person=b"aioevents").digest()
    return int.from_bytes(digest, "big", signed=True)


class Store:
    """The statements of one outbox, compiled once per shape by SQLAlchemy's cache."""

    def __init__(self, prefix: str, schema: str | None) -> None:
        self.metadata = MetaData()
        self.events, self.deliveries, self.inbox, self.attempts = _tables(
            self.metadata, prefix, schema
        )
        self.channel = f"{prefix}deliveries"  # PostgreSQL NOTIFY channel
        self._claim = _claim_statement(self.deliveries, postgres=False)
        self._any_due = _due_deliveries(self.deliveries)
        self._claim_joined = (
            _claim_statement(self.deliveries, postgres=True)
            .where(self.deliveries.c.event_id == self.events.c.id)
            .returning(*(self.events.c[name] for name in _EVENT_FIELDS))
        )
        self._record_sql: Any = None  # PostgreSQL's, made for its dialect's quoting
        self._complete_sql: Any = None

    # -- written in the recording transaction --------------------------------------------
    # Synchronous: called from the session's before_commit hook, on its own connection, in
    # SQLAlchemy's greenlet (where a sync call awaits the driver): no extra task or greenlet.

    def record(
        self,
        connection: Connection,
        events: Sequence[NewEvent],
        deliveries: Sequence[NewDelivery],
        lease: tuple[uuid.UUID, datetime] | None,
    ) -> list[tuple[int, int]]:
        """Write the events and their deliveries; return those leased to ``lease`` (the
        committing process's relay) as (index in ``deliveries``, delivery id).

        A keyed delivery is leased only if nothing earlier of its handler and key is
        unfinished: it is then next in its key's order.
        """
        postgres = connection.dialect.name == "postgresql"
        keys = sorted({d.key for d in deliveries if d.key is not None})
        leased = self._leasable(deliveries, self._blocked(connection, keys), lease)
        token, expires = lease if lease is not None else (None, None)
        at = now()
        if postgres:
            returned = self._record_on_postgres(
                connection, events, deliveries, leased, token, expires, at
            )
        else:
            returned = self._record_row_by_row(
                connection, events, deliveries, leased, token, expires, at
            )
        ids = {(event_id, handler): row_id for row_id, event_id, handler in returned}
        return [
            (index, ids[delivery.event_id, delivery.handler])
            for index, (delivery, mine) in enumerate(zip(deliveries, leased, strict=True))
            if mine
        ]

    def _record_on_postgres(
        self,
        connection: Connection,
        events: Sequence[NewEvent],
        deliveries: Sequence[NewDelivery],
        leased: Sequence[bool],
        token: uuid.UUID | None,
        expires: datetime | None,
        at: datetime,
    ) -> Any:
        """One statement, one round trip, whatever the count: the rows go as arrays (one
        parameter per column, so no parameter limit) into a statement compiled once."""
        if self._record_sql is None:
            self._record_sql = text(
                _RECORD_ON_POSTGRES.format(
                    events=_table_name(connection, self.events),
                    deliveries=_table_name(connection, self.deliveries),
                )
            )
        parameters = {
            "e_id": [e.id for e in events],
            "e_name": [e.name for e in events],
            "e_version": [e.version for e in events],
            "e_key": [e.key for e in events],
            "e_payload": [e.payload for e in events],
            "e_headers": [e.headers for e in events],
            "e_at": [e.recorded_at for e in events],
            "d_event": [d.event_id for d in deliveries],
            "d_handler": [d.handler for d in deliveries],
            "d_key": [d.key for d in deliveries],
            "d_leased": list(leased),
            "token": token,
            "expires": expires,
            "at": at,
        }
        return connection.execute(self._record_sql, parameters)

    def _record_row_by_row(
        self,
        connection: Connection,
        events: Sequence[NewEvent],
        deliveries: Sequence[NewDelivery],
        leased: Sequence[bool],
        token: uuid.UUID | None,
        expires: datetime | None,
        at: datetime,
    ) -> Any:
        """SQLite: executemany (no round trips to save in-process)."""
        event_rows = [
            {
                "id": e.id,
                "name": e.name,
                "version": e.version,
                "key": e.key,
                "payload": e.payload,
                "headers": e.headers,
                "recorded_at": e.recorded_at,
            }
            for e in events
        ]
        delivery_rows = [
            {
                "event_id": d.event_id,
                "handler": d.handler,
                "key": d.key,
                "status": PENDING,
                "attempts": 1 if mine else 0,
                "due_at": at,
                "lease_token": token if mine else None,
                "lease_expires": expires if mine else None,
                "created_at": at,
            }
            for d, mine in zip(deliveries, leased, strict=True)
        ]
        d = self.deliveries
        connection.execute(insert(self.events), event_rows)
        statement = insert(d).returning(d.c.id, d.c.event_id, d.c.handler)
        return connection.execute(statement, delivery_rows)

    def _blocked(self, connection: Connection, keys: Sequence[str]) -> set[tuple[str, str]]:
        if not keys:
            return set()
        d = self.deliveries
        rows = connection.execute(
            select(d.c.handler, d.c.key)
            .where(d.c.key.in_(keys), d.c.status.in_(UNFINISHED))
            .distinct()
        )
        return {(handler, key) for handler, key in rows}

    @staticmethod
    def _leasable(
        deliveries: Sequence[NewDelivery],
        blocked: set[tuple[str, str]],
        lease: tuple[uuid.UUID, datetime] | None,
    ) -> list[bool]:
        leased = []
        for d in deliveries:
            if lease is None:
                leased.append(False)
            elif d.key is None:
                leased.append(True)
            else:  # the first of its handler and key in this transaction, and none before
                leased.append((d.handler, d.key) not in blocked)
                blocked.add((d.handler, d.key))
        return leased

    # -- a relay's work ---------------------------------------------------------------------

    async def claim(
        self,
        connection: AsyncConnection,
        handlers: Iterable[str],
        token: uuid.UUID,
        lease: float,
        limit: int,
    ) -> list[Claimed]:
        """Lease up to ``limit`` due deliveries of ``handlers``, oldest first."""
        at = now()
        parameters = {
            "handlers": list(handlers),
            "now": at,
            "limit": limit,
            "token": token,
            "expires": at + timedelta(seconds=lease),
        }
        if connection.dialect.name == "postgresql":  # the events ride along: one round trip
            rows = (await connection.execute(self._claim_joined, parameters)).all()
        elif not (await connection.execute(self._any_due, parameters)).first():
            return []  # SQLite: a read first, so that an idle relay's poll takes no write lock
        else:  # SQLite's RETURNING names only the updated table
            rows = (await connection.execute(self._claim, parameters)).all()
            rows = await self._with_events(connection, rows)
        claimed = [
            Claimed(
                id=row.id,
                handler=row.handler,
                attempt=row.attempts,
                event_id=row.event_id,
                event_name=row.name,
                event_version=row.version,
                key=row.key,
                payload=row.payload,
                headers=row.headers,
                recorded_at=row.recorded_at,
            )
            for row in rows
        ]
        claimed.sort(key=lambda c: c.id)
        return claimed

    async def _with_events(self, connection: AsyncConnection, rows: Sequence[Any]) -> list[Any]:
        if not rows:
            return []
        e = self.events
        found = await connection.execute(
            select(e).where(e.c.id.in_({row.event_id for row in rows}))
        )
        by_id = {event.id: event for event in found}
        return [_Joined(row, by_id[row.event_id]) for row in rows]

    async def complete(
        self,
        connection: AsyncConnection,
        ids: Sequence[int],
        token: uuid.UUID,
        *,
        keep: bool,
        durations: Sequence[float],
    ) -> int:
        """Mark ``ids`` completed with their handlers' ``durations`` (or delete them); return
        how many this token still held."""
        d = self.deliveries
        held = and_(_among(connection, d.c.id, ids), d.c.lease_token == token)
        if not keep:
            return (await connection.execute(delete(d).where(held))).rowcount
        if connection.dialect.name == "postgresql":  # one statement, the durations as an array
            if self._complete_sql is None:
                name = connection.dialect.identifier_preparer.format_table(d)
                self._complete_sql = text(_COMPLETE_ON_POSTGRES.format(deliveries=name))
            parameters = {"ids": list(ids), "durations": list(durations), "token": token}
            parameters["at"] = now()
            return (await connection.execute(self._complete_sql, parameters)).rowcount
        one = update(d).where(d.c.id == bindparam("delivery_id"), d.c.lease_token == token)
        one = one.values({**_finished(COMPLETED, now()), "duration": bindparam("took")})
        written = 0  # SQLite, in process: a statement each costs no round trip
        for delivery_id, took in zip(ids, durations, strict=True):
            row = {"delivery_id": delivery_id, "took": took}
            written += (await connection.execute(one, row)).rowcount
        return written

    async def fail(
        self, connection: AsyncConnection, failures: Sequence[Failure], token: uuid.UUID
    ) -> int:
        """Write each failure on its delivery (retry or dead) and in its attempts history;
        return how many this token still held."""
        d = self.deliveries
        at = now()
        statement = (
            update(d)
            .where(d.c.id == bindparam("delivery_id"), d.c.lease_token == token)
            .values(
                status=bindparam("new_status"),
                due_at=bindparam("new_due_at"),
                finished_at=bindparam("finished"),
                lease_token=None,
                lease_expires=None,
                error_type=bindparam("error_type"),
                error_message=bindparam("error_message"),
                error_traceback=bindparam("error_traceback"),
                duration=bindparam("took"),
            )
        )
        # One statement each: a driver's rowcount of an executemany is not the sum (asyncpg
        # reports -1), and failures are few.
        written = []
        for f in failures:
            error = _error_texts(f.error)
            row = {
                "delivery_id": f.id,
                "new_status": DEAD if f.dead else PENDING,
                "new_due_at": f.due_at,
                "finished": at if f.dead else None,
                "took": f.duration,
                **error,
            }
            if (await connection.execute(statement, row)).rowcount:
                written.append(_attempt_row(f, at, error))
        if written:  # only where the lease still held: another relay's attempt is its own
            await connection.execute(insert(self.attempts), written)
        return len(written)

    async def renew(
        self, connection: AsyncConnection, ids: Sequence[int], token: uuid.UUID, lease: float
    ) -> set[int]:
        """Extend the leases ``token`` still holds among ``ids``; return those ids."""
        d = self.deliveries
        result = await connection.execute(
            update(d)
            .where(_among(connection, d.c.id, ids), d.c.lease_token == token)
            .values(lease_expires=now() + timedelta(seconds=lease))
            .returning(d.c.id)
        )
        return set(result.scalars())

    async def release(
        self, connection: AsyncConnection, ids: Sequence[int], token: uuid.UUID
    ) -> int:
        """Give back leased deliveries that did not run: due now, the attempt not counted."""
        d = self.deliveries
        result = await connection.execute(
            update(d)
            .where(_among(connection, d.c.id, ids), d.c.lease_token == token)
            .values(lease_token=None, lease_expires=None, attempts=d.c.attempts - 1)
        )
        return result.rowcount

    async def notify(self, connection: AsyncConnection) -> None:
        if connection.dialect.name == "postgresql":
            await connection.execute(select(func.pg_notify(self.channel, "")))

    # -- operators ------------------------------------------------------------------------

    async def resubmit(self, connection: AsyncConnection, ids: Sequence[int]) -> int:
        d = self.deliveries
        result = await connection.execute(
            update(d)
            .where(_among(connection, d.c.id, ids), d.c.status == DEAD)
            .values(status=PENDING, attempts=0, due_at=now(), finished_at=None)
        )
        if result.rowcount:
            await self.notify(connection)
        return result.rowcount

    async def discard(
        self, connection: AsyncConnection, ids: Sequence[int], *, only_dead: bool = False
    ) -> int:
        d = self.deliveries
        # A leased delivery is running: it is left to finish (and counted as not discarded).
        not_running = or_(d.c.lease_expires.is_(None), d.c.lease_expires < now())
        # only_dead: a row resubmitted since the caller saw it dead is pending again: kept.
        statuses = (DEAD,) if only_dead else UNFINISHED
        result = await connection.execute(
            update(d)
            .where(_among(connection, d.c.id, ids), d.c.status.in_(statuses), not_running)
            .values(_finished(DISCARDED, now()))
        )
        if result.rowcount:  # a key's later deliveries may be free now
            await self.notify(connection)
        return result.rowcount

    async def purge(self, connection: AsyncConnection, before: datetime) -> int:
        """Delete finished deliveries older than ``before``, then events with none left."""
        d, e = self.deliveries, self.events
        old = await connection.execute(
            delete(d).where(d.c.status.in_((COMPLETED, DISCARDED)), d.c.finished_at < before)
        )
        orphan = ~exists().where(d.c.event_id == e.c.id)
        await connection.execute(delete(e).where(e.c.recorded_at < before, orphan))
        a = self.attempts  # SQLite enforces no cascade unless asked: its rows go here
        await connection.execute(
            delete(a).where(a.c.finished_at < before, ~exists().where(d.c.id == a.c.delivery_id))
        )
        return old.rowcount

    async def duration_percentiles(
        self, connection: AsyncConnection, fractions: Sequence[float]
    ) -> dict[str, tuple[float | None, ...]]:
        """Per handler, the ``fractions`` percentiles of its completed deliveries' durations:
        in the database on PostgreSQL; SQLite (embedded, small) has no percentile function."""
        d = self.deliveries
        done = and_(d.c.status == COMPLETED, d.c.duration.is_not(None))
        if connection.dialect.name == "postgresql":
            wanted = [func.percentile_cont(f).within_group(d.c.duration) for f in fractions]
            query = select(d.c.handler, *wanted).where(done).group_by(d.c.handler)
            return {row[0]: tuple(row[1:]) for row in await connection.execute(query)}
        found: dict[str, list[float]] = {}
        query = select(d.c.handler, d.c.duration).where(done).order_by(d.c.handler, d.c.duration)
        for handler, duration in await connection.execute(query):
            found.setdefault(handler, []).append(duration)
        return {
            handler: tuple(_percentile(durations, f) for f in fractions)
            for handler, durations in found.items()
        }

    async def first_time(
        self, connection: AsyncConnection, handler: str, event_id: uuid.UUID
    ) -> bool:
        """Write (handler, event id) to the inbox; False if it is there already."""
        i = self.inbox
        values = {"handler": handler, "event_id": event_id, "processed_at": now()}
        if connection.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert  # type: ignore[assignment]
        statement = dialect_insert(i).values(values).on_conflict_do_nothing()
        return bool((await connection.execute(statement)).rowcount)


# The events' insert rides along as a CTE: PostgreSQL checks the deliveries' foreign key at
# the end of the statement, when both are in.
_RECORD_ON_POSTGRES = """
WITH recorded_events AS (
    INSERT INTO {events} (id, name, version, key, payload, headers, recorded_at)
    SELECT * FROM unnest(
        CAST(:e_id AS uuid[]), CAST(:e_name AS varchar[]), CAST(:e_version AS integer[]),
        CAST(:e_key AS varchar[]), CAST(:e_payload AS text[]), CAST(:e_headers AS text[]),
        CAST(:e_at AS timestamptz[])
    )
)
INSERT INTO {deliveries}
    (event_id, handler, key, status, attempts, due_at, lease_token, lease_expires, created_at)
SELECT
    d.event_id, d.handler, d.key, 'pending', CASE WHEN d.leased THEN 1 ELSE 0 END,
    CAST(:at AS timestamptz), CASE WHEN d.leased THEN CAST(:token AS uuid) END,
    CASE WHEN d.leased THEN CAST(:expires AS timestamptz) END, CAST(:at AS timestamptz)
FROM unnest(
    CAST(:d_event AS uuid[]), CAST(:d_handler AS varchar[]), CAST(:d_key AS varchar[]),
    CAST(:d_leased AS boolean[])
) AS d (event_id, handler, key, leased)
RETURNING id, event_id, handler
"""


_COMPLETE_ON_POSTGRES = """
UPDATE {deliveries} AS d
SET status = 'completed', finished_at = CAST(:at AS timestamptz), lease_token = NULL,
    lease_expires = NULL, duration = done.duration
FROM unnest(CAST(:ids AS bigint[]), CAST(:durations AS double precision[])) AS done (id, duration)
WHERE d.id = done.id AND d.lease_token = CAST(:token AS uuid)
"""


_LOCK_KEYS = text(
    "SELECT pg_advisory_xact_lock(lock) FROM unnest(CAST(:locks AS bigint[])) AS lock ORDER BY lock"
)


def _table_name(connection: Connection, table: Table) -> str:
    return connection.dialect.identifier_preparer.format_table(table)


def _among(connection: AsyncConnection, column: Any, ids: Sequence[int]) -> Any:
    """``column IN ids``; on PostgreSQL ``= ANY(array)``: one parameter, whatever the count,
    instead of one each, rendered anew for every count."""
    if connection.dialect.name == "postgresql":
        return column == any_(bindparam("ids", list(ids), type_=ARRAY(BigInteger)))
    return column.in_(ids)


def _due_deliveries(d: Table) -> Any:
    """The ids of the deliveries a claim may take, oldest first."""
    earlier = d.alias("earlier")
    held_back = exists().where(
        earlier.c.handler == d.c.handler,
        earlier.c.key == d.c.key,
        earlier.c.id < d.c.id,
        earlier.c.status.in_(UNFINISHED),
    )
    return (
        select(d.c.id)
        .where(
            d.c.status == PENDING,
            d.c.handler.in_(bindparam("handlers", expanding=True)),
            d.c.due_at <= bindparam("now"),
            or_(d.c.lease_expires.is_(None), d.c.lease_expires < bindparam("now")),
            or_(d.c.key.is_(None), ~held_back),
        )
        .order_by(d.c.id)
        .limit(bindparam("limit"))
    )


def _claim_statement(d: Table, *, postgres: bool) -> Any:
    # SQLite has no row locks and ignores FOR UPDATE: one writer at a time there.
    due = _due_deliveries(d).with_for_update(skip_locked=True)
    return (
        update(d)
        # PostgreSQL plans "id IN (subquery)" as a scan of the whole table; "= ANY(ARRAY(...))"
        # goes by the primary key, however many finished rows are kept.
        .where(
            d.c.id == any_(func.array(due.scalar_subquery()))
            if postgres
            else d.c.id.in_(due.scalar_subquery())
        )
        .values(
            attempts=d.c.attempts + 1,
            lease_token=bindparam("token"),
            lease_expires=bindparam("expires"),
        )
        .returning(d.c.id, d.c.handler, d.c.attempts, d.c.event_id, d.c.key)
    )


_EVENT_FIELDS = ("name", "version", "payload", "headers", "recorded_at")


class _Joined:
    """A claimed delivery row with its event's fields, as PostgreSQL's joined claim returns."""

    __slots__ = ("event", "row")

    def __init__(self, row: Any, event: Any) -> None:
        self.row, self.event = row, event

    def __getattr__(self, name: str) -> Any:
        return getattr(self.event if name in _EVENT_FIELDS else self.row, name)


def _finished(status: str, at: datetime) -> dict[str, Any]:
    return {"status": status, "finished_at": at, "lease_token": None, "lease_expires": None}


def _percentile(ordered: Sequence[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks, as PostgreSQL's percentile_cont."""
    position = fraction * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _attempt_row(failure: Failure, at: datetime, error: dict[str, str]) -> dict[str, Any]:
    took = failure.duration
    return {
        "delivery_id": failure.id,
        "attempt": failure.attempt,
        "started_at": at if took is None else at - timedelta(seconds=took),
        "finished_at": at,
        "duration": took,
        **error,
    }


def _error_type(error: BaseException) -> str:
    kind = type(error)
    return f"{kind.__module__}.{kind.__qualname__}"


def _error_texts(error: BaseException) -> dict[str, str]:
    """A failure's type, message and traceback as every database stores them: a text the
    database refuses would fail the relay's write of every outcome batched with it."""
    try:
        message = str(error)
    except Exception:  # an exception's own __str__ may fail; its failure must still be kept
        message = f"<{type(error).__name__}: str() failed>"
    return {
        "error_type": _storable(_error_type(error))[:_ERROR_TYPE_LIMIT],
        "error_message": _storable(_capped(message, _MESSAGE_LIMIT)),
        "error_traceback": _storable(traceback_text(error)),
    }


def _capped(text: str, limit: int) -> str:
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text) - limit} more)"


def _storable(text: str) -> str:
    # PostgreSQL's text refuses NUL; shown as Python would escape it.
    return text.replace("\x00", "\\x00")
