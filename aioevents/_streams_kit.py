"""The conformance kit every stream transport runs: the same tests, whatever the engine.

Modelled on the pub/sub suite Go's Watermill runs for each of its brokers: a test module
subclasses `TransportConformance`, gives it a factory of fresh transports, and inherits every
test. The tests drive the whole stack (`Streams`, `consume`, buses and their handlers) over the
transport, and read the transport's own state (pending entries, lag, consumers, dead letters,
trims) to check what it promises in `aioevents._transport`::

    class TestMemoryStreams(TransportConformance):
        @pytest.fixture
        def transport_factory(self) -> TransportFactory:
            return lambda **options: MemoryStreams(**options)

The factory takes the transport's keyword options (the kit passes ``max_len`` only) and makes a
new transport each call; a test uses one (the cap's test a second, alone). Every test names its
streams with `stream_prefix`, unique per test: a transport on a shared server deletes the keys
under it after the test (the factory fixture can take ``stream_prefix`` and clean up after its
``yield``).

What the tests show (the numbers of issue 12's "must show" list):

1. publish/subscribe: 100 events whose key and headers arrive; 5,000 events over 50 consumers
   of one group, each handled once; 2 groups each get all 50 events.
2. retries: a handler failing twice then succeeding is delivered 3 times and acknowledged once;
   3 consumers failing every delivery (100 failures at least, each of them failing), then
   healthy: all 100 events handled once.
3. a consumer that died holding 10 entries: another takes them after ``min_idle``, and the dead
   one is removed from the group.
6. poison: after ``max_deliveries`` an entry is a dead letter with its reason and handler, and
   the rest flows on; an entry that cannot be decoded is a dead letter at once.
7. retention: what a slow group still needs is never trimmed (by `Transport.trim` nor by the
   consumers' own trimming); a stream every group keeps up with stays under a bound; the cap
   removes the oldest entries and says how many.
8. per-key order with partitions: 1,000 events over 16 keys, 4 consumers, one killed half way:
   per key, handled in publish order (a redelivery repeats an event right after itself).

Also: a stop drains (in-flight handlers finish and are acknowledged, nothing is redelivered);
one cut short by the drain timeout is left pending for another consumer; lag and pending read
from `Consumer.groups` and `Streams.groups`.

How a consumer is killed in one process: its `Streams` goes through `Switchable`, a transport
that forwards every call to the real one until it is cut, and then raises `ConnectionError` on
every call, as a process that lost its network or was frozen would look from the engine's side;
its handlers, from then on, block without recording anything (a dead process does nothing more).
Its leases and heartbeats then run out, and its pending entries are taken by the others.

Time: the tests wait for states, never for durations; each wait has a generous deadline that only
a hang reaches. ``min_idle`` is short where reclaiming is what is tested and long everywhere else,
so that a loaded machine's stalls cannot make a live consumer's entries look abandoned.

The kit needs pytest and anyio's pytest plugin (anyio is aioevents' own dependency); it runs on
asyncio (`anyio_backend`). Import it from tests only: ``aioevents.testing.TransportConformance``.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import anyio
import pytest

from ._bus import EventBus
from ._streams import Consumer, Streams, consume, current_entry
from ._transport import DeadLetter, Entry, Envelope, GroupInfo, Transport, Trimmed

__all__ = [
    "Happened",
    "Stepped",
    "StreamsFactory",
    "Switchable",
    "TransportConformance",
    "TransportFactory",
]

DEADLINE = 60.0  # seconds a wait may take before the test fails: only a hang gets there
POLL = 0.01  # seconds between looks at a state being waited for
QUIET_MIN_IDLE = 30.0  # min_idle where nothing is to be reclaimed: never reached in a test
FAST_RETRIES: Mapping[str, float] = {"wait_initial": 0.01, "wait_max": 0.05, "wait_jitter": 0.0}


# -- events -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class Happened:
    """An event without order: ``number`` tells the test which one it is."""

    __event_name__ = "aioevents-kit.happened"

    number: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Stepped:
    """Step ``n`` of ``key``: published in ``n`` order per key."""

    __event_name__ = "aioevents-kit.stepped"

    key: str
    n: int


class FailedOnPurpose(Exception):
    """A handler's failure the test asked for."""


# -- the factories a test module gives ------------------------------------------------------------


class TransportFactory(Protocol):
    """Makes a new transport; ``options`` are the transport's keyword arguments (``max_len``)."""

    def __call__(self, **options: Any) -> Transport: ...


class StreamsFactory(Protocol):
    """Makes a `Streams` with the test's prefix, over the test's transport or ``transport``."""

    def __call__(
        self, *, partitions: int | None = None, transport: Transport | None = None
    ) -> Streams: ...


# -- a transport that can be cut, and watched -----------------------------------------------------


