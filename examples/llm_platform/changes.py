"""What each handler changed: real row counts from the database, per handler call.

`ChangeRecorder` is an `aioevents.Hook`: when a handler starts it puts a fresh `Changes` in a
context variable, which the handler's task (and the greenlet SQLAlchemy runs its statements
in) sees; a cursor listener on the engine adds each statement's rowcount to it. Statements
outside a handler (the publishers') are not counted.
"""

from __future__ import annotations

from collections import Counter
from contextvars import ContextVar, Token
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from aioevents import Subscription

_current: ContextVar[Counter[str] | None] = ContextVar("llm_platform_changes", default=None)

_VERBS = {"INSERT": "created", "UPDATE": "updated", "DELETE": "deleted"}


def note_change(kind: str, count: int) -> None:
    """Count a change the database does not see (cache keys deleted) for the running handler."""
    changes = _current.get()
    if changes is not None and count:
        changes[kind] += count


def count_rows(engine: AsyncEngine) -> None:
    """Count the rows each write statement on ``engine`` affects, for the running handler."""
    event.listen(engine.sync_engine, "after_cursor_execute", _after_cursor_execute)


def _after_cursor_execute(
    _conn: Any, cursor: Any, statement: str, _params: Any, _context: Any, executemany: bool
) -> None:
    changes = _current.get()
    verb = _VERBS.get(statement.lstrip().split(" ", 1)[0].upper())
    if changes is None or verb is None:
        return
    rowcount = cursor.rowcount
    if rowcount is not None and rowcount > 0:  # -1: the driver does not know
        changes[f"rows {verb}"] += rowcount


@dataclass(frozen=True, slots=True)
class _Started:
    changes: Counter[str]
    reset: Token[Counter[str] | None]


@dataclass(frozen=True, slots=True)
class HandlerRun:
    """One handler call: what it handled, how long it took, what it changed, how it ended."""

    event: object
    handler: str
    duration: float
    changes: dict[str, int]
    error: BaseException | None


@dataclass
class ChangeRecorder:
    """Records a `HandlerRun` for every handler call on the bus it is hooked into."""

    runs: list[HandlerRun] = field(default_factory=list)

    def handler_started(self, event: object, subscription: Subscription) -> object:
        changes: Counter[str] = Counter()
        return _Started(changes, _current.set(changes))

    def handler_finished(
        self,
        event: object,
        subscription: Subscription,
        *,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        # The protocol types the token as object: it is the _Started handler_started returned.
        assert isinstance(token, _Started)
        _current.reset(token.reset)
        run = HandlerRun(event, subscription.name, duration, dict(token.changes), error)
        self.runs.append(run)

    def runs_for(self, event: object) -> list[HandlerRun]:
        return [run for run in self.runs if run.event is event]
