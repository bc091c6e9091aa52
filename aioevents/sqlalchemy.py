"""Delivery after commit for SQLAlchemy asyncio sessions.

`TransactionalEvents` records events on an `AsyncSession` while its transaction runs and ties
each one to the fate of that transaction, the way Spring's transactional event listeners do:

- **after commit**: once the outermost COMMIT has returned (and the session has handed its
  connection back to the pool), the recorded events are emitted on the bus with
  ``bus.emit``, one at a time, in recording order;
- **after rollback**: events of a transaction that rolls back, and of a savepoint
  (``begin_nested``) that rolls back, are discarded: the bus never sees them. They go to the
  ``after_rollback`` handlers instead, once the outermost transaction has ended;
- **before commit** (optional): ``before_commit`` handlers run inside the transaction, on its
  session and connection, just before the outermost COMMIT; what they write commits or rolls
  back with it, and an exception there propagates out of the commit, which does not happen.

It works however the transaction ends: ``async with session.begin():``,
``await session.commit()``, ``async with sessionmaker.begin()``, a framework's unit of work,
or a session closed with its transaction still open (a rollback).

How it works, and why: SQLAlchemy runs an `AsyncSession`'s synchronous core inside a
greenlet; its session events (``before_commit``, ``after_commit``, ``after_soft_rollback``,
``after_transaction_end``) fire there, synchronously, inside the ``await session.commit()``
call. ``after_transaction_end`` of the outermost transaction is the first moment at which the
COMMIT has returned *and* the connection is back in the pool; from there the delivery
coroutine is handed to the awaiting task with SQLAlchemy's ``await_only``, the same bridge
``AdaptedConnection.run_async`` uses in pool events. So handlers run in the committing task,
as ordinary asyncio code with its context variables, and ``await session.commit()`` returns
once they have finished (Spring's ``AFTER_COMMIT`` also runs inside ``commit()``, after the
database commit). The alternative, a wrapper whose own ``commit()`` delivers, would miss every
commit made by other code (``session.begin()``, a framework), and delivering from
``after_commit`` would hold the pooled connection while handlers wait for another one: 50
concurrent requests on a 15-connection pool would then deadlock.

Each `record` returns a `Recorded` handle that says what became of the event and holds the
`EmitResult` of its delivery. A handler that fails after commit is logged by the bus and
reported in that result; it never undoes the commit, which has already happened.

Delivery is in memory, hence **at most once**: if the process dies (or the committing task
is cancelled) between COMMIT and emit, the committed events are never delivered, and nothing
records that they were not. A cancelled delivery marks the remaining events
`Outcome.UNDELIVERED` and logs them; a dead process cannot. Handlers that must not miss an
event are subscribed ``durable=True`` and the events recorded with an outbox
(``TransactionalEvents(bus, outbox=Outbox(engine))``, see `aioevents.outbox`): the event and
their deliveries are then written in the transaction itself, just before COMMIT, and run at
least once by a relay.

Handlers after commit run when the session's transaction is over: they must not use the
emitting session's connection, and events should carry plain values (ids), not ORM
instances, whose expired attributes cannot be loaded there. Use a new session to read.
"""

from __future__ import annotations

import enum
import inspect
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Generic, TypeVar

try:
    from sqlalchemy import event as sa_event
    from sqlalchemy.ext.asyncio import AsyncSession
    from sqlalchemy.orm import Session, SessionTransaction
    from sqlalchemy.util.concurrency import in_greenlet
except ImportError as missing:
    # A newcomer's first import: say which extra brings SQLAlchemy, not just its module name.
    raise ModuleNotFoundError(
        f"aioevents.sqlalchemy needs SQLAlchemy ({missing}): install the extra with "
        f"pip install 'aioevents[sqlalchemy]'",
        name=missing.name,
    ) from missing

try:
    from sqlalchemy.util.concurrency import await_ as await_only
except ImportError:  # pragma: no cover  (SQLAlchemy 2.0 only has the name 2.1 deprecates)
    from sqlalchemy.util.concurrency import await_only

from ._bus import EventBus
from ._checks import check_instance
from ._exceptions import AioEventsError, ConfigurationError
from ._names import event_name, handler_name
from ._outbox import Outbox, StoredEvent, lock_keys
from ._outbox_relay import Job, Relay
from ._result import EmitResult