class Switchable(Transport):
    """Forwards every call to ``inner``; once `cut`, raises `ConnectionError` instead.

    It also counts what went through it: acknowledged ids, and each trim's result.
    """

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.max_len = inner.max_len
        self.cut = False
        self.acked: Counter[tuple[str, str]] = Counter()
        self.trims: list[Trimmed] = []

    def __repr__(self) -> str:
        return f"Switchable({self.inner!r}, cut={self.cut})"

    def _reach(self) -> Transport:
        if self.cut:
            raise ConnectionError("the conformance kit cut this consumer off (killed)")
        return self.inner

    async def publish(self, stream: str, envelope: Envelope) -> str:
        return await self._reach().publish(stream, envelope)

    async def create_group(self, stream: str, group: str) -> None:
        await self._reach().create_group(stream, group)

    async def read_new(
        self, streams: Sequence[str], group: str, consumer: str, *, count: int, block: float
    ) -> list[Entry]:
        return await self._reach().read_new(streams, group, consumer, count=count, block=block)

    async def read_pending(
        self, stream: str, group: str, consumer: str, *, count: int
    ) -> list[Entry]:
        return await self._reach().read_pending(stream, group, consumer, count=count)

    async def claim_idle(
        self, stream: str, group: str, consumer: str, *, min_idle: float, count: int
    ) -> tuple[list[Entry], list[str]]:
        return await self._reach().claim_idle(
            stream, group, consumer, min_idle=min_idle, count=count
        )

    async def keep(self, stream: str, group: str, consumer: str, ids: Sequence[str]) -> list[str]:
        return await self._reach().keep(stream, group, consumer, ids)

    async def redeliver(self, stream: str, group: str, consumer: str, entry_id: str) -> int:
        return await self._reach().redeliver(stream, group, consumer, entry_id)

    async def ack(self, stream: str, group: str, ids: Sequence[str]) -> None:
        await self._reach().ack(stream, group, ids)
        self.acked.update((group, entry_id) for entry_id in ids)

    async def dead_letter(self, entry: Entry, group: str, *, dead_stream: str, reason: str) -> None:
        await self._reach().dead_letter(entry, group, dead_stream=dead_stream, reason=reason)

    async def dead_letters(self, dead_stream: str, *, count: int = 100) -> list[DeadLetter]:
        return await self._reach().dead_letters(dead_stream, count=count)

    async def redrive(self, dead_stream: str, ids: Sequence[str]) -> int:
        return await self._reach().redrive(dead_stream, ids)

    async def remove_dead_letters(self, dead_stream: str, ids: Sequence[str]) -> int:
        return await self._reach().remove_dead_letters(dead_stream, ids)

    async def remove_idle_consumers(
        self, stream: str, group: str, *, idle: float, keep: str
    ) -> list[str]:
        return await self._reach().remove_idle_consumers(stream, group, idle=idle, keep=keep)

    async def remove_consumer(self, stream: str, group: str, consumer: str) -> bool:
        return await self._reach().remove_consumer(stream, group, consumer)

    async def trim(self, stream: str) -> Trimmed:
        trimmed = await self._reach().trim(stream)
        self.trims.append(trimmed)
        return trimmed

    async def groups(self, stream: str) -> list[GroupInfo]:
        return await self._reach().groups(stream)

    async def acquire_lease(self, name: str, owner: str, ttl: float) -> bool:
        return await self._reach().acquire_lease(name, owner, ttl)

    async def release_lease(self, name: str, owner: str) -> None:
        await self._reach().release_lease(name, owner)

    async def heartbeat(self, group: str, consumer: str, ttl: float) -> list[str]:
        return await self._reach().heartbeat(group, consumer, ttl)

    async def leave(self, group: str, consumer: str) -> None:
        await self._reach().leave(group, consumer)

    def id_key(self, entry_id: str) -> tuple[int, int]:  # type: ignore[override]
        return self.inner.id_key(entry_id)


# -- helpers --------------------------------------------------------------------------------------

Handler = Callable[[Any], Awaitable[None]]


def running_entry() -> Entry:
    """The entry the calling handler runs for; a handler fed by `consume` always has one."""
    entry = current_entry()
    if entry is None:
        raise AssertionError("current_entry() is None inside a handler fed by consume()")
    return entry


def consumer_bus(
    streams: Streams, event_type: type, handlers: Mapping[str, Handler], **options: Any
) -> tuple[EventBus, Consumer]:
    """A bus with ``handlers`` (name -> handler) of ``event_type``, fed from ``streams``."""
    bus = EventBus()
    for name, handler in handlers.items():
        bus.subscribe(event_type, handler, name=name)
    settings: dict[str, Any] = {"min_idle": QUIET_MIN_IDLE, **FAST_RETRIES, **options}
    return bus, consume(bus, event_type, streams=streams, **settings)


@contextmanager
def _asyncio_debug_off() -> Iterator[None]:
    """Counts are the point of the heavy tests, not asyncio's debug checks (PYTHONDEVMODE in
    CI): those record a stack for every callback, and 50 consumers crawl on a busy machine."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:  # not asyncio (trio): nothing to switch off
        yield
        return
    debug = loop.get_debug()
    loop.set_debug(False)
    try:
        yield
    finally:
        loop.set_debug(debug)


async def until(check: Callable[[], object], what: str | Callable[[], object]) -> None:
    """Wait until ``check()`` (a value or an awaitable one) is true; fail after `DEADLINE`."""
    with anyio.move_on_after(DEADLINE):
        while True:
            value = check()
            if inspect.isawaitable(value):
                value = await value
            if value:
                return
            await anyio.sleep(POLL)
    pytest.fail(f"not within {DEADLINE:.0f}s: {what() if callable(what) else what}")


async def settled(streams: Streams, *event_types: type) -> bool:
    """Every group of the types' streams has handled all: nothing pending, nothing to read."""
    infos = await streams.groups(*event_types)
    return bool(infos) and all(info.pending == 0 and info.lag == 0 for info in infos)


async def _dead_count(streams: Streams, count: int) -> bool:
    return len(await streams.dead_letters(Happened)) == count


