"""Durable delivery through the outbox (issue 11), on PostgreSQL, with pgqueuer alongside.

Everything runs in one schema of its own in the PostgreSQL at ``AIOEVENTS_TEST_DATABASE_URL``
(created here and dropped at the end; the outbox's tables, and its NOTIFY channel, carry a
prefix of their own too, and pgqueuer's objects a schema and prefix of their own):

- [11.1] drain: 50,000 stored deliveries to one no-op durable handler, events per second from
  the relay's start until the last completion is written (``Relay.delivered``). The rows are
  recorded beforehand with the public API, ``TransactionalEvents.record``, 1,000 events per
  transaction and no relay running. The relay has the `Outbox` defaults (``concurrency=4``,
  ``batch_size=100``), once with ``keep_completed`` at its default (completed rows updated and
  kept) and once with ``None`` (deleted). Against pgqueuer: 50,000 jobs enqueued with
  ``Queries.enqueue`` in batches of 1,000, then one `QueueManager` on a dedicated asyncpg
  connection (pgqueuer's advice for its consumer) with ``batch_size=100`` (ours) and
  ``mode=drain``, its entrypoint a no-op, timed until ``run`` returns: the queue is empty and
  every job's log row written. pgqueuer starts a task per job of a batch (no limit by
  default), which for no-op handlers is at least as much concurrency as our 4. Each
  repetition runs the three in an order rotated by one, on fresh tables; the goal is judged
  on the per-repetition ratio (aioevents events/s over pgqueuer's), its median.
- [11.2] record: one transaction (begin, insert one business row, ``record`` one event,
  commit) whose event has a durable handler, against the same transaction whose event has an
  in-memory after-commit handler, both inside ``async with bus:`` (the relay runs in the
  recording process and gets its deliveries at COMMIT). A durable repetition's time runs
  until its deliveries are all written completed, so no work spills into the next one; the
  variants alternate, their order flipping each repetition. Durable commits and
  ``synchronous_commit=off``.
- [11.3] latency on the committing process: from just after the COMMIT returned (SQLAlchemy's
  ``after_commit`` session event) to the durable handler's first line, one transaction at a
  time (the next starts once the handler ran and its completion had time to be written).

Run alone with ``python -m benchmarks.bench_outbox [--quick]``, or as the ``outbox`` scenario
of ``python -m benchmarks``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from importlib import metadata
from typing import Any, Final
from urllib.parse import urlsplit

from sqlalchemy import Column, Integer, MetaData, String, Table, event, func, insert, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.ext.asyncio import create_async_engine as create_engine
from sqlalchemy.orm import Session

from aioevents import EventBus
from aioevents.outbox import Outbox
from aioevents.sqlalchemy import TransactionalEvents

from ._timing import Goal, Skipped, Verdict, figure, middle_half

DATABASE_URL = os.environ.get(
    "AIOEVENTS_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
HANDLER: Final = "bench.outbox.noop"  # the durable handler's name: what deliveries address
RECORD_BATCH: Final = 1_000  # events per recording transaction, and jobs per enqueue
RECORD_GOAL: Final = 1.3  # [11.2] durable record ÷ in-memory after-commit, per transaction
LATENCY_GOAL_US: Final = 2_000.0  # [11.3] p50, commit to handler start
KEEP_DEFAULT = timedelta(days=7)  # Outbox(keep_completed=...)'s default


@dataclass(frozen=True, slots=True)
class Size:
    drained: int  # deliveries (and jobs) per drain
    drain_repetitions: int
    record_repetitions: int
    transactions: int  # per repetition of [11.2]
    latency_samples: int


FULL = Size(drained=50_000, drain_repetitions=3, record_repetitions=15, transactions=300,
            latency_samples=3_000)  # fmt: skip
QUICK = Size(drained=10_000, drain_repetitions=1, record_repetitions=5, transactions=100,
             latency_samples=500)  # fmt: skip


@dataclass(frozen=True, slots=True)
class Ping:
    """What the drain stores: one small field, as a typical id-carrying event."""

    n: int


@dataclass(frozen=True, slots=True)
class ItemAdded:
    """Recorded with an in-memory after-commit handler: today's path."""

    item_id: int


