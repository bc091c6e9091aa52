"""aioevents.otel: spans after the OpenTelemetry messaging conventions, read back from the SDK.

The spans go to the SDK's InMemorySpanExporter through a tracer provider given to `Tracing`
(the global provider is never set in this process: it can be set once only). The last test
follows one trace from an HTTP request through the outbox and Redis Streams into a worker
process, which sets the global provider as an application would and writes its spans to a
file (tests/otel_worker_app.py).
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import anyio
import httpx
import pytest
import pytest_asyncio
import redis.asyncio
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.propagators.textmap import (
    CarrierT,
    Getter,
    Setter,
    TextMapPropagator,
    default_getter,
    default_setter,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import NoOpTracerProvider, SpanKind, StatusCode
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from aioevents import Durable, EventBus
from aioevents.otel import IN_PROCESS_SYSTEM, Tracing
from aioevents.redis_streams import RedisStreams
from aioevents.sqlalchemy import TransactionalEvents
from aioevents.streams import Envelope, MemoryStreams, Streams, consume, externalize

from . import otel_worker_app as app
from .outbox_support import Database, eventually, open_database, record
from .streams_support import Workers

pytestmark = pytest.mark.anyio


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderWasPlaced:
    order_id: int


class PaymentDeclined(Exception):
    pass


@dataclass
class Traced:
    """A `Tracing` on an SDK provider of the test's own, and what it exported."""

    provider: TracerProvider
    exporter: InMemorySpanExporter
    tracing: Tracing

    @property
    def tracer(self) -> trace.Tracer:
        return self.provider.get_tracer("test")

    def spans(self) -> list[ReadableSpan]:
        return list(self.exporter.get_finished_spans())

    def named(self, name: str) -> list[ReadableSpan]:
        return [span for span in self.spans() if span.name == name]

    def one(self, name: str, **attributes: object) -> ReadableSpan:
        found = [
            span
            for span in self.named(name)
            if all((span.attributes or {}).get(k) == v for k, v in attributes.items())
        ]
        assert len(found) == 1, (name, attributes, [s.name for s in self.spans()])
        return found[0]


@pytest.fixture
def traced() -> Iterator[Traced]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Traced(provider, exporter, Tracing(provider))
    provider.shutdown()


def span_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


def parent_id(span: ReadableSpan) -> int | None:
    return None if span.parent is None else span.parent.span_id


def attributes(span: ReadableSpan) -> dict[str, object]:
    return dict(span.attributes or {})


def sent(system: str, destination: str, message_id: str) -> dict[str, object]:
    """The attributes of a send span."""
    return {
        "messaging.system": system,
        "messaging.operation.type": "send",
        "messaging.operation.name": "send",
        "messaging.destination.name": destination,
        "messaging.message.id": message_id,
    }


def processed(system: str, destination: str, group: str, **more: object) -> dict[str, object]:
    """The attributes of a process span (``more``: the message id and attempt)."""
    return {
        "messaging.system": system,
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.destination.name": destination,
        "messaging.consumer.group.name": group,
        **more,
    }


# -- in process: emit ---------------------------------------------------------------------------


async def test_each_handler_gets_a_current_process_span_under_the_emitters_span(
    traced: Traced,
) -> None:
    bus = EventBus(hooks=[traced.tracing])
    inner: list[trace.Span] = []

    @bus.on(OrderWasPlaced, name="ship")
    async def ship(event: OrderWasPlaced) -> None:
        with traced.tracer.start_as_current_span("ship it") as span:
            inner.append(span)

    @bus.on(OrderWasPlaced, name="mail")
    def mail(event: OrderWasPlaced) -> None:  # a sync handler: in a worker thread
        with traced.tracer.start_as_current_span("mail it") as span:
            inner.append(span)

    with traced.tracer.start_as_current_span("request") as request:
        assert (await bus.emit(OrderWasPlaced(order_id=1))).ok
    request_id = request.get_span_context().span_id
    for handler in ("ship", "mail"):
        process = traced.one(
            "process order-was-placed", **{"messaging.consumer.group.name": handler}
        )
        assert process.kind is SpanKind.CONSUMER
        assert parent_id(process) == request_id
        assert process.links == ()
        assert attributes(process) == processed(IN_PROCESS_SYSTEM, "order-was-placed", handler)
        assert parent_id(traced.one(f"{handler} it")) == span_id(process)
        assert process.status.status_code is StatusCode.UNSET
    assert len(inner) == 2
    # the context is back as it was once the handlers are done
    assert trace.get_current_span() is trace.INVALID_SPAN


