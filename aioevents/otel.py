"""OpenTelemetry traces of events, after the OpenTelemetry messaging semantic conventions.

`Tracing` is one object that is both a bus hook and a send hook::

    tracing = Tracing()                      # the global tracer provider, once one is set
    bus = EventBus(hooks=[tracing])
    streams = Streams(RedisStreams(url), hooks=[tracing])   # for publish() outside a bus

It needs only ``opentelemetry-api`` (the ``otel`` extra); which SDK, exporter and sampler to
use is the application's choice. Until an SDK tracer provider is set (globally, or given to
`Tracing`) the hook is not `Tracing.active`, and a bus skips it: it costs next to nothing.

Spans (messaging conventions; ``messaging.operation.type`` in brackets):

- ``send <destination>`` (``send``), kind PRODUCER, a child of the current span: an event
  staged in the outbox by `TransactionalEvents.record` (``messaging.system``
  ``"aioevents.outbox"``, destination: the event's name) or appended to a stream, by
  ``externalize`` or `Streams.publish` (the transport's `system`: ``"redis"``,
  ``"aioevents.memory"``; destination: the stream). Its context is injected into the event's
  headers (W3C ``traceparent`` / ``tracestate`` with the default propagator), replacing a
  context they held, and so stored in the outbox row and the stream entry. A ``baggage``
  header the application gave is kept unless the current context has baggage to send.
- ``process <event-name>`` (``process``), kind CONSUMER, one per handler call, current while
  the handler runs (the spans it starts are its children). For a delivery of the outbox or an
  entry of a stream the handler runs for, its parent is the context in the event's headers,
  which it also links to; otherwise (a plain ``emit``) it is a child of the emitter's span.
  ``messaging.system`` is ``"aioevents.outbox"``, the transport's, or ``"aioevents"`` in
  process; ``messaging.consumer.group.name`` is the handler's subscription name.

A failed handler or send has ``error.type`` (the exception's qualified class name) and status
ERROR, and the exception recorded. A cancelled one just ends: its status stays unset.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Mapping
from contextvars import Token
from typing import Any, cast

try:
    from opentelemetry import context as otel_context
    from opentelemetry import propagate, trace
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
except ImportError as missing:  # a newcomer's first import: say which extra brings it
    raise ModuleNotFoundError(
        f"aioevents.otel needs the OpenTelemetry API ({missing}): install the extra with "
        f"pip install 'aioevents[otel]'",
        name=missing.name,
    ) from missing

from ._delivery import current_delivery
from ._names import error_type_name, event_name
from ._sending import OUTBOX_SYSTEM
from ._subscription import Subscription

__all__ = ["IN_PROCESS_SYSTEM", "Tracing"]

IN_PROCESS_SYSTEM = "aioevents"
"""``messaging.system`` of a handler run by ``emit`` (or in the background), in process."""

_TRACER_NAME = "aioevents"
_KEPT_UNLESS_WRITTEN = frozenset({"baggage"})  # W3C baggage: applications set it themselves
_INACTIVE = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)  # no SDK behind them
_GLOBAL_READABLE = (
    hasattr(trace, "_TRACER_PROVIDER") and "OTEL_PYTHON_TRACER_PROVIDER" not in os.environ
)


class Tracing:
    """Traces sends and handler calls: give it as a hook to a bus (and to `Streams`).

    ``tracer_provider`` defaults to the global one (``opentelemetry.trace``), ``propagator``
    to the global text map propagator (W3C trace context and baggage unless configured).
    """

    def __init__(
        self,
        tracer_provider: trace.TracerProvider | None = None,
        *,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        if tracer_provider is not None and not isinstance(tracer_provider, trace.TracerProvider):
            raise TypeError(f"tracer_provider must be a TracerProvider, got {tracer_provider!r}")
        if propagator is not None and not isinstance(propagator, TextMapPropagator):
            raise TypeError(f"propagator must be a TextMapPropagator, got {propagator!r}")
        # A proxy given (the global provider before one was set) follows the global one.
        if isinstance(tracer_provider, trace.ProxyTracerProvider):
            tracer_provider = None
        self._provider = tracer_provider
        self._propagator = propagator
        self._tracer: Tracer | None = None

    def __repr__(self) -> str:
        return f"<Tracing active={self.active}>"

    @property
    def active(self) -> bool:
        """Whether spans are made: False while no SDK tracer provider is set (none given,
        and the global one still the API's default). Cheap: a bus reads it per emit."""
        return self._tracer is not None or self._activate() is not None

    def _activate(self) -> Tracer | None:
        if self._provider is None and _no_global_provider():
            return None  # looked at again next time: a provider may be set later
        provider = self._provider if self._provider is not None else trace.get_tracer_provider()
        if isinstance(provider, _INACTIVE):
            return None
        self._tracer = provider.get_tracer(_TRACER_NAME)
        return self._tracer

    @property
    def propagator(self) -> TextMapPropagator:
        """What injects and extracts trace contexts in event headers."""
        return self._propagator if self._propagator is not None else propagate.get_global_textmap()

    # -- handler calls (the bus's Hook) -------------------------------------------------------

    def handler_started(self, event: object, subscription: Subscription) -> object:
        """Start the handler's ``process`` span and make it current in the handler's context."""
        tracer = self._tracer if self._tracer is not None else self._activate()
        if tracer is None:
            return None
        system, destination, message_id, headers, attempt = _origin(event, subscription)
        name = _handled_name(event, subscription)
        attributes: dict[str, Any] = {
            "messaging.system": system,
            "messaging.operation.type": "process",
            "messaging.operation.name": "process",
            "messaging.destination.name": destination,
            "messaging.consumer.group.name": subscription.name,
        }
        if message_id is not None:
            attributes["messaging.message.id"] = message_id
        if attempt is not None:
            attributes["aioevents.attempt"] = attempt
        if subscription.batch is not None:  # a batch handler gets the list of its events
            attributes["messaging.batch.message_count"] = len(event)  # type: ignore[arg-type]
        parent, links = self._creation_context(headers)
        span = tracer.start_span(
            f"process {name}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes=attributes,
            links=links,
        )
        attached = otel_context.attach(trace.set_span_in_context(span, parent))
        return span, attached

    def handler_finished(
        self,
        event: object,
        subscription: Subscription,
        *,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        """End the handler's span (``error.type`` and status ERROR when it failed)."""
        if token is None:
            return
        span, attached = cast("tuple[Span, Token[otel_context.Context]]", token)
        otel_context.detach(attached)
        _end(span, error)

    def _creation_context(
        self, headers: Mapping[str, str] | None
    ) -> tuple[otel_context.Context | None, list[Link]]:
        """The context in the event's headers, as the parent and a link; else the current."""
        if not headers:
            return None, []
        extracted = self.propagator.extract(headers)
        creation = trace.get_current_span(extracted).get_span_context()
        if not creation.is_valid:
            return None, []
        return extracted, [Link(creation)]

    # -- sends (see aioevents._sending) ---------------------------------------------------------

    def send_started(
        self,
        event: object,
        *,
        system: str,
        destination: str,
        message_id: str,
        headers: dict[str, str],
    ) -> object:
        """Start a ``send`` span and put its context in ``headers``, replacing one there."""
        tracer = self._tracer if self._tracer is not None else self._activate()
        if tracer is None:
            return None
        span = tracer.start_span(
            f"send {destination}",
            kind=SpanKind.PRODUCER,
            attributes={
                "messaging.system": system,
                "messaging.operation.type": "send",
                "messaging.operation.name": "send",
                "messaging.destination.name": destination,
                "messaging.message.id": message_id,
            },
        )
        try:
            _inject(self.propagator, headers, trace.set_span_in_context(span))
        except BaseException:
            span.end()  # no token reaches send_finished: ended here
            raise
        return span

    def send_finished(self, token: object, *, error: BaseException | None) -> None:
        """End the ``send`` span (``error.type`` and status ERROR when the send failed)."""
        if token is not None:
            _end(cast(Span, token), error)


def _inject(
    propagator: TextMapPropagator, headers: dict[str, str], context: otel_context.Context
) -> None:
    """Put ``context`` in ``headers``: an earlier trace context there (the outbox's send's) is
    replaced whole (no stale ``tracestate`` left beside a new ``traceparent``), but a
    ``baggage`` header, the application's own data, only when the propagator writes one."""
    written: dict[str, str] = {}
    propagator.inject(written, context=context)
    for field in propagator.fields:
        if field not in _KEPT_UNLESS_WRITTEN:
            headers.pop(field, None)
    headers.update(written)


def _no_global_provider() -> bool:
    """Whether no global tracer provider is set, in ~50 ns: what `get_tracer_provider` looks
    at first, without its look in ``os.environ`` (~1 µs, a fifth of the 5 % a 16-handler emit
    may spend on this hook). When the API has no such variable, or a provider is named in
    the environment, `get_tracer_provider` decides."""
    return _GLOBAL_READABLE and trace._TRACER_PROVIDER is None


def _origin(
    event: object, subscription: Subscription
) -> tuple[str, str, str | None, Mapping[str, str] | None, int | None]:
    """Where the handler's event comes from: (system, destination, message id, headers,
    attempt). A delivery or stream entry counts only for the handler it is run for: one of
    its handlers emitting events sees it too."""
    delivery = current_delivery()
    if delivery is not None and delivery.handler == subscription.name:
        message_id = str(delivery.event_id)
        return OUTBOX_SYSTEM, delivery.event_name, message_id, delivery.headers, delivery.attempt
    # Only a consumer sets an entry, and it imports aioevents._streams: importing it here
    # would make the otel extra need msgspec.
    streams = sys.modules.get("aioevents._streams")
    if streams is not None and (consumer := streams.consuming()) is not None:
        group, system = consumer
        entry = streams.current_entry()
        if group == subscription.name and entry is not None:
            envelope = entry.envelope
            return system, entry.stream, envelope.id, envelope.headers, entry.deliveries
    return IN_PROCESS_SYSTEM, _handled_name(event, subscription), None, None, None


def _handled_name(event: object, subscription: Subscription) -> str:
    if subscription.batch is not None:
        return event_name(subscription.event_type)
    return event_name(event)


def _end(span: Span, error: BaseException | None) -> None:
    if error is not None and not _is_cancellation(error):
        span.set_attribute("error.type", error_type_name(type(error)))
        span.set_status(Status(StatusCode.ERROR, f"{type(error).__name__}: {error}"))
        span.record_exception(error)
    span.end()


def _is_cancellation(error: BaseException) -> bool:
    if isinstance(error, asyncio.CancelledError):
        return True
    trio = sys.modules.get("trio")  # only a trio program can be cancelled by trio
    return trio is not None and isinstance(error, trio.Cancelled)