@dataclass(frozen=True, slots=True)
class ItemStored:
    """Recorded with a durable handler: the outbox's path."""

    item_id: int


# -- the database --------------------------------------------------------------------------


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2).close()
    except OSError:
        return False
    return True


@asynccontextmanager
async def _schema() -> AsyncIterator[str]:
    """A schema of this run's own, dropped with everything in it at the end."""
    name = f"bench_outbox_{uuid.uuid4().hex[:12]}"
    admin = create_engine(DATABASE_URL)
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f"CREATE SCHEMA {name}"))
        yield name
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))
        await admin.dispose()


def _outbox(engine: AsyncEngine, schema: str, keep: timedelta | None) -> Outbox:
    # A prefix of its own: the NOTIFY channel is named after it and is database-wide.
    prefix = f"b{uuid.uuid4().hex[:10]}_"
    return Outbox(engine, schema=schema, table_prefix=prefix, keep_completed=keep)


async def _count(engine: AsyncEngine, outbox: Outbox, status: str | None = None) -> int:
    """How many of the outbox's deliveries are in ``status`` (all: None)."""
    (deliveries,) = (t for t in outbox.metadata.tables.values() if t.name.endswith("deliveries"))
    query = select(func.count()).select_from(deliveries)
    if status is not None:
        query = query.where(deliveries.c.status == status)
    async with engine.connect() as connection:
        return int((await connection.execute(query)).scalar_one())


# -- [11.1] draining ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Drained:
    seconds: float
    cpu: float  # this process's CPU seconds over the same span


DrainCase = Callable[[str, int], Awaitable[Drained]]


def _aioevents_drain(keep: timedelta | None) -> DrainCase:
    async def drain(schema: str, n: int) -> Drained:
        engine = create_engine(DATABASE_URL)
        outbox = _outbox(engine, schema, keep)
        try:
            await outbox.create_tables()
            bus = EventBus()
            events = TransactionalEvents(bus, outbox=outbox)
            handled = 0
            all_handled = asyncio.Event()

            @bus.on(Ping, durable=True, name=HANDLER)
            async def noop(event: Ping) -> None:
                nonlocal handled
                handled += 1
                if handled == n:
                    all_handled.set()

            await _record_in_bulk(engine, events, n)
            started, cpu = time.perf_counter(), time.process_time()
            async with outbox.relay(bus) as relay:
                await all_handled.wait()
                # Until written completed: the last write is part of the drain. The relay
                # counts in a plain int, with nothing to wait on but a short poll.
                while relay.delivered < n:  # noqa: ASYNC110
                    await asyncio.sleep(0.001)
                drained = Drained(time.perf_counter() - started, time.process_time() - cpu)
            await _check_drained(engine, outbox, n, keep)
            return drained
        finally:
            await outbox.drop_tables()
            await engine.dispose()

    return drain


async def _record_in_bulk(engine: AsyncEngine, events: TransactionalEvents, n: int) -> None:
    sessions = async_sessionmaker(engine)
    for first in range(0, n, RECORD_BATCH):
        async with sessions() as session, session.begin():
            for i in range(first, min(n, first + RECORD_BATCH)):
                events.record(session, Ping(n=i))


async def _check_drained(
    engine: AsyncEngine, outbox: Outbox, n: int, keep: timedelta | None
) -> None:
    left = await _count(engine, outbox, "pending")
    completed = await _count(engine, outbox, "completed")
    expected = n if keep is not None else 0  # keep_completed=None deletes them
    if left or completed != expected:
        raise AssertionError(
            f"aioevents drain: {left} deliveries pending, {completed} completed "
            f"(expected 0 and {expected})"
        )


