"""Traces of the platform's events, printed to the console: ``OTEL_TRACES_EXPORTER=console``.

With that variable set, `hooks_from_env` installs the OpenTelemetry SDK's tracer provider,
which prints every finished span as JSON on standard output, and gives the bus the
`aioevents.otel.Tracing` hook: a ``process <event-name>`` span per handler run, a ``send ...``
span per recorded or published event. Without it nothing is installed and the bus has no hook.

A real deployment sends its spans to a collector instead: configure the SDK (or run under
``opentelemetry-instrument``) and give the bus the same hook.
"""

from __future__ import annotations

import functools
import os

from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor

from aioevents import Hook
from aioevents.otel import Tracing

SERVICE = "llm_platform"


def hooks_from_env() -> list[Hook]:
    """The tracing hook, with spans printed to the console, when ``OTEL_TRACES_EXPORTER`` is
    ``console``; else none."""
    if os.environ.get("OTEL_TRACES_EXPORTER") != "console":
        return []
    install_console_tracing()
    return [Tracing()]


@functools.cache  # OpenTelemetry keeps the first global provider: install one, once
def install_console_tracing() -> TracerProvider:
    """Make a provider that prints each span as it ends the global one."""
    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: SERVICE}))
    # Printed as each span ends, so a developer sees it at once (a collector would batch).
    provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    trace.set_tracer_provider(provider)
    return provider
