"""Attacking the stream consumer the way production will (write-up: /tmp/notes/attack.md).

The promise under attack: every published entry is eventually handled and acknowledged, or
dead-lettered with a reason; no handler is silently skipped; a consumer's stop drains; the
task that runs ``async with bus:`` is never killed or hung by the library; per-key order with
partitions.

A test that passes is behaviour the library gets right; one marked ``xfail(strict=True,
reason="attack.md #N")`` fails because of bug N of the write-up. Every wait is for a state,
bounded by a generous deadline (a loaded 2-core machine is slow); no duration is asserted.
Redis tests use the shared Redis with a prefix of their own (and handler names under it, so
heartbeat keys are theirs too) and delete only those keys; the fault tests start a
redis-server of their own and kill only its PID.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import secrets
import signal
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from aioevents import ConfigurationError, EventBus, Retry
from aioevents._streams_kit import _asyncio_debug_off
from aioevents.streams import (
    Envelope,
    MemoryStreams,
    Streams,
    Transport,
    consume,
    current_entry,
)

from .streams_support import PROJECT_ROOT, RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, imported for the fault tests

pytestmark = [pytest.mark.anyio, pytest.mark.timeout(120)]

DEADLINE = 30.0  # seconds any awaited state may take: only a hang reaches it
POLL = 0.01
FAST: dict[str, Any] = {"wait_initial": 0.01, "wait_max": 0.05, "wait_jitter": 0.0}
BLOCK_FOREVER = 3600.0


@dataclass(frozen=True, slots=True)
class Job:
    __event_name__ = "attack-job"

    n: int


class Fatal(BaseException):
    """What a handler raises that is no Exception (KeyboardInterrupt-like)."""


class Boom(Exception):
    """The failing sibling's error."""


# -- what handlers did ------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the handlers of a test did; thread-safe (sync handlers write from threads)."""

    started: Counter[int] = field(default_factory=Counter)
    completed: Counter[int] = field(default_factory=Counter)
    running: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, n: int) -> None:
        with self.lock:
            self.started[n] += 1
            self.running += 1

    def end(self, n: int, *, completed: bool) -> None:
        with self.lock:
            self.running -= 1
            if completed:
                self.completed[n] += 1


async def until(check: Callable[[], object], what: str | Callable[[], str]) -> None:
    """Wait until ``check()`` (or the awaitable it returns) is true; fail at the deadline."""
    with anyio.move_on_after(DEADLINE):
        while True:
            value = check()
            if isinstance(value, Awaitable):
                value = await value
            if value:
                return
            await anyio.sleep(POLL)
    pytest.fail(f"not within {DEADLINE:.0f} s: {what() if callable(what) else what}")


def unique(name: str) -> str:
    return f"attack-{name}-{secrets.token_hex(4)}"


# -- transports ---------------------------------------------------------------------------------


def _delete_keys(redis_url: str, prefix: str) -> None:
    """The test's keys only: its streams, leases and heartbeat sets."""
    import redis

    from aioevents._redis_streams import HEARTBEATS

    with redis.Redis.from_url(redis_url) as client:
        for pattern in (f"{prefix}*", f"{HEARTBEATS}{prefix}*"):
            keys = list(client.scan_iter(match=pattern, count=1000))
            if keys:
                client.delete(*keys)


class Store:
    """Where a test's streams live: one MemoryStreams, or the shared Redis under a prefix.

    `make` gives a transport over it (a new client each time on Redis, like another process);
    `aclose` closes them all.
    """

    def __init__(self, redis_url: str | None = None) -> None:
        self.prefix = unique("p")
        self.redis_url = redis_url
        self.memory = MemoryStreams()
        self.made: list[Transport] = []

    def make(self) -> Transport:
        if self.redis_url is None:
            return self.memory
        from aioevents.redis_streams import RedisStreams

        transport = RedisStreams(self.redis_url)
        self.made.append(transport)
        return transport

    def streams(self, partitions: int | None = None) -> Streams:
        return Streams(self.make(), prefix=self.prefix, partitions=partitions)

    async def aclose(self) -> None:
        for transport in self.made:
            await transport.aclose()
        if self.redis_url is not None:
            _delete_keys(self.redis_url, self.prefix)


@pytest.fixture
async def memory() -> AsyncIterator[Store]:
    store = Store()
    yield store
    await store.aclose()


@pytest.fixture
async def shared_redis(redis_url: str) -> AsyncIterator[Store]:
    store = Store(redis_url)
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """Either store: the test runs on both."""
    url = None if request.param == "memory" else request.getfixturevalue("redis_url")
    store = Store(url)
    try:
        yield store
    finally:
        with anyio.CancelScope(shield=True):
            await store.aclose()


# -- a consumer's bus -------------------------------------------------------------------------


def worker_bus(
    streams: Streams,
    handlers: dict[str, Callable[[Any], Any]],
    **options: Any,
) -> EventBus:
    bus = EventBus()
    for name, handler in handlers.items():
        bus.subscribe(Job, handler, name=name)
    consume(bus, Job, streams=streams, **{"min_idle": 5.0, **FAST, **options})
    return bus


async def publish_jobs(streams: Streams, numbers: Sequence[int], keys: int = 4) -> None:
    for n in numbers:
        await streams.publish(Job(n), key=f"k{n % keys}")


async def all_handled(streams: Streams, group: str, ledger: Ledger, numbers: Sequence[int]) -> None:
    """A second consumer of the group, until every one of ``numbers`` completed in it (the
    entries the first consumer did not acknowledge) and the group acknowledged everything."""

    async def work(job: Job) -> None:
        ledger.start(job.n)
        ledger.end(job.n, completed=True)

    bus = worker_bus(streams, {group: work}, min_idle=0.3, drain_timeout=5.0)
    async with bus:
        await until(
            lambda: set(ledger.completed) >= set(numbers),
            lambda: f"never handled: {sorted(set(numbers) - set(ledger.completed))}",
        )
        await until(lambda: settled(streams), "every entry acknowledged")


async def settled(streams: Streams) -> bool:
    try:
        infos = await streams.groups(Job)
    except OSError:  # a pooled connection from before a Redis restart fails once: ask again
        return False
    return bool(infos) and all(info.pending == 0 and info.lag == 0 for info in infos)


