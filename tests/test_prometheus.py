"""aioevents.prometheus: the metrics are present and correct after a scripted run.

Counts are asserted exactly (they equal the handler calls the script made), never timings;
the durable stores' gauges are checked on SQLite and PostgreSQL, on memory and Redis streams.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import anyio
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import create_async_engine

from aioevents import BusStateError, ConfigurationError, Durable, EventBus, Subscription
from aioevents._streams_kit import settled, until
from aioevents.outbox import Outbox
from aioevents.prometheus import DEFAULT_BUCKETS, Metrics
from aioevents.sqlalchemy import TransactionalEvents
from aioevents.streams import GroupInfo, MemoryStreams, Streams, consume

from .outbox_support import Database, record


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentWasCreated:
    number: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentWasDeleted:
    __event_name__ = "document.deleted"

    number: int = 0


@dataclass(frozen=True, slots=True, kw_only=True)
class ImportWasStarted:
    pass


class AuditError(Exception):
    pass


def new_metrics(**options: object) -> tuple[Metrics, CollectorRegistry]:
    registry = CollectorRegistry()
    return Metrics(registry=registry, **options), registry  # type: ignore[arg-type]


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def handled(registry: CollectorRegistry, event: str, handler: str) -> float | None:
    return value(registry, "aioevents_handled_total", event=event, handler=handler)


def failures(registry: CollectorRegistry, event: str, handler: str, error: str) -> float | None:
    labels = {"event": event, "handler": handler, "error_type": error}
    return value(registry, "aioevents_handler_failures_total", **labels)


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[str, ...], float]:
    """Every sample of ``name``: label values (sorted by label name) -> value."""
    found = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name == name:
                found[tuple(v for _, v in sorted(sample.labels.items()))] = sample.value
    return found


# -- the hook ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_counts_equal_the_handler_calls_of_a_scripted_run() -> None:
    metrics, registry = new_metrics()
    bus = EventBus(hooks=[metrics], workers=2)
    started = anyio.Event()

    async def index(event: DocumentWasCreated) -> None:
        if event.number % 3 == 0:
            raise ValueError("cannot index")

    async def audit(event: object) -> None:
        if isinstance(event, DocumentWasDeleted) and event.number % 2 == 0:
            raise AuditError("audit log is full")

    async def slow(event: DocumentWasDeleted) -> None:
        if event.number == 1:
            await anyio.sleep_forever()  # past its timeout

    async def stuck(event: ImportWasStarted) -> None:
        started.set()
        await anyio.sleep_forever()  # until its emitter is cancelled

    bus.subscribe(DocumentWasCreated, index, name="index")
    bus.subscribe(object, audit, name="audit")
    bus.subscribe(DocumentWasDeleted, slow, name="slow", timeout=0.01)
    bus.subscribe(ImportWasStarted, stuck, name="stuck")

    for number in range(6):  # index fails on 0 and 3
        await bus.emit(DocumentWasCreated(number=number))
    for number in range(4):  # audit fails on 0 and 2; slow times out on 1
        await bus.emit(DocumentWasDeleted(number=number))
    async with bus:  # 3 more created, delivered in the background: index fails on 6
        for number in (6, 7, 8):
            await bus.publish(DocumentWasCreated(number=number))
    async with anyio.create_task_group() as group:
        group.start_soon(bus.emit, ImportWasStarted())
        await started.wait()
        group.cancel_scope.cancel()

    created, deleted = "document-was-created", "document.deleted"
    expected_handled = {
        (created, "index"): 9,
        (created, "audit"): 9,
        (deleted, "audit"): 4,
        (deleted, "slow"): 4,
        ("import-was-started", "audit"): 1,
        ("import-was-started", "stuck"): 1,  # cancelled: it ended, it did not fail
    }
    assert samples(registry, "aioevents_handled_total") == {
        (event, handler): count for (event, handler), count in expected_handled.items()
    }
    assert samples(registry, "aioevents_handler_failures_total") == {
        ("tests.test_prometheus.AuditError", deleted, "audit"): 2,
        ("ValueError", created, "index"): 3,
        ("TimeoutError", deleted, "slow"): 1,
    }
    for (event, handler), count in expected_handled.items():
        labels = {"event": event, "handler": handler}
        assert value(registry, "aioevents_handler_duration_seconds_count", **labels) == count
        inf = {**labels, "le": "+Inf"}
        assert value(registry, "aioevents_handler_duration_seconds_bucket", **inf) == count
        assert value(registry, "aioevents_handler_duration_seconds_sum", **labels) > 0  # type: ignore[operator]
    slow_past = {"event": deleted, "handler": "slow", "le": "0.005"}
    assert value(registry, "aioevents_handler_duration_seconds_bucket", **slow_past) <= 3  # type: ignore[operator]


def test_durations_fall_in_the_buckets_of_their_upper_bounds() -> None:
    metrics, registry = new_metrics(buckets=(0.1, 1.0, float("inf")))
    sub = EventBus().subscribe(DocumentWasCreated, audit_nothing, name="h")
    for duration in (0.05, 0.1, 0.5, 2.0):  # 0.1 is in the bucket up to 0.1 (le: <=)
        metrics.handler_finished(
            DocumentWasCreated(), sub, token=None, duration=duration, error=None
        )
    buckets = {
        labels[2]: count
        for labels, count in samples(registry, "aioevents_handler_duration_seconds_bucket").items()
    }
    assert buckets == {"0.1": 2, "1.0": 3, "+Inf": 4}
    labels = {"event": "document-was-created", "handler": "h"}
    assert value(registry, "aioevents_handler_duration_seconds_sum", **labels) == 2.65
    assert value(registry, "aioevents_handled_total", **labels) == 4


async def audit_nothing(event: object) -> None:
    pass


@pytest.mark.anyio
async def test_a_batch_handler_is_labelled_with_the_type_it_subscribed_to() -> None:
    metrics, registry = new_metrics()
    bus = EventBus(hooks=[metrics])
    batches: list[int] = []

    async def store(events: Sequence[DocumentWasCreated]) -> None:
        batches.append(len(events))

    bus.subscribe_batch(DocumentWasCreated, store, max_size=2, max_wait=60.0, name="store")
    async with bus:
        for number in range(5):
            await bus.publish(DocumentWasCreated(number=number))
    assert sum(batches) == 5
    assert handled(registry, "document-was-created", "store") == len(batches)


def test_handlers_of_one_name_and_event_types_of_one_name_are_one_series() -> None:
    metrics, registry = new_metrics()

    @dataclass
    class DocumentWasDeletedV2:
        __event_name__ = "document.deleted"

    first, second = EventBus(), EventBus()
    sub_a = first.subscribe(DocumentWasDeleted, audit_nothing, name="audit")
    sub_b = second.subscribe(DocumentWasDeletedV2, audit_nothing, name="audit")
    for event, sub in ((DocumentWasDeleted(), sub_a), (DocumentWasDeletedV2(), sub_b)):
        metrics.handler_finished(event, sub, token=None, duration=0.5, error=AuditError())
    assert handled(registry, "document.deleted", "audit") == 2
    assert failures(registry, "document.deleted", "audit", "tests.test_prometheus.AuditError") == 2
    labels = {"event": "document.deleted", "handler": "audit"}
    assert value(registry, "aioevents_handler_duration_seconds_sum", **labels) == 1.0


# -- the background queue ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_queue_depth_of_a_watched_bus_is_read_at_each_scrape() -> None:
    metrics, registry = new_metrics()
    bus, gate, started = EventBus(workers=1), anyio.Event(), anyio.Event()

    async def blocked(event: DocumentWasCreated) -> None:
        started.set()
        await gate.wait()

    bus.subscribe(DocumentWasCreated, blocked)
    metrics.watch(bus, name="web")
    depth = {"bus": "web"}
    assert value(registry, "aioevents_background_queue_depth", **depth) == 0  # not running
    async with bus:
        for number in range(5):
            bus.publish_nowait(DocumentWasCreated(number=number))
        await started.wait()  # the one worker took the first: four wait
        assert value(registry, "aioevents_background_queue_depth", **depth) == 4
        gate.set()
    assert value(registry, "aioevents_background_queue_depth", **depth) == 0


def test_a_bus_is_watched_under_one_name_while_it_lives() -> None:
    metrics, registry = new_metrics()
    bus = EventBus()
    metrics.watch(bus)
    metrics.watch(bus)  # again: nothing changes
    with pytest.raises(ConfigurationError, match="another bus is watched under the name 'default'"):
        metrics.watch(EventBus())
    assert samples(registry, "aioevents_background_queue_depth") == {("default",): 0}
    del bus
    gc.collect()
    assert samples(registry, "aioevents_background_queue_depth") == {}
    metrics.watch(EventBus(), name="default")  # the name is free again
    assert "buses=['default']" in repr(metrics)


# -- durable stores --------------------------------------------------------------------------

BACKENDS = [pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"]
QUICKLY = Durable(max_attempts=1, wait_initial=0.0, wait_jitter=0.0)


def outbox_gauges(registry: CollectorRegistry) -> dict[tuple[str, ...], float]:
    return samples(registry, "aioevents_outbox_deliveries")


@pytest.mark.asyncio
async def test_outbox_deliveries_pending_and_dead_per_handler(db: Database) -> None:
    metrics, registry = new_metrics()
    bus = EventBus(hooks=[metrics])
    outbox = db.new_outbox()
    events = TransactionalEvents(bus, outbox=outbox)

    @bus.on(DocumentWasCreated, durable=QUICKLY, name="index")
    async def index(event: DocumentWasCreated) -> None:
        pass

    @bus.on(DocumentWasCreated, durable=QUICKLY, name="mirror")
    async def mirror(event: DocumentWasCreated) -> None:
        raise ConnectionError("the mirror is down")

    await record(db, events, *(DocumentWasCreated(number=n) for n in range(3)))  # not running
    await metrics.poll(outbox=outbox)
    assert outbox_gauges(registry) == {("index", "pending"): 3, ("mirror", "pending"): 3}

    async with bus:  # its relay runs them: index completes, mirror dies (one attempt)
        await db.wait_for_statuses({"completed": 3, "dead": 3})
    await metrics.poll(outbox=outbox)
    assert outbox_gauges(registry) == {
        ("index", "pending"): 0,  # seen before: zero, not gone
        ("mirror", "pending"): 0,
        ("mirror", "dead"): 3,
    }
    assert handled(registry, "document-was-created", "index") == 3
    assert failures(registry, "document-was-created", "mirror", "ConnectionError") == 3

    await record(db, events, DocumentWasCreated(number=3), DocumentWasCreated(number=4))
    await metrics.poll(outbox=outbox)
    assert outbox_gauges(registry) == {
        ("index", "pending"): 2,
        ("mirror", "pending"): 2,
        ("mirror", "dead"): 3,
    }
    assert value(registry, "aioevents_poll_errors_total", source="outbox") == 0


@pytest.mark.asyncio
async def test_a_failing_outbox_poll_keeps_the_last_values(
    db: Database, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics, registry = new_metrics()
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=db.outbox)
    bus.subscribe(DocumentWasCreated, audit_nothing, durable=True, name="index")
    await record(db, events, DocumentWasCreated())
    await metrics.poll(outbox=db.outbox)
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'missing' / 'x.db'}")
    try:
        with caplog.at_level(logging.WARNING, logger="aioevents"):
            await metrics.poll(outbox=Outbox(engine))  # no such directory: it cannot open
    finally:
        await engine.dispose()
    assert "polling the outbox for metrics failed" in caplog.text
    assert outbox_gauges(registry) == {("index", "pending"): 1}
    assert value(registry, "aioevents_poll_errors_total", source="outbox") == 1


# -- streams ---------------------------------------------------------------------------------


@pytest_asyncio.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def streams(request: pytest.FixtureRequest) -> AsyncIterator[Streams]:
    prefix = f"aioevents-test:{uuid.uuid4().hex}"
    if request.param == "memory":
        yield Streams(MemoryStreams(), prefix=prefix)
        return
    from redis.asyncio import Redis

    from aioevents.redis_streams import RedisStreams

    url = str(request.getfixturevalue("redis_url"))
    client = Redis.from_url(url)
    try:
        yield Streams(RedisStreams(client), prefix=prefix)
    finally:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def lag_and_pending(streams: Streams, event_type: type, groups: Sequence[str]) -> str:
    """Two groups on the type's stream; 5 entries; the first group's consumer reads 2."""
    stream = streams.stream(event_type)
    for group in groups:
        await streams.transport.create_group(stream, group)
    for _ in range(5):
        await streams.publish(event_type())
    read = await streams.transport.read_new([stream], groups[0], "c1", count=2, block=0)
    assert len(read) == 2
    return stream


@pytest.mark.asyncio
async def test_stream_lag_and_pending_per_group(streams: Streams) -> None:
    metrics, registry = new_metrics()
    stream = await lag_and_pending(streams, DocumentWasCreated, ["index", "mirror"])
    await metrics.poll(streams=streams, event_types=[DocumentWasCreated])
    assert samples(registry, "aioevents_stream_lag") == {
        ("index", stream): 3,
        ("mirror", stream): 5,
    }
    assert samples(registry, "aioevents_stream_pending") == {
        ("index", stream): 2,
        ("mirror", stream): 0,
    }
    assert value(registry, "aioevents_poll_errors_total", source="streams") == 0


@pytest.mark.anyio
async def test_a_stream_consumers_handler_calls_are_counted_and_its_group_polled() -> None:
    metrics, registry = new_metrics()
    streams = Streams(MemoryStreams(), prefix="t")
    calls: list[int] = []

    async def index(event: DocumentWasCreated) -> None:
        calls.append(event.number)
        if event.number == 1:
            raise ValueError("cannot index")

    bus = EventBus(hooks=[metrics])
    bus.subscribe(DocumentWasCreated, index, name="index")
    consume(bus, DocumentWasCreated, streams=streams, max_deliveries=2, wait_initial=0.01)
    async with bus:
        for number in range(3):
            await streams.publish(DocumentWasCreated(number=number))
        await until(lambda: streams.dead_letters(DocumentWasCreated), "the failing one dead")
        await until(lambda: settled(streams, DocumentWasCreated), "the group done")
    await metrics.poll(streams=streams, event_types=[DocumentWasCreated])

    assert calls.count(1) >= 2 and sorted(set(calls)) == [0, 1, 2]
    assert handled(registry, "document-was-created", "index") == len(calls)
    assert failures(registry, "document-was-created", "index", "ValueError") == calls.count(1)
    stream = streams.stream(DocumentWasCreated)
    assert samples(registry, "aioevents_stream_pending") == {("index", stream): 0}
    assert samples(registry, "aioevents_stream_lag") == {("index", stream): 0}


class BrokenTransport(MemoryStreams):
    """A memory transport whose groups() fails (or hangs) once ``broken`` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.broken: str | None = None
        self.asked = 0
        self.asked_again = anyio.Event()

    async def groups(self, stream: str) -> list[GroupInfo]:
        self.asked += 1
        self.asked_again.set()
        if self.broken == "fails":
            raise ConnectionError("the transport is down")
        if self.broken == "hangs":
            await anyio.sleep_forever()
        infos = await super().groups(stream)
        if self.broken == "no lag":  # as Redis answers when it cannot tell
            return [dataclasses.replace(info, lag=None) for info in infos]
        return infos


