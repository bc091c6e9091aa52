"""Attacks on issue 13's observability code, the way production would hit it: the panel fed
hostile payloads, names and query strings, clicked twice at once; tracing cancelled from every
direction; metrics scraped from another thread while handlers run.

Each test is one finding or one attack that held. A bug in code this file's author does not
own is a strict xfail naming where the fix belongs (see the reasons).
"""

from __future__ import annotations

import asyncio
import re
import secrets
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.routing import Mount

from aioevents import Durable, EventBus
from aioevents.otel import Tracing
from aioevents.panel import Panel
from aioevents.prometheus import Metrics
from aioevents.sqlalchemy import TransactionalEvents
from aioevents.streams import MemoryStreams, Streams, consume

from .outbox_support import Database, eventually, record
from .test_panel import MOUNT, client, csrf_token

HOSTILE = '"><script>alert(1)</script><img src=x onerror=alert(2)>'
QUICKLY = Durable(max_attempts=1, wait_initial=0.001, wait_max=0.001, wait_jitter=0)


@dataclass(frozen=True, slots=True, kw_only=True)
class Hostile:
    __event_name__ = "attack.hostile"
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Tick:
    __event_name__ = "attack.tick"
    number: int


async def one_dead_delivery(db: Database, handler: str = "attack.failing") -> int:
    """One event whose only durable handler fails once and is dead: its delivery id."""
    bus = EventBus()

    async def fail(event: Tick) -> None:
        raise ValueError("down")

    bus.subscribe(Tick, fail, name=handler, durable=QUICKLY)
    events = TransactionalEvents(bus, outbox=db.outbox)
    async with bus:
        await record(db, events, Tick(number=1))
        await db.wait_for_statuses({"dead": 1})
    [dead] = await db.outbox.deliveries(status="dead")
    return dead.id


# -- the panel: bad input is a 400 naming it, never a 500 ---------------------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("before=%C2%B2", "before: a delivery id"),  # "²".isdigit() is True, int() refuses it
        ("before=99999999999999999999", "before: a delivery id"),  # past a BIGINT
        ("since=9999-12-31T23:59:59-14:00", "since: an ISO 8601 time"),  # past year 9999 in UTC
        ("until=0001-01-01T00:00%2B14:00", "until: an ISO 8601 time"),  # before year 1 in UTC
        ("event=a%00b", "search: a NUL character"),  # PostgreSQL text refuses NUL
        ("handler=a%00b", "search: a NUL character"),
    ],
)
async def test_dead_page_answers_400_to_queries_the_database_cannot_take(
    db: Database, query: str, message: str
) -> None:
    async with client(Panel(outbox=db.outbox)) as browser:
        page = await browser.get(f"{MOUNT}/dead?{query}")
    assert page.status_code == 400, page.text
    assert page.text.startswith(message)


@pytest.mark.asyncio
@pytest.mark.parametrize("bad", ["\u00b2", "\u0663", "99999999999999999999", "0"])
async def test_actions_answer_400_to_ids_the_database_cannot_take(db: Database, bad: str) -> None:
    dead = await one_dead_delivery(db)
    async with client(Panel(outbox=db.outbox)) as browser:
        token = await csrf_token(browser)
        for action in ("retry", "discard"):
            for field in ("one", "id"):
                answer = await browser.post(
                    f"{MOUNT}/dead/{action}", data={"csrf": token, field: bad}
                )
                assert answer.status_code == 400, (action, field, answer.text)
                assert answer.text.startswith("id: a delivery id"), answer.text
    # "٣" (an Arabic-Indic 3) is no alias of another row: nothing changed
    assert [d.id for d in await db.outbox.deliveries(status="dead")] == [dead]


