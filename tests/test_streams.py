"""aioevents.streams at its boundary: arguments refused with what was wrong, names, context.

On the in-memory transport, on asyncio and on trio (the conftest's ``anyio_backend``). What a
transport must do is the conformance kit's (tests/test_streams_conformance.py); the outbox's
externalizing is tested with the outbox.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

import anyio
import anyio.lowlevel
import pytest

from aioevents import ConfigurationError, EventBus
from aioevents._streams_kit import settled, until
from aioevents.streams import (
    Consumer,
    Entry,
    MemoryStreams,
    Streams,
    consume,
    current_entry,
    externalize,
)

pytestmark = pytest.mark.anyio

FAST: dict[str, Any] = {"wait_initial": 0.01, "wait_max": 0.05, "wait_jitter": 0.0}


@dataclass(frozen=True, slots=True, kw_only=True)
class ReportWasFiled:
    __event_name__ = "report-was-filed"

    number: int


@dataclass(frozen=True, slots=True, kw_only=True)
class UrgentReportWasFiled(ReportWasFiled):
    """A subclass: an event type of its own (its own name), travelling on its base's stream."""

    __event_name__ = "urgent-report-was-filed"

    reason: str = "now"


@dataclass(frozen=True, slots=True, kw_only=True)
class LineWasWritten:
    key: str
    n: int


class Broken(Exception):
    pass


def streams_over(transport: MemoryStreams | None = None, **options: Any) -> Streams:
    return Streams(MemoryStreams() if transport is None else transport, prefix="t", **options)


async def until_settled(streams: Streams, *event_types: type) -> None:
    await until(lambda: settled(streams, *event_types), "every group handled everything")