@pytest.mark.asyncio
async def test_a_failing_streams_poll_keeps_the_last_values(
    caplog: pytest.LogCaptureFixture,
) -> None:
    metrics, registry = new_metrics()
    transport = BrokenTransport()
    streams = Streams(transport)
    stream = await lag_and_pending(streams, DocumentWasCreated, ["index"])
    await metrics.poll(streams=streams, event_types=[DocumentWasCreated])
    transport.broken = "fails"
    await streams.publish(DocumentWasCreated())
    with caplog.at_level(logging.WARNING, logger="aioevents"):
        await metrics.poll(streams=streams, event_types=[DocumentWasCreated])
    assert "polling the streams for metrics failed" in caplog.text
    assert samples(registry, "aioevents_stream_lag") == {("index", stream): 3}
    assert samples(registry, "aioevents_stream_pending") == {("index", stream): 2}
    assert value(registry, "aioevents_poll_errors_total", source="streams") == 1


@pytest.mark.asyncio
async def test_a_group_whose_lag_is_unknown_has_pending_and_no_lag() -> None:
    metrics, registry = new_metrics()
    transport = BrokenTransport()
    streams = Streams(transport)
    stream = await lag_and_pending(streams, DocumentWasCreated, ["index"])
    transport.broken = "no lag"
    await metrics.poll(streams=streams, event_types=[DocumentWasCreated])
    assert samples(registry, "aioevents_stream_lag") == {}
    assert samples(registry, "aioevents_stream_pending") == {("index", stream): 2}


