"""Externalizing recorded events: from the outbox's transaction to a consumer's handler.

The producing bus records events in a transaction (SQLite file and PostgreSQL); its relay
runs the ``externalize:`` handler, which appends each to its stream; a consumer on another
bus handles them. What the tests hold: what commits arrives, with the outbox's event id, key
and headers; what rolls back never does; a transport that fails makes the outbox retry, and
nothing is lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest

from aioevents import Durable, EventBus
from aioevents.sqlalchemy import TransactionalEvents
from aioevents.streams import (
    Entry,
    Envelope,
    MemoryStreams,
    Streams,
    consume,
    current_entry,
    externalize,
)

from .outbox_support import Database, eventually, record

pytestmark = pytest.mark.asyncio


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentWasIndexed:
    document_id: int


class FlakyStreams(MemoryStreams):
    """Refuses the first ``failures`` publishes, as a Redis that is down would."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures

    async def publish(self, stream: str, envelope: Envelope) -> str:
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the transport is down")
        return await super().publish(stream, envelope)


FAST_RETRIES = Durable(max_attempts=50, wait_initial=0.01, wait_max=0.05, wait_jitter=0.0)
BACKENDS = [pytest.param("postgresql", marks=pytest.mark.postgres), "sqlite"]


def producer(db: Database, streams: Streams) -> tuple[EventBus, TransactionalEvents]:
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=db.new_outbox())
    externalize(bus, DocumentWasIndexed, streams=streams, durable=FAST_RETRIES)
    return bus, events


def worker(streams: Streams, handled: list[tuple[int, Entry]]) -> EventBus:
    bus = EventBus()

    @bus.on(DocumentWasIndexed, name="index")
    async def index(event: DocumentWasIndexed) -> None:
        entry = current_entry()
        assert entry is not None
        handled.append((event.document_id, entry))

    consume(bus, DocumentWasIndexed, streams=streams, min_idle=1.0, block=0.2)
    return bus


async def wait_for(handled: Sequence[object], count: int) -> None:
    async def enough() -> bool:
        return len(handled) >= count

    await eventually(enough, f"{count} handled")


async def test_recorded_events_reach_the_consumer_with_id_key_and_headers(db: Database) -> None:
    streams = Streams(MemoryStreams(), prefix="t")
    web, events = producer(db, streams)
    handled: list[tuple[int, Entry]] = []
    async with web, worker(streams, handled):
        recorded = await record(
            db,
            events,
            *(DocumentWasIndexed(document_id=n) for n in range(20)),
            key="tenant-7",
            headers={"traceparent": "00-abc-def-01"},
        )
        await wait_for(handled, 20)
        await db.wait_for_statuses({"completed": 20})
    by_number = dict(handled)
    assert sorted(by_number) == list(range(20))
    for item in recorded:
        entry = by_number[item.event.document_id]
        assert entry.envelope.id == str(item.event_id)
        assert entry.envelope.key == "tenant-7"
        assert entry.envelope.headers == {"traceparent": "00-abc-def-01"}
        assert entry.envelope.name == "document-was-indexed"


async def test_a_rolled_back_transaction_puts_nothing_in_the_stream(db: Database) -> None:
    transport = MemoryStreams()
    streams = Streams(transport, prefix="t")
    web, events = producer(db, streams)
    handled: list[tuple[int, Entry]] = []
    async with web, worker(streams, handled):
        with pytest.raises(RuntimeError):
            async with db.sessions.begin() as session:
                events.record(session, DocumentWasIndexed(document_id=1))
                raise RuntimeError("rolled back")
        await record(db, events, DocumentWasIndexed(document_id=2))
        await wait_for(handled, 1)
    assert [number for number, _ in handled] == [2]
    (group,) = await streams.groups(DocumentWasIndexed)
    assert (group.pending, group.lag) == (0, 0)


async def test_a_failing_transport_is_retried_by_the_outbox_and_nothing_is_lost(
    db: Database,
) -> None:
    transport = FlakyStreams(failures=15)
    streams = Streams(transport, prefix="t")
    web, events = producer(db, streams)
    handled: list[tuple[int, Entry]] = []
    async with web, worker(streams, handled):
        await record(db, events, *(DocumentWasIndexed(document_id=n) for n in range(10)))
        await wait_for(handled, 10)
        await db.wait_for_statuses({"completed": 10})
    assert transport.failures == 0
    assert sorted(number for number, _ in handled) == list(range(10))


async def test_an_emitted_event_is_published_at_once_with_a_new_id() -> None:
    streams = Streams(MemoryStreams(), prefix="t")
    web = EventBus()
    externalize(web, DocumentWasIndexed, streams=streams)
    handled: list[tuple[int, Entry]] = []
    async with worker(streams, handled):
        result = await web.emit(DocumentWasIndexed(document_id=5))
        await wait_for(handled, 1)
    assert result.handlers == ("externalize:document-was-indexed",)
    ((number, entry),) = handled
    assert number == 5
    assert entry.envelope.key is None and len(entry.envelope.id) == 36
