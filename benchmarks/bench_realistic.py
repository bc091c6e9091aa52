"""Scenario 4: the example platform's app-was-created handlers against PostgreSQL, per emit.

The llm_platform (``examples/llm_platform``) is opened on a schema of its own in the
PostgreSQL at ``AIOEVENTS_TEST_DATABASE_URL`` (created here, dropped at the end), with one
tenant and account. Each emit is for a new app, so both handlers do their real work: one
inserts the installed-app row, the other reads the app and account and inserts the site
with a fresh code, each in a transaction of its own on a connection of its own from the pool.

- aioevents: ``await bus.emit(AppWasCreated(...))`` on the bus the platform wires
  (``build_bus``): the handlers run concurrently.
- sequential: the same two handlers (``bus.handlers_for(AppWasCreated)``) awaited one after
  the other, each in try/except: the original's Blinker ``send`` and Django's
  ``send_robust``, done async.

The apps are inserted before each timed run; only the emits are timed. Two columns: durable
commits (each handler's COMMIT waits for the WAL flush), and ``synchronous_commit=off``.
Below the table, the share of the wall time this process spent on the CPU: near 100 %, the
emits are bound by Python's own work (SQLAlchemy, asyncpg), which concurrency cannot overlap.
"""

from __future__ import annotations

import os
import socket
import statistics
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from time import perf_counter, process_time
from typing import cast
from urllib.parse import urlsplit

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import create_async_engine

from examples.llm_platform.app import Platform, open_platform
from examples.llm_platform.cache import MemoryCache
from examples.llm_platform.db import create_engine
from examples.llm_platform.events import AppWasCreated
from examples.llm_platform.models import App, InstalledApp, Site

from ._timing import (
    Case,
    Run,
    Sample,
    Settings,
    Verdict,
    measure,
    middle_half,
    print_table,
    run_on,
)

DATABASE_URL = os.environ.get(
    "AIOEVENTS_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
CONCURRENT = "aioevents  await bus.emit(AppWasCreated(...))"
SEQUENTIAL = "each handler awaited in turn + try/except (Blinker/Django)"

Emit = Callable[[AppWasCreated], Awaitable[object]]


@dataclass
class Bed:
    platform: Platform
    tenant_id: str
    account_id: str
    apps: int = 0
    failures: int = 0

    async def new_apps(self, count: int) -> list[AppWasCreated]:
        """``count`` apps in the database, and the event each one's creation emits."""
        apps = [
            App(tenant_id=self.tenant_id, name=f"app {self.apps + number}", mode="chat",
                created_by=self.account_id)
            for number in range(count)
        ]  # fmt: skip
        async with self.platform.sessions.begin() as session:
            session.add_all(apps)
        self.apps += count
        return [
            AppWasCreated(
                app_id=app.id, tenant_id=self.tenant_id, mode="chat", account_id=self.account_id
            )
            for app in apps
        ]


def main(settings: Settings) -> list[Verdict]:
    if not _reachable(DATABASE_URL):
        print(f"\n== realistic: skipped: PostgreSQL not reachable at {DATABASE_URL} ==")
        return []
    # Emits take milliseconds here: longer repetitions, fewer of them.
    database = Settings(max(3, settings.repetitions // 4), settings.target * 12)
    columns: dict[str, dict[str, Sample]] = {}
    cpu: dict[str, dict[str, list[float]]] = {}
    for commit, durable in (("durable commit", True), ("sync commit off", False)):
        cpu[commit] = {CONCURRENT: [], SEQUENTIAL: []}
        columns[commit] = _column(database, cpu[commit], durable=durable)
    print_table(
        "realistic: AppWasCreated to the example platform's 2 handlers, PostgreSQL", columns
    )
    for commit, column in columns.items():
        ratios = column[CONCURRENT].ratios_to(column[SEQUENTIAL])
        q1, q3 = middle_half(ratios)
        shares = ", ".join(
            f"{statistics.median(cpu[commit][name]):.0%} {label}"
            for name, label in ((CONCURRENT, "aioevents"), (SEQUENTIAL, "sequential"))
        )
        print(
            f"   {commit}: aioevents ÷ sequential = {statistics.median(ratios):.2f} "
            f"(middle half {q1:.2f} to {q3:.2f}); "
            f"this process's CPU time ÷ wall time: {shares}"
        )
    return []


def _column(settings: Settings, cpu: dict[str, list[float]], *, durable: bool) -> dict[str, Sample]:
    stack = AsyncExitStack()
    try:
        bed = run_on("asyncio", stack.enter_async_context(_bed(durable=durable)))
        handlers = [sub.handler for sub in bed.platform.bus.handlers_for(AppWasCreated)]
        assert len(handlers) == 2, f"AppWasCreated has {len(handlers)} handlers, not 2"
        cases = [
            Case(CONCURRENT, _emits(bed, bed.platform.bus.emit, cpu[CONCURRENT])),
            Case(SEQUENTIAL, _emits(bed, _sequential(bed, handlers), cpu[SEQUENTIAL])),
        ]
        column = measure(cases, settings)
        sites, installed = run_on("asyncio", _count_rows(bed))
    finally:
        run_on("asyncio", stack.aclose())
    # Every app got its site and installed-app row, from one variant or the other.
    assert sites == installed == bed.apps, (bed.apps, sites, installed)
    assert not bed.failures, f"{bed.failures} handler failures"
    return column


def _emits(bed: Bed, emit: Emit, cpu: list[float]) -> Run:
    async def run(n: int) -> float:
        events = await bed.new_apps(n)
        started, cpu_started = perf_counter(), process_time()
        for event in events:
            await emit(event)
        elapsed = perf_counter() - started
        cpu.append((process_time() - cpu_started) / elapsed)
        return elapsed

    return run


def _sequential(bed: Bed, handlers: Sequence[Callable[[AppWasCreated], object]]) -> Emit:
    async def emit(event: AppWasCreated) -> list[object]:
        responses: list[object] = []
        for handler in handlers:
            try:
                # The platform's handlers are all async: what they return is awaitable.
                responses.append(await cast(Awaitable[object], handler(event)))
            except Exception as exc:
                bed.failures += 1
                responses.append(exc)
        return responses

    return emit


@asynccontextmanager
async def _bed(*, durable: bool) -> AsyncIterator[Bed]:
    schema = f"bench_realistic_{uuid.uuid4().hex[:12]}"
    admin = create_engine(DATABASE_URL)
    try:
        async with admin.begin() as connection:
            await connection.execute(text(f"CREATE SCHEMA {schema}"))
        # Without durable commits the server skips the WAL flush at each handler's COMMIT:
        # what is left is the round trips and the server's work, which can overlap.
        server_settings = {"search_path": schema}
        if not durable:
            server_settings["synchronous_commit"] = "off"
        engine = create_async_engine(
            DATABASE_URL, connect_args={"server_settings": server_settings}
        )
        async with open_platform(engine, MemoryCache()) as platform:
            tenants = platform.services.tenants
            tenant = (await tenants.create_tenant("Bench")).value
            account = await tenants.create_account(tenant.id, "Ann", "ann@bench.test", "de-DE")
            yield Bed(platform, tenant.id, account.value.id)
    finally:
        async with admin.begin() as connection:
            await connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        await admin.dispose()


async def _count_rows(bed: Bed) -> tuple[int, int]:
    async with bed.platform.sessions() as session:
        sites = await session.scalar(select(func.count()).select_from(Site))
        installed = await session.scalar(select(func.count()).select_from(InstalledApp))
    return sites or 0, installed or 0


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5432), 2).close()
    except OSError:
        return False
    return True
