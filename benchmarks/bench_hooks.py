"""Scenario: what hooks cost on a 16-handler emit (issue 13's overhead goals).

Five buses with the same 16 no-op handlers, timed interleaved like every emit table: no hooks
(the reference); a no-op hook (what the bus's hook plumbing costs: the calls and the clock);
a no-op hook switched off (``active = False``: the bus then runs its plain path); the
OpenTelemetry hook of `aioevents.otel` with no SDK configured (the OTel API's no-op provider:
the hook reports itself inactive); and the Prometheus hook of `aioevents.prometheus` (a
`Metrics` registered nowhere: a scrape is no part of an emit).

Run alone: ``python -m benchmarks hooks [--quick]``.
"""

from __future__ import annotations

import statistics

from aioevents import EventBus, Hook, Subscription

from ._floors import Handler, Ping, Run, make_handlers
from ._timing import (
    Case,
    Goal,
    Settings,
    Skipped,
    Verdict,
    figure,
    measure,
    middle_half,
    print_table,
)

COUNT = 16
NONE = "aioevents, no hooks"
NOOP = "aioevents, a no-op hook"
SWITCHED_OFF = "aioevents, a no-op hook with active = False"
OTEL = "aioevents, aioevents.otel hook, no SDK configured"
PROMETHEUS = "aioevents, aioevents.prometheus Metrics hook"
OTEL_LIMIT = 1.05  # issue 13: at most 5 % more than without it
PROMETHEUS_LIMIT = 1.25  # issue 13: at most 25 %


class NoopHook:
    """A hook that does nothing: what is left is the bus's own cost of calling one."""

    def handler_started(self, event: object, subscription: Subscription) -> object:
        return None

    def handler_finished(
        self,
        event: object,
        subscription: Subscription,
        *,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        pass


class SwitchedOffHook(NoopHook):
    active = False


def main(settings: Settings) -> list[Verdict]:
    handlers = make_handlers(COUNT)
    cases = [
        Case(NONE, _emit(handlers, None)),
        Case(NOOP, _emit(handlers, NoopHook())),
        Case(SWITCHED_OFF, _emit(handlers, SwitchedOffHook())),
    ]
    judged: list[tuple[str, str, float]] = []
    skipped: list[Verdict] = []
    for name, what, limit, make in (
        (OTEL, "[13.3] the otel hook, no SDK", OTEL_LIMIT, _otel_hook),
        (PROMETHEUS, "[13.4] the Prometheus hook", PROMETHEUS_LIMIT, _prometheus_hook),
    ):
        text = f"{what}, {COUNT} handlers: emit ÷ emit without hooks"
        try:
            hook = make()
        except ImportError as missing:  # its extra is not installed: said, and the run goes on
            skipped.append(Skipped(text, f"cannot import it ({missing})"))
            continue
        cases.append(Case(name, _emit(handlers, hook)))
        judged.append((name, text, limit))
    column = measure(cases, settings)
    print_table(f"emit, {COUNT} no-op handlers, with hooks", {f"{COUNT} handlers": column})
    for name, what in ((NOOP, "a no-op hook"), (SWITCHED_OFF, "a switched-off hook")):
        percents = [(ratio - 1) * 100 for ratio in column[name].ratios_to(column[NONE])]
        q1, q3 = middle_half(percents)
        print(
            f"   {what}: {figure(statistics.median(percents))} % over no hooks "
            f"(middle half {figure(q1)} to {figure(q3)})"
        )
    verdicts: list[Verdict] = [
        Goal.ratio(text, column[name], column[NONE], limit, "<=") for name, text, limit in judged
    ]
    verdicts += skipped
    for verdict in verdicts:
        print(f"   {verdict}")
    return verdicts


def _emit(handlers: list[Handler], hook: Hook | None) -> Run:
    bus = EventBus(hooks=[] if hook is None else [hook])
    for handler in handlers:
        bus.subscribe(Ping, handler)
    emit, event = bus.emit, Ping(seq=1)

    async def run(n: int) -> None:
        for _ in range(n):
            await emit(event)

    return run


def _otel_hook() -> Hook:
    from aioevents.otel import Tracing

    hook = Tracing()
    # The goal is for the API alone; this process sets no SDK provider (were one set, the
    # hook would make spans, and the figure would be the SDK's).
    assert not hook.active, "an OpenTelemetry SDK tracer provider is configured"
    return hook


def _prometheus_hook() -> Hook:
    from aioevents.prometheus import Metrics

    return Metrics(registry=None)  # registered nowhere: no scrape runs during the emits
