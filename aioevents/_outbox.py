"""The Outbox: the stored side of durable delivery, and what operators do with it."""

from __future__ import annotations

import dataclasses
import enum
import re
import time
import uuid
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession

from ._bus import EventBus
from ._checks import check_flag, check_instance, check_positive_int, check_seconds
from ._codec import Codec, uuid7
from ._exceptions import AioEventsError, ConfigurationError
from ._names import event_name, event_version
from ._outbox_relay import Delivery, Job, Relay, RelaySettings, current_delivery
from ._outbox_store import NewDelivery, NewEvent, Store, lock_keys, now
from ._sending import OUTBOX_SYSTEM, Sends, send_hooks, start_sends

__all__ = [
    "Activity",
    "AttemptRecord",
    "Backlog",
    "DeliveryRecord",
    "DeliveryStatus",
    "EventRecord",
    "HandlerStats",
    "NotInDeliveryError",
    "Outbox",
    "StoredEvent",
    "lock_keys",
]

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_KEY_LENGTH = 255  # the key column's size
_A_DAY = 86_400.0


class NotInDeliveryError(AioEventsError):
    """Raised by `Outbox.first_time` outside a durable handler's delivery."""


class DeliveryStatus(enum.StrEnum):
    """Where a stored delivery stands."""

    PENDING = "pending"
    """Waiting for its (next) attempt, or leased to a relay that runs it."""
    COMPLETED = "completed"
    """Its handler succeeded."""
    DEAD = "dead"
    """Out of attempts, or its event could not be decoded: kept until resubmitted or
    discarded, and holding back the later deliveries of its handler and key."""
    DISCARDED = "discarded"
    """Given up by an operator."""