# -- Streams ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"transport": object()}, TypeError, "transport must be a Transport"),
        ({"transport": "redis://localhost"}, TypeError, "transport must be a Transport"),
        ({"prefix": ""}, TypeError, "prefix must be a non-empty str"),
        ({"prefix": 7}, TypeError, "prefix must be a non-empty str"),
        ({"partitions": 0}, ConfigurationError, "partitions must be an int >= 1"),
        ({"partitions": -2}, ConfigurationError, "partitions must be an int >= 1"),
        ({"partitions": "4"}, TypeError, "partitions must be an int"),
        ({"partitions": 2.0}, TypeError, "partitions must be an int"),
        ({"partitions": True}, TypeError, "partitions must be an int"),
    ],
)
async def test_streams_refuses_bad_arguments(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    settings: dict[str, Any] = {"transport": MemoryStreams(), **arguments}
    transport = settings.pop("transport")
    with pytest.raises(error, match=re.escape(message)):
        Streams(transport, **settings)


async def test_stream_names_follow_the_prefix_event_name_and_partition() -> None:
    plain = Streams(MemoryStreams(), prefix="shop")
    split = Streams(MemoryStreams(), prefix="shop", partitions=3)

    assert plain.stream(ReportWasFiled) == "shop:report-was-filed"
    assert plain.partition_streams(ReportWasFiled) == ["shop:report-was-filed"]
    assert plain.dead_stream(ReportWasFiled) == "shop:report-was-filed:dead"
    assert split.stream(LineWasWritten) == "shop:line-was-written"
    assert split.partition_streams(LineWasWritten) == [
        "shop:line-was-written:0",
        "shop:line-was-written:1",
        "shop:line-was-written:2",
    ]
    assert split.dead_stream(LineWasWritten) == "shop:line-was-written:dead"
    assert Streams(MemoryStreams()).stream(ReportWasFiled) == "aioevents:report-was-filed"
    assert repr(split) == "Streams(MemoryStreams(max_len=None), prefix='shop', partitions=3)"


async def test_a_partition_is_chosen_by_the_keys_hash_or_else_the_event_ids() -> None:
    transport = MemoryStreams()
    streams = Streams(transport, prefix="t", partitions=5)
    names = streams.partition_streams(LineWasWritten)
    for name in names:
        await transport.create_group(name, "g")

    await streams.publish(LineWasWritten(key="k", n=1), key="account-17", event_id="keyed")
    await streams.publish(LineWasWritten(key="k", n=2), event_id="event-42")

    # by event id: entry ids are per stream, two streams can give the same one
    where = {entry.envelope.id: entry.stream for entry in await _read_all(transport, names)}
    assert where == {
        "keyed": names[zlib.crc32(b"account-17") % 5],
        "event-42": names[zlib.crc32(b"event-42") % 5],
    }


async def _read_all(transport: MemoryStreams, names: list[str]) -> list[Entry]:
    return await transport.read_new(names, "g", "reader", count=100, block=0)


async def test_publish_refuses_an_event_that_is_not_of_the_type_it_is_published_as() -> None:
    transport = MemoryStreams()
    streams = streams_over(transport)
    await transport.create_group(streams.stream(ReportWasFiled), "g")

    with pytest.raises(TypeError, match=r"LineWasWritten\(.*\) is not a ReportWasFiled"):
        await streams.publish(LineWasWritten(key="k", n=1), as_type=ReportWasFiled)
    with pytest.raises(TypeError, match="is not a UrgentReportWasFiled"):
        await streams.publish(ReportWasFiled(number=1), as_type=UrgentReportWasFiled)
    with pytest.raises(TypeError, match="key must be a str or None, got 7"):
        await streams.publish(ReportWasFiled(number=1), key=7)  # type: ignore[arg-type]

    assert await _read_all(transport, [streams.stream(ReportWasFiled)]) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"headers": {"attempt": 1}}, "headers"),  # memory keeps the int, Redis too: not str
        ({"headers": {1: "x"}}, "headers"),  # memory keeps 1, Redis gives back "1"
        ({"headers": "tenant=a"}, "headers"),  # a ValueError from dict(), not a TypeError
        ({"event_id": 5}, "event_id"),  # memory keeps 5, Redis gives back "5"
    ],
)
async def test_publish_refuses_headers_and_event_ids_that_are_not_text(
    arguments: dict[str, Any], message: str
) -> None:
    transport = MemoryStreams()
    streams = streams_over(transport)
    await transport.create_group(streams.stream(ReportWasFiled), "g")

    with pytest.raises(TypeError, match=message):
        await streams.publish(ReportWasFiled(number=1), **arguments)
    assert await _read_all(transport, [streams.stream(ReportWasFiled)]) == []


async def test_a_subclass_published_as_its_base_reaches_the_bases_handlers_as_itself() -> None:
    streams = streams_over()
    seen: list[tuple[object, str]] = []

    async def on_report(event: ReportWasFiled) -> None:
        entry = current_entry()
        assert entry is not None
        seen.append((event, entry.envelope.name))

    bus = EventBus()
    bus.subscribe(ReportWasFiled, on_report, name="on-report")
    consume(bus, ReportWasFiled, streams=streams, **FAST)
    async with bus:
        await streams.publish(UrgentReportWasFiled(number=1), as_type=ReportWasFiled)
        await streams.publish(ReportWasFiled(number=2))
        await until(lambda: len(seen) == 2, "both handled")
        await until_settled(streams, ReportWasFiled)

    assert sorted(seen, key=lambda item: item[1]) == [
        (ReportWasFiled(number=2), "report-was-filed"),
        (UrgentReportWasFiled(number=1), "urgent-report-was-filed"),
    ]


async def test_a_handler_of_a_subclass_gets_only_those_from_the_bases_stream() -> None:
    streams = streams_over()
    seen: list[object] = []

    async def on_urgent(event: UrgentReportWasFiled) -> None:
        seen.append(event)

    bus = EventBus()
    bus.subscribe(UrgentReportWasFiled, on_urgent, name="on-urgent")
    consume(bus, ReportWasFiled, streams=streams, **FAST)
    async with bus:
        await streams.publish(ReportWasFiled(number=1))
        await streams.publish(UrgentReportWasFiled(number=2), as_type=ReportWasFiled)
        await until(lambda: len(seen) == 1, "the urgent one handled")
        await until_settled(streams, ReportWasFiled)  # the other acknowledged, not handled

    assert seen == [UrgentReportWasFiled(number=2)]
    assert await streams.dead_letters(ReportWasFiled) == []


