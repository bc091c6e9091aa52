"""The panel's dead-letter page over 100,000 dead deliveries (issue 13), on PostgreSQL.

Everything runs in one schema of its own in the PostgreSQL at ``AIOEVENTS_TEST_DATABASE_URL``
(created here and dropped at the end). The outbox's tables are made by `Outbox.create_tables`
(with the index the page needs), then filled in one ``INSERT ... SELECT generate_series``:
100,000 events over 10 event names, each with one dead delivery (5 handlers, a traceback,
recorded a second apart), then 100,000 more, later, whose deliveries completed (as a week of
kept completed rows would sit on top of the dead ones: the page must not wade through them),
and ANALYZEd.

- [13.1] the dead-letter page's first page (the 50 newest dead deliveries), and [13.2] a deep
  page (the 50 before a cursor 90,000 rows down, as its "next page" links carry it), each a
  full GET of ``/dead`` through httpx's ASGITransport: Starlette routing, the query, the
  Jinja2 render. Also timed, not judged: the first page of one handler's and of one event
  name's dead deliveries. Goal: median < 300 ms each; the max is printed too.

It prints the PostgreSQL plans of the two pages' queries (EXPLAIN ANALYZE of the statements
the panel sent) to show the index they go by. Run alone with ``python -m benchmarks.bench_panel
[--quick]``, or as the ``panel`` scenario of ``python -m benchmarks``.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

from sqlalchemy import event, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from ._timing import Goal, Skipped, Verdict
from .bench_outbox import _reachable  # the same check of the same server

DATABASE_URL = os.environ.get(
    "AIOEVENTS_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
DEAD: Final = 100_000
DEEP: Final = 90_000  # rows below the newest where the deep page's cursor points
GOAL_MS: Final = 300.0
OTHERS: Final = ("/", "/handlers", "/deliveries")  # timed too, not judged
GOALS = (
    f"[13.1] dead-letter page over {DEAD:,} dead, first page, ms",
    f"[13.2] dead-letter page over {DEAD:,} dead, deep page ({DEEP:,} down), ms",
)

_FILL = """
WITH recorded AS (
    INSERT INTO {events} (id, name, version, key, payload, headers, recorded_at)
    SELECT
        -- time-ordered ids, as the outbox's UUIDv7: 48 bits of milliseconds, then the rest
        CAST(lpad(to_hex(CAST(extract(epoch FROM at) * 1000 AS bigint)), 12, '0')
             || substr(md5(CAST(i AS text)), 1, 20) AS uuid),
        'bench.event-' || (i % 10), 1, NULL, '{{"number": ' || i || '}}', '{{}}', at
    FROM generate_series(1, 2 * {count}) AS i,
         LATERAL (SELECT now() - (2 * {count} - i) * interval '1 second' AS at) AS times
    RETURNING id, recorded_at, payload
)
INSERT INTO {deliveries} (
    event_id, handler, key, status, attempts, due_at, created_at, finished_at,
    error_type, error_message, error_traceback, duration
)
SELECT id, 'bench.handler-' || (abs(hashtext(id::text)) % 5), NULL,
       CASE WHEN dead THEN 'dead' ELSE 'completed' END, CASE WHEN dead THEN 10 ELSE 1 END,
       recorded_at, recorded_at, recorded_at + interval '1 minute',
       CASE WHEN dead THEN 'builtins.ValueError' END,
       CASE WHEN dead THEN 'failed on purpose, the tenth time' END,
       CASE WHEN dead THEN 'Traceback (most recent call last):'
                           || repeat(E'\\n  File "app.py", line 1', 12) END,
       0.01
FROM (
    SELECT id, recorded_at, (payload::json ->> 'number')::int <= {count} AS dead FROM recorded
) AS made
ORDER BY recorded_at
"""


def main(quick: bool = False) -> list[Verdict]:
    """Print the dead-letter page's render times over 100,000 dead deliveries."""
    try:
        import httpx  # noqa: F401

        import aioevents.panel  # noqa: F401
    except ImportError as missing:
        return _skipped(f"{missing.name} is not installed (the panel extra, and httpx)")
    if not _reachable(DATABASE_URL):
        return _skipped(f"PostgreSQL not reachable at {DATABASE_URL}")
    print(f"\n== panel: the dead-letter page over {DEAD:,} dead deliveries, on PostgreSQL ==")
    return asyncio.run(_run(rounds=3 if quick else 15))


def _skipped(reason: str) -> list[Verdict]:
    print(f"\n== panel: skipped: {reason} ==")
    return [Skipped(goal, reason) for goal in GOALS]


async def _run(rounds: int) -> list[Verdict]:
    engine = create_async_engine(DATABASE_URL)
    try:
        async with _schema(engine) as schema:
            return await _measure(engine, schema, rounds)
    finally:
        await engine.dispose()