def _pgqueuer_drain() -> DrainCase:
    # Imported here: pgqueuer is a peer of the benchmark session only (noxfile BENCH_PEERS).
    import asyncpg  # type: ignore[import-untyped]  # (no stubs; pgqueuer's driver takes it)
    from pgqueuer import Job, Queries, QueueManager
    from pgqueuer.adapters.persistence.qb import (
        QueryBuilderEnvironment,
        QueryQueueBuilder,
        QuerySchedulerBuilder,
    )
    from pgqueuer.db import AsyncpgDriver
    from pgqueuer.domain.settings import DBSettings
    from pgqueuer.types import Channel, QueueExecutionMode

    dsn = _asyncpg_dsn(DATABASE_URL)

    def queries(connection: Any, settings: DBSettings) -> Queries:
        return Queries(
            AsyncpgDriver(connection),
            qbe=QueryBuilderEnvironment(settings),
            qbq=QueryQueueBuilder(settings),
            qbs=QuerySchedulerBuilder(settings),
        )

    async def drain(schema: str, n: int) -> Drained:
        # Its own prefix in our schema: its NOTIFY channel is named after the prefix.
        settings = DBSettings(db_schema=schema, prefix=f"q{uuid.uuid4().hex[:10]}_")
        admin, consumer = await asyncpg.connect(dsn), await asyncpg.connect(dsn)
        setup = queries(admin, settings)
        try:
            await setup.install(create_schema=False)
            for first in range(0, n, RECORD_BATCH):
                size = min(n, first + RECORD_BATCH) - first
                payloads: list[bytes | None] = [
                    f'{{"n":{i}}}'.encode() for i in range(first, first + size)
                ]
                await setup.enqueue([HANDLER] * size, payloads, [0] * size)
            manager = QueueManager(queries(consumer, settings), channel=Channel(settings.channel))

            @manager.entrypoint(HANDLER)
            async def noop(job: Job) -> None:
                pass

            started, cpu = time.perf_counter(), time.process_time()
            await manager.run(batch_size=100, mode=QueueExecutionMode.drain)
            drained = Drained(time.perf_counter() - started, time.process_time() - cpu)
            names = settings.qualified
            left = await admin.fetchval(f"SELECT count(*) FROM {names.queue_table}")
            logged = await admin.fetchval(
                f"SELECT count(*) FROM {names.queue_table_log} WHERE status = 'successful'"
            )
            if left or logged != n:
                raise AssertionError(f"pgqueuer drain: {left} jobs left, {logged} of {n} logged")
            return drained
        finally:
            await setup.uninstall()
            await admin.close()
            await consumer.close()

    return drain


def _asyncpg_dsn(url: str) -> str:
    """The SQLAlchemy URL as asyncpg (and pgqueuer) take it."""
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


AIOEVENTS_KEPT = "aioevents  relay, 4 x batch 100, keep_completed=7 days (default)"
AIOEVENTS_DELETED = "aioevents  relay, 4 x batch 100, keep_completed=None"
PGQUEUER = "pgqueuer   QueueManager, batch_size=100, mode=drain"