# -- sources of cancellation of the task running `async with bus:` ----------------------------


@dataclass
class Outcome:
    returned: bool
    error: BaseException | None
    task_cancelled: bool = False


Call = Callable[[], Awaitable[None]]
Wait = Callable[[], Awaitable[None]]


async def native_cancel(call: Call, wait: Wait, *, times: int = 1) -> Outcome:
    returned = False

    async def caller() -> None:
        nonlocal returned
        await call()
        returned = True

    task = asyncio.ensure_future(caller())
    await wait()
    for _ in range(times):
        task.cancel()
        await asyncio.sleep(0.05)  # the second lands while the stop drains
    with anyio.fail_after(DEADLINE):
        await asyncio.wait([task])
    error = None if task.cancelled() else task.exception()
    return Outcome(returned, error, task_cancelled=task.cancelled())


async def native_cancel_twice(call: Call, wait: Wait) -> Outcome:
    return await native_cancel(call, wait, times=2)


async def asyncio_timeout(call: Call, wait: Wait) -> Outcome:
    returned = False

    async def caller() -> None:
        nonlocal returned
        async with asyncio.timeout(None) as timeout:
            expiry = asyncio.ensure_future(_expire(timeout, wait))
            try:
                await call()
                returned = True
            finally:
                expiry.cancel()

    return await _outcome(caller, lambda: returned)


async def _expire(expiring: asyncio.Timeout, wait: Wait) -> None:
    await wait()
    expiring.reschedule(asyncio.get_running_loop().time())


def anyio_scope(*, fail: bool) -> Callable[[Call, Wait], Awaitable[Outcome]]:
    async def source(call: Call, wait: Wait) -> Outcome:
        scopes: list[anyio.CancelScope] = []
        reached: list[BaseException] = []
        returned = False

        async def caller() -> None:
            nonlocal returned
            try:
                with anyio.fail_after(None) if fail else anyio.move_on_after(None) as scope:
                    scopes.append(scope)
                    await call()
                    returned = True
            except BaseException as exc:  # what reached the caller is the point
                reached.append(exc)

        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as group:
                group.start_soon(caller)
                await wait()
                scopes[0].deadline = anyio.current_time()
        return Outcome(returned, reached[0] if reached else None)

    return source


async def failing_sibling(call: Call, wait: Wait) -> Outcome:
    returned = False

    async def caller() -> None:
        nonlocal returned
        async with anyio.create_task_group() as group:

            async def sibling() -> None:
                await wait()
                raise Boom

            group.start_soon(sibling)
            await call()
            returned = True

    return await _outcome(caller, lambda: returned)


async def _outcome(caller: Call, returned: Callable[[], bool]) -> Outcome:
    try:
        with anyio.fail_after(DEADLINE * 2):  # a hang fails here, as a TimeoutError of ours
            await caller()
    except BaseException as exc:  # whatever reached the caller is the point
        return Outcome(returned(), exc)
    return Outcome(returned(), None)


SOURCES: dict[str, tuple[Callable[[Call, Wait], Awaitable[Outcome]], tuple[str, ...]]] = {
    "task.cancel()": (native_cancel, ("asyncio",)),
    "task.cancel() twice": (native_cancel_twice, ("asyncio",)),
    "asyncio.timeout": (asyncio_timeout, ("asyncio",)),
    "move_on_after": (anyio_scope(fail=False), ("asyncio", "trio")),
    "fail_after": (anyio_scope(fail=True), ("asyncio", "trio")),
    "failing sibling": (failing_sibling, ("asyncio", "trio")),
}


def assert_reached_as_intended(source: str, outcome: Outcome, fatal: bool = False) -> None:
    """The source's own outcome reached the caller; a handler's BaseException instead."""
    assert not outcome.returned, "the caller went on as if nothing was cancelled"
    error = outcome.error
    if fatal:
        if source == "failing sibling":
            assert isinstance(error, BaseExceptionGroup), repr(error)
            assert {type(e) for e in error.exceptions} == {Boom, Fatal}, error.exceptions
        else:
            assert isinstance(error, Fatal), repr(error)
        return
    if source.startswith("task.cancel()"):
        assert outcome.task_cancelled, f"the task ended with {error!r}, not cancelled"
    elif source in ("asyncio.timeout", "fail_after"):
        assert isinstance(error, TimeoutError), repr(error)
    elif source == "move_on_after":
        assert error is None, repr(error)
    else:
        assert isinstance(error, BaseExceptionGroup), repr(error)
        assert [type(e) for e in error.exceptions] == [Boom], error.exceptions


EVERY_BACKEND = [("asyncio", None), ("asyncio", 2), ("trio", None), ("trio", 2)]


def _cells(partitioned: Sequence[int | None]) -> list[Any]:
    return [
        pytest.param(name, backend, partitions, id=f"{backend}-{name}-partitions={partitions}")
        for name, (_, backends) in SOURCES.items()
        for backend in backends
        for partitions in partitioned
    ]


# -- 1. the owner of `async with bus:` cancelled while handlers run and entries are pending -----

JOBS = 12


@pytest.mark.parametrize(("source_name", "anyio_backend", "partitions"), _cells([None, 2]))
async def test_a_cancelled_owner_leaves_every_unfinished_entry_for_the_next_consumer(
    source_name: str, anyio_backend: str, partitions: int | None, memory: Store
) -> None:
    await _cancelled_owner(source_name, memory, partitions)


@pytest.mark.redis
@pytest.mark.parametrize(
    ("source_name", "anyio_backend", "partitions"),
    [
        pytest.param(name, "asyncio", partitions, id=f"{name}-partitions={partitions}")
        for name in ("task.cancel() twice", "fail_after", "failing sibling")
        for partitions in (None, 2)
    ],
)
async def test_a_cancelled_owner_on_redis_leaves_every_unfinished_entry(
    source_name: str, partitions: int | None, shared_redis: Store
) -> None:
    await _cancelled_owner(source_name, shared_redis, partitions)