# -- consume ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "error", "message"),
    [
        ({"concurrency": 0}, ConfigurationError, "concurrency must be an int >= 1"),
        ({"concurrency": 2.5}, TypeError, "concurrency must be an int"),
        ({"max_deliveries": 0}, ConfigurationError, "max_deliveries must be an int >= 1"),
        ({"max_deliveries": None}, TypeError, "max_deliveries must be an int"),
        ({"batch_size": 0}, ConfigurationError, "batch_size must be an int >= 1"),
        ({"min_idle": 0}, ConfigurationError, "min_idle must be a number of seconds > 0"),
        ({"min_idle": "30"}, TypeError, "min_idle must be a number of seconds"),
        ({"min_idle": float("inf")}, ConfigurationError, "min_idle must be a number"),
        ({"drain_timeout": -1}, ConfigurationError, "drain_timeout must be a number of se"),
        ({"block": -0.5}, ConfigurationError, "block must be a number of seconds > 0"),
        ({"block": 0}, ConfigurationError, "block must be a number of seconds > 0"),
        ({"wait_initial": -1}, ConfigurationError, "wait_initial must be a number"),
        ({"wait_max": float("nan")}, ConfigurationError, "wait_max must be a number"),
        ({"wait_jitter": True}, TypeError, "wait_jitter must be a number of seconds"),
        ({"handlers": "on-report"}, TypeError, "handlers takes an iterable of handler names"),
    ],
)
async def test_consume_refuses_bad_options(
    arguments: dict[str, Any], error: type[Exception], message: str
) -> None:
    bus = EventBus()
    with pytest.raises(error, match=re.escape(message)):
        consume(bus, ReportWasFiled, streams=streams_over(), **arguments)
    async with bus:  # nothing was attached to it: it runs as if consume was never called
        pass


async def test_consume_refuses_what_is_not_a_bus_streams_or_event_class() -> None:
    bus, streams = EventBus(), streams_over()
    with pytest.raises(TypeError, match="bus must be an EventBus, got 'bus'"):
        consume("bus", ReportWasFiled, streams=streams)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="streams must be a Streams"):
        consume(bus, ReportWasFiled, streams=MemoryStreams())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"consume\(\) needs at least one event type"):
        consume(bus, streams=streams)
    with pytest.raises(TypeError, match=r"consume\(\) takes event classes, got 'report'"):
        consume(bus, "report", streams=streams)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"takes event classes, got ReportWasFiled\(number=1\)"):
        consume(bus, ReportWasFiled(number=1), streams=streams)  # type: ignore[arg-type]


async def test_a_zero_drain_timeout_is_allowed() -> None:
    consumer = consume(EventBus(), ReportWasFiled, streams=streams_over(), drain_timeout=0)
    assert consumer.drain_timeout == 0


@pytest.mark.parametrize("partitions", [None, 4])
async def test_at_most_concurrency_handlers_run_at_once(partitions: int | None) -> None:
    streams = streams_over(partitions=partitions)
    running, most, done = 0, 0, []

    async def handler(event: LineWasWritten) -> None:
        nonlocal running, most
        running += 1
        most = max(most, running)
        await anyio.sleep(0.01)  # room for another to start, if one could
        running -= 1
        done.append(event.n)

    bus = EventBus()
    bus.subscribe(LineWasWritten, handler, name="on-line")
    consume(bus, LineWasWritten, streams=streams, concurrency=2, **FAST)
    async with bus:
        for n in range(40):
            await streams.publish(LineWasWritten(key=f"k{n % 8}", n=n), key=f"k{n % 8}")
        await until(lambda: len(done) == 40, "all handled")
    assert most <= 2