async def test_a_failing_handler_has_error_type_and_status_error(traced: Traced) -> None:
    bus = EventBus(hooks=[traced.tracing])

    @bus.on(OrderWasPlaced, name="charge")
    async def charge(event: OrderWasPlaced) -> None:
        raise PaymentDeclined("card refused")

    @bus.on(OrderWasPlaced, name="late")
    async def late(event: OrderWasPlaced) -> None:
        raise TimeoutError

    result = await bus.emit(OrderWasPlaced(order_id=1))
    assert len(result.errors) == 2
    failed = traced.one("process order-was-placed", **{"messaging.consumer.group.name": "charge"})
    assert failed.status.status_code is StatusCode.ERROR
    assert attributes(failed)["error.type"] == f"{__name__}.PaymentDeclined"
    assert failed.status.description == "PaymentDeclined: card refused"
    assert [event.name for event in failed.events] == ["exception"]
    timed_out = traced.one("process order-was-placed", **{"messaging.consumer.group.name": "late"})
    assert attributes(timed_out)["error.type"] == "TimeoutError"  # a builtin: no module


async def test_a_cancelled_handlers_span_ends_without_an_error(traced: Traced) -> None:
    bus = EventBus(hooks=[traced.tracing])
    started = anyio.Event()

    @bus.on(OrderWasPlaced, name="slow")
    async def slow(event: OrderWasPlaced) -> None:
        started.set()
        await anyio.sleep_forever()

    async with anyio.create_task_group() as tasks:
        tasks.start_soon(bus.emit, OrderWasPlaced(order_id=1))
        await started.wait()
        tasks.cancel_scope.cancel()
    span = traced.one("process order-was-placed")
    assert span.end_time is not None
    assert span.status.status_code is StatusCode.UNSET
    assert "error.type" not in attributes(span)


async def test_a_batch_handlers_span_counts_its_events(traced: Traced) -> None:
    bus = EventBus(hooks=[traced.tracing])
    handled: list[int] = []

    @bus.on_batch(OrderWasPlaced, max_size=3, max_wait=60, name="tally")
    async def tally(events: Sequence[OrderWasPlaced]) -> None:
        handled.extend(event.order_id for event in events)

    async with bus:
        for n in range(3):
            await bus.publish(OrderWasPlaced(order_id=n))
    assert handled == [0, 1, 2]
    span = traced.one("process order-was-placed")
    assert attributes(span)["messaging.batch.message_count"] == 3


# -- no SDK, and a hook that fails ----------------------------------------------------------------


async def test_without_an_sdk_nothing_is_traced_and_nothing_changes() -> None:
    # This process never sets the global provider: the API's default is still in place.
    for tracing in (Tracing(), Tracing(trace.get_tracer_provider()), Tracing(NoOpTracerProvider())):
        assert not tracing.active
        bus = EventBus(hooks=[tracing])
        ran: list[object] = []
        sub = bus.subscribe(OrderWasPlaced, ran.append)
        assert (await bus.emit(OrderWasPlaced(order_id=1))).ok
        assert len(ran) == 1
        assert tracing.handler_started(OrderWasPlaced(order_id=1), sub) is None
        headers = {"tenant": "7"}
        token = tracing.send_started(
            OrderWasPlaced(order_id=1),
            system="redis",
            destination="t:order-was-placed",
            message_id="1",
            headers=headers,
        )
        assert token is None
        assert headers == {"tenant": "7"}  # nothing injected
        tracing.send_finished(token, error=None)
        assert repr(tracing) == "<Tracing active=False>"