async def _cancelled_owner(source_name: str, store: Store, partitions: int | None) -> None:
    """Odd jobs block until cancelled (cut by the drain timeout), even ones complete; the
    source cancels the owner while the odd ones run. Then: the cancellation reached the caller
    as the source intends, no handler ran on after, and a new consumer completes every job
    the first did not (none was acknowledged without completing)."""
    group = f"{store.prefix}.work"
    first, second = Ledger(), Ledger()
    streams = store.streams(partitions)
    await publish_jobs(streams, range(JOBS))

    async def work(job: Job) -> None:
        first.start(job.n)
        completed = False
        try:
            if job.n % 2:
                await anyio.sleep(BLOCK_FOREVER)
            completed = True
        finally:
            first.end(job.n, completed=completed)

    bus = worker_bus(streams, {group: work}, drain_timeout=0.3)
    log: list[str] = []

    async def call() -> None:
        try:
            async with bus:
                await anyio.sleep(BLOCK_FOREVER)
        finally:
            log.append(f"returned, {first.running} running")

    # unpartitioned: every odd job runs at once; partitioned: one blocks each partition
    blocked = JOBS // 2 if partitions is None else 1

    async def wait() -> None:
        await until(
            lambda: sum(first.started[n] for n in range(1, JOBS, 2)) >= blocked,
            "the blocking handlers started",
        )

    source, _ = SOURCES[source_name]
    outcome = await source(call, wait)
    assert_reached_as_intended(source_name, outcome)
    assert log == ["returned, 0 running"], log
    # none of the first consumer's unfinished entries was acknowledged: a new one gets them
    unfinished = set(range(JOBS)) - set(first.completed)
    assert unfinished, "the test meant to cut some handlers short"
    await all_handled(store.streams(partitions), group, second, sorted(unfinished))
    # and what completed in the first was acknowledged by its stop: not run again
    assert not set(first.completed) & set(second.completed), (first.completed, second.completed)


# -- 2. partitions: consumers churning while keyed events are published ------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_churning_consumers_keep_per_key_order_and_lose_nothing(store: Store) -> None:
    """Consumers start and stop (drained) all the time while keyed events arrive: each event
    is handled, and per key the first handlings are in publish order."""
    group = f"{store.prefix}.ordered"
    partitions, keys, total = 4, 8, 240
    order: list[tuple[str, int]] = []
    handled: Counter[int] = Counter()

    async def work(job: Job) -> None:
        entry = current_entry()
        assert entry is not None
        await anyio.sleep(0.002 * (job.n % 3))
        order.append((entry.envelope.key or "", job.n))
        handled[job.n] += 1

    publisher = store.streams(partitions)

    async def publish() -> None:
        for n in range(total):
            await publisher.publish(Job(n), key=f"k{n % keys}")
            if n % 20 == 0:
                await anyio.sleep(0.05)

    async def one_consumer(lifetime: float) -> None:
        streams = store.streams(partitions)
        bus = worker_bus(streams, {group: work}, min_idle=10.0, block=0.05, drain_timeout=10.0)
        async with bus:
            await anyio.sleep(lifetime)

    async def churn(seed: int) -> None:
        while len(handled) < total:
            await one_consumer(0.1 + (seed % 3) * 0.15)
            seed += 1

    # Counts and order are the point, not asyncio's debug checks (PYTHONDEVMODE in CI), which
    # make every consumer's start and stop crawl on a busy machine.
    with _asyncio_debug_off():
        async with anyio.create_task_group() as group_of_tasks:
            group_of_tasks.start_soon(publish)
            for seed in range(3):
                group_of_tasks.start_soon(churn, seed)
            await until(lambda: len(handled) == total, lambda: f"{len(handled)} of {total}")
    assert set(handled) == set(range(total))
    assert [n for n, times in handled.items() if times > 1] == [], "drained, yet run again"
    for key in {k for k, _ in order}:
        firsts = list(dict.fromkeys(n for k, n in order if k == key))
        assert firsts == sorted(firsts), f"key {key}: handled in the order {firsts}"


# -- 3. bugs: order and poison ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Checked:
    """An event that validates itself the usual way: an assert in __post_init__."""

    __event_name__ = "attack-checked"

    n: int

    def __post_init__(self) -> None:
        assert self.n >= 0, "n must not be negative"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("partitions", [None, 2])
async def test_an_entry_whose_event_fails_its_own_checks_is_dead_not_fatal(
    store: Store, partitions: int | None
) -> None:
    """Another producer (an older version, a bug) wrote {"n": -1}: decoding it raises the
    class's own AssertionError. That entry must go to the dead letters with its reason; the
    consumer, the other entries and the owner of `async with bus:` carry on."""
    group = f"{store.prefix}.checked"
    streams = store.streams(partitions)
    handled: list[int] = []

    async def work(event: Checked) -> None:
        handled.append(event.n)

    bus = EventBus()
    bus.subscribe(Checked, work, name=group)
    consume(bus, Checked, streams=streams, min_idle=5.0, **FAST)
    await streams.publish(Checked(1), key="k")
    stream = streams.partition_streams(Checked)[zlib.crc32(b"k") % (partitions or 1)]
    poison = Envelope(id="poison", name="attack-checked", version=1, payload='{"n":-1}', key="k")
    await streams.transport.publish(stream, poison)
    await streams.publish(Checked(2), key="k")

    async with bus:  # an ExceptionGroup([AssertionError]) comes out of here
        await until(lambda: len(handled) == 2, lambda: f"handled {handled}")
        await until(lambda: streams.dead_letters(Checked), "the poison entry is dead")
    letters = await streams.dead_letters(Checked)
    assert [letter.envelope.id for letter in letters] == ["poison"]
    assert "n must not be negative" in letters[0].reason


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_stop_during_a_retry_backoff_does_not_run_the_keys_later_events_first(
    store: Store,
) -> None:
    """Partition 0 holds one key's events 0..4; event 0 fails and waits in its backoff when
    the consumer stops. The holder must not run 1..4 (and acknowledge them) before 0: the
    README says a failing entry holds its partition until it succeeds or is dead."""
    group = f"{store.prefix}.in-order"
    streams = store.streams(partitions=1)
    order: list[int] = []
    failed = anyio.Event()

    async def first(job: Job) -> None:
        if job.n == 0:
            failed.set()
            raise ConnectionError("not yet")
        order.append(job.n)

    async def second(job: Job) -> None:
        order.append(job.n)

    for n in range(5):
        await streams.publish(Job(n), key="k")
    # a backoff far longer than the test: the stop lands while entry 0 waits in it
    bus = worker_bus(streams, {group: first}, wait_initial=600.0, wait_max=600.0)
    async with bus:
        await failed.wait()
    bus = worker_bus(store.streams(partitions=1), {group: second})
    async with bus:
        await until(lambda: len(order) >= 5, lambda: f"handled {order}")
    assert order == [0, 1, 2, 3, 4]