__all__ = ["NoTransactionError", "Outcome", "Recorded", "RolledBackError", "TransactionalEvents"]

logger = logging.getLogger("aioevents.sqlalchemy")

E = TypeVar("E")
R = TypeVar("R")
BeforeCommitHandler = Callable[[E, AsyncSession], Awaitable[R]]

_STATE_KEY = "aioevents.sqlalchemy"  # in Session.info: the recordings of the current transaction


class RolledBackError(AioEventsError):
    """What send hooks (a tracing hook's ``send`` span) are told of an event recorded with
    durable handlers when its transaction rolled back (or its savepoint did, or its COMMIT
    failed): it was not sent."""


class NoTransactionError(AioEventsError):
    """Raised when an event is recorded on a session that has no transaction in progress.

    An event recorded there would have no commit to wait for. Record it inside
    ``async with session.begin():`` or after the session's first statement has begun one.
    """


class Outcome(enum.Enum):
    """What became of a recorded event."""

    PENDING = "pending"
    """Its transaction has not ended yet."""
    DELIVERED = "delivered"
    """The transaction committed and the event was emitted on the bus."""
    DISCARDED = "discarded"
    """Its transaction or savepoint rolled back; only ``after_rollback`` handlers saw it."""
    UNDELIVERED = "undelivered"
    """The transaction committed but delivery was cancelled before the event's emit ended."""


class Recorded(Generic[E]):
    """The handle `TransactionalEvents.record` returns for one recorded event.

    ``result`` is the `EmitResult` of the event's delivery: of the bus's handlers once it is
    `Outcome.DELIVERED`, of the ``after_rollback`` handlers once it is `Outcome.DISCARDED`;
    ``None`` before then, and when delivery was cancelled. For an event with durable
    handlers it reports the others; ``event_id`` is then the stored event's id (UUIDv7),
    and `Outcome.DELIVERED` says its deliveries were committed.
    """

    __slots__ = (
        "_owner",
        "_prepared",
        "_scope",
        "_stored",
        "_succeeded",
        "event",
        "outcome",
        "result",
    )

    def __init__(
        self,
        event: E,
        owner: TransactionalEvents,
        scope: tuple[SessionTransaction, ...],
        stored: StoredEvent | None = None,
    ) -> None:
        self.event = event
        self.outcome = Outcome.PENDING
        self.result: EmitResult | None = None
        self._stored = stored  # what the outbox writes before COMMIT; None without durables
        self._owner = owner
        self._scope = scope  # the transaction it was recorded in, and that one's ancestors
        self._prepared = False  # its before-commit handlers have run
        # How many of them have succeeded: a commit retried after a failure resumes there,
        # so a handler whose writes are already in the transaction does not write them again.
        self._succeeded = 0

    def __repr__(self) -> str:
        return f"<Recorded {event_name(self.event)} {self.outcome.value}>"

    @property
    def event_id(self) -> uuid.UUID | None:
        """The stored event's id when it has durable handlers (written with its deliveries)."""
        return None if self._stored is None else self._stored.row.id


class _Transaction:
    """The recordings of one outermost transaction of one session."""

    __slots__ = ("committed", "handovers", "records", "session", "stored")

    def __init__(self, session: AsyncSession) -> None:
        self.session = session
        self.records: list[Recorded[Any]] = []
        self.committed = False
        self.stored = 0  # how many records with durable handlers it has: written before COMMIT
        self.handovers: list[tuple[Relay, list[Job]]] = []  # leased to a relay here