async def nothing_left(transport: Transport, streams: Sequence[str], group: str) -> None:
    """Assert the group holds nothing to deliver again: nothing pending, nothing new.

    A probe consumer claims whatever is pending (however briefly idle) and reads what is new.
    """
    probe = "aioevents-kit-probe"
    for stream in streams:
        claimed, gone = await transport.claim_idle(stream, group, probe, min_idle=0, count=1000)
        assert (claimed, gone) == ([], []), f"{group} still had pending entries in {stream}"
    fresh = await transport.read_new(list(streams), group, probe, count=1000, block=0)
    assert fresh == [], f"{group} still had undelivered entries"


async def publish_numbers(streams: Streams, numbers: Sequence[int], *, tasks: int = 10) -> None:
    """Publish `Happened` events with these numbers from ``tasks`` concurrent publishers."""

    async def publish(share: Sequence[int]) -> None:
        for number in share:
            await streams.publish(Happened(number=number))

    async with anyio.create_task_group() as group:
        for index in range(tasks):
            group.start_soon(publish, numbers[index::tasks])


def _marks() -> list[pytest.MarkDecorator]:
    marks = [pytest.mark.anyio]
    if importlib.util.find_spec("pytest_timeout") is not None:
        # Above the waits' own deadline, so that a hang fails with what was being waited for.
        marks.append(pytest.mark.timeout(5 * DEADLINE))
    return marks


# -- the kit --------------------------------------------------------------------------------------