class StalledRenewals(MemoryStreams):
    """MemoryStreams where the renewals of one consumer (`stalled`) no longer get through,
    as on a connection that stopped answering, while its reads and acknowledgements work."""

    stalled: str | None = None

    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        if owner == self.stalled:
            raise ConnectionError("the renewal did not get through")
        return await super().acquire_lease(name, owner, ttl)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_holder_that_cannot_renew_its_lease_stops_handling_the_partition() -> None:
    """Consumer a holds the only partition; its renewals stop getting through, so its lease
    runs out and b takes the partition. From then on a must start no entry of it: b handles
    the key, in order (a may finish the one entry it was running)."""
    transport = StalledRenewals()
    prefix = unique("p")
    group = f"{prefix}.leased"
    starts: list[tuple[str, int]] = []

    def handler(name: str) -> Callable[[Job], Awaitable[None]]:
        async def work(job: Job) -> None:
            starts.append((name, job.n))
            await anyio.sleep(0.05)

        return work

    def consumer_bus(name: str) -> tuple[EventBus, Any]:
        bus = EventBus()
        bus.subscribe(Job, handler(name), name=group)
        streams = Streams(transport, prefix=prefix, partitions=1)
        consumer = consume(bus, Job, streams=streams, min_idle=0.6, block=0.05, **FAST)
        return bus, consumer

    publisher = Streams(transport, prefix=prefix, partitions=1)
    a, a_consumer = consumer_bus("a")
    b, _ = consumer_bus("b")
    async with a:
        for n in range(40):
            await publisher.publish(Job(n), key="k")
        await until(lambda: starts, "a started")
        transport.stalled = a_consumer.name
        async with b:
            await until(lambda: ("b", 39) in starts, lambda: f"b has not handled all: {starts}")
    taken = starts.index(next(start for start in starts if start[0] == "b"))
    after = [n for name, n in starts[taken:] if name == "a"]
    assert len(after) <= 1, f"a went on handling the partition b held: {after}"


# -- 4. which handlers are fed ------------------------------------------------------------------


async def notify(channel: str, ledger: list[tuple[str, int]], job: Job) -> None:
    ledger.append((channel, job.n))


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_two_handlers_with_one_name_each_get_every_entry_or_are_refused(
    memory: Store,
) -> None:
    """Handlers made by one factory (partials, closures) share their default name, which the
    bus allows. Fed from streams, the name is the consumer group: two handlers in one group
    split the entries between them, each silently missing the other's share."""
    streams = memory.streams()
    got: list[tuple[str, int]] = []
    bus = EventBus()
    for channel in ("mail", "chat"):
        bus.subscribe(Job, functools.partial(notify, channel, got))
    try:
        consume(bus, Job, streams=streams, min_idle=5.0, **FAST)
        await publish_jobs(streams, range(6))
        async with bus:
            await until(lambda: len(got) >= 6, lambda: f"handled {got}")
            await anyio.sleep(0.2)  # the other handler's share, if it comes
    except ConfigurationError:
        return  # refused: fine too
    assert sorted(got) == sorted((c, n) for c in ("mail", "chat") for n in range(6)), got


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_batch_handler_of_a_consumed_type_is_fed_or_refused(
    memory: Store, caplog: pytest.LogCaptureFixture
) -> None:
    streams = memory.streams()
    batches: list[list[int]] = []

    async def per_job(job: Job) -> None:
        pass

    async def in_batches(jobs: Sequence[Job]) -> None:
        batches.append([job.n for job in jobs])

    bus = EventBus()
    bus.subscribe(Job, per_job, name=f"{memory.prefix}.one")
    bus.subscribe_batch(Job, in_batches, max_size=10, max_wait=0.05, name=f"{memory.prefix}.many")
    try:
        consume(bus, Job, streams=streams, min_idle=5.0, **FAST)
        await publish_jobs(streams, range(3))
        with caplog.at_level(logging.WARNING, logger="aioevents"):
            async with bus:
                await until(lambda: settled(streams), "the per-job group is done")
                await anyio.sleep(0.2)  # a batch, if one comes
    except ConfigurationError:
        return  # refused: fine too
    warned = any(f"{memory.prefix}.many" in record.getMessage() for record in caplog.records)
    assert batches or warned, "the batch handler was neither fed nor named in a warning"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_once_handler_fed_from_streams_runs_once_or_is_refused(memory: Store) -> None:
    streams = memory.streams()
    ran: list[int] = []

    async def first_only(job: Job) -> None:
        ran.append(job.n)

    bus = EventBus()
    bus.subscribe(Job, first_only, once=True, name=f"{memory.prefix}.once")
    try:
        consume(bus, Job, streams=streams, min_idle=5.0, **FAST)
        await publish_jobs(streams, range(3))
        async with bus:
            await until(lambda: settled(streams), "the group is done")
    except ConfigurationError:
        return
    assert len(ran) <= 1, f"a once=True handler ran for {ran}"


# -- 5. what handlers do ----------------------------------------------------------------------


@pytest.mark.parametrize(("anyio_backend", "partitions"), EVERY_BACKEND)
async def test_a_handlers_base_exception_reaches_the_owner_as_itself(
    anyio_backend: str, partitions: int | None, memory: Store
) -> None:
    """As for the bus's own background handlers (README: "A BaseException in a background
    handler ends the drain at once and is raised from the block"), not in nested groups."""
    group = f"{memory.prefix}.fatal"
    streams = memory.streams(partitions)
    ledger = Ledger()

    async def work(job: Job) -> None:
        ledger.start(job.n)
        try:
            if job.n == 3:
                raise Fatal
            await anyio.sleep(0.05)
        finally:
            ledger.end(job.n, completed=job.n != 3)

    await publish_jobs(streams, range(8))
    bus = worker_bus(streams, {group: work}, drain_timeout=5.0)
    with pytest.raises(BaseException) as raised:  # what it is, is the point
        with anyio.fail_after(DEADLINE):
            async with bus:
                # The consumer stops at once; the block raises it when it ends, as the bus
                # does with its background handlers' (it does not cancel its owner).
                await until(
                    lambda: ledger.started[3] and ledger.running == 0, "the consumer stopped"
                )
    assert ledger.running == 0
    # nothing that did not complete was acknowledged: 3 (and the others cut) run again
    await all_handled(memory.streams(partitions), group, Ledger(), [3])
    assert isinstance(raised.value, Fatal), repr(raised.value)