def _drain_table(size: Size) -> list[Verdict]:
    cases: dict[str, DrainCase] = {
        AIOEVENTS_KEPT: _aioevents_drain(KEEP_DEFAULT),
        AIOEVENTS_DELETED: _aioevents_drain(None),
    }
    peer = _pgqueuer_version()
    if peer is not None:
        cases[PGQUEUER] = _pgqueuer_drain()
    n = size.drained
    print(
        f"\n[11.1] drain {n:,} stored deliveries to a no-op durable handler "
        f"({size.drain_repetitions} repetition(s), order rotated; medians)"
    )
    print("   events/s: n ÷ (consumer start to last completion written); vs pgqueuer: this")
    print("   row's events/s ÷ pgqueuer's in the same repetition; CPU: this process's CPU time")
    print("   ÷ wall time (low: waiting on the database)")
    runs: dict[str, list[Drained]] = {name: [] for name in cases}
    names = list(cases)
    for repetition in range(size.drain_repetitions):
        shift = repetition % len(names)
        for name in [*names[shift:], *names[:shift]]:
            runs[name].append(asyncio.run(_in_schema(cases[name], n)))
    width = max(map(len, names)) + 2
    print(" " * width + f"{'events/s':>12}{'vs pgqueuer':>14}{'CPU':>7}")
    for name in names:
        rates = [n / run.seconds for run in runs[name]]
        versus = "-"
        if PGQUEUER in runs:
            versus = f"{statistics.median(_ratios(runs[name], runs[PGQUEUER])):.2f}x"
        cpu = statistics.median(run.cpu / run.seconds for run in runs[name])
        print(f"{name:<{width}}{statistics.median(rates):>12,.0f}{versus:>14}{cpu:>7.0%}")
    goals: list[Verdict] = []
    for name, what in ((AIOEVENTS_KEPT, "default"), (AIOEVENTS_DELETED, "None")):
        text_ = f"[11.1] drain {n:,}, keep_completed={what}: aioevents events/s ÷ pgqueuer's"
        if PGQUEUER not in runs:
            goals.append(Skipped(text_, "pgqueuer is not installed"))
        else:
            goals.append(Goal(text_, _ratios(runs[name], runs[PGQUEUER]), 1.0, ">="))
    if peer is not None:
        print(f"   pgqueuer {peer}: 1 consumer on its own asyncpg connection, jobs enqueued")
        print(
            f"   with Queries.enqueue, {RECORD_BATCH:,} a call; durability: durable (its default)"
        )
    for goal in goals:
        print(f"   {goal}")
    return goals


def _ratios(runs: Sequence[Drained], others: Sequence[Drained]) -> list[float]:
    """events/s over the other's, per repetition: the other's time over this one's."""
    return [other.seconds / run.seconds for run, other in zip(runs, others, strict=True)]


async def _in_schema(case: DrainCase, n: int) -> Drained:
    async with _schema() as schema:
        return await case(schema, n)


def _pgqueuer_version() -> str | None:
    try:
        return metadata.version("pgqueuer")
    except metadata.PackageNotFoundError:
        return None


# -- [11.2] and [11.3]: recording with the relay running --------------------------------------


class TimedSession(Session):
    """A session that notes when its last COMMIT returned (``after_commit`` fires then)."""

    committed_at = 0.0


@event.listens_for(TimedSession, "after_commit")
def _note_commit(session: Session) -> None:
    TimedSession.committed_at = time.perf_counter()


@dataclass
class Bed:
    """A bus whose relay runs, with an in-memory and a durable handler, on one schema."""

    engine: AsyncEngine
    outbox: Outbox
    events: TransactionalEvents
    sessions: async_sessionmaker[AsyncSession]
    items: Table
    stored: int = 0  # durable handler runs
    handler_started: list[float] = field(default_factory=list)  # its perf_counter() at start
    ran: asyncio.Event = field(default_factory=asyncio.Event)

    async def insert_and_record(self, event: object) -> None:
        async with self.sessions() as session, session.begin():
            await session.execute(insert(self.items).values(name="x"))
            self.events.record(session, event)

    async def wait_completed(self, expected: int) -> None:
        """Until the durable handler ran ``expected`` times and no delivery is pending."""
        deadline = time.perf_counter() + 120
        while self.stored < expected or await _count(self.engine, self.outbox, "pending"):
            if time.perf_counter() > deadline:
                raise AssertionError(f"deliveries left pending: {self.stored} of {expected} ran")
            await asyncio.sleep(0.002)