class TransportConformance:
    """The tests every `Transport` passes; subclass it and override `transport_factory`.

    Class attributes a transport may change: ``min_idle`` (reclaiming), ``order_min_idle``
    (partition leases), ``trim_slack`` (entries an approximate trim may keep beyond what every
    group acknowledged), ``many_consumers`` and ``many_events`` (the load test).
    """

    pytestmark: ClassVar[list[pytest.MarkDecorator]] = _marks()

    #: min_idle where reclaiming is tested: short, for a quick suite.
    min_idle: ClassVar[float] = 0.5
    #: min_idle (the leases' time) of the per-key order test: long enough that a live holder
    #: renews its leases in time on a loaded machine (a lease that runs out under a live
    #: holder is a stall, which the order test is not about).
    order_min_idle: ClassVar[float] = 2.0
    trim_slack: ClassVar[int] = 0
    many_consumers: ClassVar[int] = 50
    many_events: ClassVar[int] = 5_000

    # -- fixtures ---------------------------------------------------------------------------------

    @pytest.fixture
    def anyio_backend(self) -> str:
        """asyncio: transports talk to servers through asyncio clients."""
        return "asyncio"

    @pytest.fixture
    def transport_factory(self) -> TransportFactory:
        """Override: a factory of new transports (see the module's doc)."""
        raise NotImplementedError(f"{type(self).__name__} must override transport_factory")

    @pytest.fixture
    def stream_prefix(self) -> str:
        """The test's own stream prefix: every key it makes starts with it."""
        return f"aioevents-kit-{secrets.token_hex(6)}"

    @pytest.fixture
    async def transport(self, transport_factory: TransportFactory) -> AsyncIterator[Transport]:
        """The test's transport, closed afterwards."""
        transport = transport_factory()
        try:
            yield transport
        finally:
            await transport.aclose()

    @pytest.fixture
    def make_streams(self, transport: Transport, stream_prefix: str) -> StreamsFactory:
        """`Streams` over the test's transport (or another given), with the test's prefix."""
        default = transport

        def make(*, partitions: int | None = None, transport: Transport | None = None) -> Streams:
            over = default if transport is None else transport
            return Streams(over, prefix=stream_prefix, partitions=partitions)

        return make

    # -- 1. publish and subscribe -----------------------------------------------------------------

    async def test_publish_subscribe_keys_and_headers_arrive(
        self, make_streams: StreamsFactory
    ) -> None:
        streams = make_streams()
        seen: list[tuple[Happened, Entry]] = []

        async def record(event: Happened) -> None:
            seen.append((event, running_entry()))

        bus, _ = consumer_bus(make_streams(), Happened, {"kit.record": record})
        sent: dict[int, tuple[str, str]] = {}  # number -> entry id, event id
        async with bus:
            for number in range(100):
                event_id = f"kit-event-{number}-{secrets.token_hex(4)}"
                entry_id = await streams.publish(
                    Happened(number=number),
                    key=f"key-{number % 7}",
                    headers={"trace": f"trace-{number}", "tenant": "kit"},
                    event_id=event_id,
                )
                sent[number] = entry_id, event_id
            await until(lambda: len(seen) >= 100, lambda: f"{len(seen)} of 100 handled")
            await until(lambda: settled(streams, Happened), "the group acknowledged everything")

        assert sorted(event.number for event, _ in seen) == list(range(100))
        for event, entry in seen:
            assert (entry.id, entry.envelope.id) == sent[event.number]
            assert entry.stream == streams.stream(Happened)
            assert entry.deliveries == 1
            assert entry.envelope.name == "aioevents-kit.happened"
            assert entry.envelope.version == 1
            assert entry.envelope.key == f"key-{event.number % 7}"
            assert dict(entry.envelope.headers) == {
                "trace": f"trace-{event.number}",
                "tenant": "kit",
            }
        assert current_entry() is None

    async def test_a_group_gets_what_was_published_before_it_existed(
        self, make_streams: StreamsFactory
    ) -> None:
        streams = make_streams()
        await publish_numbers(streams, range(20))
        handled: Counter[int] = Counter()

        async def count(event: Happened) -> None:
            handled[event.number] += 1

        bus, _ = consumer_bus(make_streams(), Happened, {"kit.late": count})
        async with bus:
            await until(lambda: len(handled) == 20, lambda: f"{len(handled)} of 20 handled")
            await until(lambda: settled(streams, Happened), "the group acknowledged everything")
        assert handled == Counter(range(20))

    async def test_many_consumers_of_one_group_handle_each_event_once(
        self, make_streams: StreamsFactory
    ) -> None:
        streams = make_streams()
        total = self.many_events
        handled: Counter[int] = Counter()
        by_consumer: Counter[int] = Counter()

        def counting(index: int) -> Handler:
            async def count(event: Happened) -> None:
                handled[event.number] += 1
                by_consumer[index] += 1

            return count

        running: list[EventBus] = []
        stop = anyio.Event()

        async def run(bus: EventBus) -> None:
            async with bus:
                running.append(bus)
                await stop.wait()

        # Each bus in a task of its own, all stopped at once (Watermill's TestConcurrentClose).
        with _asyncio_debug_off():
            async with anyio.create_task_group() as buses:
                for index in range(self.many_consumers):
                    # 50 consumers are the point, not 800 handler slots: a few each.
                    bus, _ = consumer_bus(
                        make_streams(),
                        Happened,
                        {"kit.count": counting(index)},
                        concurrency=2,
                        batch_size=10,
                    )
                    buses.start_soon(run, bus)
                await until(lambda: len(running) == self.many_consumers, "every consumer started")
                await publish_numbers(streams, range(total), tasks=20)
                await until(lambda: len(handled) == total, lambda: f"{len(handled)} of {total}")
                await until(lambda: settled(streams, Happened), "the group acknowledged all")
                stop.set()

        assert not any(bus.running for bus in running)
        duplicates = {number: n for number, n in handled.items() if n != 1}
        assert not duplicates, f"handled more than once: {duplicates}"
        assert sorted(handled) == list(range(total))
        print(f"{len(by_consumer)} of {self.many_consumers} consumers handled events")
        infos = await streams.groups(Happened)
        assert [(i.group, i.pending, i.lag, i.consumers) for i in infos] == [("kit.count", 0, 0, 0)]

    async def test_each_group_gets_every_event(self, make_streams: StreamsFactory) -> None:
        streams = make_streams()
        handled: dict[str, Counter[int]] = {"kit.first": Counter(), "kit.second": Counter()}

        from_streams: set[str] = set()

        def counting(group: str) -> Handler:
            async def count(event: Happened) -> None:
                from_streams.add(running_entry().stream)
                handled[group][event.number] += 1

            return count

        bus, consumer = consumer_bus(
            make_streams(), Happened, {group: counting(group) for group in handled}
        )
        async with bus:
            await publish_numbers(streams, range(50))
            await until(
                lambda: all(len(counts) == 50 for counts in handled.values()),
                lambda: {group: len(counts) for group, counts in handled.items()},
            )
            await until(lambda: settled(streams, Happened), "both groups acknowledged all")
            infos = await consumer.groups()
        assert handled == {group: Counter(range(50)) for group in handled}
        assert from_streams == {streams.stream(Happened)}
        assert sorted((info.group, info.pending, info.lag) for info in infos) == [
            ("kit.first", 0, 0),
            ("kit.second", 0, 0),
        ]

    # -- 2. failures and retries ------------------------------------------------------------------

    @pytest.mark.parametrize("partitions", [None, 4])
    async def test_a_handler_failing_twice_is_delivered_three_times_and_acked_once(
        self, make_streams: StreamsFactory, transport: Transport, partitions: int | None
    ) -> None:
        streams = make_streams(partitions=partitions)
        watched = Switchable(transport)
        deliveries: list[int] = []

        async def flaky(event: Happened) -> None:
            entry = running_entry()
            deliveries.append(entry.deliveries)
            if entry.deliveries < 3:
                raise FailedOnPurpose(f"delivery {entry.deliveries}")

        bus, _ = consumer_bus(
            make_streams(partitions=partitions, transport=watched),
            Happened,
            {"kit.flaky": flaky},
            max_deliveries=5,
        )
        async with bus:
            entry_id = await streams.publish(Happened(number=1))
            await until(lambda: len(deliveries) >= 3, lambda: f"deliveries {deliveries}")
            await until(lambda: settled(streams, Happened), "the entry was acknowledged")

        assert deliveries == [1, 2, 3]
        assert watched.acked == Counter({("kit.flaky", entry_id): 1})
        assert await streams.dead_letters(Happened) == []
        await nothing_left(transport, streams.partition_streams(Happened), "kit.flaky")

    async def test_consumers_failing_every_event_then_healthy_deliver_all(
        self, make_streams: StreamsFactory
    ) -> None:
        # Watermill's TestNoAck/TestResendOnError: nothing is lost while every consumer fails.
        # Each consumer holds at most concurrency + batch_size = 20 entries: of the 100, every
        # one of the three gets some, and fails them, over and over, until each of them failed
        # at least once and 100 deliveries failed in all. Then all is well.
        streams = make_streams()
        failures: Counter[int] = Counter()  # consumer -> deliveries it failed
        failed: set[int] = set()  # the events that failed at least once
        succeeded: dict[int, list[int]] = {}  # number -> deliveries at which it succeeded
        healthy = False

        def handler(index: int) -> Handler:
            async def handle(event: Happened) -> None:
                nonlocal healthy
                if not healthy:
                    failures[index] += 1
                    failed.add(event.number)
                    healthy = len(failures) == 3 and failures.total() >= 100
                    raise FailedOnPurpose(f"not healthy yet ({event.number})")
                succeeded.setdefault(event.number, []).append(running_entry().deliveries)

            return handle

        async with AsyncExitStack() as stack:
            for index in range(3):
                bus, _ = consumer_bus(
                    make_streams(),
                    Happened,
                    {"kit.nack": handler(index)},
                    concurrency=10,
                    batch_size=10,
                    max_deliveries=1_000_000,
                )
                await stack.enter_async_context(bus)
            await publish_numbers(streams, range(100))
            await until(lambda: len(succeeded) == 100, lambda: f"{len(succeeded)} of 100")
            await until(lambda: settled(streams, Happened), "the group acknowledged all")

        assert sorted(succeeded) == list(range(100))
        assert all(len(deliveries) == 1 for deliveries in succeeded.values()), succeeded
        assert set(failures) == {0, 1, 2} and failures.total() >= 100
        # What failed succeeded later, as a redelivery.
        assert all(succeeded[number][0] >= 2 for number in failed)
        assert await streams.dead_letters(Happened) == []

    # -- 3. a dead consumer's entries -------------------------------------------------------------

    async def test_a_dead_consumers_pending_entries_are_taken_and_it_is_removed(
        self, make_streams: StreamsFactory, transport: Transport
    ) -> None:
        streams = make_streams()
        stream, group = streams.stream(Happened), "kit.reclaim"
        await transport.create_group(stream, group)
        await publish_numbers(streams, range(10), tasks=1)
        # A consumer reads 10 entries and dies before acknowledging any.
        taken = await transport.read_new([stream], group, "kit-dead-consumer", count=10, block=0)
        assert len(taken) == 10
        assert [(i.consumers, i.pending) for i in await transport.groups(stream)] == [(1, 10)]
        seen: list[tuple[int, int]] = []

        async def record(event: Happened) -> None:
            seen.append((event.number, running_entry().deliveries))

        bus, consumer = consumer_bus(
            make_streams(), Happened, {group: record}, min_idle=self.min_idle
        )
        async with bus:
            await until(lambda: len(seen) >= 10, lambda: f"{len(seen)} of 10 taken over")
            await until(lambda: settled(streams, Happened), "the taken entries were acked")

            async def only_the_live_one() -> bool:
                infos = await consumer.groups()
                return [info.consumers for info in infos] == [1]

            # The live consumer is in the group (it read): one consumer left is the live one.
            await until(only_the_live_one, "the dead consumer removed from the group")
            assert not await transport.remove_consumer(stream, group, "kit-dead-consumer")

        assert sorted(seen) == [(number, 2) for number in range(10)]
        assert [(i.consumers, i.pending) for i in await transport.groups(stream)] == [(0, 0)]

    async def test_a_consumer_reads_its_own_pending_entries_again(
        self, make_streams: StreamsFactory, transport: Transport
    ) -> None:
        # A consumer back under its name (a restart that kept it) gets what it held, counted.
        streams = make_streams()
        stream, group = streams.stream(Happened), "kit.own-pending"
        await transport.create_group(stream, group)
        await publish_numbers(streams, range(4), tasks=1)
        mine = await transport.read_new([stream], group, "kit-me", count=3, block=0)
        await transport.read_new([stream], group, "kit-other", count=1, block=0)
        await transport.ack(stream, group, [mine[0].id])
        again = await transport.read_pending(stream, group, "kit-me", count=10)
        assert [entry.id for entry in again] == [entry.id for entry in mine[1:]]
        assert [entry.deliveries for entry in again] == [2, 2]
        assert [entry.envelope for entry in again] == [entry.envelope for entry in mine[1:]]
        [first] = await transport.read_pending(stream, group, "kit-me", count=1)
        assert (first.id, first.deliveries) == (again[0].id, 3)

    # -- 6. poison --------------------------------------------------------------------------------

    @pytest.mark.parametrize("partitions", [None, 4])
    async def test_a_poison_entry_becomes_a_dead_letter_and_the_rest_flows(
        self, make_streams: StreamsFactory, partitions: int | None
    ) -> None:
        streams = make_streams(partitions=partitions)
        attempts: list[int] = []
        handled: list[int] = []

        async def picky(event: Happened) -> None:
            if event.number == 7:
                attempts.append(running_entry().deliveries)
                raise FailedOnPurpose("seven is poison")
            handled.append(event.number)

        bus, _ = consumer_bus(
            make_streams(partitions=partitions),
            Happened,
            {"kit.picky": picky},
            max_deliveries=3,
        )
        ids: dict[int, tuple[str, str]] = {}  # number -> entry id, event id
        async with bus:
            for number in range(20):
                event_id = f"kit-{number}-{secrets.token_hex(4)}"
                # Two keys: with partitions, the steps after seven on its key wait for it.
                key = f"key-{number % 2}"
                entry_id = await streams.publish(
                    Happened(number=number), key=key, event_id=event_id
                )
                ids[number] = entry_id, event_id
            await until(lambda: len(handled) == 19, lambda: f"handled {sorted(handled)}")
            await until(lambda: settled(streams, Happened), "the group acknowledged all")

        assert sorted(handled) == [n for n in range(20) if n != 7]
        if partitions is not None:  # in order per key, seven left out
            for parity in (0, 1):
                assert [n for n in handled if n % 2 == parity] == [
                    n for n in range(20) if n % 2 == parity and n != 7
                ]
        assert attempts == [1, 2, 3]
        [letter] = await streams.dead_letters(Happened)
        assert letter.stream in streams.partition_streams(Happened)
        assert (letter.entry_id, letter.envelope.id) == ids[7]
        assert (letter.group, letter.deliveries) == ("kit.picky", 3)
        assert "FailedOnPurpose" in letter.reason and "seven is poison" in letter.reason
        assert letter.envelope.name == "aioevents-kit.happened"
        assert letter.envelope.key == "key-1"
        assert streams.codec.decode(
            letter.envelope.name, letter.envelope.version, letter.envelope.payload
        ) == Happened(number=7)

    async def test_an_undecodable_entry_is_a_dead_letter_at_once(
        self, make_streams: StreamsFactory, transport: Transport
    ) -> None:
        streams = make_streams()
        stream = streams.stream(Happened)
        handled: list[int] = []

        async def record(event: Happened) -> None:
            handled.append(event.number)

        bus, _ = consumer_bus(make_streams(), Happened, {"kit.decode": record})
        stranger = Envelope(
            id="kit-stranger", name="aioevents-kit.unheard-of", version=1, payload="{}"
        )
        garbled = Envelope(id="kit-garbled", name="aioevents-kit.happened", version=1, payload="{")
        async with bus:
            await streams.publish(Happened(number=1))
            stranger_id = await transport.publish(stream, stranger)
            garbled_id = await transport.publish(stream, garbled)
            await streams.publish(Happened(number=2))
            await until(lambda: len(handled) == 2, lambda: f"handled {handled}")
            await until(lambda: settled(streams, Happened), "the group acknowledged all")

        assert sorted(handled) == [1, 2]
        letters = sorted(
            await streams.dead_letters(Happened), key=lambda x: transport.id_key(x.entry_id)
        )
        assert {x.stream for x in letters} == {stream}
        assert [(x.entry_id, x.envelope, x.deliveries, x.group) for x in letters] == [
            (stranger_id, stranger, 1, "kit.decode"),
            (garbled_id, garbled, 1, "kit.decode"),
        ]
        assert all("EventDecodeError" in letter.reason for letter in letters)
        assert "aioevents-kit.unheard-of" in letters[0].reason

    async def test_dead_letters_are_retried_once_or_discarded(
        self, make_streams: StreamsFactory
    ) -> None:
        """An operator's retry publishes a dead letter again (once, however often it is sent)
        and takes it off the dead-letter stream; a discard only takes it off."""
        streams = make_streams()
        healthy = False
        handled: list[tuple[int, str]] = []

        async def flaky(event: Happened) -> None:
            if not healthy:
                raise FailedOnPurpose("not yet")
            handled.append((event.number, running_entry().envelope.id))

        bus, _ = consumer_bus(make_streams(), Happened, {"kit.flaky": flaky}, max_deliveries=1)
        async with bus:
            for number in range(3):
                await streams.publish(Happened(number=number), event_id=f"kit-redrive-{number}")
            await until(lambda: _dead_count(streams, 3), "three dead letters")
            letters = sorted(await streams.dead_letters(Happened), key=lambda x: x.envelope.payload)
            healthy = True
            retried = [letters[0].id, letters[1].id]
            assert await streams.retry_dead_letters(Happened, [*retried, retried[0]]) == 2
            assert await streams.retry_dead_letters(Happened, retried) == 0
            await until(lambda: len(handled) == 2, lambda: f"handled {handled}")
            assert await streams.discard_dead_letters(Happened, [letters[2].id]) == 1
            assert await streams.discard_dead_letters(Happened, [letters[2].id]) == 0
            await until(lambda: settled(streams, Happened), "the group acknowledged all")
        assert sorted(handled) == [(0, "kit-redrive-0"), (1, "kit-redrive-1")]
        assert await streams.dead_letters(Happened) == []

    # -- 7. retention -----------------------------------------------------------------------------

    async def test_what_a_slow_group_needs_is_never_trimmed(
        self, make_streams: StreamsFactory, transport: Transport
    ) -> None:
        streams = make_streams()
        stream = streams.stream(Happened)
        watched = Switchable(transport)
        fast: Counter[int] = Counter()
        slow: Counter[int] = Counter()
        slow_started: list[int] = []
        gate = anyio.Event()

        async def quick(event: Happened) -> None:
            fast[event.number] += 1

        async def sluggish(event: Happened) -> None:
            slow_started.append(event.number)
            await gate.wait()
            slow[event.number] += 1

        fast_bus, _ = consumer_bus(make_streams(transport=watched), Happened, {"kit.fast": quick})
        # It holds at most concurrency + batch_size = 3: 2 running, 1 read ahead, 27 unread.
        slow_bus, _ = consumer_bus(
            make_streams(transport=watched),
            Happened,
            {"kit.slow": sluggish},
            concurrency=2,
            batch_size=1,
        )
        async with fast_bus, slow_bus:
            await publish_numbers(streams, range(30), tasks=1)
            await until(lambda: len(fast) == 30, lambda: f"fast handled {len(fast)} of 30")
            await until(lambda: len(slow_started) == 2, "the slow group has two in hand")

            async def fast_done() -> bool:
                infos = {info.group: info for info in await streams.groups(Happened)}
                return (infos["kit.fast"].pending, infos["kit.fast"].lag) == (0, 0)

            await until(fast_done, "the fast group acknowledged all")
            # The slow group has 2 pending and 28 it has not read: a trim keeps all 30.
            trimmed = await transport.trim(stream)
            assert (trimmed.removed, trimmed.capped, trimmed.length) == (0, 0, 30)
            # And so do the consumers' own trims: wait for one that starts after now.
            trims_before = len(watched.trims)
            await until(lambda: len(watched.trims) > trims_before, "a consumer trimmed")
            gate.set()
            await until(lambda: len(slow) == 30, lambda: f"slow handled {len(slow)} of 30")
            await until(lambda: settled(streams, Happened), "both groups acknowledged all")

        assert fast == slow == Counter(range(30))
        assert all(t.capped == 0 for t in watched.trims)
        trimmed = await transport.trim(stream)
        assert trimmed.length <= self.trim_slack

    async def test_a_stream_every_group_keeps_up_with_stays_bounded(
        self, make_streams: StreamsFactory, transport: Transport
    ) -> None:
        streams = make_streams()
        stream = streams.stream(Happened)
        watched = Switchable(transport)
        handled: Counter[int] = Counter()

        async def quick(event: Happened) -> None:
            handled[event.number] += 1

        bus, _ = consumer_bus(make_streams(transport=watched), Happened, {"kit.fast": quick})
        removed = 0
        async with bus:
            for round_ in range(5):
                numbers = range(round_ * 40, (round_ + 1) * 40)
                await publish_numbers(streams, numbers)
                await until(functools.partial(_at_least, handled, numbers.stop), "handled")
                await until(lambda: settled(streams, Happened), "the group acknowledged all")
                trimmed = await transport.trim(stream)
                assert trimmed.capped == 0
                assert trimmed.length <= self.trim_slack, f"round {round_}: {trimmed}"
                removed += trimmed.removed
        removed += sum(t.removed for t in watched.trims if t.stream == stream)
        assert removed >= 200 - self.trim_slack
        assert handled == Counter(range(200))

    async def test_the_cap_removes_the_oldest_and_says_how_many(
        self, stream_prefix: str, transport_factory: TransportFactory
    ) -> None:
        transport = transport_factory(max_len=10)
        try:
            await self._check_the_cap(transport, stream_prefix)
        finally:
            await transport.aclose()

    async def _check_the_cap(self, transport: Transport, prefix: str) -> None:
        assert transport.max_len == 10
        lonely, grouped = f"{prefix}:capped-alone", f"{prefix}:capped-grouped"
        # A stream without groups is only capped.
        for number in range(12):
            await transport.publish(lonely, _envelope(number))
        assert await transport.trim(lonely) == Trimmed(lonely, 0, 2, 10)
        # A group holding 5 unacknowledged entries: the cap removes them all the same...
        await transport.create_group(grouped, "kit.capped")
        ids = [await transport.publish(grouped, _envelope(number)) for number in range(25)]
        held = await transport.read_new([grouped], "kit.capped", "kit-c", count=5, block=0)
        assert [entry.id for entry in held] == ids[:5]
        assert await transport.trim(grouped) == Trimmed(grouped, 0, 15, 10)
        # ...and says so when they are claimed: gone, no longer pending.
        claimed, gone = await transport.claim_idle(
            grouped, "kit.capped", "kit-d", min_idle=0, count=100
        )
        assert (claimed, gone) == ([], ids[:5])
        [info] = await transport.groups(grouped)
        assert info.pending == 0
        rest = await transport.read_new([grouped], "kit.capped", "kit-d", count=100, block=0)
        assert [entry.id for entry in rest] == ids[15:]

    # -- 8. per-key order -------------------------------------------------------------------------

    async def test_per_key_order_holds_when_a_consumer_is_killed(
        self, make_streams: StreamsFactory, transport: Transport
    ) -> None:
        streams = make_streams(partitions=4)
        keys = [f"key-{k:02d}" for k in range(16)]
        events = [Stepped(key=keys[i % 16], n=i // 16) for i in range(1_000)]
        handled: list[tuple[str, int, int]] = []  # key, n, consumer
        switches = [Switchable(transport) for _ in range(4)]
        victim: list[tuple[int, str, int]] = []  # the consumer killed half way: its last

        def handler(index: int) -> Handler:
            async def handle(event: Stepped) -> None:
                if switches[index].cut:
                    await anyio.sleep_forever()  # a dead process does nothing more
                handled.append((event.key, event.n, index))
                # Half way, whoever holds a key with steps still to come is killed: its
                # partition has work left for the others to take over.
                if len(handled) >= len(events) // 2 and event.n < 50 and not victim:
                    victim.append((index, event.key, len(handled)))
                    switches[index].cut = True

            return handle

        async with AsyncExitStack() as stack:
            for index in range(4):
                bus, _ = consumer_bus(
                    make_streams(partitions=4, transport=switches[index]),
                    Stepped,
                    {"kit.ordered": handler(index)},
                    min_idle=self.order_min_idle,
                    drain_timeout=1.0,  # the killed one's stuck work is cut at the end
                )
                await stack.enter_async_context(bus)
            for event in events:
                await streams.publish(event, key=event.key)

            def progress() -> str:
                return f"{len({(k, n) for k, n, _ in handled})} of {len(events)}, victim {victim}"

            await until(lambda: len({(k, n) for k, n, _ in handled}) == len(events), progress)
            await until(lambda: settled(streams, Stepped), "every partition acknowledged all")

        assert victim, "no consumer was killed"
        [(killed, key_held, kill_at)] = victim
        after = handled[kill_at:]
        assert not [h for h in after if h[2] == killed], "the killed consumer handled more"
        assert [h for h in after if h[0] == key_held], "its partition was not taken over"
        duplicates = 0
        for key in keys:
            order = [n for k, n, _ in handled if k == key]
            once = [n for i, n in enumerate(order) if i == 0 or order[i - 1] != n]
            assert once == [e.n for e in events if e.key == key], f"{key}: {order}"
            duplicates += len(order) - len(once)
        print(f"per-key order kept; {duplicates} redelivered after the kill")
        infos = await streams.groups(Stepped)
        assert len(infos) == 4 and {info.stream for info in infos} == set(
            streams.partition_streams(Stepped)
        )

    # -- stopping ---------------------------------------------------------------------------------

    async def test_a_stop_lets_handlers_finish_and_acks_them(
        self, make_streams: StreamsFactory, transport: Transport
    ) -> None:
        streams = make_streams()
        group = "kit.drained"
        started: list[int] = []
        finished: Counter[int] = Counter()
        gate = anyio.Event()

        async def slow(event: Happened) -> None:
            started.append(event.number)
            await gate.wait()
            finished[event.number] += 1

        # It holds at most concurrency + batch_size = 6: 5 running, 1 read ahead.
        bus, consumer = consumer_bus(
            make_streams(), Happened, {group: slow}, concurrency=5, batch_size=1
        )
        stop = anyio.Event()

        async def run() -> None:
            async with bus:
                await stop.wait()

        await publish_numbers(streams, range(20), tasks=1)
        with anyio.fail_after(DEADLINE):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(run)
                await until(lambda: len(started) == 5, "five handlers in flight")
                stop.set()
                await consumer._stopping.wait()  # the stop has begun: no more reading
                gate.set()
        # The 5 running finish, and the one read ahead (if it was read) runs too: all of
        # them acknowledged, nothing left pending, the consumer gone from the group.
        assert sorted(finished) == sorted(started) and len(finished) in (5, 6)
        assert set(finished.values()) == {1}
        [info] = await streams.groups(Happened)
        assert info.lag is not None and info.pending == 0, info
        assert len(finished) + info.lag == 20, info
        assert info.consumers == 0, info

        # A consumer that starts later gets the other 15, and none of the first 5 again.
        again, _ = consumer_bus(make_streams(), Happened, {group: slow}, min_idle=self.min_idle)
        async with again:
            await until(lambda: len(finished) == 20, lambda: f"{len(finished)} of 20")
            await until(lambda: settled(streams, Happened), "the group acknowledged all")
        assert finished == Counter(range(20))
        await nothing_left(transport, streams.partition_streams(Happened), group)

    async def test_a_handler_cut_short_by_the_drain_timeout_is_left_pending(
        self, make_streams: StreamsFactory
    ) -> None:
        streams = make_streams()
        group = "kit.cut-short"
        runs: list[int] = []

        async def stuck_once(event: Happened) -> None:
            runs.append(running_entry().deliveries)
            if len(runs) == 1:
                await anyio.sleep_forever()

        bus, _ = consumer_bus(make_streams(), Happened, {group: stuck_once}, drain_timeout=0.1)
        async with bus:
            await streams.publish(Happened(number=1))
            await until(lambda: runs, "the handler runs")
        [info] = await streams.groups(Happened)
        assert (info.pending, info.consumers) == (1, 1)  # left pending: it stays in the group

        again, _ = consumer_bus(
            make_streams(), Happened, {group: stuck_once}, min_idle=self.min_idle
        )
        async with again:
            await until(lambda: len(runs) == 2, "another consumer takes it")
            await until(lambda: settled(streams, Happened), "the group acknowledged it")
        assert runs == [1, 2]

    # -- lag and pending --------------------------------------------------------------------------

    async def test_lag_and_pending_are_readable(self, make_streams: StreamsFactory) -> None:
        streams = make_streams()
        started: list[int] = []
        gate = anyio.Event()

        async def held(event: Happened) -> None:
            started.append(event.number)
            await gate.wait()

        # It holds at most concurrency + batch_size = 5: 3 running, 2 read ahead, 5 unread.
        bus, consumer = consumer_bus(
            make_streams(), Happened, {"kit.lag": held}, concurrency=3, batch_size=2
        )
        await publish_numbers(streams, range(10), tasks=1)
        stream = streams.stream(Happened)
        async with bus:
            try:
                await until(lambda: len(started) == 3, "three handlers in flight")
                wanted = [GroupInfo(stream, "kit.lag", 1, 5, 5)]

                async def holding() -> bool:
                    return await consumer.groups() == wanted

                await until(holding, "5 pending and 5 to read")
                assert await streams.groups(Happened) == wanted
            finally:
                gate.set()
            await until(lambda: settled(streams, Happened), "the group acknowledged all")
            assert await consumer.groups() == [GroupInfo(stream, "kit.lag", 1, 0, 0)]
        assert sorted(started) == list(range(10))


def _at_least(handled: Counter[int], count: int) -> bool:
    return len(handled) >= count


def _envelope(number: int) -> Envelope:
    return Envelope(id=f"kit-{number}", name="aioevents-kit.happened", version=1, payload="{}")