async def test_a_handler_named_in_handlers_that_does_not_exist_fails_the_start() -> None:
    bus = EventBus()
    bus.subscribe(ReportWasFiled, lambda event: None, name="on-report")
    consume(bus, ReportWasFiled, streams=streams_over(), handlers=["on-report", "on-reprot"])

    with pytest.raises(ConfigurationError, match="no handler named on-reprot for ReportWasFiled"):
        async with bus:
            pytest.fail("the bus must not start")
    assert not bus.running


async def test_handlers_picks_which_handlers_are_fed() -> None:
    streams = streams_over()
    fed: list[str] = []
    bus = EventBus()
    bus.subscribe(ReportWasFiled, lambda event: fed.append("first"), name="first")
    bus.subscribe(ReportWasFiled, lambda event: fed.append("second"), name="second")
    consumer = consume(bus, ReportWasFiled, streams=streams, handlers=["second"], **FAST)
    async with bus:
        await streams.publish(ReportWasFiled(number=1))
        await until(lambda: fed == ["second"], "the second handler fed")
        await until_settled(streams, ReportWasFiled)
        assert [info.group for info in await consumer.groups()] == ["second"]
    assert [info.group for info in await streams.groups(ReportWasFiled)] == ["second"]


async def test_a_consumer_of_a_bus_without_handlers_for_its_types_warns(
    caplog: pytest.LogCaptureFixture,
) -> None:
    streams = streams_over()
    bus = EventBus()
    bus.subscribe(LineWasWritten, lambda event: None, name="on-line")
    consumer = consume(bus, ReportWasFiled, streams=streams)
    with caplog.at_level(logging.WARNING, logger="aioevents.streams"):
        async with bus:
            await streams.publish(ReportWasFiled(number=1))
    [record] = [r for r in caplog.records if r.name == "aioevents.streams"]
    assert record.levelno == logging.WARNING
    assert "no handlers on the bus for its event types" in record.getMessage()
    assert consumer.name in record.getMessage()
    assert await streams.groups(ReportWasFiled) == []  # it joined no group, read nothing


async def test_a_consumer_is_named_after_its_host_and_process() -> None:
    first = consume(EventBus(), ReportWasFiled, streams=streams_over())
    second = consume(EventBus(), ReportWasFiled, streams=streams_over())
    host, pid, token = first.name.rsplit(":", 2)
    assert (host, pid) == (socket.gethostname(), str(os.getpid()))
    assert re.fullmatch("[0-9a-f]{6}", token)
    assert first.name != second.name
    assert isinstance(first, Consumer)
    assert repr(first) == f"<Consumer {first.name} of report-was-filed running=0>"


# -- externalize ---------------------------------------------------------------------------------


async def test_externalize_refuses_bad_arguments() -> None:
    bus, streams = EventBus(), streams_over()
    with pytest.raises(TypeError, match="streams must be a Streams"):
        externalize(bus, ReportWasFiled, streams="t")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"externalize\(\) needs at least one event type"):
        externalize(bus, streams=streams)
    with pytest.raises(TypeError, match=r"externalize\(\) takes event classes, got 3"):
        externalize(bus, 3, streams=streams)  # type: ignore[arg-type]
    assert bus.subscriptions == ()


# -- current_entry --------------------------------------------------------------------------------