class TransactionalEvents:
    """Records events on an `AsyncSession` and emits them on ``bus`` after it commits.

    ``after_rollback`` handlers are subscribed on ``rollback_bus`` (a new `EventBus` unless
    one is given). Several instances may record on one session; its events are then delivered
    in recording order across them.

    In a FastAPI handler::

        @app.post("/apps")
        async def create_app(body: NewApp, session: SessionDep) -> AppOut:
            async with session.begin():
                app = App(name=body.name)
                session.add(app)
                await session.flush()
                events.record(session, AppWasCreated(app_id=app.id))
            # COMMIT has returned, and the bus's handlers have run
            return AppOut(id=app.id)
    """

    def __init__(
        self, bus: EventBus, *, rollback_bus: EventBus | None = None, outbox: Outbox | None = None
    ) -> None:
        check_instance(bus, EventBus, "TransactionalEvents() takes an EventBus")
        check_instance(
            rollback_bus,
            EventBus,
            "TransactionalEvents(rollback_bus=...) takes an EventBus or None",
            none=True,
        )
        check_instance(outbox, Outbox, "TransactionalEvents(outbox=...) takes an Outbox", none=True)
        self.bus = bus
        self.outbox = outbox
        if outbox is not None:
            outbox._attach(bus)
        self.rollback_bus = rollback_bus if rollback_bus is not None else EventBus()
        self._before: list[tuple[type, str, Callable[[Any, AsyncSession], Awaitable[object]]]] = []
        self._before_cache: dict[type, tuple[tuple[str, Any], ...]] = {}
        _install_listeners()

    def __repr__(self) -> str:
        return f"<TransactionalEvents bus={self.bus!r} before_commit={len(self._before)}>"

    def record(
        self,
        session: AsyncSession,
        event: E,
        *,
        key: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Recorded[E]:
        """Record ``event`` in the session's current transaction (or savepoint).

        It is emitted on the bus after the outermost transaction commits, and discarded if
        that transaction, or the savepoint it was recorded in, rolls back. Raises
        `NoTransactionError` when the session has no transaction in progress.

        Its durable handlers (``durable=True``) get it through the outbox instead: the event
        and their deliveries are written in the transaction, just before COMMIT, and run at
        least once. ``key`` (default: the field the class names in ``__event_key__``) orders
        one handler's deliveries of one key; ``headers`` travel with the stored event.
        """
        if isinstance(event, type):
            raise TypeError(f"record() takes an event instance, got the class {event.__qualname__}")
        if not isinstance(session, AsyncSession):
            raise TypeError(f"record() takes an AsyncSession, got {session!r}")
        sync = session.sync_session
        current = sync.get_nested_transaction() or sync.get_transaction()
        if current is None:
            raise NoTransactionError(
                f"cannot record {event_name(event)}: the session has no transaction in progress"
            )
        scope = _ancestry(current)
        transaction = sync.info.get(_STATE_KEY)
        if transaction is None:
            transaction = sync.info[_STATE_KEY] = _Transaction(session)
        stored = self._stored(event, key, headers)
        recorded = Recorded(event, self, scope, stored)
        transaction.records.append(recorded)
        transaction.stored += stored is not None
        return recorded

    def _stored(
        self, event: object, key: str | None, headers: Mapping[str, str] | None
    ) -> StoredEvent | None:
        durable = self.bus._route(event).durable
        if not durable:
            return None
        if self.outbox is None:
            names = ", ".join(sub.name for sub in durable)
            raise ConfigurationError(
                f"{event_name(event)} has durable handlers ({names}) but these "
                f"TransactionalEvents have no outbox: TransactionalEvents(bus, outbox=Outbox(...))"
            )
        return self.outbox._prepare(
            self.bus, event, tuple(sub.name for sub in durable), key, headers
        )

    def before_commit(
        self, event_type: type[E]
    ) -> Callable[[BeforeCommitHandler[E, R]], BeforeCommitHandler[E, R]]:
        """Decorator: run ``handler(event, session)`` inside the transaction, before COMMIT.

        The handler gets the recording session; what it writes with it commits or rolls back
        with the transaction. Handlers run one at a time (they share one connection), in
        recording order of the events and subscription order of the handlers. The first
        exception propagates out of the commit, with a note naming the handler: the COMMIT is
        not sent and the transaction stays open until ``session.begin()``'s block or the
        session's close rolls it back; committing again retries from the failed handler (the
        handlers that succeeded do not run again: what they wrote is still in the transaction).

        They run only before the outermost COMMIT, not when a savepoint is released. Commit
        with the savepoints closed (as ``async with`` blocks and ``session.commit()`` do):
        committing the outer transaction object while a savepoint is still open skips them,
        which is logged as an error.
        """
        if not isinstance(event_type, type):
            raise TypeError(f"before_commit() takes an event class, got {event_type!r}")

        def decorator(handler: BeforeCommitHandler[E, R]) -> BeforeCommitHandler[E, R]:
            if not inspect.iscoroutinefunction(handler):
                raise TypeError(
                    f"before-commit handler {handler_name(handler)} must be an async function"
                )
            self._before.append((event_type, handler_name(handler), handler))
            self._before_cache.clear()
            return handler

        return decorator

    def after_rollback(
        self, event_type: type[E], *, timeout: float | None = None
    ) -> Callable[[Callable[[E], R]], Callable[[E], R]]:
        """Decorator: ``handler(event)`` gets each discarded event of ``event_type``.

        An event is discarded when its transaction, or the savepoint it was recorded in,
        rolls back. The handlers run on ``rollback_bus`` once the outermost transaction has
        ended, in recording order; the emit's report lands in the event's `Recorded.result`.
        """
        return self.rollback_bus.on(event_type, timeout=timeout)

    def _before_handlers(self, event_type: type) -> tuple[tuple[str, Any], ...]:
        try:
            return self._before_cache[event_type]
        except KeyError:
            handlers = tuple(
                (name, handler)
                for base, name, handler in self._before
                if issubclass(event_type, base)
            )
            self._before_cache[event_type] = handlers
            return handlers


def _ancestry(transaction: SessionTransaction) -> tuple[SessionTransaction, ...]:
    chain = [transaction]
    while (parent := chain[-1].parent) is not None:
        chain.append(parent)
    return tuple(chain)


# -- the session events ---------------------------------------------------------------------
# Registered once on the Session class, so they see every session, whichever sessionmaker or
# framework made it; a session with nothing recorded costs one dictionary lookup per event.

_installed = False


def _install_listeners() -> None:
    global _installed
    if not _installed:
        sa_event.listen(Session, "before_commit", _on_before_commit)
        sa_event.listen(Session, "after_commit", _on_after_commit)
        sa_event.listen(Session, "after_soft_rollback", _on_soft_rollback)
        sa_event.listen(Session, "after_transaction_end", _on_transaction_end)
        _installed = True


def _on_before_commit(session: Session) -> None:
    transaction: _Transaction | None = session.info.get(_STATE_KEY)
    # With a savepoint still open this is a savepoint being released (see before_commit()).
    if transaction is None or session.get_nested_transaction() is not None:
        return
    unprepared = False
    for recorded in transaction.records:
        if not recorded._prepared:
            if recorded._owner._before_handlers(type(recorded.event)):
                unprepared = True
            else:
                recorded._prepared = True
    if unprepared:
        await_only(_run_before_commit(transaction))
    if transaction.stored:  # last: what before-commit handlers recorded is written too
        _write_stored(session, transaction)


async def _run_before_commit(transaction: _Transaction) -> None:
    records = transaction.records
    index = 0
    while index < len(records):  # a handler may record more events: they are run too
        recorded = records[index]
        index += 1
        if recorded._prepared or recorded.outcome is not Outcome.PENDING:
            continue
        await _run_before_handlers(recorded, transaction.session)
        recorded._prepared = True


def _write_stored(session: Session, transaction: _Transaction) -> None:
    """Write the durable deliveries, last thing before COMMIT, one outbox and bus at a time.

    Written here rather than when recorded: what a rolled-back savepoint recorded is never
    written, a keyed event's lock is held only from here to COMMIT, and one statement per
    transaction writes them all.
    """
    groups: dict[tuple[int, int], list[StoredEvent]] = {}
    for recorded in transaction.records:
        stored = recorded._stored
        if stored is not None and not stored.written:
            if recorded.outcome is Outcome.PENDING:
                key = (id(recorded._owner.outbox), id(stored.bus))
                groups.setdefault(key, []).append(stored)
    connection = session.connection()
    # Every key of the transaction at once, whichever outbox or bus recorded it.
    lock_keys(connection, (s.row.key for group in groups.values() for s in group if s.row.key))
    for group in groups.values():
        outbox = group[0].outbox
        handover = outbox._write(connection, group)
        for stored in group:  # only now: a commit retried after a failed write writes again
            stored.written = True
        if handover is not None:
            transaction.handovers.append(handover)
    transaction.stored = 0


async def _run_before_handlers(recorded: Recorded[Any], session: AsyncSession) -> None:
    # Subscriptions are only ever appended, so the handlers that already succeeded stay the
    # first ones of the tuple, even if handlers were added between the failure and the retry.
    handlers = recorded._owner._before_handlers(type(recorded.event))
    for name, handler in handlers[recorded._succeeded :]:
        try:
            await handler(recorded.event, session)
        except Exception as exc:
            exc.add_note(
                f"raised by before-commit handler {name} on event "
                f"{event_name(recorded.event)}; the transaction was not committed"
            )
            raise
        recorded._succeeded += 1


def _on_after_commit(session: Session) -> None:
    transaction: _Transaction | None = session.info.get(_STATE_KEY)
    # Also fired when a savepoint is released; only the outermost commit counts.
    if transaction is not None and session.get_nested_transaction() is None:
        transaction.committed = True


def _on_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    transaction: _Transaction | None = session.info.get(_STATE_KEY)
    if transaction is None:
        return
    for recorded in transaction.records:
        if recorded.outcome is Outcome.PENDING and previous_transaction in recorded._scope:
            recorded.outcome = Outcome.DISCARDED


def _on_transaction_end(session: Session, ended: SessionTransaction) -> None:
    if ended.parent is not None:  # a savepoint or a flush's subtransaction
        return
    transaction: _Transaction | None = session.info.pop(_STATE_KEY, None)
    if transaction is None:
        return
    records = transaction.records
    if transaction.committed:
        _check_prepared(records)
    else:
        for recorded in records:
            if recorded.outcome is Outcome.PENDING:
                recorded.outcome = Outcome.DISCARDED
    _finish_sends(records)
    if in_greenlet():
        await_only(_deliver(records, transaction.handovers if transaction.committed else ()))
    else:  # closed by synchronous code (close_all_sessions()): nothing can be awaited here
        _abandon(records, "the session's transaction ended outside its asyncio greenlet")


def _finish_sends(records: Sequence[Recorded[Any]]) -> None:
    """A stored event was sent if its transaction committed: tell the send hooks (a tracing
    hook's send span ends here, after the COMMIT), or that it rolled back."""
    for recorded in records:
        if recorded._stored is None:
            continue
        if recorded.outcome is Outcome.PENDING:
            recorded._stored.sends.finish(None)
        else:
            name = event_name(recorded.event)
            recorded._stored.sends.finish(
                RolledBackError(f"{name} was not sent: its transaction rolled back")
            )


def _check_prepared(records: Sequence[Recorded[Any]]) -> None:
    for recorded in records:
        if (
            recorded.outcome is Outcome.PENDING
            and not recorded._prepared
            and recorded._owner._before_handlers(type(recorded.event))
        ):
            logger.error(
                "before-commit handlers did not run for event %s: the transaction was "
                "committed while a savepoint was still open",
                event_name(recorded.event),
            )


async def _deliver(
    records: Sequence[Recorded[Any]], handovers: Sequence[tuple[Relay, list[Job]]]
) -> None:
    for relay, jobs in handovers:  # first: durable work starts while the rest runs
        await relay.hand_over(jobs)
    for index, recorded in enumerate(records):
        try:
            if recorded.outcome is Outcome.PENDING:
                bus = recorded._owner.bus
                recorded.result = await bus._emit_volatile(recorded.event)
                recorded.outcome = Outcome.DELIVERED
            else:
                recorded.result = await recorded._owner.rollback_bus.emit(recorded.event)
        except BaseException:
            _abandon(records[index:], "delivery was cancelled")
            raise


def _abandon(records: Sequence[Recorded[Any]], reason: str) -> None:
    """Mark and log what will not be delivered: nothing is dropped silently."""
    lost = [recorded for recorded in records if recorded.outcome is Outcome.PENDING]
    for recorded in lost:
        recorded.outcome = Outcome.UNDELIVERED
    unnotified = [recorded for recorded in records if recorded.outcome is Outcome.DISCARDED]
    for kind, skipped in (("committed", lost), ("discarded", unnotified)):
        if skipped:
            logger.warning(
                "%d %s event(s) not delivered, %s: %s",
                len(skipped),
                kind,
                reason,
                ", ".join(event_name(recorded.event) for recorded in skipped),
            )
