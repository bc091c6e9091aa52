"""The worker process of the tracing test: ``python -m aioevents worker tests.otel_worker_app:bus``.

It configures the OpenTelemetry SDK as an application would (a global tracer provider), with
an exporter that appends each finished span to a file as one JSON line (`SpanFile`), which the
test reads back. ``bus`` is built on first access from the environment (`environment`), so
the test imports this module for its event type and reader without any of it.

Two handlers consume `OrderWasPlaced` from Redis Streams: ``fulfil`` starts a span of its own
(to show that the process span is current while a handler runs) with the event's ``tenant``
header as an attribute, ``charge`` always fails.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

from aioevents import EventBus
from aioevents.otel import Tracing
from aioevents.redis_streams import RedisStreams
from aioevents.streams import Streams, consume, current_entry

__all__ = [
    "CHARGE",
    "FULFIL",
    "FULFILLING",
    "OrderWasPlaced",
    "PaymentDeclined",
    "SpanFile",
    "environment",
    "read_spans",
    "span_record",
]

REDIS_URL_VARIABLE = "AIOEVENTS_OTEL_REDIS_URL"
PREFIX_VARIABLE = "AIOEVENTS_OTEL_PREFIX"
SPANS_VARIABLE = "AIOEVENTS_OTEL_SPANS"

FULFIL = "otel-test.fulfil"
CHARGE = "otel-test.charge"
FULFILLING = "fulfilling the order"  # the span the fulfil handler starts


@dataclass(frozen=True, slots=True, kw_only=True)
class OrderWasPlaced:
    order_id: int


class PaymentDeclined(Exception):
    """What the charge handler always raises."""


def environment(redis_url: str, prefix: str, spans: Path) -> dict[str, str]:
    return {REDIS_URL_VARIABLE: redis_url, PREFIX_VARIABLE: prefix, SPANS_VARIABLE: str(spans)}


def span_record(span: ReadableSpan) -> dict[str, Any]:
    """A finished span as plain JSON values: what the test compares, from either process."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind.name,
        "trace_id": format(context.trace_id, "032x"),
        "span_id": format(context.span_id, "016x"),
        "parent_id": None if span.parent is None else format(span.parent.span_id, "016x"),
        "links": [format(link.context.span_id, "016x") for link in span.links],
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "start": span.start_time,
        "end": span.end_time,
    }


class SpanFile(SpanExporter):
    """Appends each span to ``path`` as a JSON line, in one write (a reader sees whole lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(span_record(span)) + "\n" for span in spans)
        with self.path.open("a") as file:
            file.write(lines)
        return SpanExportResult.SUCCESS


def read_spans(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    complete = text[: text.rfind("\n") + 1]
    return [json.loads(line) for line in complete.splitlines()]


def build(variables: Mapping[str, str]) -> EventBus:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(SpanFile(Path(variables[SPANS_VARIABLE]))))
    trace.set_tracer_provider(provider)  # as an application does: the SDK is its choice
    streams = Streams(
        RedisStreams(variables[REDIS_URL_VARIABLE]), prefix=variables[PREFIX_VARIABLE]
    )
    bus = EventBus(hooks=[Tracing()])
    tracer = trace.get_tracer("otel-test-worker")

    @bus.on(OrderWasPlaced, name=FULFIL)
    async def fulfil(event: OrderWasPlaced) -> None:
        entry = current_entry()
        assert entry is not None
        with tracer.start_as_current_span(FULFILLING) as span:
            span.set_attribute("tenant", entry.envelope.headers["tenant"])

    @bus.on(OrderWasPlaced, name=CHARGE)
    async def charge(event: OrderWasPlaced) -> None:
        raise PaymentDeclined(f"order {event.order_id}")

    consume(bus, OrderWasPlaced, streams=streams, max_deliveries=1, block=0.2, min_idle=5.0)
    return bus


_bus: EventBus | None = None


def __getattr__(name: str) -> EventBus:
    """``bus``, built from the environment on first access."""
    global _bus
    if name != "bus":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _bus is None:
        _bus = build(os.environ)
    return _bus
