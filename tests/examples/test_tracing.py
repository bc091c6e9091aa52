"""The web app's console traces: ``OTEL_TRACES_EXPORTER=console``.

The traced app runs in a process of its own (``tests.examples.traced_web``): OpenTelemetry's
global tracer provider is set once per process, and the other tests' must stay unset.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from examples.llm_platform.tracing import hooks_from_env

REPO = Path(__file__).resolve().parents[2]


def test_without_the_console_exporter_the_bus_gets_no_tracing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OTEL_TRACES_EXPORTER", raising=False)
    assert hooks_from_env() == []
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "otlp")  # another exporter: not the example's
    assert hooks_from_env() == []


@pytest.mark.timeout(120)  # a process of its own that imports the whole app
def test_with_the_console_exporter_handler_runs_are_printed_as_spans(tmp_path: Path) -> None:
    spans = traced_run(tmp_path)

    created = named(spans, "process app-was-created")
    assert {span["kind"] for span in created} == {"SpanKind.CONSUMER"}
    assert {span["attributes"]["messaging.operation.type"] for span in created} == {"process"}
    assert {
        span["attributes"]["messaging.consumer.group.name"].rsplit(".", 1)[-1] for span in created
    } == {
        "CreateInstalledAppWhenAppCreated",
        "CreateSiteRecordWhenAppCreated",
    }
    # A durable handler's run continues the trace of the request that recorded its event.
    [sent] = named(spans, "send document-index-created")
    [indexed] = named(spans, "process document-index-created")
    assert (sent["kind"], indexed["kind"]) == ("SpanKind.PRODUCER", "SpanKind.CONSUMER")
    assert indexed["parent_id"] == sent["context"]["span_id"]
    assert indexed["context"]["trace_id"] == sent["context"]["trace_id"]
    assert indexed["attributes"]["messaging.consumer.group.name"] == "create_document_index"


def traced_run(tmp_path: Path) -> list[dict[str, Any]]:
    """The spans ``tests.examples.traced_web`` printed, run on a SQLite file in ``tmp_path``."""
    environment = {
        **os.environ,
        "OTEL_TRACES_EXPORTER": "console",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'traced.sqlite3'}",
    }
    environment.pop("REDIS_URL", None)  # the in-memory cache and throttle
    environment.pop("DATABASE_SCHEMA", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.examples.traced_web"],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return printed_spans(done.stdout)


def named(spans: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    found = [span for span in spans if span["name"] == name]
    assert found, f"no span {name!r} among {sorted({span['name'] for span in spans})}"
    return found


def printed_spans(output: str) -> list[dict[str, Any]]:
    """The JSON objects the console exporter printed one after another (each over several
    lines), whatever else was printed between them."""
    decoder, spans, at = json.JSONDecoder(), [], output.find("{")
    while at != -1:
        try:
            span, end = decoder.raw_decode(output, at)
        except json.JSONDecodeError:
            at = output.find("{", at + 1)
            continue
        if isinstance(span, dict) and {"name", "context", "kind"} <= span.keys():
            spans.append(span)
        at = output.find("{", end)
    return spans