SCRIPT = """
import asyncio, sys
from dataclasses import dataclass
import anyio
import anyio.lowlevel
from aioevents import EventBus
from aioevents.streams import MemoryStreams, Streams, consume

@dataclass(frozen=True)
class Job:
    __event_name__ = "attack-job"
    n: int

async def main(kind):
    streams = Streams(MemoryStreams(), prefix="x")
    bus = EventBus()

    async def work(job):
        await anyio.sleep(0.01)
        raise KeyboardInterrupt if kind == "interrupt" else SystemExit(3)

    bus.subscribe(Job, work, name="work")
    consumer = consume(bus, Job, streams=streams)
    await streams.publish(Job(1))
    try:
        async with bus:
            with anyio.move_on_after(60):
                while consumer._fatal is None:  # stopped: raised when the block ends
                    await anyio.sleep(0.01)
    except BaseException as exc:
        print("the owner got", type(exc).__name__, flush=True)
        raise
    print("the owner returned", flush=True)

try:
    asyncio.run(main(sys.argv[1]))
except BaseException as exc:
    print("asyncio.run raised", type(exc).__name__, flush=True)
"""


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("kind", "name"), [("interrupt", "KeyboardInterrupt"), ("exit", "SystemExit")]
)
async def test_a_handlers_keyboard_interrupt_or_system_exit_reaches_the_owner(
    kind: str, name: str
) -> None:
    """In a process of its own: on asyncio these escape the event loop when a task raises
    them. The bus's own background handlers hand them to the owner of the block; so must
    the consumer."""
    result = await anyio.run_process(
        [sys.executable, "-c", SCRIPT, kind], check=False, cwd=PROJECT_ROOT
    )
    output = result.stdout.decode()
    assert f"the owner got {name}" in output, output + result.stderr.decode()[-2000:]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("partitions", [None, 2])
async def test_a_handler_that_cancels_itself_is_retried_then_dead_and_the_rest_flows(
    partitions: int | None, memory: Store
) -> None:
    group = f"{memory.prefix}.self-cancel"
    streams = memory.streams(partitions)
    done: Counter[int] = Counter()
    tries: Counter[int] = Counter()

    async def work(job: Job) -> None:
        tries[job.n] += 1
        if job.n == 2:
            with anyio.CancelScope() as scope:  # its own scope, cancelled and then left
                scope.cancel()
                await anyio.sleep(1)
            raise asyncio.CancelledError  # and then a cancellation nobody asked for
        done[job.n] += 1

    await publish_jobs(streams, range(6))
    bus = worker_bus(streams, {group: work}, max_deliveries=3)
    async with bus:
        await until(lambda: streams.dead_letters(Job), "job 2 is dead")
        await until(lambda: len(done) == 5, lambda: f"handled {sorted(done)}")
        await until(lambda: settled(streams), "the group is done")
    assert tries[2] == 3
    (letter,) = await streams.dead_letters(Job)
    assert "HandlerCancelledError" in letter.reason
    assert letter.deliveries == 3


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_handler_that_cancels_its_own_task_is_retried_then_dead(memory: Store) -> None:
    group = f"{memory.prefix}.task-cancel"
    streams = memory.streams(partitions=1)
    done: list[int] = []

    async def work(job: Job) -> None:
        if job.n == 0:
            task = asyncio.current_task()
            assert task is not None
            task.cancel()
            await asyncio.sleep(0)
        done.append(job.n)

    await publish_jobs(streams, range(4), keys=1)
    bus = worker_bus(streams, {group: work}, max_deliveries=2)
    async with bus:
        await until(lambda: done == [1, 2, 3], lambda: f"handled {done}")
        await until(lambda: settled(streams), "the group is done")
    assert [letter.envelope.key for letter in await streams.dead_letters(Job)] == ["k0"]


@pytest.mark.parametrize(("anyio_backend", "partitions"), EVERY_BACKEND)
async def test_sync_handlers_cut_by_a_zero_drain_are_waited_for_and_left_pending(
    anyio_backend: str, partitions: int | None, memory: Store
) -> None:
    """drain_timeout=0: nothing more runs after the block is left (threads included), and
    every job not completed is there for the next consumer."""
    group = f"{memory.prefix}.sync"
    streams = memory.streams(partitions)
    ledger = Ledger()
    started = threading.Event()

    def work(job: Job) -> None:
        ledger.start(job.n)
        started.set()
        time.sleep(0.2)
        ledger.end(job.n, completed=True)

    await publish_jobs(streams, range(6))
    bus = worker_bus(streams, {group: work}, drain_timeout=0)
    async with bus:
        await anyio.to_thread.run_sync(started.wait, DEADLINE)
    assert ledger.running == 0, "a sync handler's thread ran on after the block was left"
    # a thread that ran to its end may be acknowledged (trio) or run again (asyncio): both
    # keep the promise; one that did not run must run now
    unfinished = sorted(set(range(6)) - set(ledger.completed))
    await all_handled(memory.streams(partitions), group, Ledger(), unfinished)


@pytest.mark.parametrize(("anyio_backend", "partitions"), EVERY_BACKEND)
async def test_slow_async_handlers_cut_by_a_zero_drain_are_left_pending(
    anyio_backend: str, partitions: int | None, memory: Store
) -> None:
    group = f"{memory.prefix}.slow"
    streams = memory.streams(partitions)
    ledger = Ledger()

    async def work(job: Job) -> None:
        ledger.start(job.n)
        completed = False
        try:
            await anyio.sleep(BLOCK_FOREVER)
            completed = True
        finally:
            ledger.end(job.n, completed=completed)

    await publish_jobs(streams, range(6))
    bus = worker_bus(streams, {group: work}, drain_timeout=0)
    async with bus:
        await until(lambda: ledger.started, "a handler started")
    assert ledger.running == 0 and not ledger.completed
    await all_handled(memory.streams(partitions), group, Ledger(), range(6))