@pytest.mark.anyio
async def test_polling_reads_at_the_start_then_every_interval_until_the_block_ends() -> None:
    metrics, registry = new_metrics()
    transport = BrokenTransport()
    streams = Streams(transport)
    stream = await lag_and_pending(streams, DocumentWasCreated, ["index"])

    def lag() -> float | None:
        return value(registry, "aioevents_stream_lag", stream=stream, group="index")

    polling = metrics.polling(streams=streams, event_types=[DocumentWasCreated], interval=0.02)
    async with polling as entered:
        assert entered is metrics
        assert lag() == 3  # polled as the block starts
        await streams.publish(DocumentWasCreated())
        for _ in range(2):  # a poll that starts after it, and the next: the first one stored
            transport.asked_again = anyio.Event()
            with anyio.fail_after(60):  # a bound on a loaded machine, never a timing
                await transport.asked_again.wait()
        assert lag() == 4
        with pytest.raises(BusStateError, match="this polling block is already running"):
            await polling.__aenter__()
    asked = transport.asked
    await anyio.sleep(0.1)
    assert transport.asked == asked  # the polling task ended with the block


@pytest.mark.anyio
async def test_a_poll_longer_than_the_interval_is_given_up_and_counted() -> None:
    metrics, registry = new_metrics()
    transport = BrokenTransport()
    transport.broken = "hangs"
    streams = Streams(transport)
    async with metrics.polling(streams=streams, event_types=[DocumentWasCreated], interval=0.01):
        assert value(registry, "aioevents_poll_errors_total", source="streams") == 1


