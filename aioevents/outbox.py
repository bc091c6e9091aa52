"""Durable delivery: a transactional outbox on the application's own database.

Handlers subscribed with ``durable=True`` get events recorded with
`aioevents.sqlalchemy.TransactionalEvents` through stored deliveries, at least once, whatever
crashes::

    outbox = Outbox(engine)
    await outbox.create_tables()               # or Alembic, from outbox.metadata
    events = TransactionalEvents(bus, outbox=outbox)

    @bus.on(DocumentWasCreated, durable=True)
    async def create_document_index(event: DocumentWasCreated) -> None: ...

    async with bus:                             # runs this process's relay
        async with session.begin():
            events.record(session, DocumentWasCreated(document_id=7))

The event and one delivery row per durable handler are written in the recording transaction,
just before its COMMIT: a rollback, or a rolled-back savepoint, leaves nothing. After COMMIT
the committing process runs its own deliveries at once; every running bus's relay claims
what is due (``FOR UPDATE SKIP LOCKED`` and a lease), so the deliveries of a process that died
are run by another once its lease ran out. Failed attempts are retried with backoff and end
``dead`` after ``max_attempts`` (see `aioevents.Durable`), kept for an operator to
`Outbox.resubmit` or `Outbox.discard`.
"""

from __future__ import annotations

try:
    import msgspec  # noqa: F401
    import sqlalchemy.ext.asyncio  # noqa: F401
except ImportError as missing:  # a newcomer's first import: say which extra brings them
    raise ModuleNotFoundError(
        f"aioevents.outbox needs SQLAlchemy and msgspec ({missing}): install the extra with "
        f"pip install 'aioevents[outbox]'",
        name=missing.name,
    ) from missing

from ._codec import Codec, EventDecodeError, uuid7
from ._outbox import (
    Activity,
    AttemptRecord,
    Backlog,
    DeliveryRecord,
    DeliveryStatus,
    EventRecord,
    HandlerStats,
    NotInDeliveryError,
    Outbox,
)
from ._outbox_relay import Delivery, Relay, current_delivery
from ._policies import Durable

__all__ = [
    "Activity",
    "AttemptRecord",
    "Backlog",
    "Codec",
    "Delivery",
    "DeliveryRecord",
    "DeliveryStatus",
    "Durable",
    "EventDecodeError",
    "EventRecord",
    "HandlerStats",
    "NotInDeliveryError",
    "Outbox",
    "Relay",
    "current_delivery",
    "uuid7",
]