@pytest.mark.parametrize(("anyio_backend", "partitions"), EVERY_BACKEND)
async def test_a_handlers_timeout_fails_each_delivery_until_it_is_dead(
    anyio_backend: str, partitions: int | None, memory: Store
) -> None:
    group = f"{memory.prefix}.timed"
    streams = memory.streams(partitions)
    done: list[int] = []

    async def work(job: Job) -> None:
        if job.n == 1:
            await anyio.sleep(BLOCK_FOREVER)
        done.append(job.n)

    await publish_jobs(streams, range(4))
    bus = EventBus()
    bus.subscribe(Job, work, name=group, timeout=0.05)
    consume(bus, Job, streams=streams, min_idle=5.0, max_deliveries=2, **FAST)
    async with bus:
        await until(lambda: streams.dead_letters(Job), "job 1 is dead")
        await until(lambda: settled(streams), "the group is done")
    assert sorted(done) == [0, 2, 3]
    (letter,) = await streams.dead_letters(Job)
    assert letter.reason.startswith("TimeoutError") and letter.deliveries == 2


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("partitions", [None, 2])
async def test_a_stop_during_a_handlers_own_retry_wait_leaves_the_entry_pending(
    partitions: int | None, memory: Store
) -> None:
    """retry=Retry(...) retries inside one delivery; a stop cuts its wait at the drain
    timeout: not acknowledged, not dead, run by the next consumer."""
    group = f"{memory.prefix}.retrying"
    streams = memory.streams(partitions)
    attempts: Counter[int] = Counter()

    async def work(job: Job) -> None:
        attempts[job.n] += 1
        raise ConnectionError("the service is down")

    retry = Retry(on=ConnectionError, attempts=5, wait_initial=600, wait_max=600, wait_jitter=0)
    await publish_jobs(streams, [0])
    bus = EventBus()
    bus.subscribe(Job, work, name=group, retry=retry)
    consume(bus, Job, streams=streams, min_idle=5.0, drain_timeout=0.2, **FAST)
    async with bus:
        await until(lambda: attempts[0] >= 1, "the first attempt")
    assert attempts[0] == 1 and not await streams.dead_letters(Job)
    await all_handled(memory.streams(partitions), group, Ledger(), [0])


@pytest.mark.parametrize(("anyio_backend", "partitions"), EVERY_BACKEND)
async def test_a_stop_during_the_consumers_retry_backoff_returns_and_leaves_it_pending(
    anyio_backend: str, partitions: int | None, memory: Store
) -> None:
    """The consumer's own backoff (wait_initial) is not waited out by a stop."""
    group = f"{memory.prefix}.backoff"
    streams = memory.streams(partitions)
    failed = anyio.Event()

    async def work(job: Job) -> None:
        failed.set()
        raise ConnectionError("not yet")

    await publish_jobs(streams, [0])
    bus = worker_bus(streams, {group: work}, wait_initial=600.0, wait_max=600.0)
    with anyio.fail_after(DEADLINE):  # a stop that waited for the backoff would hang here
        async with bus:
            await failed.wait()
    assert not await streams.dead_letters(Job)
    await all_handled(memory.streams(partitions), group, Ledger(), [0])


# -- 6. Redis away, back, slow ------------------------------------------------------------------


@asynccontextmanager
async def own_redis_streams(server: RedisServer, **options: Any) -> AsyncIterator[Transport]:
    from aioevents.redis_streams import RedisStreams

    transport = RedisStreams(server.url, **options)
    try:
        yield transport
    finally:
        await transport.aclose()


async def publish_retrying(streams: Streams, numbers: Sequence[int]) -> None:
    """A producer that retries while Redis is away (as the outbox does)."""
    for n in numbers:
        with anyio.fail_after(DEADLINE):
            while True:
                try:
                    await streams.publish(Job(n), key=f"k{n % 4}", event_id=f"job-{n}")
                    break
                except OSError:
                    await anyio.sleep(0.05)


@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("partitions", [None, 2])
async def test_a_consumer_started_while_redis_is_down_and_redis_killed_mid_run_loses_nothing(
    redis_server: RedisServer, partitions: int | None
) -> None:
    """Down at the start (the consumer waits for it), then killed (kill -9) and restarted
    in the middle of the run: every job is handled, the group ends with nothing pending."""
    redis_server.kill()  # down before the consumer starts
    group = "attack.faults"
    handled: Counter[int] = Counter()

    async def work(job: Job) -> None:
        handled[job.n] += 1

    async with own_redis_streams(redis_server) as transport:
        streams = Streams(transport, prefix="attack", partitions=partitions)
        bus = worker_bus(streams, {group: work}, min_idle=1.0, block=0.1)
        async with bus:
            await anyio.sleep(0.3)  # its first calls fail: nobody is listening
            await redis_server.astart()
            await publish_retrying(streams, range(0, 30))
            await until(lambda: len(handled) >= 30, lambda: f"{len(handled)} of 30 handled")
            await anyio.to_thread.run_sync(redis_server.kill)
            await anyio.sleep(0.3)
            await redis_server.astart()
            await publish_retrying(streams, range(30, 60))
            await until(lambda: len(handled) == 60, lambda: f"{len(handled)} of 60 handled")
            await until(lambda: settled(streams), "every entry acknowledged")
    assert set(handled) == set(range(60))


@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("partitions", [None, 2])
async def test_a_stop_while_redis_is_down_returns_and_the_next_consumer_gets_the_rest(
    redis_server: RedisServer, partitions: int | None
) -> None:
    """Redis dies while handlers run; the owner leaves the block (its drain cuts them);
    once Redis is back a new consumer completes every job the first did not."""
    group = "attack.stop-down"
    first = Ledger()
    release = anyio.Event()

    async def work(job: Job) -> None:
        first.start(job.n)
        completed = False
        try:
            if job.n % 2:
                await release.wait()
            completed = True
        finally:
            first.end(job.n, completed=completed)

    async with own_redis_streams(redis_server) as transport:
        streams = Streams(transport, prefix="attack", partitions=partitions)
        await publish_jobs(streams, range(10))
        bus = worker_bus(streams, {group: work}, min_idle=1.0, block=0.1, drain_timeout=0.5)
        with anyio.fail_after(DEADLINE):
            async with bus:
                await until(lambda: first.started[1], "a blocking handler runs")
                await anyio.to_thread.run_sync(redis_server.kill)
                release.set()  # they complete, but nothing can be acknowledged now
        assert first.running == 0
    await redis_server.astart()
    second = Ledger()
    async with own_redis_streams(redis_server) as transport:
        streams = Streams(transport, prefix="attack", partitions=partitions)
        await all_handled(streams, group, second, [])
    # whatever the first did not complete ran in the second (none was acknowledged unrun)
    assert set(range(10)) - set(first.completed) <= set(second.completed)


