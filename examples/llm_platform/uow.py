"""One service call's transaction, with the events it records emitted after it commits.

Delivery is `aioevents.sqlalchemy.TransactionalEvents`: events recorded on the session are
emitted once the COMMIT has returned (inside ``commit()``, after the connection is back in
the pool), and discarded if the transaction rolls back. A handler therefore never sees a row
that might still roll back, and a refused call emits nothing.
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
    """A service call's value and the reports of the events it emitted after committing."""

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
                await self.session.commit()  # returns once the recorded events are emitted

    def done(self, value: T) -> Done[T]:
        reports = tuple(recorded.result for recorded in self._recorded if recorded.result)
        return Done(value, reports)