@pytest.mark.asyncio
async def test_a_time_in_another_zone_searches_in_utc(db: Database) -> None:
    await one_dead_delivery(db)
    async with client(Panel(outbox=db.outbox)) as browser:
        later = await browser.get(f"{MOUNT}/dead", params={"since": "9999-12-30T00:00+05:00"})
        earlier = await browser.get(f"{MOUNT}/dead", params={"until": "2000-01-01T05:00+05:00"})
        around = await browser.get(f"{MOUNT}/dead", params={"since": "2000-01-01T05:00+05:00"})
    assert [p.status_code for p in (later, earlier, around)] == [200, 200, 200]
    assert "data-delivery-id" not in later.text
    assert "data-delivery-id" not in earlier.text
    assert "data-delivery-id" in around.text


# -- the panel: what events carry is shown, never run ---------------------------------------------


@pytest.mark.asyncio
async def test_hostile_payloads_headers_keys_and_errors_are_escaped_on_every_page(
    db: Database,
) -> None:
    bus = EventBus()

    async def fail(event: Hostile) -> None:
        raise ValueError(event.text)

    bus.subscribe(Hostile, fail, name="attack.<b>handler</b>&x", durable=QUICKLY)
    events = TransactionalEvents(bus, outbox=db.outbox)
    async with bus:
        [recorded] = await record(
            db, events, Hostile(text=HOSTILE), key=HOSTILE, headers={HOSTILE: HOSTILE}
        )
        await db.wait_for_statuses({"dead": 1})
    streams = Streams(MemoryStreams(), prefix="attack")
    letters_bus = EventBus()

    async def refuse(event: Hostile) -> None:
        raise ValueError(event.text)

    letters_bus.subscribe(Hostile, refuse, name="attack.stream")
    consume(letters_bus, Hostile, streams=streams, max_deliveries=1, min_idle=60.0)
    async with letters_bus:
        await streams.publish(Hostile(text=HOSTILE), key=HOSTILE)

        async def dead_letter() -> bool:
            return len(await streams.dead_letters(Hostile)) == 1

        await eventually(dead_letter, "a stream dead letter")
    panel = Panel(outbox=db.outbox, streams=streams, event_types=[Hostile], title=HOSTILE)
    async with client(panel) as browser:
        pages = {
            path: await browser.get(f"{MOUNT}{path}")
            for path in (
                "/",
                "/handlers",
                "/deliveries",
                "/dead",
                f"/dead?event={HOSTILE}&handler={HOSTILE}&since=&until=",
                f"/event/{recorded.event_id}",
            )
        }
    for path, page in pages.items():
        assert page.status_code == 200, (path, page.text)
        assert "<script>alert" not in page.text, path
        assert "<img src=x" not in page.text, path
        assert "<b>handler" not in page.text, path
    shown = pages[f"/event/{recorded.event_id}"].text
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in shown  # there, as text
    assert "attack.&lt;b&gt;handler&lt;/b&gt;&amp;x" in pages["/handlers"].text
    # the handler's link to its dead letters keeps its name whole (& encoded, not a new field)
    assert "?handler=attack.%3Cb%3Ehandler%3C/b%3E%26x" in pages["/handlers"].text
    assert "&lt;script&gt;alert(1)" in pages["/dead"].text  # the stream letter's reason


@pytest.mark.asyncio
async def test_an_error_page_is_plain_text_and_never_html(db: Database) -> None:
    async with client(Panel(outbox=db.outbox)) as browser:
        bad = await browser.get(f"{MOUNT}/event/{HOSTILE}")
        cursor = await browser.get(f"{MOUNT}/dead", params={"before": HOSTILE})
    assert bad.status_code == 404  # a "/" in it: no route
    assert cursor.status_code == 400
    for answer in (bad, cursor):
        assert answer.headers["content-type"].startswith("text/plain")