@asynccontextmanager
async def _bed(schema: str, *, durable: bool) -> AsyncIterator[Bed]:
    # Without durable commits the server skips the WAL flush at COMMIT: the library's own
    # cost shows more clearly against the smaller denominator.
    settings = {} if durable else {"server_settings": {"synchronous_commit": "off"}}
    engine = create_engine(DATABASE_URL, connect_args=settings)
    outbox = _outbox(engine, schema, KEEP_DEFAULT)
    items = Table(
        f"items_{uuid.uuid4().hex[:12]}",
        MetaData(schema=schema),
        Column("id", Integer, primary_key=True),
        Column("name", String, nullable=False),
    )
    bus = EventBus()
    bed = Bed(
        engine,
        outbox,
        TransactionalEvents(bus, outbox=outbox),
        async_sessionmaker(engine, sync_session_class=TimedSession, expire_on_commit=False),
        items,
    )

    @bus.on(ItemAdded)
    async def in_memory(event: ItemAdded) -> None:
        pass

    @bus.on(ItemStored, durable=True, name=HANDLER)
    async def stored(event: ItemStored) -> None:
        bed.handler_started.append(time.perf_counter())
        bed.stored += 1
        bed.ran.set()

    try:
        await outbox.create_tables()
        async with engine.begin() as connection:
            await connection.run_sync(items.metadata.create_all)
        async with bus:  # the relay runs in the recording process, as in an application
            yield bed
    finally:
        await outbox.drop_tables()
        async with engine.begin() as connection:
            await connection.run_sync(items.metadata.drop_all)
        await engine.dispose()


IN_MEMORY = "record, in-memory after-commit handler"
DURABLE = "record, durable handler (outbox)"


