"""What every service has: sessions to open, and events delivered after commit."""

from __future__ import annotations

from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from aioevents.sqlalchemy import TransactionalEvents

from ..db import SessionFactory
from ..models import Row
from ..uow import UnitOfWork
from .errors import NotFound

R = TypeVar("R", bound=Row)


class Service:
    def __init__(self, sessions: SessionFactory, events: TransactionalEvents) -> None:
        self._sessions = sessions
        self._events = events

    def unit_of_work(self) -> UnitOfWork:
        return UnitOfWork(self._sessions, self._events)


async def get_or_404(session: AsyncSession, model: type[R], id: str) -> R:
    row = await session.get(model, id)
    if row is None:
        raise NotFound(model.__tablename__.rstrip("s").replace("_", " "), id)
    return row