async def test_current_entry_is_none_outside_a_stream_fed_handler() -> None:
    assert current_entry() is None
    streams = streams_over()
    in_emit: list[Entry | None] = []
    in_stream: list[Entry | None] = []

    async def handler(event: ReportWasFiled) -> None:
        (in_emit if event.number == 0 else in_stream).append(current_entry())

    bus = EventBus()
    bus.subscribe(ReportWasFiled, handler, name="on-report")
    consume(bus, ReportWasFiled, streams=streams, **FAST)
    async with bus:
        await bus.emit(ReportWasFiled(number=0))  # emitted here: not from a stream
        entry_id = await streams.publish(ReportWasFiled(number=1), headers={"h": "v"})
        await until(lambda: len(in_stream) == 1, "the published one handled")
        assert current_entry() is None
    assert in_emit == [None]
    [entry] = in_stream
    assert entry is not None
    assert (entry.id, entry.deliveries, dict(entry.envelope.headers)) == (entry_id, 1, {"h": "v"})
    assert current_entry() is None


# -- both backends: a whole round trip ------------------------------------------------------------


async def test_a_round_trip_with_retries_and_dead_letters(anyio_backend: str) -> None:
    streams = streams_over()
    deliveries: Counter[int] = Counter()
    done: list[int] = []

    async def handler(event: ReportWasFiled) -> None:
        entry = current_entry()
        assert entry is not None
        deliveries[event.number] += 1
        if event.number == 13:
            raise Broken("thirteen")
        if event.number % 3 == 0 and entry.deliveries < 2:
            raise Broken("first delivery")
        done.append(event.number)

    bus = EventBus()
    bus.subscribe(ReportWasFiled, handler, name="on-report")
    consume(bus, ReportWasFiled, streams=streams, max_deliveries=3, concurrency=4, **FAST)
    async with bus:
        for number in range(30):
            await streams.publish(ReportWasFiled(number=number))
        await until(lambda: len(done) == 29, f"29 handled on {anyio_backend}")
        await until_settled(streams, ReportWasFiled)

    assert sorted(done) == [n for n in range(30) if n != 13]
    assert deliveries == Counter({n: 3 if n == 13 else 2 if n % 3 == 0 else 1 for n in range(30)})
    [letter] = await streams.dead_letters(ReportWasFiled)
    assert (letter.group, letter.deliveries, letter.reason) == ("on-report", 3, "Broken: thirteen")


async def test_per_key_order_with_partitions(anyio_backend: str) -> None:
    transport = MemoryStreams()
    keys = [f"k{k}" for k in range(6)]
    handled: list[tuple[str, int]] = []

    async def handler(event: LineWasWritten) -> None:
        handled.append((event.key, event.n))
        await anyio.lowlevel.checkpoint()  # it awaits: the next of its partition waits for it

    publisher = streams_over(transport, partitions=3)
    buses = []
    for _ in range(2):
        bus = EventBus()
        bus.subscribe(LineWasWritten, handler, name="on-line")
        consume(bus, LineWasWritten, streams=streams_over(transport, partitions=3), **FAST)
        buses.append(bus)
    async with buses[0], buses[1]:
        for n in range(20):
            for key in keys:
                await publisher.publish(LineWasWritten(key=key, n=n), key=key)
        await until(lambda: len(handled) == 120, f"120 handled on {anyio_backend}")
        await until_settled(publisher, LineWasWritten)

    for key in keys:
        assert [n for k, n in handled if k == key] == list(range(20)), key


# -- the kit, from aioevents.testing --------------------------------------------------------------


def test_aioevents_testing_imports_without_msgspec_and_pytest() -> None:
    code = (
        "import sys; sys.modules['msgspec'] = None; sys.modules['pytest'] = None; "
        "import aioevents.testing as testing; "
        "assert 'aioevents._streams_kit' not in sys.modules; "
        "assert 'TransportConformance' in dir(testing); "
        "assert 'TransportConformance' not in testing.__all__; "
        "from aioevents.testing import capture, muted"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def test_the_conformance_kit_is_imported_from_aioevents_testing_on_first_access() -> None:
    import aioevents.testing
    from aioevents._streams_kit import TransportConformance

    assert aioevents.testing.TransportConformance is TransportConformance
    with pytest.raises(AttributeError, match="has no attribute 'TransportConformanse'"):
        aioevents.testing.TransportConformanse  # noqa: B018