# -- the panel: actions raced and repeated ----------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_retry_clicks_resubmit_a_dead_delivery_once(db: Database) -> None:
    dead = await one_dead_delivery(db)
    async with client(Panel(outbox=db.outbox)) as browser:
        token = await csrf_token(browser)
        answers = await asyncio.gather(
            *(
                browser.post(f"{MOUNT}/dead/retry", data={"csrf": token, "one": str(dead)})
                for _ in range(8)
            )
        )
    counts = [re.search(r"count=(\d+)", a.headers["location"]) for a in answers]
    assert sorted(int(c.group(1)) for c in counts if c) == [0] * 7 + [1]
    [again] = await db.outbox.deliveries()
    assert again.status.value == "pending"


@pytest.mark.asyncio
async def test_discard_from_the_dead_page_leaves_a_row_another_operator_retried(
    db: Database,
) -> None:
    dead = await one_dead_delivery(db)
    async with client(Panel(outbox=db.outbox)) as first, client(Panel(outbox=db.outbox)) as second:
        token_first, token_second = await csrf_token(first), await csrf_token(second)
        retried = await first.post(
            f"{MOUNT}/dead/retry", data={"csrf": token_first, "one": str(dead)}
        )
        discarded = await second.post(
            f"{MOUNT}/dead/discard", data={"csrf": token_second, "one": str(dead)}
        )
    assert "count=1" in retried.headers["location"]
    [row] = await db.outbox.deliveries()
    assert row.status.value == "pending", "the retry stands"
    assert "count=0" in discarded.headers["location"]


@pytest.mark.asyncio
@pytest.mark.redis
async def test_stream_retry_of_an_id_past_redis_range_is_a_400(
    db: Database, request: pytest.FixtureRequest
) -> None:
    from aioevents.redis_streams import RedisStreams

    transport = RedisStreams(str(request.getfixturevalue("redis_url")))
    streams = Streams(transport, prefix=f"attack-{secrets.token_hex(6)}")
    panel = Panel(outbox=db.outbox, streams=streams, event_types=[Hostile])
    app = Starlette(routes=[Mount(MOUNT, panel)])
    transport_app = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport_app, base_url="http://t") as browser:
            token = await csrf_token(browser)
            answer = await browser.post(
                f"{MOUNT}/streams/retry",
                data={"csrf": token, "event": "attack.hostile", "one": "99999999999999999999-0"},
            )
    finally:
        await transport.aclose()
    assert answer.status_code == 400, answer.text


# -- the relay: what a failure's text may hold ------------------------------------------------


