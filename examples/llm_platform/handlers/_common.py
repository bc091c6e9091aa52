"""What several handlers share: the dependency holder, idempotent inserts, row syncing."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from sqlalchemy import CursorResult, Executable, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from ..deps import Deps
from ..models import AppDatasetJoin, Row


class Handler:
    """A handler is built with the application's `Deps` and called with an event."""

    def __init__(self, deps: Deps) -> None:
        self.deps = deps


async def insert_missing(
    session: AsyncSession, model: type[Row], rows: list[dict[str, Any]]
) -> int:
    """Insert ``rows``, skipping any a unique constraint says exists; return how many went in.

    INSERT ... ON CONFLICT DO NOTHING, not check-then-insert: a handler run twice at once for
    the same event must not fail on the second insert.
    """
    if not rows:
        return 0
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return await rowcount(session, dialect.insert(model).values(rows).on_conflict_do_nothing())


async def rowcount(session: AsyncSession, statement: Executable) -> int:
    """Execute an INSERT, UPDATE or DELETE; return how many rows it affected."""
    result = await session.execute(statement)
    return cast(CursorResult[Any], result).rowcount  # DML always gives a CursorResult


def assign(row: object, values: Mapping[str, Any]) -> bool:
    """Set the attributes that differ; True if any did (the ORM then issues one UPDATE)."""
    changed = {name: value for name, value in values.items() if getattr(row, name) != value}
    for name, value in changed.items():
        setattr(row, name, value)
    return bool(changed)


async def sync_dataset_joins(
    session: AsyncSession, app_id: str, wanted: Iterable[str]
) -> tuple[int, int]:
    """Make the app's dataset joins exactly ``wanted``; return (added, removed)."""
    wanted = set(wanted)
    query = select(AppDatasetJoin.dataset_id).where(AppDatasetJoin.app_id == app_id)
    existing = set((await session.scalars(query)).all())
    removed = existing - wanted
    if removed:
        await session.execute(
            delete(AppDatasetJoin).where(
                AppDatasetJoin.app_id == app_id, AppDatasetJoin.dataset_id.in_(removed)
            )
        )
    rows = [
        {"app_id": app_id, "dataset_id": dataset_id} for dataset_id in sorted(wanted - existing)
    ]
    added = await insert_missing(session, AppDatasetJoin, rows)
    return added, len(removed)