@dataclass(frozen=True, slots=True)
class DeliveryRecord:
    """One stored delivery, as `Outbox.deliveries` lists it."""

    id: int
    event_id: uuid.UUID
    event_name: str
    handler: str
    key: str | None
    status: DeliveryStatus
    attempts: int
    due_at: datetime
    leased_until: datetime | None
    created_at: datetime
    finished_at: datetime | None
    error_type: str | None
    error_message: str | None
    error_traceback: str | None
    duration: float | None = None  # seconds its last attempt's handler ran


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One failed attempt of a delivery, as `Outbox.event` lists them (a success is its
    delivery's ``completed`` status and ``duration``)."""

    delivery_id: int
    attempt: int
    started_at: datetime
    finished_at: datetime
    duration: float | None  # seconds the handler ran; None when it did not (undecodable)
    error_type: str | None
    error_message: str | None
    error_traceback: str | None


@dataclass(frozen=True, slots=True)
class EventRecord:
    """One stored event with every delivery and failed attempt of it (`Outbox.event`)."""

    id: uuid.UUID
    name: str
    version: int
    key: str | None
    payload: str  # as the codec wrote it (JSON)
    headers: dict[str, str]
    recorded_at: datetime
    deliveries: list[DeliveryRecord]
    attempts: list[AttemptRecord]  # by delivery, then as they happened


@dataclass(frozen=True, slots=True)
class Activity:
    """What happened in the last ``window`` (`Outbox.activity`), and deliveries by status."""

    window: timedelta
    events: int  # recorded in the window
    failures: int  # failed attempts in the window
    statuses: dict[DeliveryStatus, int]  # every kept delivery, whenever it was recorded

    @property
    def events_per_second(self) -> float:
        """Events recorded per second, over the window."""
        return self.events / self.window.total_seconds()

    @property
    def failures_per_second(self) -> float:
        """Failed attempts per second, over the window."""
        return self.failures / self.window.total_seconds()


@dataclass(frozen=True, slots=True)
class HandlerStats:
    """One durable handler's kept deliveries (`Outbox.handler_stats`)."""

    handler: str
    statuses: dict[DeliveryStatus, int]
    failed_attempts: int
    p50: float | None  # seconds, over its completed deliveries that recorded a duration
    p99: float | None

    @property
    def failure_rate(self) -> float:
        """Failed attempts among all attempts that ended (failed or completed)."""
        ended = self.failed_attempts + self.statuses.get(DeliveryStatus.COMPLETED, 0)
        return self.failed_attempts / ended if ended else 0.0


@dataclass(frozen=True, slots=True)
class Backlog:
    """Pending deliveries of one handler (and key, in `Outbox.backlog(by_key=True)`)."""

    handler: str
    key: str | None
    pending: int
    oldest_due: datetime


@dataclass(slots=True)
class StoredEvent:
    """What `TransactionalEvents.record` prepared for the outbox: written before COMMIT."""

    row: NewEvent
    handlers: tuple[str, ...]
    bus: EventBus
    outbox: Outbox
    event: object
    headers: dict[str, str]
    sends: Sends  # told to the send hooks; finished when the transaction ends
    written: bool = False  # a commit retried after a failed write writes it again


class Outbox:
    """Durable delivery on the application's own database (PostgreSQL or SQLite).

    Give it to `aioevents.sqlalchemy.TransactionalEvents`: an event recorded there is
    written, with one delivery per durable handler, in the recording transaction; the
    committing process runs its deliveries right after COMMIT, and every running bus's relay
    runs what is due, including what a dead process left: at least once.

    ``lease`` is how long a relay holds a delivery without renewing it, ``poll_interval`` how
    often relays look for due deliveries besides being woken, ``concurrency`` how many
    handlers a relay runs at once, ``batch_size`` how many deliveries it claims at a time.
    Completed deliveries are kept ``keep_completed`` (None: deleted at completion). On
    PostgreSQL with asyncpg a running relay holds one of the engine's pooled connections to
    LISTEN for new deliveries; ``listen=False`` leaves it to the application and only polls.
    Tables are named ``table_prefix`` + ``events`` / ``deliveries`` / ``inbox``, in
    ``schema`` if given; `metadata` holds them (for Alembic).
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        schema: str | None = None,
        table_prefix: str = "aioevents_",
        codec: Codec | None = None,
        lease: float = 30.0,
        poll_interval: float = 1.0,
        concurrency: int = 4,
        batch_size: int = 100,
        keep_completed: timedelta | None = timedelta(days=7),
        drain_timeout: float = 30.0,
        listen: bool = True,
    ) -> None:
        check_instance(engine, AsyncEngine, "Outbox() takes an AsyncEngine")
        _check_identifier("table_prefix", table_prefix)
        if schema is not None:
            _check_identifier("schema", schema)
        check_instance(codec, Codec, "Outbox(codec=...) takes a Codec or None", none=True)
        for name, seconds in (("lease", lease), ("poll_interval", poll_interval)):
            check_seconds(name, seconds)
        check_seconds("drain_timeout", drain_timeout)
        check_positive_int("concurrency", concurrency)
        check_positive_int("batch_size", batch_size)
        check_flag("listen", listen)
        check_instance(
            keep_completed,
            timedelta,
            "Outbox(keep_completed=...) takes a timedelta or None",
            none=True,
        )
        if keep_completed is not None and keep_completed < timedelta(0):
            raise ConfigurationError(f"keep_completed must not be negative, got {keep_completed}")
        for name, seconds in (("lease", lease), ("poll_interval", poll_interval)):
            if seconds > _A_DAY:  # beyond, a lease's expiry overflows, or nobody notices
                raise ConfigurationError(f"{name} is at most a day ({_A_DAY} s), got {seconds}")
        self.engine = engine
        self.codec = codec if codec is not None else Codec()
        self._store = Store(table_prefix, schema)
        self._settings = RelaySettings(
            lease, poll_interval, concurrency, batch_size, keep_completed, drain_timeout, listen
        )
        self._local: dict[EventBus, Relay] = {}  # the relay each running bus runs
        self._attached: weakref.WeakSet[EventBus] = weakref.WeakSet()
        self._registered: set[type] = set()

    def __repr__(self) -> str:
        return f"<Outbox {self._store.deliveries.fullname} on {self.engine.url!r}>"

    @property
    def metadata(self) -> Any:
        """The SQLAlchemy `MetaData` of the outbox's tables (for Alembic's target_metadata)."""
        return self._store.metadata

    async def create_tables(self) -> None:
        """Create the tables (and PostgreSQL's wake-up trigger) unless they exist."""
        async with self.engine.begin() as connection:
            await connection.run_sync(self._store.metadata.create_all)

    async def drop_tables(self) -> None:
        async with self.engine.begin() as connection:
            await connection.run_sync(self._store.metadata.drop_all)

    # -- relays -----------------------------------------------------------------------------

    def relay(self, bus: EventBus, *, concurrency: int | None = None) -> Relay:
        """A relay for ``bus``'s durable handlers: ``async with outbox.relay(bus):``.

        A bus given to `TransactionalEvents` with this outbox runs one while it runs; this
        starts more, for example in a process that only delivers.
        """
        check_instance(bus, EventBus, "relay() takes an EventBus")
        settings = self._settings
        if concurrency is not None:
            check_positive_int("concurrency", concurrency)
            settings = dataclasses.replace(settings, concurrency=concurrency)
        return Relay(bus, self.engine, self._store, self.codec, settings)

    def _attach(self, bus: EventBus) -> None:
        """Run a relay for ``bus`` whenever it runs, and hand it what its process commits."""
        if bus in self._attached:
            return

        def local_relay() -> Relay:
            relay = Relay(
                bus, self.engine, self._store, self.codec, self._settings, on_close=self._forget
            )
            self._local[bus] = relay
            return relay

        bus._attach(local_relay)  # refused while the bus runs: then not attached
        self._attached.add(bus)

    def _forget(self, relay: Relay) -> None:
        if self._local.get(relay.bus) is relay:
            del self._local[relay.bus]

    # -- recording (for TransactionalEvents) -------------------------------------------------

    def _prepare(
        self,
        bus: EventBus,
        event: object,
        handlers: tuple[str, ...],
        key: str | None,
        headers: Mapping[str, str] | None,
    ) -> StoredEvent:
        """Encode ``event`` now, so that what cannot be stored fails where it is recorded."""
        if type(event) not in self._registered:  # register() walks every subclass: once
            self.codec.register(type(event))
            self._registered.add(type(event))
        checked_headers = _checked_headers(headers)
        event_id, name = uuid7(), event_name(event)
        # The bus's send hooks see the event staged (a trace context they add is stored);
        # its send ends with the transaction (TransactionalEvents finishes it).
        sends = start_sends(
            send_hooks(bus._hooks),
            event,
            system=OUTBOX_SYSTEM,
            destination=name,
            message_id=str(event_id),
            headers=checked_headers,
        )
        try:
            row = NewEvent(
                id=event_id,
                name=name,
                version=event_version(event),
                key=_event_key(event) if key is None else _checked_key(key),
                payload=self.codec.encode(event),
                headers=self.codec.encode_headers(checked_headers),
                recorded_at=now(),
            )
        except BaseException as exc:
            sends.finish(exc)
            raise
        return StoredEvent(row, handlers, bus, self, event, checked_headers, sends)

    def _write(
        self, connection: Connection, stored: Sequence[StoredEvent]
    ) -> tuple[Relay, list[Job]] | None:
        """Write recorded events and their deliveries into the committing transaction; lease
        them to the bus's own relay if it runs and has room (handed over after COMMIT)."""
        bus = stored[0].bus
        relay = self._local.get(bus)
        lease = None
        deadline = time.monotonic() + self._settings.lease  # taken first: a lower bound
        if relay is not None and relay.has_room():
            lease = (relay.token, now() + timedelta(seconds=self._settings.lease))
        deliveries = [
            NewDelivery(item.row.id, handler, item.row.key)
            for item in stored
            for handler in item.handlers
        ]
        leased = self._store.record(connection, [item.row for item in stored], deliveries, lease)
        if relay is None or not leased:
            return None
        return relay, _jobs(stored, deliveries, leased, deadline)

    # -- operators --------------------------------------------------------------------------

    async def deliveries(
        self,
        *,
        status: DeliveryStatus | str | None = None,
        handler: str | None = None,
        event_name: str | None = None,
        key: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        after: int | None = None,
        before: int | None = None,
        newest_first: bool = False,
        limit: int = 100,
    ) -> list[DeliveryRecord]:
        """Stored deliveries, oldest first (or ``newest_first``), filtered; ``since`` and
        ``until`` bound when they were recorded. The next page starts ``after`` the last id
        of this one (``before`` it, newest first): keyset pagination, so a deep page costs
        what the first does."""
        check_positive_int("limit", limit)
        check_flag("newest_first", newest_first)
        for name, cursor in (("after", after), ("before", before)):
            if cursor is not None and type(cursor) is not int:
                raise TypeError(f"deliveries({name}=...) takes a delivery id (int), got {cursor!r}")
        d, e = self._store.deliveries, self._store.events
        order = d.c.id.desc() if newest_first else d.c.id
        query = select(d, e.c.name).join(e, e.c.id == d.c.event_id).order_by(order).limit(limit)
        equal = {
            d.c.status: None if status is None else DeliveryStatus(status).value,
            d.c.handler: handler,
            e.c.name: event_name,
            d.c.key: key,
        }
        query = query.where(*(column == value for column, value in equal.items() if value))
        if since is not None:
            query = query.where(d.c.created_at >= since)
        if until is not None:
            query = query.where(d.c.created_at < until)
        if after is not None:
            query = query.where(d.c.id > after)
        if before is not None:
            query = query.where(d.c.id < before)
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [_delivery_record(row) for row in rows]

    async def event(self, event_id: uuid.UUID) -> EventRecord | None:
        """One stored event with its deliveries and their failed attempts; None if unknown."""
        check_instance(event_id, uuid.UUID, "event() takes the event's id, a uuid.UUID")
        d, e, a = self._store.deliveries, self._store.events, self._store.attempts
        async with self.engine.connect() as connection:
            found = (await connection.execute(select(e).where(e.c.id == event_id))).first()
            if found is None:
                return None
            deliveries = await connection.execute(
                select(d, e.c.name)
                .join(e, e.c.id == d.c.event_id)
                .where(d.c.event_id == event_id)
                .order_by(d.c.id)
            )
            attempts = await connection.execute(
                select(a)
                .join(d, d.c.id == a.c.delivery_id)
                .where(d.c.event_id == event_id)
                .order_by(
                    a.c.delivery_id, a.c.id
                )  # as they happened (a resubmit restarts the count)
            )
            return EventRecord(
                id=found.id,
                name=found.name,
                version=found.version,
                key=found.key,
                payload=found.payload,
                headers=self.codec.decode_headers(found.headers),
                recorded_at=found.recorded_at,
                deliveries=[_delivery_record(row) for row in deliveries],
                attempts=[_attempt_record(row) for row in attempts],
            )

    async def activity(self, window: timedelta = timedelta(minutes=1)) -> Activity:
        """Events recorded and attempts failed in the last ``window``, and how many kept
        deliveries are in each status."""
        check_instance(window, timedelta, "activity(window=...) takes a timedelta")
        if window <= timedelta(0):
            raise ConfigurationError(f"activity(window=...) must be positive, got {window}")
        d, e, a = self._store.deliveries, self._store.events, self._store.attempts
        since = now() - window
        # Event ids are UUIDv7, in time order: the primary key finds the window's events.
        first_id = uuid.UUID(int=int(since.timestamp() * 1000) << 80)
        async with self.engine.connect() as connection:
            events = await connection.scalar(select(func.count()).where(e.c.id >= first_id))
            failures = await connection.scalar(select(func.count()).where(a.c.finished_at >= since))
            rows = await connection.execute(select(d.c.status, func.count()).group_by(d.c.status))
            statuses = {DeliveryStatus(status): count for status, count in rows}
        return Activity(window, int(events or 0), int(failures or 0), statuses)

    async def counts(
        self, *statuses: DeliveryStatus | str
    ) -> dict[tuple[str, DeliveryStatus], int]:
        """How many kept deliveries each handler has in each status (only ``statuses``, when
        given): one GROUP BY that an index serves (cheap enough to poll, as metrics do)."""
        wanted = [DeliveryStatus(status).value for status in statuses]
        async with self.engine.connect() as connection:
            return await self._counts(connection, wanted)

    async def _counts(
        self, connection: AsyncConnection, statuses: Sequence[str] = ()
    ) -> dict[tuple[str, DeliveryStatus], int]:
        d = self._store.deliveries
        query = select(d.c.handler, d.c.status, func.count()).group_by(d.c.handler, d.c.status)
        if statuses:
            query = query.where(d.c.status.in_(statuses))
        rows = await connection.execute(query)
        return {(handler, DeliveryStatus(status)): count for handler, status, count in rows}

    async def handler_stats(self) -> list[HandlerStats]:
        """Each durable handler's kept deliveries by status, failed attempts, and the median
        and 99th percentile of its completed deliveries' durations; by handler name. It reads
        every kept delivery: for a page, not for a frequent poll (see `counts`)."""
        d, a = self._store.deliveries, self._store.attempts
        async with self.engine.connect() as connection:
            statuses: dict[str, dict[DeliveryStatus, int]] = {}
            for (handler, status), count in (await self._counts(connection)).items():
                statuses.setdefault(handler, {})[status] = count
            failed = select(d.c.handler, func.count()).join(a, a.c.delivery_id == d.c.id)
            failed_rows = await connection.execute(failed.group_by(d.c.handler))
            failures: dict[str, int] = {row[0]: row[1] for row in failed_rows}
            percentiles = await self._store.duration_percentiles(connection, (0.5, 0.99))
        return [
            HandlerStats(
                handler,
                statuses[handler],
                failures.get(handler, 0),
                *percentiles.get(handler, (None, None)),
            )
            for handler in sorted(statuses)
        ]

    async def backlog(self, *, by_key: bool = False, limit: int = 100) -> list[Backlog]:
        """Pending deliveries per handler (per handler and key, keyed ones only, with
        ``by_key``), the largest first."""
        check_flag("by_key", by_key)
        check_positive_int("limit", limit)
        d = self._store.deliveries
        columns = [d.c.handler, d.c.key] if by_key else [d.c.handler]
        query = (
            select(*columns, func.count().label("pending"), func.min(d.c.due_at).label("due"))
            .where(d.c.status == DeliveryStatus.PENDING.value)
            .group_by(*columns)
            .order_by(func.count().desc(), d.c.handler)
            .limit(limit)
        )
        if by_key:
            query = query.where(d.c.key.is_not(None))
        async with self.engine.connect() as connection:
            rows = (await connection.execute(query)).all()
        return [
            Backlog(row.handler, row.key if by_key else None, row.pending, row.due) for row in rows
        ]

    async def resubmit(self, ids: Iterable[int]) -> int:
        """Make dead deliveries pending again, attempts from zero; returns how many were dead
        (only those are touched, so a retry clicked twice runs once)."""
        async with self.engine.begin() as connection:
            return await self._store.resubmit(connection, _ids(ids))

    async def discard(self, ids: Iterable[int], *, only_dead: bool = False) -> int:
        """Give up pending or dead deliveries that no relay is running; returns how many.

        With ``only_dead``, only deliveries still dead are given up: a delivery resubmitted
        meanwhile (by another operator, from a page that showed it dead) is pending again
        and kept, so a discard decided on a stale view cannot undo that retry.
        """
        check_flag("only_dead", only_dead)
        async with self.engine.begin() as connection:
            return await self._store.discard(connection, _ids(ids), only_dead=only_dead)

    async def purge(self) -> int:
        """Delete completed and discarded deliveries older than ``keep_completed`` (and events
        left without deliveries); relays do this every minute. Returns how many."""
        keep = self._settings.keep_completed or timedelta(0)
        async with self.engine.begin() as connection:
            return await self._store.purge(connection, now() - keep)

    async def first_time(self, session: AsyncSession) -> bool:
        """In a durable handler: record its delivery in the inbox, in ``session``'s transaction.

        True the first time for this handler and event; False when a committed transaction
        recorded it already (the handler ran before and should return). Write the handler's
        effects in the same transaction, and it is exactly once for this database.
        """
        delivery = current_delivery()
        if delivery is None:
            raise NotInDeliveryError("first_time() is called from a durable handler's delivery")
        connection = await session.connection()
        return await self._store.first_time(connection, delivery.handler, delivery.event_id)


def _jobs(
    stored: Sequence[StoredEvent],
    deliveries: Sequence[NewDelivery],
    leased: Sequence[tuple[int, int]],
    deadline: float,
) -> list[Job]:
    """The leased deliveries as jobs holding the recorded objects themselves (no decoding)."""
    by_id = {item.row.id: item for item in stored}
    jobs = []
    for index, delivery_id in leased:
        delivery = deliveries[index]
        item = by_id[delivery.event_id]
        running = Delivery(
            id=delivery_id,
            event_id=item.row.id,
            event_name=item.row.name,
            handler=delivery.handler,
            attempt=1,
            key=delivery.key,
            headers=item.headers,
            recorded_at=item.row.recorded_at,
        )
        jobs.append(Job(running, deadline, event=item.event))
    return jobs


def _event_key(event: object) -> str | None:
    field = getattr(type(event), "__event_key__", None)
    if field is None:
        return None
    if not isinstance(field, str) or not field:
        raise ConfigurationError(
            f"{type(event).__qualname__}.__event_key__ names the field whose value is the "
            f"key: a non-empty str, got {field!r}"
        )
    try:
        value = getattr(event, field)
    except AttributeError:
        raise ConfigurationError(
            f"{type(event).__qualname__}.__event_key__ is {field!r}, which the event lacks"
        ) from None
    return None if value is None else _checked_key(str(value))


def _checked_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"an event key is a str, got {key!r}")
    if not key or len(key) > _KEY_LENGTH:
        raise ValueError(f"an event key has 1 to {_KEY_LENGTH} characters, got {key!r}")
    if "\x00" in key or not _utf8(key):
        raise ValueError(f"an event key is text a database can store (no NUL), got {key!r}")
    return key


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:  # a lone surrogate
        return False
    return True