@pytest.mark.asyncio
@pytest.mark.postgres
async def test_a_nul_in_an_error_message_does_not_wedge_the_relay_on_postgresql(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    from .outbox_support import open_database

    async with open_database("postgresql", database_url) as database:
        bus = EventBus()

        async def binary(event: Tick) -> None:
            raise ValueError("cannot parse b'\x00\x01'")

        async def fine(event: Tick) -> None:
            return None

        bus.subscribe(Tick, binary, name="attack.binary", durable=QUICKLY)
        bus.subscribe(Tick, fine, name="attack.fine", durable=True)
        events = TransactionalEvents(bus, outbox=database.outbox)

        def write_failures() -> int:
            return sum("outcome(s) failed" in r.getMessage() for r in caplog.records)

        async def settled() -> bool:
            statuses = await database.statuses()
            return (statuses["dead"], statuses["completed"]) == (2, 2) or write_failures() >= 3

        async with bus:
            await record(database, events, Tick(number=1))
            await record(database, events, Tick(number=2))  # fine's, and binary's 2nd
            await eventually(settled, "the outcomes written, or their write failing")
            statuses = await database.statuses()
    assert statuses["completed"] == 2, statuses  # fine's completions were written
    assert write_failures() == 0


# -- tracing: no span left open, no context left attached --------------------------------------


class OpenSpans(SpanProcessor):
    """The spans started and not yet ended."""

    def __init__(self) -> None:
        self.open: dict[int, str] = {}

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        self.open[_span_id(span)] = span.name

    def on_end(self, span: ReadableSpan) -> None:
        self.open.pop(_span_id(span), None)


def _span_id(span: ReadableSpan) -> int:
    context = span.get_span_context()
    assert context is not None
    return context.span_id


@dataclass
class Watched:
    provider: TracerProvider
    exporter: InMemorySpanExporter
    spans: OpenSpans
    tracing: Tracing

    def finished(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.exporter.get_finished_spans() if s.name == name]


@pytest.fixture
def watched() -> Iterator[Watched]:
    provider, exporter, spans = TracerProvider(), InMemorySpanExporter(), OpenSpans()
    provider.add_span_processor(spans)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield Watched(provider, exporter, spans, Tracing(provider))
    provider.shutdown()


async def _cancel_scope(bus: EventBus, started: anyio.Event) -> None:
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tasks:

            async def stop() -> None:
                await started.wait()
                scope.cancel()

            tasks.start_soon(stop)
            await bus.emit(Tick(number=1))


async def _failing_sibling(bus: EventBus, started: anyio.Event) -> None:
    async def sibling() -> None:
        await started.wait()
        raise RuntimeError("sibling failed")

    with pytest.raises(ExceptionGroup):
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(sibling)
            await bus.emit(Tick(number=1))


async def _move_on(bus: EventBus, started: anyio.Event) -> None:
    async with anyio.create_task_group() as tasks:

        async def emit_until_cancelled() -> None:
            with anyio.CancelScope() as scope:
                tasks.start_soon(_cancel_when, started, scope)
                await bus.emit(Tick(number=1))

        tasks.start_soon(emit_until_cancelled)


async def _cancel_when(started: anyio.Event, scope: anyio.CancelScope) -> None:
    await started.wait()
    scope.cancel()


@pytest.mark.anyio
@pytest.mark.parametrize("handlers", [1, 3])  # one handler runs inline, several in tasks
@pytest.mark.parametrize("cancel", [_cancel_scope, _failing_sibling, _move_on])
async def test_a_cancelled_emit_leaves_no_span_open_and_no_context_attached(
    watched: Watched, cancel: Any, handlers: int
) -> None:
    bus = EventBus(hooks=[watched.tracing])
    started = anyio.Event()

    async def stuck(event: Tick) -> None:
        started.set()
        await anyio.sleep_forever()

    for number in range(handlers):
        bus.subscribe(Tick, stuck, name=f"attack.stuck-{number}")
    async with bus:
        await cancel(bus, started)
        assert watched.spans.open == {}
        assert not trace.get_current_span().get_span_context().is_valid
    await _next_emit_is_a_root(watched)


async def _next_emit_is_a_root(watched: Watched) -> None:
    after = EventBus(hooks=[watched.tracing])
    after.subscribe(Tick, _nothing, name="attack.after")
    await after.emit(Tick(number=2))
    [span] = [s for s in watched.finished("process attack.tick") if _group(s) == "attack.after"]
    assert span.parent is None, "a stale span was still current"


async def _nothing(event: object) -> None:
    return None


def _group(span: ReadableSpan) -> object:
    return (span.attributes or {}).get("messaging.consumer.group.name")


@pytest.mark.asyncio
@pytest.mark.parametrize("handlers", [1, 3])
@pytest.mark.parametrize("how", ["task.cancel", "asyncio.timeout"])
async def test_an_emit_cancelled_by_asyncio_leaves_no_span_open(
    watched: Watched, how: str, handlers: int
) -> None:
    bus = EventBus(hooks=[watched.tracing])
    started = asyncio.Event()

    async def stuck(event: Tick) -> None:
        started.set()
        await asyncio.Event().wait()

    for number in range(handlers):
        bus.subscribe(Tick, stuck, name=f"attack.stuck-{number}")
    async with bus:
        if how == "task.cancel":
            task = asyncio.ensure_future(bus.emit(Tick(number=1)))
            await started.wait()
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        else:
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(None) as timeout:
                    emitting = asyncio.ensure_future(started.wait())
                    emitting.add_done_callback(lambda _: timeout.reschedule(0))
                    await bus.emit(Tick(number=1))
        assert watched.spans.open == {}
        assert not trace.get_current_span().get_span_context().is_valid
    spans = watched.finished("process attack.tick")
    assert len(spans) == handlers
    assert all(s.status.status_code is StatusCode.UNSET for s in spans)  # no error
    await _next_emit_is_a_root(watched)


@pytest.mark.anyio
async def test_nested_emits_and_thread_handlers_nest_their_spans(watched: Watched) -> None:
    bus = EventBus(hooks=[watched.tracing])
    tracer = watched.provider.get_tracer("attack")

    async def outer(event: Hostile) -> None:
        await bus.emit(Tick(number=1))

    def in_thread(event: Tick) -> None:
        with tracer.start_as_current_span("in a thread"):
            pass

    async def leaky(event: Tick) -> None:
        otel_context.attach(otel_context.set_value("attack", "leaked"))  # never detached

    bus.subscribe(Hostile, outer, name="attack.outer")
    bus.subscribe(Tick, in_thread, name="attack.thread")
    bus.subscribe(Tick, leaky, name="attack.leaky")
    await bus.emit(Hostile(text="x"))
    [outer_span] = watched.finished("process attack.hostile")
    inner = {_group(s): s for s in watched.finished("process attack.tick")}
    [thread_span] = watched.finished("in a thread")
    assert outer_span.parent is None
    assert {g: s.parent.span_id for g, s in inner.items() if s.parent} == {
        "attack.thread": outer_span.context.span_id,
        "attack.leaky": outer_span.context.span_id,
    }
    assert thread_span.parent is not None
    assert thread_span.parent.span_id == inner["attack.thread"].context.span_id
    assert otel_context.get_value("attack") is None  # the handler's leak stayed its own
    assert watched.spans.open == {}


@pytest.mark.anyio
async def test_a_hook_removed_during_an_emit_still_ends_its_spans(watched: Watched) -> None:
    bus = EventBus(hooks=[watched.tracing])
    started, go = anyio.Event(), anyio.Event()

    async def waits(event: Tick) -> None:
        started.set()
        await go.wait()

    bus.subscribe(Tick, waits, name="attack.waits")
    bus.subscribe(Tick, _nothing, name="attack.quick")
    async with anyio.create_task_group() as tasks:
        tasks.start_soon(bus.emit, Tick(number=1))
        await started.wait()
        bus.remove_hook(watched.tracing)
        go.set()
    assert sorted(str(_group(s)) for s in watched.finished("process attack.tick")) == [
        "attack.quick",
        "attack.waits",
    ]
    await bus.emit(Tick(number=2))  # removed: no more spans
    assert len(watched.finished("process attack.tick")) == 2
    assert watched.spans.open == {}


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": "00-ab-cd-01"},  # too short
        {"traceparent": "ff-" + "1" * 32 + "-" + "2" * 16 + "-01"},  # version ff is invalid
        {"traceparent": "00-" + "0" * 32 + "-" + "2" * 16 + "-01"},  # an all-zero trace id
        {"traceparent": "00-" + "1" * 32 + "-" + "2" * 16 + "-01", "tracestate": "x" * 10_000},
        {"traceparent": "\x00" * 55},
    ],
)
async def test_a_durable_handler_under_a_malformed_stored_trace_context_still_runs(
    db: Database, watched: Watched, headers: dict[str, str]
) -> None:
    bus = EventBus()  # recorded untraced (another service, say): the headers stored as given
    handled: list[int] = []

    async def handle(event: Tick) -> None:
        handled.append(event.number)

    bus.subscribe(Tick, handle, name="attack.durable", durable=True)
    events = TransactionalEvents(bus, outbox=db.outbox)
    await record(db, events, Tick(number=7), headers=headers)
    bus.add_hook(watched.tracing)  # the relay's run is traced
    async with bus:
        await db.wait_for_statuses({"completed": 1})
    assert handled == [7]
    [process] = watched.finished("process attack.tick")
    if "tracestate" in headers:  # a valid context, with a tracestate the propagator drops
        assert process.parent is not None and process.parent.span_id == int("2" * 16, 16)
        assert len(process.links) == 1
    else:  # nothing usable: a trace of its own
        assert process.parent is None and process.links == ()
    assert watched.spans.open == {}