async def _measure(engine: AsyncEngine, schema: str, rounds: int) -> list[Verdict]:
    import httpx

    from aioevents.outbox import Outbox
    from aioevents.panel import Panel

    outbox = Outbox(engine, schema=schema)
    await outbox.create_tables()
    started = time.perf_counter()
    await _fill(engine, outbox)
    took = time.perf_counter() - started
    print(f"inserted {DEAD:,} dead and {DEAD:,} completed deliveries, ANALYZEd: {took:.1f} s")
    newest = await outbox.deliveries(status="dead", newest_first=True, limit=1)
    cursor = newest[0].id - DEEP
    pages = {
        "first page": "/dead",
        f"deep page (before={cursor})": f"/dead?before={cursor}",
        "one handler, first page": "/dead?handler=bench.handler-3",
        "one event name, first page": "/dead?event=bench.event-7",
    }
    transport = httpx.ASGITransport(app=Panel(outbox=outbox))
    times: dict[str, list[float]] = {name: [] for name in pages}
    async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
        for path in pages.values():  # warm: connections, compiled statements, templates
            await _get(client, path)
        for _ in range(rounds):
            for name, path in pages.items():
                times[name].append(await _get(client, path))
        others = {path: [await _get(client, path, rows=None) for _ in range(3)] for path in OTHERS}
    print(f"{'page (GET /dead, full render)':<44} {'median ms':>10} {'max ms':>10}")
    for name, values in times.items():
        print(f"{name:<44} {statistics.median(values):>10.1f} {max(values):>10.1f}")
    print("the other pages over the same 200,000 deliveries (3 GETs each, not judged):")
    for path, values in others.items():
        print(f"  GET {path:<38} {statistics.median(values):>10.1f} {max(values):>10.1f}")
    for path in ("/dead", f"/dead?before={cursor}"):
        await _explain(engine, path, transport)
    first, deep = (times[name] for name in list(pages)[:2])
    verdicts: list[Verdict] = [Goal(GOALS[0], first, GOAL_MS), Goal(GOALS[1], deep, GOAL_MS)]
    for goal, values in zip(verdicts, (first, deep), strict=True):
        met = "met" if goal.met else "missed"
        print(f"goal < {GOAL_MS:.0f} ms: {met} ({goal.text}: max {max(values):.1f} ms)")
    return verdicts


async def _get(client: Any, path: str, rows: int | None = 50) -> float:
    started = time.perf_counter()
    response = await client.get(path)
    elapsed = (time.perf_counter() - started) * 1000
    if response.status_code != 200:
        raise RuntimeError(f"GET {path}: {response.status_code}")
    if rows is not None and response.text.count("data-delivery-id=") != rows:
        raise RuntimeError(f"GET {path}: not a full page of {rows} rows")
    return elapsed


async def _fill(engine: AsyncEngine, outbox: Any) -> None:
    tables = outbox.metadata.tables
    events, deliveries = (
        next(t for t in tables.values() if t.name.endswith(suffix))
        for suffix in ("events", "deliveries")
    )
    async with engine.begin() as connection:
        quote = connection.dialect.identifier_preparer.format_table
        fill = _FILL.format(events=quote(events), deliveries=quote(deliveries), count=DEAD)
        await connection.execute(text(fill))
    async with engine.connect() as connection:
        autocommit = await connection.execution_options(isolation_level="AUTOCOMMIT")
        for table in (events, deliveries):
            await autocommit.execute(text(f"ANALYZE {quote(table)}"))


async def _explain(engine: AsyncEngine, path: str, transport: Any) -> None:
    """EXPLAIN ANALYZE the statement the panel sends for ``path``: the plan shows the index."""
    import httpx

    sent: list[tuple[str, Any]] = []

    def capture(conn: Any, cursor: Any, statement: str, parameters: Any, *rest: Any) -> None:
        if "ORDER BY" in statement and "DESC" in statement:
            sent.append((statement, parameters))

    event.listen(engine.sync_engine, "before_cursor_execute", capture)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://bench") as client:
            await client.get(path)
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", capture)
    statement, parameters = sent[0]
    async with engine.connect() as connection:
        plan = await connection.exec_driver_sql(
            "EXPLAIN (ANALYZE, COSTS OFF) " + statement, parameters
        )
        print(f"\nthe page's query (GET {path}), its plan:")
        for (line,) in plan:
            print(f"  {line}")


@asynccontextmanager
async def _schema(engine: AsyncEngine) -> AsyncIterator[str]:
    """A schema of this run's own, dropped with everything in it at the end."""
    name = f"bench_panel_{uuid.uuid4().hex[:12]}"
    async with engine.begin() as connection:
        await connection.execute(text(f"CREATE SCHEMA {name}"))
    try:
        yield name
    finally:
        async with engine.begin() as connection:
            await connection.execute(text(f"DROP SCHEMA IF EXISTS {name} CASCADE"))


if __name__ == "__main__":
    main(quick="--quick" in sys.argv[1:])