@pytest.mark.anyio
async def test_what_ends_the_block_goes_out_as_it_is() -> None:
    metrics = Metrics(registry=None)
    streams = Streams(MemoryStreams())
    with pytest.raises(ValueError, match="the block's own"):
        async with metrics.polling(streams=streams, event_types=[DocumentWasCreated]):
            raise ValueError("the block's own")
    with anyio.move_on_after(0.01) as scope:
        async with metrics.polling(streams=streams, event_types=[DocumentWasCreated]):
            await anyio.sleep_forever()
    assert scope.cancelled_caught


# -- the exposition and the registry -----------------------------------------------------------


@pytest.mark.anyio
async def test_the_text_exposition_parses_with_every_family() -> None:
    metrics, registry = new_metrics()
    bus = EventBus(hooks=[metrics])
    bus.subscribe(DocumentWasCreated, audit_nothing, name="index")
    metrics.watch(bus)
    await bus.emit(DocumentWasCreated())
    text = generate_latest(registry).decode()
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert families == {
        "aioevents_handler_duration_seconds": "histogram",
        "aioevents_handled": "counter",
        "aioevents_handler_failures": "counter",
        "aioevents_background_queue_depth": "gauge",
        "aioevents_outbox_deliveries": "gauge",
        "aioevents_stream_lag": "gauge",
        "aioevents_stream_pending": "gauge",
        "aioevents_poll_errors": "counter",
    }
    assert 'aioevents_handled_total{event="document-was-created",handler="index"} 1.0' in text
    buckets = [line for line in text.splitlines() if line.startswith("aioevents_handler_dur")]
    assert len(buckets) == len(DEFAULT_BUCKETS) + 1 + 2  # the bounds, +Inf, _count and _sum