# -- metrics: scraped from another thread while handlers run ----------------------------------


HANDLERS = 8


@pytest.mark.anyio
async def test_scrapes_from_another_thread_while_handlers_come_and_fail_are_whole() -> None:
    from prometheus_client.parser import text_string_to_metric_families

    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    bus = EventBus(hooks=[metrics])
    errors = [type(f"Failure{n}", (Exception,), {}) for n in range(5)]
    calls = 0
    stop = threading.Event()
    scraped: list[int] = []
    broken: list[BaseException] = []

    def scrape() -> None:
        while not stop.is_set():
            try:
                text = generate_latest(registry).decode()
                families = {f.name: f for f in text_string_to_metric_families(text)}
                scraped.append(len(families["aioevents_handled"].samples))
            except BaseException as exc:  # what a scrape raised: the test fails below
                broken.append(exc)
                return

    def handler_of(number: int) -> Any:
        def handle(event: Tick) -> None:  # sync: run in a worker thread
            nonlocal calls
            calls += 1
            if event.number % 3 == 0:
                raise errors[(event.number + number) % len(errors)]("failed")

        return handle

    scraper = threading.Thread(target=scrape, daemon=True)
    scraper.start()
    try:
        for number in range(HANDLERS):  # a new handler, and new records, while scrapes run
            bus.subscribe(Tick, handler_of(number), name=f"attack.h{number}")
            for event_number in range(6):
                await bus.emit(Tick(number=event_number))
    finally:
        stop.set()
        await anyio.to_thread.run_sync(scraper.join)
    assert broken == []
    assert scraped, "the scraper ran"
    text = generate_latest(registry).decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    handled = sum(
        s.value for s in families["aioevents_handled"].samples if s.name.endswith("_total")
    )
    failures = sum(
        s.value for s in families["aioevents_handler_failures"].samples if s.name.endswith("_total")
    )
    emitted = sum(HANDLERS - n for n in range(HANDLERS)) * 6  # handler n saw 6 per later emit
    assert handled == calls == emitted
    assert failures == emitted // 3  # numbers 0 and 3 of each six
    buckets = [
        s
        for s in families["aioevents_handler_duration_seconds"].samples
        if s.name.endswith("_count")
    ]
    assert sum(s.value for s in buckets) == calls


