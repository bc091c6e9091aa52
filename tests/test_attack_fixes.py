"""The fixes of the observability attack's findings (see tests/test_observability_attack.py),
checked at the API the fix changed rather than through the panel."""

from __future__ import annotations

import pytest

from .outbox_support import Database
from .test_observability_attack import one_dead_delivery
from .test_panel import database_kind, db

__all__ = ["database_kind", "db"]  # the panel tests' fixtures, on SQLite and PostgreSQL


@pytest.mark.asyncio
async def test_discard_only_dead_keeps_a_delivery_resubmitted_meanwhile(db: Database) -> None:
    dead = await one_dead_delivery(db)
    assert await db.outbox.resubmit([dead]) == 1  # another operator's retry: pending again
    assert await db.outbox.discard([dead], only_dead=True) == 0
    [row] = await db.outbox.deliveries()
    assert row.status.value == "pending"
    assert await db.outbox.discard([dead]) == 1  # without the flag: pending ones too, as before
    [row] = await db.outbox.deliveries()
    assert row.status.value == "discarded"


@pytest.mark.asyncio
async def test_discard_only_dead_gives_up_a_dead_delivery(db: Database) -> None:
    dead = await one_dead_delivery(db)
    assert await db.outbox.discard([dead], only_dead=True) == 1
    [row] = await db.outbox.deliveries()
    assert row.status.value == "discarded"


@pytest.mark.asyncio
async def test_discard_only_dead_must_be_a_bool(db: Database) -> None:
    with pytest.raises(TypeError, match="only_dead"):
        await db.outbox.discard([1], only_dead="yes")  # type: ignore[arg-type]