def test_it_registers_itself_once_in_the_registry_it_is_given() -> None:
    metrics, registry = new_metrics()
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        Metrics(registry=registry)
    unregistered = Metrics(registry=None)
    other = CollectorRegistry()
    other.register(unregistered)
    assert other.get_sample_value("aioevents_poll_errors_total", {"source": "outbox"}) == 0
    described = [family.name for family in metrics.describe()]
    assert "aioevents_handler_duration_seconds" in described
    assert all(not family.samples for family in metrics.describe())


def test_it_is_a_hook_that_starts_with_nothing_to_hand_over() -> None:
    metrics = Metrics(registry=None)
    sub: Subscription = EventBus().subscribe(DocumentWasCreated, audit_nothing)
    metrics.handler_started(DocumentWasCreated(), sub)  # the bus measures the duration
    assert repr(metrics) == "<Metrics handlers=0 buses=[]>"


# -- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"registry": 5}, TypeError, "takes a prometheus_client CollectorRegistry or None"),
        ({"buckets": "0.1"}, TypeError, "buckets must be a sequence of seconds"),
        ({"buckets": 5}, TypeError, "buckets must be a sequence of seconds"),
        ({"buckets": ("1",)}, TypeError, "a bucket's upper bound must be a number of seconds"),
        ({"buckets": (True,)}, TypeError, "a bucket's upper bound must be a number of seconds"),
        ({"buckets": (0,)}, ConfigurationError, r"a bucket's upper bound must be .* > 0"),
        ({"buckets": ()}, ConfigurationError, "at least one bound, increasing"),
        ({"buckets": (float("inf"),)}, ConfigurationError, "at least one bound, increasing"),
        ({"buckets": (1.0, 0.5)}, ConfigurationError, "at least one bound, increasing"),
        ({"buckets": (1.0, 1.0)}, ConfigurationError, "at least one bound, increasing"),
    ],
)
def test_bad_options_are_refused(
    options: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Metrics(**options)  # type: ignore[arg-type]


def test_watching_what_is_no_bus_or_under_no_name_is_refused() -> None:
    metrics = Metrics(registry=None)
    with pytest.raises(TypeError, match="watch\\(\\) takes an EventBus, got 5"):
        metrics.watch(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="the bus's name must be a non-empty str, got ''"):
        metrics.watch(EventBus(), name="")


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({}, TypeError, "nothing to poll: give an outbox, streams, or both"),
        ({"outbox": 5}, TypeError, "outbox must be an aioevents.outbox.Outbox or None, got 5"),
        ({"streams": 5}, TypeError, "streams must be an aioevents.streams.Streams or None"),
        ({"streams": "memory"}, TypeError, "streams need event_types"),
        ({"event_types": [DocumentWasCreated]}, TypeError, "give streams too"),
        ({"streams": "memory", "event_types": DocumentWasCreated}, TypeError, "an iterable"),
        ({"streams": "memory", "event_types": "doc"}, TypeError, "an iterable of event classes"),
        ({"streams": "memory", "event_types": [5]}, TypeError, "event_types holds event classes"),
        (
            {"streams": "memory", "event_types": [DocumentWasCreated], "interval": 0},
            ConfigurationError,
            "interval must be",
        ),
        (
            {"streams": "memory", "event_types": [DocumentWasCreated], "interval": "1"},
            TypeError,
            "interval must be",
        ),
    ],
)
@pytest.mark.asyncio
async def test_bad_polling_options_are_refused(
    options: dict[str, object], error: type[Exception], match: str
) -> None:
    metrics = Metrics(registry=None)
    if options.get("streams") == "memory":
        options["streams"] = Streams(MemoryStreams())
    with pytest.raises(error, match=match):
        async with metrics.polling(**options):  # type: ignore[arg-type]
            pass
    if "interval" not in options:
        with pytest.raises(error, match=match):
            await metrics.poll(**options)  # type: ignore[arg-type]


def test_importing_without_prometheus_client_names_the_extra_to_install() -> None:
    code = (
        "import sys\n"
        "sys.modules['prometheus_client'] = None  # as if the extra were not installed\n"
        "try:\n"
        "    import aioevents.prometheus\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc.name, '|', exc)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.startswith("prometheus_client | aioevents.prometheus needs prometheus-c")
    assert "pip install 'aioevents[prometheus]'" in done.stdout


def test_the_hook_alone_imports_no_database_or_stream_library() -> None:
    code = (
        "import sys, aioevents.prometheus; "
        "bad = [m for m in ('sqlalchemy', 'msgspec', 'redis') if m in sys.modules]; "
        "print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)