# -- the panel while Redis is down --------------------------------------------------------------


@pytest.mark.asyncio
async def test_with_the_streams_down_the_outbox_pages_still_work(db: Database) -> None:
    from aioevents.redis_streams import RedisStreams

    from .streams_support import free_port

    dead = await one_dead_delivery(db)
    transport = RedisStreams(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    streams = Streams(transport, prefix="attack-down")
    try:
        async with client(Panel(outbox=db.outbox, streams=streams, event_types=[Tick])) as browser:
            page = await browser.get(f"{MOUNT}/dead")
            backlog = await browser.get(f"{MOUNT}/deliveries")
            token = await csrf_token(browser)
            letter = await browser.post(
                f"{MOUNT}/streams/retry", data={"csrf": token, "event": "attack.tick", "one": "1-0"}
            )
            retried = await browser.post(f"{MOUNT}/dead/retry", data={"csrf": token, "one": dead})
    finally:
        await transport.aclose()
    assert (page.status_code, backlog.status_code) == (200, 200)
    for shown in (page, backlog):
        assert "The streams could not be read: ConnectionError" in shown.text
    assert f'data-delivery-id="{dead}"' in page.text  # the outbox's dead letters are there
    assert letter.status_code == 503
    assert letter.text.startswith("the streams could not be reached")
    assert "count=1" in retried.headers["location"]


# -- send hooks: a hook's failure never fails the send ------------------------------------------


class BrokenSwitch:
    """A send hook whose ``active`` starts to raise (its configuration went away, say)."""

    def __init__(self) -> None:
        self.broken = False
        self.sends: list[str] = []

    @property
    def active(self) -> bool:
        if self.broken:
            raise RuntimeError("the switch's configuration is gone")
        return True

    def handler_started(self, event: object, subscription: object) -> None:
        return None

    def handler_finished(self, event: object, subscription: object, **_: object) -> None:
        return None

    def send_started(self, event: object, *, destination: str, **_: object) -> None:
        self.sends.append(destination)

    def send_finished(self, token: object, *, error: BaseException | None) -> None:
        return None


@pytest.mark.asyncio
async def test_a_send_hook_whose_active_raises_fails_neither_publish_nor_record(
    db: Database, caplog: pytest.LogCaptureFixture
) -> None:
    hook = BrokenSwitch()
    bus = EventBus(hooks=[hook])
    bus.subscribe(Tick, _nothing, name="attack.durable", durable=True)
    events = TransactionalEvents(bus, outbox=db.outbox)
    streams = Streams(MemoryStreams(), hooks=[hook], prefix="attack")
    hook.broken = True
    await streams.publish(Tick(number=1))
    await record(db, events, Tick(number=2))
    assert await db.count(db.events) == 1
    assert hook.sends == ["attack:attack.tick", "attack.tick"]  # called: taken as active
    told = [r for r in caplog.records if r.module == "_sending"]
    assert ["reading its active failed" in r.getMessage() for r in told] == [True, True]


@pytest.mark.asyncio
async def test_an_applications_own_baggage_header_survives_tracing(watched: Watched) -> None:
    from opentelemetry.baggage.propagation import W3CBaggagePropagator
    from opentelemetry.propagators.composite import CompositePropagator
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    from aioevents.streams import current_entry

    default = CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])
    tracing = Tracing(watched.provider, propagator=default)  # the SDK's default propagators
    streams = Streams(MemoryStreams(), hooks=[tracing], prefix="attack")
    seen: list[dict[str, str]] = []
    bus = EventBus()

    async def read(event: Tick) -> None:
        entry = current_entry()
        assert entry is not None
        seen.append(dict(entry.envelope.headers))

    bus.subscribe(Tick, read, name="attack.reader")
    consume(bus, Tick, streams=streams)
    async with bus:
        await streams.publish(Tick(number=1), headers={"baggage": "tenant=7", "x-app": "1"})

        async def got() -> bool:
            return bool(seen)

        await eventually(got, "the entry consumed")
    assert "traceparent" in seen[0]  # the send's context went along
    assert seen[0]["x-app"] == "1"
    assert seen[0].get("baggage") == "tenant=7"


