"""The fixes of the observability attack's findings (see tests/test_observability_attack.py),
checked at the API the fix changed rather than through the panel."""

from __future__ import annotations

import gc
import secrets
import weakref

import pytest
from opentelemetry import baggage
from opentelemetry import context as otel_context
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import CollectorRegistry

from aioevents import EventBus
from aioevents.otel import Tracing
from aioevents.prometheus import Metrics
from aioevents.streams import MemoryStreams, Streams

from .outbox_support import Database
from .test_observability_attack import Tick, one_dead_delivery


@pytest.mark.asyncio
async def test_discard_only_dead_keeps_a_delivery_resubmitted_meanwhile(db: Database) -> None:
    dead = await one_dead_delivery(db)
    assert await db.outbox.resubmit([dead]) == 1  # another operator's retry: pending again
    assert await db.outbox.discard([dead], only_dead=True) == 0
    [row] = await db.outbox.deliveries()
    assert row.status.value == "pending"
    assert await db.outbox.discard([dead]) == 1  # without the flag: pending ones too, as before
    [row] = await db.outbox.deliveries()
    assert row.status.value == "discarded"


@pytest.mark.asyncio
async def test_discard_only_dead_gives_up_a_dead_delivery(db: Database) -> None:
    dead = await one_dead_delivery(db)
    assert await db.outbox.discard([dead], only_dead=True) == 1
    [row] = await db.outbox.deliveries()
    assert row.status.value == "discarded"


@pytest.mark.asyncio
async def test_discard_only_dead_must_be_a_bool(db: Database) -> None:
    with pytest.raises(TypeError, match="only_dead"):
        await db.outbox.discard([1], only_dead="yes")  # type: ignore[arg-type]


_PAST_64_BITS = str(2**64)  # 20 digits: the id pattern takes it, Redis does not


@pytest.mark.asyncio
@pytest.mark.parametrize("dead_id", [f"{_PAST_64_BITS}-0", f"1-{_PAST_64_BITS}"])
async def test_a_dead_letter_id_past_64_bits_is_refused_naming_it(dead_id: str) -> None:
    streams = Streams(MemoryStreams(), prefix="fixes")
    for act in (streams.retry_dead_letters, streams.discard_dead_letters):
        with pytest.raises(ValueError, match=f"at most 2\\*\\*64-1, got '{dead_id}'"):
            await act(Tick, [dead_id])


@pytest.mark.asyncio
@pytest.mark.redis
async def test_redis_takes_the_largest_dead_letter_id(redis_url: str) -> None:
    from aioevents.redis_streams import RedisStreams

    largest = f"{2**64 - 1}-{2**64 - 1}"
    transport = RedisStreams(redis_url)
    streams = Streams(transport, prefix=f"fixes-{secrets.token_hex(6)}")
    try:  # none there: nothing retried or removed, and no error from Redis
        assert await streams.retry_dead_letters(Tick, [largest]) == 0
        assert await streams.discard_dead_letters(Tick, [largest]) == 0
    finally:
        await transport.aclose()


def _default_propagators() -> CompositePropagator:
    return CompositePropagator([TraceContextTextMapPropagator(), W3CBaggagePropagator()])


def _send(tracing: Tracing, headers: dict[str, str]) -> None:
    token = tracing.send_started(
        Tick(number=1), system="redis", destination="fixes:tick", message_id="1", headers=headers
    )
    tracing.send_finished(token, error=None)


def test_a_send_replaces_an_earlier_trace_context_whole_and_keeps_the_apps_headers() -> None:
    provider = TracerProvider()
    tracing = Tracing(provider, propagator=_default_propagators())
    earlier = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    headers = {"traceparent": earlier, "tracestate": "vendor=stale", "baggage": "tenant=7"}
    _send(tracing, headers)  # the send's span has no tracestate: the earlier one must go
    assert set(headers) == {"traceparent", "baggage"}
    assert headers["traceparent"] != earlier
    assert headers["baggage"] == "tenant=7"  # no baggage in the context: the app's kept
    provider.shutdown()


def test_baggage_in_the_current_context_replaces_the_apps_header() -> None:
    provider = TracerProvider()
    tracing = Tracing(provider, propagator=_default_propagators())
    headers = {"baggage": "tenant=7", "x-app": "1"}
    attached = otel_context.attach(baggage.set_baggage("tenant", "8"))
    try:
        _send(tracing, headers)
    finally:
        otel_context.detach(attached)
    assert headers["baggage"] == "tenant=8"
    assert headers["x-app"] == "1" and "traceparent" in headers
    provider.shutdown()


async def _nothing(event: Tick) -> None:
    return None


def test_exception_classes_made_at_run_time_are_neither_kept_nor_miscounted() -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry=registry)
    subscription = EventBus().subscribe(Tick, _nothing, name="fixes.made")
    first: weakref.ref[type] | None = None
    for n in range(300):  # more classes than the label cache keeps
        kind = type(f"Made{n}", (Exception,), {})
        first = first or weakref.ref(kind)
        metrics.handler_finished(
            Tick(number=n), subscription, token=None, duration=0.0, error=kind("no")
        )
    del kind
    gc.collect()
    assert first is not None and first() is None, "the first class is not kept alive"
    labels = {"event": "attack.tick", "handler": "fixes.made"}
    for n in (0, 299):
        name = f"{__name__}.Made{n}"
        value = registry.get_sample_value(
            "aioevents_handler_failures_total", {**labels, "error_type": name}
        )
        assert value == 1.0, name