@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("partitions", [None, 2])
async def test_a_handler_that_blocks_the_loop_past_min_idle_loses_nothing(
    shared_redis: Store, partitions: int | None
) -> None:
    """A slow, badly written handler (time.sleep in async def) stalls every renewal and
    keep-alive past min_idle; the consumer comes back and every job is handled."""
    group = f"{shared_redis.prefix}.blocking"
    handled: Counter[int] = Counter()

    async def work(job: Job) -> None:
        if job.n in (0, 5):
            time.sleep(0.8)  # noqa: ASYNC251  (the point: it blocks the event loop)
        handled[job.n] += 1

    streams = shared_redis.streams(partitions)
    await publish_jobs(streams, range(12))
    bus = worker_bus(streams, {group: work}, min_idle=0.5, block=0.1)
    async with bus:
        await until(lambda: len(handled) == 12, lambda: f"{len(handled)} of 12 handled")
        await until(lambda: settled(streams), "every entry acknowledged")
    assert set(handled) == set(range(12))


@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_leaving_the_block_while_redis_does_not_answer_is_bounded(
    redis_server: RedisServer,
) -> None:
    """Redis stops answering (SIGSTOP: connections open, no replies; a network partition
    looks the same) and the owner leaves the block under a deadline. With a client without a
    socket timeout (redis-py's default before 8.0), the stop's final writes wait for ever and
    no cancellation ends them. The owner must return while Redis is still silent."""
    from redis.asyncio import Redis

    from aioevents.redis_streams import RedisStreams

    client = Redis.from_url(redis_server.url, socket_timeout=None)
    streams = Streams(RedisStreams(client), prefix="attack")
    handled: list[int] = []

    async def work(job: Job) -> None:
        handled.append(job.n)

    await publish_jobs(streams, range(3))
    bus = worker_bus(streams, {"attack.silent": work}, min_idle=5.0, block=0.1, drain_timeout=1)
    returned = anyio.Event()

    async def owner() -> None:
        with anyio.move_on_after(BLOCK_FOREVER) as scope:
            async with bus:
                await until(lambda: len(handled) == 3, "handled")
                os.kill(redis_server.pid, signal.SIGSTOP)
                scope.deadline = anyio.current_time() + 0.5  # the owner's own deadline
                await anyio.sleep(BLOCK_FOREVER)
        returned.set()

    try:
        async with anyio.create_task_group() as group:
            group.start_soon(owner)
            with anyio.move_on_after(10):  # generous: the fix needs about drain_timeout
                await returned.wait()
            silent_returned = returned.is_set()
            os.kill(redis_server.pid, signal.SIGCONT)  # then it can end, whatever happens
    finally:
        if redis_server.running():
            os.kill(redis_server.pid, signal.SIGCONT)
        await client.aclose()
    assert silent_returned, "the owner was held while Redis did not answer"


# -- 7. a lease taken away ----------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_holder_whose_lease_was_taken_stops_and_the_key_stays_in_order(
    memory: Store,
) -> None:
    """While a holds the only partition, its lease goes to someone else (as when it ran out
    under a stalled holder). a's next renewal says so: a stops, the entry it ran stays
    pending, and once the lease is free again the partition goes on in order."""
    group = f"{memory.prefix}.taken"
    streams = memory.streams(partitions=1)
    transport = streams.transport
    lease = f"{streams.partition_streams(Job)[0]}:lease:{group}"
    firsts: list[int] = []
    handled: Counter[int] = Counter()

    async def work(job: Job) -> None:
        if not handled[job.n]:
            firsts.append(job.n)
        handled[job.n] += 1
        await anyio.sleep(0.01)

    bus = EventBus()
    bus.subscribe(Job, work, name=group)
    consumer = consume(bus, Job, streams=streams, min_idle=0.6, block=0.05, **FAST)
    await publish_jobs(streams, range(30), keys=1)
    async with bus:
        await until(lambda: len(handled) >= 5, "a few handled")
        await transport.release_lease(lease, consumer.name)
        assert await transport.acquire_lease(lease, "somebody-else", 1.0)
        await until(lambda: len(handled) == 30, lambda: f"{len(handled)} of 30 handled")
        await until(lambda: settled(streams), "every entry acknowledged")
    assert firsts == list(range(30))


# -- 8. bad input at the boundary ---------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_keys_that_are_not_text_are_refused_and_nothing_is_appended(store: Store) -> None:
    streams = store.streams(partitions=2)
    for key in (1, b"k", ("a",), 2.5):
        with pytest.raises(TypeError, match="key must be a str"):
            await streams.publish(Job(1), key=key)  # type: ignore[arg-type]
    assert await streams.groups(Job) == []
    for name in streams.partition_streams(Job):
        await streams.transport.create_group(name, "probe")
    entries = await streams.transport.read_new(
        streams.partition_streams(Job), "probe", "probe", count=10, block=0
    )
    assert entries == []


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_consume_refuses_what_is_not_an_event_class(memory: Store) -> None:
    streams = memory.streams()
    with pytest.raises(TypeError, match="consume\\(\\) takes event classes"):
        consume(EventBus(), Job(1), streams=streams)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="streams must be a Streams"):
        consume(EventBus(), Job, streams=memory.make())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="handlers takes an iterable"):
        consume(EventBus(), Job, streams=streams, handlers="work")