@pytest.mark.asyncio
async def test_pages_run_only_the_panels_own_files_and_are_not_framed_by_other_sites(
    db: Database,
) -> None:
    async with client(Panel(outbox=db.outbox)) as browser:
        pages = [await browser.get(f"{MOUNT}{path}") for path in ("/", "/dead", "/handlers")]
    for page in pages:
        policy = page.headers["content-security-policy"]
        assert "default-src 'self'" in policy
        assert "frame-ancestors 'self'" in policy
        assert page.headers["x-frame-options"] == "SAMEORIGIN"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert "<script>" not in page.text and " style=" not in page.text  # nothing inline


# -- the attempts history: one row per failure its relay still held ------------------------------


@pytest.mark.asyncio
async def test_a_failure_written_after_the_lease_passed_on_adds_no_attempt(db: Database) -> None:
    import uuid
    from datetime import UTC, datetime, timedelta

    from aioevents._outbox_store import Failure

    dead = await one_dead_delivery(db)
    store, d = db.outbox._store, db.deliveries
    theirs, mine = uuid.uuid4(), uuid.uuid4()
    later = datetime.now(UTC) + timedelta(minutes=1)
    async with db.engine.begin() as connection:  # another relay runs it now: its lease
        await connection.execute(
            d.update()
            .where(d.c.id == dead)
            .values(status="pending", lease_token=theirs, lease_expires=later, finished_at=None)
        )
    late = Failure(dead, dead=False, due_at=later, error=ValueError("late"), attempt=2)
    async with db.engine.begin() as connection:
        assert await store.fail(connection, [late], mine) == 0
    async with db.engine.begin() as connection:
        assert await store.fail(connection, [late], theirs) == 1
    [event] = await db.outbox.deliveries(handler="attack.failing")
    record_of = await db.outbox.event(event.event_id)
    assert record_of is not None
    assert [(a.attempt, a.error_message) for a in record_of.attempts] == [(1, "down"), (2, "late")]


