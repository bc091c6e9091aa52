"""Provider usage: database writes and wall time of four ways to book each message's use.

10,000 messages over 20 providers of one tenant, emitted from 8 concurrent workers, each
message booked in a transaction of its own on PostgreSQL, with the ``last_used`` window
(the original's five minutes, which the run never outlives) kept in Redis:

- (a) naive: the original handler without its throttle: every message UPDATEs ``last_used``,
  and a hosted provider's message UPDATEs ``quota_used`` (and ``last_used`` again);
- (b) original: the same, but ``last_used`` only when a Redis GET finds no recent write,
  followed by a SETEX: not atomic, so concurrent workers all write at a window's start;
- (c) ours, per message: `UpdateProviderWhenMessageCreated`, window claimed with SET NX,
  at most one UPDATE per provider row and transaction, ledger row per charged message;
- (d) ours, batched: `UpdateProviderWhenMessagesCreated` on batches of 100 messages.

Two provider mixes: half hosted (10 with a platform quota, 10 with the tenant's own key) and
all hosted. "beyond 1/window" counts the ``last_used`` writes past the first per provider
(one window per provider here). The goals: (c) writes ``last_used`` exactly once per window
per provider, and makes at most half of (a)'s UPDATE statements.

Run alone with ``python -m benchmarks.bench_provider_usage [--quick]``, or as the
``provider-usage`` scenario of ``python -m benchmarks``; it needs the
PostgreSQL at ``AIOEVENTS_TEST_DATABASE_URL`` and the Redis at ``AIOEVENTS_TEST_REDIS_URL``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit

from redis.asyncio import Redis
from sqlalchemy import delete, event, func, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from examples.llm_platform.cache import MemoryCache
from examples.llm_platform.db import SessionFactory, create_engine, create_schema, session_factory
from examples.llm_platform.deps import Deps
from examples.llm_platform.events import MessageWasCreated
from examples.llm_platform.handlers.update_provider_when_message_created import (
    UpdateProviderWhenMessageCreated as per_message,
)
from examples.llm_platform.handlers.update_provider_when_message_created import (
    UpdateProviderWhenMessagesCreated,
)
from examples.llm_platform.models import Provider, ProviderUsage
from examples.llm_platform.throttling import PlatformThrottle

from ._timing import Check

DATABASE_URL = os.environ.get(
    "AIOEVENTS_TEST_DATABASE_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("AIOEVENTS_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
TENANT: Final = "bench-tenant"
PROVIDERS: Final = 20
WORKERS: Final = 8
WINDOW: Final = 300.0  # the original's: no run outlives it, so one window per provider
BATCH: Final = 100
BURST: Final = 50

Book = Callable[[Sequence[MessageWasCreated]], Awaitable[None]]


@dataclass
class Counts:
    """What the engine ran while counting: every statement, and the UPDATEs of providers."""

    statements: int = 0
    updates: int = 0
    last_used: int = 0
    counting: bool = False

    def __call__(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if not self.counting:
            return
        self.statements += 1
        if statement.startswith("UPDATE providers SET"):
            self.updates += 1
            self.last_used += "last_used=" in statement


@dataclass(frozen=True)
class Outcome:
    name: str
    counts: Counts
    seconds: float
    exact: bool


# -- the original's scheme, naive and throttled ------------------------------------------------


class Original:
    """The original handler: a basic ``last_used`` UPDATE, then a hosted quota UPDATE that
    sets ``last_used`` too, sorted, in one transaction; with ``throttled``, each ``last_used``
    goes through GET then SETEX on Redis, as the original did."""

    def __init__(self, sessions: SessionFactory, redis: Redis | None, prefix: str) -> None:
        self.sessions, self.redis, self.prefix = sessions, redis, prefix
        self.hosted: set[str] = set()

    async def __call__(self, events: Sequence[MessageWasCreated]) -> None:
        for message in events:
            await self.book(message)

    async def book(self, message: MessageWasCreated) -> None:
        now = datetime.now(UTC)
        where = (
            Provider.tenant_id == message.tenant_id,
            Provider.provider_name == message.provider,
        )
        updates: list[tuple[Any, dict[str, Any]]] = [(where, {"last_used": now})]
        if message.provider in self.hosted:
            used = message.message_tokens + message.answer_tokens
            guard = (*where, Provider.provider_type == "system",
                     Provider.quota_limit > Provider.quota_used)  # fmt: skip
            updates.append((guard, {"quota_used": Provider.quota_used + used, "last_used": now}))
        async with self.sessions.begin() as session:
            for conditions, values in updates:
                if "last_used" in values and not await self.window_passed(message, now):
                    del values["last_used"]
                if values:
                    statement = update(Provider).where(*conditions).values(values)
                    await session.execute(statement.execution_options(synchronize_session=False))

    async def window_passed(self, message: MessageWasCreated, now: datetime) -> bool:
        if self.redis is None:
            return True
        key = f"{self.prefix}provider:last_update:{message.tenant_id}:{message.provider}"
        last = await self.redis.get(key)
        if last is not None and now.timestamp() - float(last) <= WINDOW:
            return False
        await self.redis.set(key, now.timestamp(), ex=int(WINDOW))  # the original's SETEX
        return True


# -- running one variant -----------------------------------------------------------------------


def messages(count: int) -> list[MessageWasCreated]:
    """Conversations come in bursts: runs of ``BURST`` messages for one provider, so the
    workers book the same provider at the same time, as they do for a busy app."""
    return [
        MessageWasCreated(
            message_id=str(uuid.uuid4()),
            conversation_id="c",
            app_id="a",
            tenant_id=TENANT,
            provider=f"provider-{number // BURST % PROVIDERS:02}",
            model="gpt-4o-mini",
            message_tokens=number % 7 + 1,
            answer_tokens=3,
        )
        for number in range(count)
    ]


async def reset(sessions: SessionFactory, redis: Redis, prefix: str, hosted: set[str]) -> None:
    async with sessions.begin() as session:
        await session.execute(delete(ProviderUsage))
        await session.execute(delete(Provider))
        for number in range(PROVIDERS):
            name = f"provider-{number:02}"
            kind = "system" if name in hosted else "custom"
            session.add(Provider(tenant_id=TENANT, provider_name=name, provider_type=kind,
                                 quota_type="free", quota_limit=10**12))  # fmt: skip
    keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
    if keys:
        await redis.delete(*keys)


async def run_variant(
    name: str, book: Book, sent: Sequence[MessageWasCreated], chunk: int, bed: Bed
) -> Outcome:
    shares = [sent[first::WORKERS] for first in range(WORKERS)]

    async def work(share: Sequence[MessageWasCreated]) -> None:
        for start in range(0, len(share), chunk):
            await book(share[start : start + chunk])

    counts = Counts()
    event.listen(bed.engine.sync_engine, "before_cursor_execute", counts)
    counts.counting = True
    started = time.perf_counter()
    try:
        await asyncio.gather(*(work(share) for share in shares))
    finally:
        seconds = time.perf_counter() - started
        counts.counting = False
        event.remove(bed.engine.sync_engine, "before_cursor_execute", counts)
    async with bed.sessions() as session:
        charged = await session.scalar(select(func.coalesce(func.sum(Provider.quota_used), 0)))
    expected = sum(m.message_tokens + m.answer_tokens for m in sent if m.provider in bed.hosted)
    return Outcome(name, counts, seconds, charged == expected)


@dataclass
class Bed:
    engine: AsyncEngine
    sessions: SessionFactory
    redis: Redis
    prefix: str
    hosted: set[str]


async def run_mix(title: str, hosted_count: int, count: int, bed: Bed) -> list[Outcome]:
    bed.hosted = {f"provider-{number:02}" for number in range(hosted_count)}
    sent = messages(count)
    outcomes = []
    for name, chunk, make in variants(bed):
        await reset(bed.sessions, bed.redis, bed.prefix, bed.hosted)
        book, close = make()
        try:
            outcomes.append(await run_variant(name, book, sent, chunk, bed))
        finally:
            await close()
    print_table(f"{count:,} messages, {PROVIDERS} providers, {title}", outcomes)
    return outcomes


def variants(bed: Bed) -> list[tuple[str, int, Callable[[], tuple[Book, Callable[[], Any]]]]]:
    def original(throttled: bool) -> tuple[Book, Callable[[], Any]]:
        handler = Original(bed.sessions, bed.redis if throttled else None, bed.prefix)
        handler.hosted = bed.hosted
        return handler, _nothing

    def ours(batched: bool) -> tuple[Book, Callable[[], Any]]:
        throttle = PlatformThrottle.redis(REDIS_URL, prefix=bed.prefix)
        deps = Deps(bed.sessions, MemoryCache(), throttle)
        handler_class = UpdateProviderWhenMessagesCreated if batched else per_message
        return handler_class(deps, last_used_window=WINDOW).apply, throttle.aclose

    return [
        ("(a) naive: write every time", 1, lambda: original(False)),
        ("(b) original: GET then SETEX", 1, lambda: original(True)),
        ("(c) ours, per message", 1, lambda: ours(False)),
        (f"(d) ours, batches of {BATCH}", BATCH, lambda: ours(True)),
    ]


async def _nothing() -> None:
    pass


def print_table(title: str, outcomes: Sequence[Outcome]) -> None:
    naive = outcomes[0].counts.updates
    print(f"\n{title}, {WORKERS} workers")
    print(f"{'variant':<32}{'UPDATEs':>9}{'vs (a)':>8}{'last_used':>11}{'beyond 1/window':>17}"
          f"{'statements':>12}{'wall s':>8}{'quota exact':>13}")  # fmt: skip
    for outcome in outcomes:
        counts = outcome.counts
        print(
            f"{outcome.name:<32}{counts.updates:>9,}{counts.updates / naive:>8.2f}"
            f"{counts.last_used:>11,}{max(0, counts.last_used - PROVIDERS):>17,}"
            f"{counts.statements:>12,}{outcome.seconds:>8.2f}{'yes' if outcome.exact else 'NO':>13}"
        )


def goals(mix: str, outcomes: Sequence[Outcome]) -> list[Check]:
    naive, ours = outcomes[0].counts, outcomes[2].counts
    return [
        Check(
            f"provider usage, {mix}: (c) writes last_used once per window per provider "
            f"({ours.last_used} writes, {PROVIDERS} providers)",
            ours.last_used == PROVIDERS,
        ),
        Check(
            f"provider usage, {mix}: (c) makes at most half of (a)'s UPDATEs "
            f"({ours.updates:,} of {naive.updates:,})",
            ours.updates <= naive.updates / 2,
        ),
    ]


# -- setting up ----------------------------------------------------------------------------------


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    address = (parts.hostname or "127.0.0.1", parts.port or default_port)
    try:
        socket.create_connection(address, 2).close()
    except OSError:
        return False
    return True


async def _run(count: int) -> list[Check]:
    schema = f"bench_usage_{uuid.uuid4().hex[:12]}"
    prefix = f"{schema}:"
    admin = create_engine(DATABASE_URL)
    async with admin.begin() as connection:
        await connection.execute(text(f"CREATE SCHEMA {schema}"))
    engine = create_engine(DATABASE_URL, search_path=schema)
    redis = Redis.from_url(REDIS_URL)
    try:
        await create_schema(engine)
        bed = Bed(engine, session_factory(engine), redis, prefix, set())
        half = await run_mix("half hosted", PROVIDERS // 2, count, bed)
        every = await run_mix("all hosted", PROVIDERS, count, bed)
        return goals("half hosted", half) + goals("all hosted", every)
    finally:
        keys = [key async for key in redis.scan_iter(match=f"{prefix}*")]
        if keys:
            await redis.delete(*keys)
        await redis.aclose()
        await engine.dispose()
        async with admin.begin() as connection:
            await connection.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        await admin.dispose()


def main(quick: bool = False) -> list[Check]:
    """Print, per provider mix, the UPDATEs and time of each variant, and the goals."""
    for what, url, port in (("PostgreSQL", DATABASE_URL, 5432), ("Redis", REDIS_URL, 6379)):
        if not _reachable(url, port):
            print(f"\n== provider usage: skipped: {what} not reachable at {url} ==")
            return []
    count = 2_000 if quick else 10_000
    print(
        "\n== provider usage on PostgreSQL and Redis: one transaction per message "
        "(per batch in d) =="
    )
    checks = asyncio.run(_run(count))
    for check in checks:
        print(f"   {check}")
    return checks


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_provider_usage")
    parser.add_argument("--quick", action="store_true", help="2,000 messages instead of 10,000")
    main(quick=parser.parse_args().quick)
