"""update_provider_when_message_created: exact quota, last_used once per window, idempotent.

The concurrency tests run on SQLite (writers serialised by BEGIN IMMEDIATE) and on
PostgreSQL with Redis (row locks, a throttle shared through Redis), each in a schema and
under a key prefix of its own.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import pytest_asyncio
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from aioevents import EventBus
from aioevents.throttle import MemoryThrottle, RedisThrottle
from examples.llm_platform.app import Platform, build_bus, open_platform
from examples.llm_platform.cache import MemoryCache
from examples.llm_platform.db import SessionFactory, create_engine, create_schema, session_factory
from examples.llm_platform.deps import Deps
from examples.llm_platform.events import MessageWasCreated
from examples.llm_platform.handlers import DURABLE, provider_usage_router
from examples.llm_platform.handlers.update_provider_when_message_created import (
    UpdateProviderWhenMessageCreated,
    UpdateProviderWhenMessagesCreated,
)
from examples.llm_platform.models import Message, Provider, ProviderUsage
from examples.llm_platform.quota import MODEL_CREDITS, TRIAL_QUOTAS
from examples.llm_platform.throttling import PlatformThrottle
from examples.llm_platform.web import create_web_app

from .conftest import (
    BACKENDS,
    _postgres_schema,
    _redis_prefix,
    deliveries_done,
    lifespan_in_a_task,
)
from .graphs import model_config
from .provider_usage import (
    PROVIDER,
    TENANT,
    CountingThrottle,
    StatementCounter,
    emit_concurrently,
    messages,
    tokens,
)

pytestmark = pytest.mark.asyncio

REPO = Path(__file__).resolve().parents[2]
HOUR = 3600.0  # a window no test outlives: every run is within one window


@dataclass
class Bed:
    """A database and throttle with the provider tables, and the UPDATEs counted."""

    engine: AsyncEngine
    sessions: SessionFactory
    throttle: PlatformThrottle
    counter: StatementCounter
    url: str
    schema: str | None = None
    redis_url: str | None = None
    prefix: str = ""

    def deps(self) -> Deps:
        return Deps(self.sessions, MemoryCache(), self.throttle)

    def bus(self, *, window: float = HOUR) -> EventBus:
        bus = EventBus()
        bus.subscribe(
            MessageWasCreated,
            UpdateProviderWhenMessageCreated(self.deps(), last_used_window=window),
        )
        return bus

    async def add_provider(
        self,
        name: str = PROVIDER,
        *,
        provider_type: str = "system",
        quota_type: str = "free",
        quota_limit: int = 10**9,
        quota_used: int = 0,
    ) -> None:
        async with self.sessions.begin() as session:
            session.add(
                Provider(
                    tenant_id=TENANT,
                    provider_name=name,
                    provider_type=provider_type,
                    quota_type=quota_type,
                    quota_limit=quota_limit,
                    quota_used=quota_used,
                )
            )

    async def provider(self, name: str = PROVIDER) -> Provider:
        async with self.sessions() as session:
            query = select(Provider).filter_by(tenant_id=TENANT, provider_name=name)
            return (await session.scalars(query)).one()

    async def ledger(self) -> list[ProviderUsage]:
        async with self.sessions() as session:
            return list(await session.scalars(select(ProviderUsage)))

    @property
    def last_used_writes(self) -> int:
        return len(self.counter.last_used)


@pytest_asyncio.fixture(params=BACKENDS)
async def bed(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Bed]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'usage.sqlite3'}"
        async with _bed(url, PlatformThrottle.memory()) as bed:
            yield bed
        return
    database_url: str = request.getfixturevalue("database_url")
    redis_url: str = request.getfixturevalue("redis_url")
    async with _postgres_schema(database_url) as schema, _redis_prefix(redis_url) as prefix:
        throttle = PlatformThrottle.redis(redis_url, prefix=prefix)
        async with _bed(database_url, throttle, schema, redis_url, prefix) as bed:
            yield bed


@pytest_asyncio.fixture
async def postgres_bed(database_url: str, redis_url: str) -> AsyncIterator[Bed]:
    async with _postgres_schema(database_url) as schema, _redis_prefix(redis_url) as prefix:
        throttle = PlatformThrottle.redis(redis_url, prefix=prefix)
        async with _bed(database_url, throttle, schema, redis_url, prefix) as bed:
            yield bed


@asynccontextmanager
async def _bed(
    url: str,
    throttle: PlatformThrottle,
    schema: str | None = None,
    redis_url: str | None = None,
    prefix: str = "",
) -> AsyncIterator[Bed]:
    engine = create_engine(url, search_path=schema)
    try:
        await create_schema(engine)
        counter = StatementCounter(engine)
        sessions = session_factory(engine)
        yield Bed(engine, sessions, throttle, counter, url, schema, redis_url, prefix)
    finally:
        await throttle.aclose()
        await engine.dispose()


def assert_all_ok(results: Sequence[Any]) -> None:
    failures = [error for result in results for error in result.errors]
    assert failures == []


# -- the guarantees, under concurrency ----------------------------------------------


@pytest.mark.timeout(120)
async def test_concurrent_messages_charge_the_exact_sum_and_write_last_used_once(
    bed: Bed,
) -> None:
    await bed.add_provider()
    sent = messages("exact", 0, 500)

    assert_all_ok(await emit_concurrently(bed.bus(), sent, tasks=8))

    provider = await bed.provider()
    assert provider.quota_used == tokens(sent)
    assert provider.last_used is not None
    assert bed.last_used_writes == 1
    assert len(await bed.ledger()) == 500


@pytest.mark.timeout(120)
async def test_redelivered_messages_are_not_charged_again(bed: Bed) -> None:
    await bed.add_provider()
    sent = messages("again", 0, 500)
    bus = bed.bus()
    assert_all_ok(await emit_concurrently(bus, sent, tasks=8))
    charged = (await bed.provider()).quota_used

    # Every message twice more, the two copies of each emitted at the same time.
    assert_all_ok(await emit_concurrently(bus, [m for m in sent for _ in "ab"], tasks=8))

    assert charged == tokens(sent)
    assert (await bed.provider()).quota_used == charged
    assert len(await bed.ledger()) == 500


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(120)
async def test_two_processes_share_the_window_and_charge_the_exact_sum(
    postgres_bed: Bed,
) -> None:
    bed = postgres_bed
    await bed.add_provider()
    worker = [sys.executable, "-m", "tests.examples.provider_usage"]
    server = [bed.url, bed.schema or "", bed.redis_url or "", bed.prefix, "two"]
    reports: list[dict[str, int]] = []

    async def run_worker(start: int) -> None:
        done = await anyio.run_process([*worker, *server, str(start), "250"], cwd=REPO)
        reports.append(json.loads(done.stdout.decode().splitlines()[-1]))

    with anyio.fail_after(90):
        async with anyio.create_task_group() as task_group:
            task_group.start_soon(run_worker, 0)
            task_group.start_soon(run_worker, 250)

    def total(field: str) -> int:
        return sum(report[field] for report in reports)

    assert sorted(report["emitted"] for report in reports) == [250, 250]
    assert total("failed") == 0
    # What the throttle guarantees, even on a loaded machine where a Redis call can miss its
    # 0.25 s timeout and fail open: Redis grants the window at most once across both
    # processes, every other write is a counted fallback after a timeout, and load never
    # denies a claim here (8 tasks a process, far fewer than the throttle's connections).
    assert total("granted") <= 1
    assert total("last_used_writes") == total("granted") + total("fallback_granted") >= 1
    assert (total("saturations"), total("other_fallbacks")) == (0, 0)  # only timeouts
    assert (await bed.provider()).quota_used == tokens(messages("two", 0, 500))
    assert len(await bed.ledger()) == 500


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.timeout(120)
async def test_redis_going_down_mid_run_falls_back_to_writing_last_used(
    postgres_bed: Bed, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bed = postgres_bed
    await bed.add_provider()
    sent = messages("outage", 0, 500)
    with redis_server(tmp_path) as (url, server):
        throttle = PlatformThrottle.redis(url, prefix=bed.prefix)
        deps = Deps(bed.sessions, MemoryCache(), throttle)
        bus = EventBus()
        bus.subscribe(MessageWasCreated, UpdateProviderWhenMessageCreated(deps))
        handled, hundred_handled = 0, anyio.Event()

        async def count(event: MessageWasCreated) -> None:
            nonlocal handled
            handled += 1
            if handled == 100:
                hundred_handled.set()

        bus.subscribe(MessageWasCreated, count)

        handled_when_down = 0

        async def stop_after_a_hundred() -> None:
            nonlocal handled_when_down
            await hundred_handled.wait()
            server.terminate()
            await anyio.to_thread.run_sync(server.wait)
            handled_when_down = handled

        caplog.set_level(logging.WARNING, "aioevents.throttle")
        try:
            async with anyio.create_task_group() as task_group:
                task_group.start_soon(stop_after_a_hundred)
                results = await emit_concurrently(bus, sent, tasks=8)
        finally:
            await throttle.aclose()

    assert_all_ok(results)
    assert len(results) == 500
    assert (await bed.provider()).quota_used == tokens(sent)
    assert isinstance(throttle.throttle, RedisThrottle)
    fallbacks = throttle.throttle.fallbacks
    # Every claim made once the server was down fell back: those of the messages handled
    # after it, but for the few (one a task) that had claimed before. How many messages were
    # handled between the hundredth and the server's exit depends on the machine's load.
    assert fallbacks >= len(sent) - handled_when_down - 8 > 0
    assert bed.last_used_writes == 1 + fallbacks  # the one granted claim, then each fallback
    warnings = [r for r in caplog.records if r.name == "aioevents.throttle"]
    assert len(warnings) == 1  # rate-limited: one a minute


@pytest.mark.timeout(120)
async def test_240_concurrent_messages_over_3_providers_write_last_used_3_times(
    bed: Bed,
) -> None:
    # More concurrent claims than redis-py's default pool of 100 connections, which the
    # platform's client has: load, not an outage, so no claim may fail open for it.
    names = ["openai", "anthropic", "mistral"]
    for name in names:
        await bed.add_provider(name)
    sent = [m for name in names for m in messages(f"burst-{name}", 0, 80, provider=name)]
    throttle = CountingThrottle(bed.throttle)
    bus = EventBus()
    deps = Deps(bed.sessions, MemoryCache(), throttle)
    bus.subscribe(MessageWasCreated, UpdateProviderWhenMessageCreated(deps, last_used_window=HOUR))

    assert_all_ok(await emit_concurrently(bus, sent[::-1], tasks=len(sent)))

    for name in names:
        provider = await bed.provider(name)
        assert provider.quota_used == tokens([m for m in sent if m.provider == name])
        assert provider.last_used is not None
    # Exactly 3 on a machine that answers in time. On a loaded one, a Redis call may miss
    # its 0.25 s timeout and fail open: each such write is a counted timeout, never a
    # pool running out of connections (which granted 142 extra writes here before).
    assert throttle.granted <= 3
    assert bed.last_used_writes == throttle.granted + throttle.fallback_granted
    if isinstance(bed.throttle.throttle, RedisThrottle):
        assert set(bed.throttle.throttle.counter.causes) <= {"TimeoutError"}
        assert bed.throttle.throttle.saturations == 0
    else:
        assert bed.last_used_writes == 3


async def test_a_failed_transaction_releases_its_claim(bed: Bed) -> None:
    await bed.add_provider()
    first, second = messages("rollback", 0, 2)
    bus = bed.bus()
    fail_once = FailOnce(bed.engine, "UPDATE providers SET")

    failed = await bus.emit(first)

    fail_once.close()
    assert [type(error.exception).__name__ for error in failed.errors] == ["RuntimeError"]
    provider = await bed.provider()
    assert (provider.last_used, provider.quota_used, await bed.ledger()) == (None, 0, [])

    assert (await bus.emit(second)).ok

    provider = await bed.provider()
    assert provider.last_used is not None
    assert provider.quota_used == tokens([second])
    assert bed.last_used_writes == 2  # the rolled-back one and the one after it


class FailOnce:
    """Makes the next statement starting with ``prefix`` fail, after it was counted."""

    def __init__(self, engine: AsyncEngine, prefix: str) -> None:
        self.engine, self.prefix, self.armed = engine, prefix, True
        event.listen(engine.sync_engine, "before_cursor_execute", self._fail)

    def close(self) -> None:
        event.remove(self.engine.sync_engine, "before_cursor_execute", self._fail)

    def _fail(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if self.armed and statement.startswith(self.prefix):
            self.armed = False
            raise RuntimeError("the database went away")


# -- what a message costs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quota_type", "model", "cost"),
    [
        ("free", "gpt-4o-mini", "tokens"),  # tokens: the message's and the answer's
        ("paid", "gpt-4o", MODEL_CREDITS["gpt-4o"]),  # credits: the model's price
        ("paid", "some-new-model", 1),  # a model without a price costs one credit
        ("trial", "gpt-4o", 1),  # times: one per message
    ],
)
async def test_each_quota_type_counts_its_unit(
    bed: Bed, quota_type: str, model: str, cost: object
) -> None:
    await bed.add_provider(quota_type=quota_type)
    sent = messages(quota_type, 0, 3, model=model)

    assert_all_ok(await emit_concurrently(bed.bus(), sent, tasks=1))

    expected = tokens(sent) if cost == "tokens" else 3 * int(str(cost))
    assert (await bed.provider()).quota_used == expected


async def test_unlimited_and_custom_providers_are_not_charged_but_marked_used(bed: Bed) -> None:
    await bed.add_provider("unlimited", quota_limit=-1)
    await bed.add_provider("own-key", provider_type="custom")
    bus = bed.bus()

    for name in ("unlimited", "own-key"):
        assert_all_ok(await emit_concurrently(bus, messages(name, 0, 3, provider=name)))

    for name in ("unlimited", "own-key"):
        provider = await bed.provider(name)
        assert (provider.quota_used, provider.last_used is not None) == (0, True)
    assert await bed.ledger() == []
    assert bed.counter.quota_updates == 0


async def test_an_exhausted_quota_logs_a_warning_and_does_not_fail(
    bed: Bed, caplog: pytest.LogCaptureFixture
) -> None:
    await bed.add_provider(quota_limit=10, quota_used=8)
    first, second = messages("exhausted", 0, 2)
    bus = bed.bus()

    assert (await bus.emit(first)).ok  # 8 < 10: charged, overshooting as the original did
    assert (await bus.emit(second)).ok  # not charged

    assert (await bed.provider()).quota_used == 8 + tokens([first])
    ledger = {entry.message_id: entry.charged for entry in await bed.ledger()}
    assert ledger == {first.message_id: True, second.message_id: False}
    [warning] = exhausted_warnings(caplog)
    assert "quota of provider openai of tenant tenant-1 is exhausted" in warning.getMessage()


def exhausted_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """The quota's warnings. Others may come: on a loaded machine Redis may not answer the
    throttle within its timeout, and the throttle warns that it failed open (as designed)."""
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    others = [r for r in warnings if "is exhausted" not in r.getMessage()]
    assert all(r.name == "aioevents.throttle" for r in others), others
    return [r for r in warnings if "is exhausted" in r.getMessage()]


@pytest.mark.timeout(120)
async def test_a_quota_used_up_by_concurrent_messages_charges_only_the_first(
    bed: Bed, caplog: pytest.LogCaptureFixture
) -> None:
    # Every message costs more than the 2 tokens left: the first charged uses the quota up.
    # On PostgreSQL, the others read the quota before that commits, so it is the UPDATE's
    # guard that refuses them, and their ledger rows are marked afterwards.
    await bed.add_provider(quota_limit=10, quota_used=8)
    sent = messages("used-up", 0, 16)

    assert_all_ok(await emit_concurrently(bed.bus(), sent, tasks=8))

    ledger = await bed.ledger()
    [charged] = [entry for entry in ledger if entry.charged]
    assert len(ledger) == 16
    assert (await bed.provider()).quota_used == 8 + charged.units
    assert len(exhausted_warnings(caplog)) == 15


async def test_a_message_for_an_unknown_provider_changes_nothing(bed: Bed) -> None:
    bus = bed.bus()

    assert (await bus.emit(messages("unknown", 0, 1)[0])).ok

    assert await bed.ledger() == []
    assert bed.counter.updates == 0
    await bed.add_provider()  # its window was given back: the first message writes last_used
    assert (await bus.emit(messages("unknown", 1, 1)[0])).ok
    assert bed.last_used_writes == 1


async def test_last_used_is_written_again_once_the_window_has_passed(tmp_path: Path) -> None:
    now = [0.0]
    throttle = PlatformThrottle(MemoryThrottle(clock=lambda: now[0]))
    async with _bed(f"sqlite+aiosqlite:///{tmp_path / 'w.sqlite3'}", throttle) as bed:
        await bed.add_provider()
        bus = bed.bus(window=300)
        writes = []
        for number, at in enumerate((0, 100, 299, 300, 450, 601)):
            now[0] = at
            assert (await bus.emit(messages("window", number, 1)[0])).ok
            writes.append(bed.last_used_writes)

    assert writes == [1, 1, 1, 2, 2, 3]


# -- the batch variant ------------------------------------------------------------------------


@pytest.mark.timeout(120)
async def test_batches_charge_the_exact_sum_once_per_provider_and_batch(bed: Bed) -> None:
    names = [f"provider-{number}" for number in range(5)]
    for name in names:
        await bed.add_provider(name)
    sent = [m for n, name in enumerate(names) for m in messages(name, 0, 100, provider=name)]
    handler = UpdateProviderWhenMessagesCreated(bed.deps(), last_used_window=HOUR)
    bus = EventBus()
    bus.subscribe_batch(MessageWasCreated, handler, max_size=50, max_wait=0.05)

    async with bus:
        for shuffled in (sent[::-1], sent):  # then every message again: a redelivery
            async with anyio.create_task_group() as task_group:
                for first in range(8):
                    task_group.start_soon(publish_all, bus, shuffled[first::8])

    for name in names:
        provider = await bed.provider(name)
        assert provider.quota_used == tokens([m for m in sent if m.provider == name])
    assert len(await bed.ledger()) == 500
    assert bed.last_used_writes == 5
    assert bed.counter.quota_updates <= 5 * 20  # one per provider per batch, not per message


async def publish_all(bus: EventBus, events: Sequence[object]) -> None:
    for one in events:
        await bus.publish(one)


@pytest.mark.timeout(120)
async def test_concurrent_batches_over_the_same_providers_do_not_deadlock(bed: Bed) -> None:
    names = [f"provider-{number}" for number in range(6)]
    for name in names:
        await bed.add_provider(name)
    sent = [m for name in names for m in messages(f"lock-{name}", 0, 60, provider=name)]
    handler = UpdateProviderWhenMessagesCreated(bed.deps(), last_used_window=HOUR)
    # 8 batches, each over every provider, in different orders: without one lock order,
    # PostgreSQL would find transactions waiting on each other's rows.
    batches = [sent[first::8][:: 1 if first % 2 else -1] for first in range(8)]

    async with anyio.create_task_group() as task_group:
        for batch in batches * 2:  # and every batch twice at once
            task_group.start_soon(handler, batch)

    for name in names:
        provider = await bed.provider(name)
        assert provider.quota_used == tokens([m for m in sent if m.provider == name])
    assert len(await bed.ledger()) == len(sent)


async def test_the_platform_wires_exactly_one_provider_update_the_durable_one(
    tmp_path: Path,
) -> None:
    engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'b.sqlite3'}")
    deps = Deps(session_factory(engine), MemoryCache())

    bus = build_bus(deps)

    await engine.dispose()
    [sub] = bus.handlers_for(MessageWasCreated)
    assert sub.handler.__class__ is UpdateProviderWhenMessageCreated
    assert (sub.name, sub.durable, sub.batch) == (
        "update_provider_when_message_created",
        DURABLE,
        None,
    )


@pytest.mark.parametrize("batched", [False, True])
async def test_the_provider_usage_router_gives_one_variant(batched: bool) -> None:
    deps = Deps(session_factory(create_engine("sqlite://")), MemoryCache())  # never connects
    bus = EventBus()

    bus.include(provider_usage_router(deps, batched=batched))

    [sub] = bus.handlers_for(MessageWasCreated)
    expected = UpdateProviderWhenMessagesCreated if batched else UpdateProviderWhenMessageCreated
    assert sub.handler.__class__ is expected
    assert (sub.batch is not None, sub.durable is not None) == (batched, not batched)


async def test_the_web_app_charges_each_message_durably_after_the_answer(tmp_path: Path) -> None:
    def opener() -> AbstractAsyncContextManager[Platform]:
        engine = create_engine(f"sqlite+aiosqlite:///{tmp_path / 'web.sqlite3'}")
        return open_platform(engine, MemoryCache())

    web = create_web_app(opener)
    async with lifespan_in_a_task(web):
        platform: Platform = web.state.platform
        assert platform.bus.running
        transport = httpx.ASGITransport(app=web)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            # The tenant comes with a trial quota of the hosted openai, which the app uses.
            _, account_id, app_id = await chat_app(http)
            for query in ("Hi", "How are you?", "Bye now"):
                body = {"account_id": account_id, "query": query}
                response = await http.post(f"/apps/{app_id}/messages", json=body)
                assert response.status_code == 201, response.text
                # Its only handler is durable: nothing ran in memory, nothing was awaited.
                assert response.json()["events"] == [{"handlers": [], "failed": []}]
        await deliveries_done(platform.outbox)
        deliveries = await platform.outbox.deliveries(
            handler="update_provider_when_message_created"
        )
        async with platform.sessions() as session:
            sent = (await session.execute(select(func.count(Message.id)))).scalar_one()
            openai = select(Provider).filter_by(provider_name="openai")
            provider = (await session.scalars(openai)).one()

    assert sent == 3
    assert [(d.status, d.attempts) for d in deliveries] == [("completed", 1)] * 3
    assert (provider.quota_type, provider.quota_limit) == ("trial", TRIAL_QUOTAS["openai"])
    assert (provider.quota_used, provider.last_used is not None) == (sent, True)  # one a message


async def chat_app(http: httpx.AsyncClient) -> tuple[str, str, str]:
    """A tenant, an account and a chat app with a model config; their ids."""
    tenant_id = (await http.post("/tenants", json={"name": "Acme"})).json()["id"]
    account = {"name": "Ann", "email": "ann@acme.test"}
    account_id = (await http.post(f"/tenants/{tenant_id}/accounts", json=account)).json()["id"]
    body = {"tenant_id": tenant_id, "account_id": account_id, "name": "Bot", "mode": "chat"}
    app_id = (await http.post("/apps", json=body)).json()["id"]
    config = await http.put(f"/apps/{app_id}/model-config", json=model_config())
    assert config.status_code == 200, config.text
    return tenant_id, account_id, app_id


# -- helpers ----------------------------------------------------------------------------------


class redis_server:
    """A redis-server of this test's own on a free port, to stop mid-run."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def __enter__(self) -> tuple[str, subprocess.Popen[bytes]]:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server is not on PATH")
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        command = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", str(self.directory)]  # fmt: skip
        self.server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                break
            except OSError:
                time.sleep(0.02)
        return f"redis://127.0.0.1:{port}/0", self.server

    def __exit__(self, *exc_info: object) -> None:
        if self.server.poll() is None:
            self.server.terminate()
        self.server.wait(timeout=10)