def test_a_provider_set_later_makes_tracing_active() -> None:
    code = """if True:
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from aioevents.otel import Tracing
        tracing = Tracing()
        assert not tracing.active
        trace.set_tracer_provider(TracerProvider())
        assert tracing.active and tracing.active
        print("ok")
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr


def test_a_provider_named_in_the_environment_makes_tracing_active() -> None:
    code = "from aioevents.otel import Tracing; print(Tracing().active)"
    environment = {**os.environ, "OTEL_PYTHON_TRACER_PROVIDER": "sdk_tracer_provider"}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment
    )
    assert done.stdout.strip() == "True", done.stderr


def test_without_opentelemetry_the_import_names_the_extra() -> None:
    code = "import sys; sys.modules['opentelemetry'] = None; import aioevents.otel"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert "pip install 'aioevents[otel]'" in done.stderr


class BrokenPropagator(TextMapPropagator):
    def extract(
        self, carrier: CarrierT, context: Any = None, getter: Getter[CarrierT] = default_getter
    ) -> Any:
        raise RuntimeError("extract is broken")

    def inject(
        self, carrier: CarrierT, context: Any = None, setter: Setter[CarrierT] = default_setter
    ) -> None:
        raise RuntimeError("inject is broken")

    @property
    def fields(self) -> set[str]:
        return {"traceparent"}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_failing_hook_never_fails_a_handler_or_a_send(
    traced: Traced, caplog: pytest.LogCaptureFixture
) -> None:
    tracing = Tracing(traced.provider, propagator=BrokenPropagator())
    streams = Streams(MemoryStreams(), prefix="t", hooks=[tracing])
    bus, handled = shipping(streams, tracing)
    async with bus:
        # inject fails: published all the same; extract fails: handled all the same
        await streams.publish(OrderWasPlaced(order_id=1), headers={"tenant": "7"})
        await eventually(_has(handled, 1), "the entry handled")
    assert handled == [1]
    assert "the send is not affected" in caplog.text
    assert "the handler is not affected" in caplog.text


def shipping(streams: Streams, tracing: Tracing) -> tuple[EventBus, list[int]]:
    """A bus traced by ``tracing`` whose handler "ship" consumes OrderWasPlaced from
    ``streams``, and the ids it handled."""
    bus = EventBus(hooks=[tracing])
    handled: list[int] = []

    @bus.on(OrderWasPlaced, name="ship")
    async def ship(event: OrderWasPlaced) -> None:
        handled.append(event.order_id)

    consume(bus, OrderWasPlaced, streams=streams, block=0.05)
    return bus, handled


def _has(items: list[Any], count: int) -> Any:
    async def check() -> bool:
        return len(items) >= count

    return check


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(TypeError, match="tracer_provider must be a TracerProvider"):
        Tracing("provider")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="propagator must be a TextMapPropagator"):
        Tracing(propagator="w3c")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="send_started"):
        Streams(MemoryStreams(), hooks=[object()])
    with pytest.raises(TypeError, match="iterable of send hooks"):
        Streams(MemoryStreams(), hooks="tracing")


# -- streams --------------------------------------------------------------------------------------


class DownStreams(MemoryStreams):
    async def publish(self, stream: str, envelope: Envelope) -> str:
        raise ConnectionError("the transport is down")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_publish_sends_and_the_consumer_processes_in_the_same_trace(traced: Traced) -> None:
    streams = Streams(MemoryStreams(), prefix="t", hooks=[traced.tracing])
    bus = EventBus(hooks=[traced.tracing])
    seen: list[Mapping[str, str]] = []

    @bus.on(OrderWasPlaced, name="ship")
    async def ship(event: OrderWasPlaced) -> None:
        from aioevents.streams import current_entry

        entry = current_entry()
        assert entry is not None
        seen.append(entry.envelope.headers)
        await bus.emit(Shipped(order_id=event.order_id))  # a nested emit: in process

    @bus.on(Shipped, name="notify")
    async def notify(event: Shipped) -> None:
        pass

    consume(bus, OrderWasPlaced, streams=streams, block=0.05)
    async with bus:
        with traced.tracer.start_as_current_span("request") as request:
            entry_id = await streams.publish(
                OrderWasPlaced(order_id=1), event_id="evt-1", headers={"tenant": "7"}
            )
        await eventually(_has(seen, 1), "the entry handled")
        await eventually(_spans(traced, "process shipped"), "the nested handler's span")
    assert entry_id
    send = traced.one("send t:order-was-placed")
    assert send.kind is SpanKind.PRODUCER
    assert parent_id(send) == request.get_span_context().span_id
    assert attributes(send) == sent("aioevents.memory", "t:order-was-placed", "evt-1")
    (headers,) = seen
    assert headers["tenant"] == "7"
    assert headers["traceparent"].split("-")[2] == format(span_id(send), "016x")
    process = traced.one("process order-was-placed")
    assert parent_id(process) == span_id(send)
    assert [link.context.span_id for link in process.links] == [span_id(send)]
    assert attributes(process) == processed(
        "aioevents.memory",
        "t:order-was-placed",
        "ship",
        **{"messaging.message.id": "evt-1", "aioevents.attempt": 1},
    )
    nested = traced.one("process shipped")
    assert parent_id(nested) == span_id(process)
    assert attributes(nested)["messaging.system"] == IN_PROCESS_SYSTEM
    assert nested.links == ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Shipped:
    order_id: int


def _spans(traced: Traced, name: str) -> Any:
    async def check() -> bool:
        return bool(traced.named(name))

    return check


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_failed_send_has_error_type(traced: Traced) -> None:
    streams = Streams(DownStreams(), prefix="t", partitions=2, hooks=[traced.tracing])
    with pytest.raises(ConnectionError):
        await streams.publish(OrderWasPlaced(order_id=1), key="k")
    (send,) = traced.spans()
    assert send.name.startswith("send t:order-was-placed:")  # the partition's stream
    assert attributes(send)["error.type"] == "ConnectionError"
    assert send.status.status_code is StatusCode.ERROR


class StuckStreams(MemoryStreams):
    async def publish(self, stream: str, envelope: Envelope) -> str:
        await anyio.sleep_forever()
        raise AssertionError("never")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cancelled_send_ends_without_an_error(traced: Traced) -> None:
    streams = Streams(StuckStreams(), prefix="t", hooks=[traced.tracing])
    with anyio.move_on_after(0.01):
        await streams.publish(OrderWasPlaced(order_id=1))
    (send,) = traced.spans()
    assert send.end_time is not None
    assert send.status.status_code is StatusCode.UNSET
    assert "error.type" not in attributes(send)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_entry_without_a_trace_context_starts_a_trace(traced: Traced) -> None:
    streams = Streams(MemoryStreams(), prefix="t")  # publishes without hooks
    bus, handled = shipping(streams, traced.tracing)
    async with bus:
        with traced.tracer.start_as_current_span("elsewhere"):
            await streams.publish(OrderWasPlaced(order_id=1), headers={"tenant": "7"})
        await eventually(_has(handled, 1), "the entry handled")
    process = traced.one("process order-was-placed")
    assert process.parent is None
    assert process.links == ()
    assert attributes(process)["messaging.system"] == "aioevents.memory"


# -- the outbox, and externalize -------------------------------------------------------------------

FAST = Durable(max_attempts=2, wait_initial=0.01, wait_max=0.05, wait_jitter=0.0)


@pytest_asyncio.fixture
async def db(tmp_path: Path) -> AsyncIterator[Database]:
    async with open_database("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'outbox.db'}") as database:
        yield database


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_record_sends_to_the_outbox_and_its_relay_processes_under_it(
    traced: Traced, db: Database
) -> None:
    bus = EventBus(hooks=[traced.tracing])
    events = TransactionalEvents(bus, outbox=db.new_outbox())
    attempts: list[int] = []

    @bus.on(OrderWasPlaced, durable=FAST, name="bill")
    async def bill(event: OrderWasPlaced) -> None:
        attempts.append(event.order_id)
        if len(attempts) == 1:
            raise PaymentDeclined("first attempt")

    async with bus:
        with traced.tracer.start_as_current_span("request") as request:
            (recorded,) = await record(db, events, OrderWasPlaced(order_id=1), headers={"a": "b"})
        await db.wait_for_statuses({"completed": 1})
    event_id = str(recorded.event_id)
    send = traced.one("send order-was-placed")
    assert send.kind is SpanKind.PRODUCER
    assert parent_id(send) == request.get_span_context().span_id
    assert attributes(send) == sent("aioevents.outbox", "order-was-placed", event_id)
    (row,) = await db.event_rows()
    stored = json.loads(row.headers)
    assert stored["a"] == "b"
    assert stored["traceparent"].split("-")[2] == format(span_id(send), "016x")
    first, second = sorted(
        traced.named("process order-was-placed"), key=lambda s: s.start_time or 0
    )
    for attempt, process in enumerate((first, second), start=1):
        assert parent_id(process) == span_id(send)
        assert [link.context.span_id for link in process.links] == [span_id(send)]
        assert attributes(process)["messaging.system"] == "aioevents.outbox"
        assert attributes(process)["messaging.message.id"] == event_id
        assert attributes(process)["messaging.consumer.group.name"] == "bill"
        assert attributes(process)["aioevents.attempt"] == attempt
    assert attributes(first)["error.type"] == f"{__name__}.PaymentDeclined"
    assert second.status.status_code is StatusCode.UNSET


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_outbox_send_ends_with_its_transaction(traced: Traced, db: Database) -> None:
    """The event is sent when its transaction commits: the send span ends after the COMMIT,
    and one whose transaction (or savepoint) rolled back ends as a failed send."""
    bus = EventBus(hooks=[traced.tracing])
    events = TransactionalEvents(bus, outbox=db.new_outbox())

    @bus.on(OrderWasPlaced, durable=FAST, name="bill")
    async def bill(event: OrderWasPlaced) -> None:
        return None

    async with db.sessions.begin() as session:
        events.record(session, OrderWasPlaced(order_id=1))
        assert traced.named("send order-was-placed") == []  # still open: not sent yet
    [committed] = traced.named("send order-was-placed")
    assert committed.status.status_code is StatusCode.UNSET
    with pytest.raises(ZeroDivisionError):
        async with db.sessions.begin() as session:
            events.record(session, OrderWasPlaced(order_id=2))
            raise ZeroDivisionError
    async with db.sessions.begin() as session:
        savepoint = await session.begin_nested()
        events.record(session, OrderWasPlaced(order_id=3))
        await savepoint.rollback()
    rolled_back = [s for s in traced.named("send order-was-placed") if s is not committed]
    assert len(rolled_back) == 2
    for span in rolled_back:
        assert span.status.status_code is StatusCode.ERROR
        assert attributes(span)["error.type"] == "aioevents.sqlalchemy.RolledBackError"
    assert await db.statuses() == {"pending": 1}  # only the committed one was stored


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_externalize_forwards_the_headers_with_its_own_send_context(
    traced: Traced, db: Database
) -> None:
    streams = Streams(MemoryStreams(), prefix="t", hooks=[traced.tracing])  # told once
    web = EventBus(hooks=[traced.tracing])
    events = TransactionalEvents(web, outbox=db.new_outbox())
    externalize(web, OrderWasPlaced, streams=streams, durable=FAST)
    worker, handled = shipping(streams, traced.tracing)
    async with web, worker:
        (recorded,) = await record(db, events, OrderWasPlaced(order_id=1), headers={"a": "b"})
        await eventually(_has(handled, 1), "the entry handled")
    outbox_send = traced.one("send order-was-placed")
    relayed = traced.one("process order-was-placed", **{"messaging.system": "aioevents.outbox"})
    stream_send = traced.one("send t:order-was-placed")
    consumed = traced.one("process order-was-placed", **{"messaging.system": "aioevents.memory"})
    assert parent_id(relayed) == span_id(outbox_send)
    assert attributes(relayed)["messaging.consumer.group.name"] == "externalize:order-was-placed"
    assert parent_id(stream_send) == span_id(relayed)
    assert parent_id(consumed) == span_id(stream_send)
    assert attributes(consumed)["messaging.message.id"] == str(recorded.event_id)
    trace_ids = {s.get_span_context().trace_id for s in traced.spans()}  # type: ignore[union-attr]
    assert len(trace_ids) == 1


# -- one trace: an HTTP request, the outbox, Redis Streams, a worker process --------------------


WORKER_COMMAND = [sys.executable, "-m", "aioevents", "worker", "tests.otel_worker_app:bus"]


@asynccontextmanager
async def instrumented(engine: AsyncEngine, provider: TracerProvider) -> AsyncIterator[None]:
    """The engine's statements as spans (opentelemetry-instrumentation-sqlalchemy)."""
    instrumentor = SQLAlchemyInstrumentor()
    # Its declared range stops below SQLAlchemy 2.1, which it instruments all the same.
    instrumentor.instrument(
        engine=engine.sync_engine, tracer_provider=provider, skip_dep_check=True
    )
    try:
        yield
    finally:
        instrumentor.uninstrument()