async def _time_recording(bed: Bed, size: Size) -> dict[str, list[float]]:
    recorded = 0

    async def in_memory(transactions: int) -> None:
        for n in range(transactions):
            await bed.insert_and_record(ItemAdded(item_id=n))

    async def durable(transactions: int) -> None:
        nonlocal recorded
        for n in range(transactions):
            await bed.insert_and_record(ItemStored(item_id=n))
        recorded += transactions
        await bed.wait_completed(recorded)  # its relay's work is part of its cost

    variants: dict[str, Callable[[int], Awaitable[None]]] = {
        IN_MEMORY: in_memory,
        DURABLE: durable,
    }
    timings: dict[str, list[float]] = {name: [] for name in variants}
    for variant in variants.values():  # warm up the pool, caches and statements
        await variant(max(10, size.transactions // 10))
    for repetition in range(size.record_repetitions):
        order = list(variants.items())
        if repetition % 2:
            order.reverse()
        for name, variant in order:
            started = time.perf_counter()
            await variant(size.transactions)
            timings[name].append((time.perf_counter() - started) / size.transactions)
    completed = await _count(bed.engine, bed.outbox, "completed")
    if completed != recorded:
        raise AssertionError(f"{completed} of {recorded} durable deliveries completed")
    return timings


async def _record_run(schema: str, size: Size, durable: bool) -> dict[str, list[float]]:
    async with _bed(schema, durable=durable) as bed:
        return await _time_recording(bed, size)


def _record_table(size: Size) -> list[Verdict]:
    print(
        f"\n[11.2] one transaction: begin, insert a row, record 1 event, commit; relay running "
        f"({size.record_repetitions} alternating repetitions x {size.transactions} transactions)"
    )
    print("   per transaction: median over the repetitions; ratio: durable ÷ in-memory within")
    print("   each repetition, its median and middle half")
    goals: list[Verdict] = []
    for durable in (True, False):
        timings: dict[str, list[float]] = _run_in_schema(_record_run, size, durable)
        commit = "synchronous_commit=on" if durable else "synchronous_commit=off"
        ratios = [a / b for a, b in zip(timings[DURABLE], timings[IN_MEMORY], strict=True)]
        print(f"{commit:<42}{'per transaction':>18}{'ratio, middle half':>28}")
        for name, runs in timings.items():
            mine = [a / b for a, b in zip(runs, timings[IN_MEMORY], strict=True)]
            q1, q3 = middle_half(mine)
            print(
                f"{name:<42}{statistics.median(runs) * 1e6:>15.1f} us"
                f"{statistics.median(mine):>12.3f}x [{q1:.3f}, {q3:.3f}]"
            )
        extra = [(a - b) * 1e6 for a, b in zip(timings[DURABLE], timings[IN_MEMORY], strict=True)]
        e1, e3 = middle_half(extra)
        print(
            f"   the outbox's cost: {statistics.median(extra):+.1f} us per transaction "
            f"(middle half {e1:+.1f} to {e3:+.1f})"
        )
        goals.append(
            Goal(
                f"[11.2] durable record ÷ in-memory after-commit, {commit}",
                ratios,
                RECORD_GOAL,
                "<=",
            )
        )
        print(f"   {goals[-1]}")
    return goals


async def _latency_run(schema: str, size: Size) -> list[float]:
    """Microseconds from COMMIT returned to the durable handler's start, one at a time."""
    async with _bed(schema, durable=True) as bed:
        samples = []
        for n in range(size.latency_samples + 50):  # the first 50 warm up
            bed.ran.clear()
            await bed.insert_and_record(ItemStored(item_id=n))
            await asyncio.wait_for(bed.ran.wait(), 60)
            samples.append((bed.handler_started[-1] - TimedSession.committed_at) * 1e6)
            await asyncio.sleep(0.002)  # unsaturated: its completion is written meanwhile
        await bed.wait_completed(size.latency_samples + 50)
        return samples[50:]


def _latency_table(size: Size) -> list[Verdict]:
    samples: list[float] = _run_in_schema(_latency_run, size)
    chunks = [samples[i : i + 100] for i in range(0, len(samples), 100)]
    p50s = [statistics.median(chunk) for chunk in chunks]
    p50, p99 = _percentile(samples, 50), _percentile(samples, 99)
    print(
        f"\n[11.3] COMMIT returned (after_commit event) to the durable handler's start, "
        f"committing process, {len(samples):,} transactions one at a time, synchronous_commit=on"
    )
    print(
        f"   p50 {figure(p50)} µs, p90 {figure(_percentile(samples, 90))} µs, "
        f"p99 {figure(p99)} µs, max {figure(max(samples))} µs"
    )
    goal = Goal("[11.3] commit to durable handler start, p50 µs (per 100 samples)", p50s,
                LATENCY_GOAL_US)  # fmt: skip
    print(f"   {goal}")
    return [goal]


def _percentile(values: Sequence[float], percent: int) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(percent / 100 * (len(ordered) - 1)))]


def _run_in_schema(run: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    async def in_schema() -> Any:
        async with _schema() as schema:
            return await run(schema, *args)

    return asyncio.run(in_schema())


# -- the scenario ------------------------------------------------------------------------


GOALS = (
    "[11.1] drain: aioevents events/s ÷ pgqueuer's",
    "[11.2] durable record ÷ in-memory after-commit",
    "[11.3] commit to durable handler start, p50 µs",
)


def main(quick: bool = False) -> list[Verdict]:
    """Print the outbox's drain rate against pgqueuer, its recording cost and its latency."""
    if not _reachable(DATABASE_URL):
        reason = f"PostgreSQL not reachable at {DATABASE_URL}"
        print(f"\n== outbox: skipped: {reason} ==")
        return [Skipped(goal, reason) for goal in GOALS]
    size = QUICK if quick else FULL
    peer = _pgqueuer_version()
    print(
        f"\n== outbox: durable delivery on PostgreSQL, against "
        f"{'pgqueuer ' + peer if peer else 'pgqueuer (not installed)'} =="
    )
    goals = _drain_table(size)
    goals += _record_table(size)
    goals += _latency_table(size)
    return goals


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