BAD_INPUT = [
    pytest.param("publish(EventClass)", id="publish-a-class"),
    pytest.param("Streams(codec=...)", id="streams-codec"),
    pytest.param("consume(handlers=[1])", id="consume-handler-names"),
]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("what", BAD_INPUT)
async def test_bad_input_is_refused_at_the_call_with_a_type_error_naming_it(
    what: str, memory: Store
) -> None:
    """As the README promises for the bus and its integrations: a wrong type is a TypeError
    at the call, saying what to fix."""
    streams = memory.streams()
    with pytest.raises(TypeError) as raised:
        if what == "publish(EventClass)":
            await streams.publish(Job)
        elif what == "Streams(codec=...)":
            Streams(memory.make(), codec="json")  # type: ignore[arg-type]
        else:
            consume(EventBus(), Job, streams=streams, handlers=[1])  # type: ignore[list-item]
    message = str(raised.value)
    assert any(word in message for word in ("class", "codec", "handler")), message


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_block_zero_is_refused_rather_than_spinning(store: Store) -> None:
    """consume(block=0) would make every reader of an empty stream a busy loop of reads
    (thousands of round trips a second to Redis, a core burnt): refused at the call."""
    with pytest.raises(ConfigurationError, match="block"):
        worker_bus(store.streams(), {f"{store.prefix}.idle": lambda job: None}, block=0)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("partitions", [None, 2])
async def test_entries_the_consumers_codec_cannot_decode_are_dead_at_once_and_the_rest_flows(
    store: Store, partitions: int | None
) -> None:
    group = f"{store.prefix}.decode"
    streams = store.streams(partitions)
    done: list[int] = []

    async def work(job: Job) -> None:
        done.append(job.n)

    strangers = [
        Envelope(id="unknown", name="attack-unknown", version=1, payload="{}", key="k0"),
        Envelope(id="newer", name="attack-job", version=9, payload='{"n":1}', key="k0"),
        Envelope(id="not-json", name="attack-job", version=1, payload="{n:", key="k0"),
        Envelope(id="wrong", name="attack-job", version=1, payload='{"n":"x"}', key="k0"),
    ]
    stream = streams.partition_streams(Job)[zlib.crc32(b"k0") % (partitions or 1)]
    await publish_jobs(streams, range(4), keys=1)
    for envelope in strangers:
        await streams.transport.publish(stream, envelope)
    await publish_jobs(streams, range(4, 8), keys=1)
    bus = worker_bus(streams, {group: work})
    async with bus:
        await until(lambda: len(done) == 8, lambda: f"handled {done}")
        await until(lambda: settled(streams), "every entry acknowledged")
    letters = await streams.dead_letters(Job)
    assert sorted(letter.envelope.id for letter in letters) == sorted(e.id for e in strangers)
    assert all(letter.reason.startswith("EventDecodeError") for letter in letters)
    assert all(letter.deliveries == 1 for letter in letters)
    if partitions is not None:
        assert done == list(range(8))  # one key: in order around the dead letters


@dataclass(frozen=True, slots=True)
class Bulky:
    __event_name__ = "attack-bulky"

    n: int
    body: str


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_huge_payloads_arrive_whole(store: Store) -> None:
    group = f"{store.prefix}.bulky"
    streams = store.streams()
    sizes: dict[int, int] = {}

    async def work(event: Bulky) -> None:
        sizes[event.n] = len(event.body)

    bus = EventBus()
    bus.subscribe(Bulky, work, name=group)
    consume(bus, Bulky, streams=streams, min_idle=30.0, **FAST)
    body = "é" * 4_000_000 + "\u2603"  # 8 MB of UTF-8, not ASCII
    for n in range(3):
        await streams.publish(Bulky(n, body))
    async with bus:
        await until(lambda: len(sizes) == 3, "the three arrived")
    assert sizes == {n: len(body) for n in range(3)}


# -- 9. a cancellation while the consumer starts ------------------------------------------------

START_SCRIPT = """
import sys
from dataclasses import dataclass
import anyio, anyio.lowlevel
from aioevents import EventBus
from aioevents.streams import MemoryStreams, Streams, consume

@dataclass(frozen=True)
class Job:
    __event_name__ = "attack-job"
    n: int

async def trial(steps, partitions):
    streams = Streams(MemoryStreams(), prefix="x", partitions=partitions)
    done = []
    bus = EventBus()

    async def work(job):
        done.append(job.n)

    bus.subscribe(Job, work, name="work")
    # an entry read by a cancelled start is reclaimed once idle this long
    consume(bus, Job, streams=streams, min_idle=0.5, wait_initial=0.01)
    await streams.publish(Job(0), key="k")
    scope = anyio.CancelScope()
    reached = []

    async def owner():
        try:
            with scope:
                async with bus:
                    await anyio.sleep(3600)
            reached.append("absorbed")
        except Exception as exc:
            reached.append(type(exc).__name__)

    with anyio.fail_after(30):
        async with anyio.create_task_group() as group:
            group.start_soon(owner)
            for _ in range(steps):
                await anyio.lowlevel.checkpoint()
            scope.cancel()
        async with bus:  # and it runs again
            while not done:
                await anyio.sleep(0.01)
    return reached[0]

backend, partitions = sys.argv[1], None if sys.argv[2] == "-" else int(sys.argv[2])
for steps in range(8):
    try:
        outcome = anyio.run(trial, steps, partitions, backend=backend)
    except BaseException as exc:
        outcome = "escaped " + type(exc).__name__
    print(steps, outcome, flush=True)
"""


@pytest.mark.parametrize(("anyio_backend", "partitions"), EVERY_BACKEND)
async def test_an_owner_cancelled_while_the_consumer_starts_gets_its_cancellation(
    anyio_backend: str, partitions: int | None
) -> None:
    """A startup under a deadline (a lifespan's timeout, a failing sibling) may be cancelled
    at any step of entering the block. Whatever the step, the owner gets its own
    cancellation (absorbed by its scope), nothing else, and the bus runs again afterwards.
    In a process of its own: what goes wrong corrupts the event loop's cancel scopes."""
    arguments = [anyio_backend, "-" if partitions is None else str(partitions)]
    result = await anyio.run_process(
        [sys.executable, "-c", START_SCRIPT, *arguments], check=False, cwd=PROJECT_ROOT
    )
    lines = result.stdout.decode().splitlines()
    assert lines == [f"{steps} absorbed" for steps in range(8)], (
        lines,
        result.stderr.decode()[-3000:],
    )