def _checked_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in headers.items()
    ):
        raise TypeError(f"headers are a mapping of str to str, got {headers!r}")
    return dict(headers)


def _check_identifier(what: str, value: object) -> None:
    if not isinstance(value, str):
        raise TypeError(f"Outbox({what}=...) takes a str, got {value!r}")
    if not _IDENTIFIER.fullmatch(value):
        raise ConfigurationError(
            f"Outbox({what}=...) takes a plain SQL identifier (letters, digits, _), got {value!r}"
        )


def _ids(ids: Iterable[int]) -> list[int]:
    if isinstance(ids, int):
        raise TypeError("pass the delivery ids as a list, e.g. [record.id]")
    listed = list(ids)
    if not all(type(i) is int for i in listed):
        raise TypeError(f"delivery ids are ints, got {listed!r}")
    return listed


def _attempt_record(row: Any) -> AttemptRecord:
    return AttemptRecord(
        delivery_id=row.delivery_id,
        attempt=row.attempt,
        started_at=row.started_at,
        finished_at=row.finished_at,
        duration=row.duration,
        error_type=row.error_type,
        error_message=row.error_message,
        error_traceback=row.error_traceback,
    )


def _delivery_record(row: Any) -> DeliveryRecord:
    return DeliveryRecord(
        id=row.id,
        event_id=row.event_id,
        event_name=row.name,
        handler=row.handler,
        key=row.key,
        status=DeliveryStatus(row.status),
        attempts=row.attempts,
        due_at=row.due_at,
        leased_until=row.lease_expires,
        created_at=row.created_at,
        finished_at=row.finished_at,
        error_type=row.error_type,
        error_message=row.error_message,
        error_traceback=row.error_traceback,
        duration=row.duration,
    )
