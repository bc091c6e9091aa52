"""Cost of delivery after commit, per committed transaction with one recorded event.

Compares, against the PostgreSQL at ``AIOEVENTS_TEST_DATABASE_URL``:

- baseline: one INSERT in ``async with session.begin():``, then ``await bus.emit(event)``;
- after commit: the same INSERT, ``events.record(session, event)`` inside the block, and the
  delivery that `aioevents.sqlalchemy.TransactionalEvents` does after the COMMIT.

Both run the same one-handler bus. The variants alternate within every repetition (their
order flips each time), so drift in the server or the machine hits both alike. The table
shows the median per-transaction time over the repetitions; the overhead in µs and the ratio
to the baseline are, like every figure of the benchmarks, the medians of the per-repetition
differences and ratios, each with its middle half. The noise band is how far the baseline
itself moves between repetitions: half the interquartile range of its per-transaction
times; an overhead inside it is not told apart from noise by this run.
The goal: the median of the per-repetition ratios under 1.10.

Run alone with ``python -m benchmarks.bench_after_commit [--quick]``, or as the
``after-commit`` scenario of ``python -m benchmarks``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit
from uuid import uuid4

from sqlalchemy import Column, Integer, MetaData, String, Table, insert
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from aioevents import EventBus
from aioevents.sqlalchemy import TransactionalEvents

from ._timing import Goal, middle_half

DATABASE_URL = os.environ.get(
    "AIOEVENTS_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
GOAL = 1.10
BASELINE = "plain commit, then emit"
AFTER_COMMIT = "record, delivered after commit"


@dataclass(frozen=True, slots=True, kw_only=True)
class ItemAdded:
    item_id: int


Variant = Callable[[int], Awaitable[None]]


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2).close()
    except OSError:
        return False
    return True


async def _time_per_transaction(variant: Variant, transactions: int) -> float:
    started = time.perf_counter()
    for n in range(transactions):
        await variant(n)
    return (time.perf_counter() - started) / transactions


async def _run(repetitions: int, transactions: int, durable: bool) -> dict[str, list[float]]:
    # Without durable commits the server skips the WAL flush at COMMIT: a far smaller
    # denominator, so the library's own cost shows more clearly in the ratio.
    settings = {} if durable else {"server_settings": {"synchronous_commit": "off"}}
    engine = create_async_engine(DATABASE_URL, connect_args=settings)
    factory = async_sessionmaker(engine, expire_on_commit=False)
    items = Table(
        f"aioevents_bench_items_{uuid4().hex[:12]}",
        MetaData(),
        Column("id", Integer, primary_key=True),
        Column("name", String, nullable=False),
    )
    bus = EventBus()
    events = TransactionalEvents(bus)
    delivered = 0

    @bus.on(ItemAdded)
    async def count(event: ItemAdded) -> None:
        nonlocal delivered
        delivered += 1

    async def plain(n: int) -> None:
        session: AsyncSession
        async with factory() as session:
            async with session.begin():
                await session.execute(insert(items).values(name="x"))
            await bus.emit(ItemAdded(item_id=n))

    async def after_commit(n: int) -> None:
        async with factory() as session, session.begin():
            await session.execute(insert(items).values(name="x"))
            events.record(session, ItemAdded(item_id=n))

    variants: dict[str, Variant] = {
        BASELINE: plain,
        AFTER_COMMIT: after_commit,
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    async with engine.begin() as conn:
        await conn.run_sync(items.metadata.create_all)
    try:
        for variant in variants.values():  # warm up the pool, caches and statements
            await _time_per_transaction(variant, max(10, transactions // 10))
        for repetition in range(repetitions):
            order = list(variants.items())
            if repetition % 2:
                order.reverse()
            for name, variant in order:
                timings[name].append(await _time_per_transaction(variant, transactions))
    finally:
        async with engine.begin() as conn:
            await conn.run_sync(items.metadata.drop_all)
        await engine.dispose()
    expected = sum(len(runs) for runs in timings.values()) * transactions
    assert delivered >= expected, f"only {delivered} of {expected} events were delivered"
    return timings


def main(quick: bool = False) -> list[Goal]:
    """Print the per-transaction cost of after-commit delivery against commit-then-emit."""
    if not _reachable(DATABASE_URL):
        print(f"\n== after-commit: skipped: PostgreSQL not reachable at {DATABASE_URL} ==")
        return []
    repetitions, transactions = (5, 100) if quick else (15, 300)
    print(
        f"\n== after-commit delivery, PostgreSQL, 1 event per transaction "
        f"({repetitions} interleaved repetitions x {transactions} transactions, medians) =="
    )
    goals = []
    for durable in (True, False):
        timings = asyncio.run(_run(repetitions, transactions, durable))
        commit = "synchronous_commit=on" if durable else "synchronous_commit=off"
        _print_table(commit, timings)
        # Judged, like the in-process goals, on the ratios within each repetition.
        ratios = [a / b for a, b in zip(timings[AFTER_COMMIT], timings[BASELINE], strict=True)]
        goals.append(Goal(f"after-commit ÷ commit-then-emit, {commit}", ratios, GOAL))
        print(f"   {goals[-1]}")
    return goals


def _print_table(title: str, timings: dict[str, list[float]]) -> None:
    baseline = timings[BASELINE]
    q1, q3 = middle_half(baseline)
    noise = (q3 - q1) / 2 * 1e6
    columns = f"{'per transaction':>18}{'overhead, middle half':>34}{'ratio, middle half':>28}"
    print(f"\n{title:<34}{columns}")
    for name, runs in timings.items():
        overheads = [(a - b) * 1e6 for a, b in zip(runs, baseline, strict=True)]
        ratios = [a / b for a, b in zip(runs, baseline, strict=True)]
        o1, o3 = middle_half(overheads)
        r1, r3 = middle_half(ratios)
        print(
            f"{name:<34}{statistics.median(runs) * 1e6:>15.1f} us"
            f"{statistics.median(overheads):>+12.1f} us [{o1:>+7.1f}, {o3:>+7.1f}]"
            f"{statistics.median(ratios):>12.3f}x [{r1:.3f}, {r3:.3f}]"
        )
    overhead = statistics.median(
        (a - b) * 1e6 for a, b in zip(timings[AFTER_COMMIT], baseline, strict=True)
    )
    verdict = "inside it" if abs(overhead) <= noise else "outside it"
    print(
        f"   after-commit overhead {overhead:+.1f} us per transaction; noise band of the "
        f"baseline ±{noise:.1f} us (half its interquartile range): {verdict}"
    )


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