@pytest.mark.asyncio
async def test_behind_a_proxy_with_a_root_path_links_cookie_and_redirects_keep_it(
    db: Database,
) -> None:
    app = Starlette(routes=[Mount("/ev", Panel(outbox=db.outbox))])

    async def proxied(scope: Any, receive: Any, send: Any) -> None:
        # The proxy takes /proxy off, uvicorn --root-path /proxy puts it in root_path and
        # back in path: the app sees what the browser asked for, and where it is mounted.
        if scope["type"] == "http":
            scope = {**scope, "root_path": "/proxy"}
        await app(scope, receive, send)

    transport = httpx.ASGITransport(app=proxied)
    async with httpx.AsyncClient(transport=transport, base_url="http://panel.test") as browser:
        page = await browser.get("/proxy/ev/dead")
        found = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert found is not None
        retried = await browser.post(
            "/proxy/ev/dead/retry", data={"csrf": found.group(1), "one": "1"}
        )
    links = re.findall(r'(?:href|action|src)="([^"]+)"', page.text)
    assert links and all(link.startswith("/proxy/ev/") for link in links), links
    assert "Path=/proxy/ev/" in page.headers["set-cookie"]
    assert retried.status_code == 303
    assert retried.headers["location"].startswith("/proxy/ev/dead?")


@pytest.mark.asyncio
@pytest.mark.parametrize("action", ["retry", "discard"])
async def test_a_bulk_action_on_a_thousand_ids_changes_the_dead_ones(
    db: Database, action: str
) -> None:
    dead = await one_dead_delivery(db)
    ids = [str(dead), *(str(dead + n) for n in range(1, 1000))]  # the rest: no such rows
    async with client(Panel(outbox=db.outbox)) as browser:
        token = await csrf_token(browser)
        answer = await browser.post(f"{MOUNT}/dead/{action}", data={"csrf": token, "id": ids})
    assert answer.status_code == 303
    assert answer.headers["location"].endswith("count=1&asked=1000")


def test_a_failures_texts_are_made_storable() -> None:
    """What the relay writes of a failure: no NUL (PostgreSQL refuses it), a message and a type
    within their columns, and a text even when the exception's own str() fails."""
    from aioevents._outbox_store import _error_texts

    class Unprintable(Exception):
        def __str__(self) -> str:
            raise RuntimeError("no")

    long_named = type("E" * 300, (Exception,), {})
    texts = _error_texts(ValueError("a\x00b" + "x" * 5_000))
    assert texts["error_message"].startswith("a\\x00bxxx")
    assert texts["error_message"].endswith("... (1003 more)")
    assert "\x00" not in texts["error_traceback"]
    assert _error_texts(Unprintable())["error_message"] == "<Unprintable: str() failed>"
    assert len(_error_texts(long_named())["error_type"]) == 255
