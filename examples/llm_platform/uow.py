"""One service call's transaction, with the events it records emitted after it commits.

Delivery is `aioevents.sqlalchemy.TransactionalEvents`: events recorded on the session are
emitted once the COMMIT has returned (inside ``commit()``, after the connection is back in
the pool), and discarded if the transaction rolls back. A handler therefore never sees a row
that might still roll back, and a refused call emits nothing.

Durable handlers are the exception: an event they handle is written to the outbox in the
transaction itself, with a delivery per durable handler, so the COMMIT that keeps the
call's rows keeps their work too. They run after the COMMIT as well, but on a relay (this
process's, at once, when its bus runs), concurrently with the rest of the call: ``commit()``
does not wait for them, and `Done.reports` does not include them.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from aioevents import EmitResult
from aioevents.sqlalchemy import Recorded, TransactionalEvents

from .db import SessionFactory

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Done(Generic[T]):
    """A service call's value and the reports of the events it emitted after committing
    (of their handlers run in memory; durable ones are delivered through the outbox)."""

    value: T
    reports: tuple[EmitResult, ...]

    @property
    def ok(self) -> bool:
        return all(report.ok for report in self.reports)


class UnitOfWork:
    """``async with UnitOfWork(...) as uow``: one transaction, its events emitted after it."""

    def __init__(self, sessions: SessionFactory, events: TransactionalEvents) -> None:
        self._sessions = sessions
        self._events = events
        self._recorded: list[Recorded[Any]] = []
        self.session: AsyncSession

    async def __aenter__(self) -> UnitOfWork:
        self.session = self._sessions()
        await self.session.begin()
        return self

    def record(self, event: object) -> None:
        """Emit ``event`` once the transaction commits; drop it if it rolls back."""
        self._recorded.append(self._events.record(self.session, event))

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        async with self.session:  # closing it rolls back a transaction still open
            if exc is None:
                # Returns once the recorded events are emitted to their in-memory handlers,
                # and their durable deliveries are committed and handed to the relay.
                await self.session.commit()

    def done(self, value: T) -> Done[T]:
        reports = tuple(recorded.result for recorded in self._recorded if recorded.result)
        return Done(value, reports)