def web_app(db: Database, events: TransactionalEvents, provider: TracerProvider) -> Any:
    async def place_order(request: Request) -> JSONResponse:
        order_id = int(request.path_params["order_id"])
        async with db.sessions.begin() as session:
            recorded = events.record(
                session, app.OrderWasPlaced(order_id=order_id), headers={"tenant": "7"}
            )
        return JSONResponse({"event_id": str(recorded.event_id)})

    starlette = Starlette(routes=[Route("/orders/{order_id}", place_order, methods=["POST"])])
    return OpenTelemetryMiddleware(starlette, tracer_provider=provider)


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_one_trace_from_a_request_through_the_outbox_and_a_stream_to_a_worker(
    traced: Traced, database_url: str, redis_url: str, tmp_path: Path
) -> None:
    prefix = f"otel-test-{uuid4().hex[:8]}"
    spans_file = tmp_path / "worker-spans.jsonl"
    redis_streams = RedisStreams(redis_url)
    streams = Streams(redis_streams, prefix=prefix)
    environment = app.environment(redis_url, prefix, spans_file)
    try:
        with Workers(environment, tmp_path / "logs", WORKER_COMMAND) as workers:
            worker = workers.start()
            async with open_database("postgresql", database_url) as db:
                tables = db.prefix
                web = EventBus(hooks=[traced.tracing])
                events = TransactionalEvents(web, outbox=db.new_outbox())
                externalize(web, app.OrderWasPlaced, streams=streams)
                async with instrumented(db.engine, traced.provider), web:
                    await workers.wait_running(worker)
                    transport = httpx.ASGITransport(app=web_app(db, events, traced.provider))
                    async with httpx.AsyncClient(
                        transport=transport, base_url="http://shop"
                    ) as client:
                        response = await client.post("/orders/42")
                    assert response.status_code == 200
                    event_id = response.json()["event_id"]
                    await db.wait_for_statuses({"completed": 1})

                    async def worker_done() -> bool:
                        names = [span["name"] for span in app.read_spans(spans_file)]
                        return names.count("process order-was-placed") == 2

                    await eventually(worker_done, lambda: workers.log_tail(worker))
                assert set((await workers.stop()).values()) == {0}
    finally:  # the workers are gone by now: nothing writes the keys again
        await _delete_keys(redis_url, prefix)
        await redis_streams.aclose()
    here = [app.span_record(span) for span in traced.spans()]
    there = app.read_spans(spans_file)
    by_id = {span["span_id"]: span for span in here + there}

    def one(name: str, spans: list[dict[str, Any]], **wanted: object) -> dict[str, Any]:
        found = [
            s
            for s in spans
            if s["name"] == name and all(s["attributes"].get(k) == v for k, v in wanted.items())
        ]
        assert len(found) == 1, (name, wanted, [s["name"] for s in spans])
        return found[0]

    server = one("POST /orders/42", here)
    assert server["kind"] == "SERVER"
    # Every span of the worker is in the request's trace (in this process, the relay's polls
    # make traces of their own).
    assert {span["trace_id"] for span in there} == {server["trace_id"]}
    outbox_send = one("send order-was-placed", here)
    relayed = one("process order-was-placed", here)
    stream = f"{prefix}:order-was-placed"
    stream_send = one(f"send {stream}", here)
    fulfilled = one(
        "process order-was-placed", there, **{"messaging.consumer.group.name": app.FULFIL}
    )
    charged = one(
        "process order-was-placed", there, **{"messaging.consumer.group.name": app.CHARGE}
    )
    fulfilling = one(app.FULFILLING, there)
    assert fulfilling["attributes"] == {"tenant": "7"}  # the outbox's headers went on
    # the chain, each a child of the one before; the process spans link to their send
    chain = [server, outbox_send, relayed, stream_send, fulfilled, fulfilling]
    for parent, child in itertools.pairwise(chain):
        assert child["parent_id"] == parent["span_id"], (
            child["name"],
            by_id.get(child["parent_id"]),
        )
    assert relayed["links"] == [outbox_send["span_id"]]
    assert fulfilled["links"] == [stream_send["span_id"]]
    assert charged["parent_id"] == stream_send["span_id"]
    # The outbox's rows: written in the request's transaction by its last statement before
    # COMMIT (the SQLAlchemy instrumentation makes no span of the COMMIT itself). The send
    # starts at record() and ends once the COMMIT returned, so it spans the write and the
    # COMMIT; the relay runs the delivery only after it.
    (written,) = [
        s for s in here if f"INSERT INTO {tables}events" in str(s["attributes"].get("db.statement"))
    ]
    assert written["parent_id"] == server["span_id"]
    assert outbox_send["start"] <= written["start"] <= written["end"] <= outbox_send["end"]
    assert outbox_send["end"] <= relayed["start"]
    assert [s["kind"] for s in (outbox_send, relayed, stream_send, fulfilled)] == [
        "PRODUCER",
        "CONSUMER",
        "PRODUCER",
        "CONSUMER",
    ]
    assert stream_send["attributes"] == sent("redis", stream, event_id)
    assert fulfilled["attributes"] == processed(
        "redis", stream, app.FULFIL, **{"messaging.message.id": event_id, "aioevents.attempt": 1}
    )
    assert fulfilled["status"] == "UNSET"
    assert charged["status"] == "ERROR"
    assert charged["attributes"]["error.type"] == "tests.otel_worker_app.PaymentDeclined"
    assert relayed["attributes"]["messaging.consumer.group.name"] == "externalize:order-was-placed"


async def _delete_keys(redis_url: str, prefix: str) -> None:
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
