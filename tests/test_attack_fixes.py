"""The fixes of the observability attack's findings (see tests/test_observability_attack.py),
checked at the API the fix changed rather than through the panel."""

from __future__ import annotations

import secrets

import pytest

from aioevents.streams import MemoryStreams, Streams

from .outbox_support import Database
from .test_observability_attack import Tick, one_dead_delivery
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


_PAST_64_BITS = str(2**64)  # 20 digits: the id pattern takes it, Redis does not


@pytest.mark.asyncio
@pytest.mark.parametrize("dead_id", [f"{_PAST_64_BITS}-0", f"1-{_PAST_64_BITS}"])
async def test_a_dead_letter_id_past_64_bits_is_refused_naming_it(dead_id: str) -> None:
    streams = Streams(MemoryStreams(), prefix="fixes")
    for act in (streams.retry_dead_letters, streams.discard_dead_letters):
        with pytest.raises(ValueError, match=f"at most 2\\*\\*64-1, got '{dead_id}'"):
            await act(Tick, [dead_id])


@pytest.mark.asyncio
@pytest.mark.redis
async def test_redis_takes_the_largest_dead_letter_id(redis_url: str) -> None:
    from aioevents.redis_streams import RedisStreams

    largest = f"{2**64 - 1}-{2**64 - 1}"
    transport = RedisStreams(redis_url)
    streams = Streams(transport, prefix=f"fixes-{secrets.token_hex(6)}")
    try:  # none there: nothing retried or removed, and no error from Redis
        assert await streams.retry_dead_letters(Tick, [largest]) == 0
        assert await streams.discard_dead_letters(Tick, [largest]) == 0
    finally:
        await transport.aclose()
