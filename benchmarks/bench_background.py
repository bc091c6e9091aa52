"""Scenario 3: fire-and-forget throughput, publish to handled, and the latency to handler start.

A burst of n events, each for one no-op async handler, published without waiting for their
handlers, then waited for until every one was handled; the time runs from the first publish
until the last is handled. Every event carries the ``perf_counter()`` of its publish, and the
handler records how long it waited to start.

- aioevents: ``await bus.publish(ev)`` n times inside ``async with bus:`` (4 workers, the
  default queue of 1024 with back-pressure), then leaving the block, which drains. Entering
  the block is not timed; leaving it is.
- pyee: ``emit(...)`` n times (a task per event at once: no queue, no limit), then
  ``await wait_for_complete()``.
- bubus: ``dispatch(Ev(...))`` n times, then ``await wait_until_idle()``. It runs one event
  at a time in its own loop, and its queue holds 50: with its default history it refuses a
  dispatch when 100 are pending, and with ``max_history_size=None`` every step scans the
  whole history (the burst gets quadratically slower). So at most 50 are in flight: once 50
  are, the publisher awaits the oldest (``await event``, its documented way to wait for one).
"""

from __future__ import annotations

import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from pyee.asyncio import AsyncIOEventEmitter

from aioevents import EventBus

from ._timing import Case, Goal, Run, Sample, Settings, measure, run_on

WORKERS = 4
BUBUS_IN_FLIGHT = 50  # bubus' queue size with its default history
AIOEVENTS = f"aioevents  publish(); leave `async with bus` ({WORKERS} workers)"
PYEE = "pyee       emit(); await wait_for_complete()"
BUBUS = f"bubus      dispatch(), {BUBUS_IN_FLIGHT} in flight; await wait_until_idle()"


@dataclass(frozen=True, slots=True, kw_only=True)
class Stamped:
    at: float  # perf_counter() when published


@dataclass
class Latencies:
    """Seconds from publish to handler start, per run size (the timed runs are the largest)."""

    by_n: dict[int, list[float]] = field(default_factory=dict)
    current: list[float] = field(default_factory=list)

    def start(self, n: int) -> None:
        self.current = self.by_n.setdefault(n, [])

    async def handle(self, event: Any) -> None:
        self.current.append(perf_counter() - event.at)


def main(settings: Settings) -> list[Goal]:
    columns: dict[str, tuple[dict[str, Sample], dict[str, Latencies]]] = {}
    # Repetitions long enough for a burst of a few thousand events, past aioevents' queue size.
    fast = Settings(settings.repetitions, settings.target * 2.5)
    columns["aioevents and pyee"] = _column({AIOEVENTS: _aioevents, PYEE: _pyee}, fast)
    goals = [_goal(columns["aioevents and pyee"][0], PYEE, "pyee")]
    bubus = _bubus_builder()
    if bubus is not None:
        # bubus handles a few hundred events a second: few, long repetitions, a short burst.
        slow_peer = Settings(max(3, settings.repetitions // 6), settings.target * 10)
        columns["aioevents and bubus"] = _column({AIOEVENTS: _aioevents, BUBUS: bubus}, slow_peer)
        goals.append(_goal(columns["aioevents and bubus"][0], BUBUS, "bubus"))
    for bus in _BUBUS_BUSES:  # its queue loop polls while idle: stop it before anything else
        run_on("asyncio", bus.stop(clear=True))
    _BUBUS_BUSES.clear()
    _print_table(columns)
    if bubus is None:
        print("   bubus is not installed: its rows are skipped")
    for goal in goals:
        print(f"   {goal}")
    return goals


Builder = Callable[["Latencies"], Run]


def _column(
    builders: dict[str, Builder], settings: Settings
) -> tuple[dict[str, Sample], dict[str, Latencies]]:
    latencies = {name: Latencies() for name in builders}
    cases = [Case(name, build(latencies[name])) for name, build in builders.items()]
    return measure(cases, settings), latencies


def _aioevents(latencies: Latencies) -> Run:
    bus = EventBus(workers=WORKERS)
    bus.subscribe(Stamped, latencies.handle)
    publish = bus.publish

    async def run(n: int) -> float:
        latencies.start(n)
        async with bus:
            started = perf_counter()
            for _ in range(n):
                await publish(Stamped(at=perf_counter()))
        return perf_counter() - started

    return run


def _pyee(latencies: Latencies) -> Run:
    emitter = AsyncIOEventEmitter()
    emitter.add_listener("stamped", latencies.handle)
    emit, wait = emitter.emit, emitter.wait_for_complete

    async def run(n: int) -> None:
        latencies.start(n)
        for _ in range(n):
            emit("stamped", Stamped(at=perf_counter()))
        await wait()

    return run


def _bubus_builder() -> Builder | None:
    try:
        import bubus  # type: ignore[import-not-found, unused-ignore]  # only the bench env has it
    except ImportError:
        return None
    # A bubus event is a pydantic model with an id of its own: one per dispatch, as its API wants.
    stamped = type("Stamped", (bubus.BaseEvent,), {"__annotations__": {"at": float}})

    def build(latencies: Latencies) -> Run:
        bus = bubus.EventBus()
        bus.on(stamped, latencies.handle)
        _BUBUS_BUSES.append(bus)
        dispatch = bus.dispatch

        async def run(n: int) -> None:
            latencies.start(n)
            in_flight: deque[Any] = deque()
            for _ in range(n):
                in_flight.append(dispatch(stamped(at=perf_counter())))
                if len(in_flight) == BUBUS_IN_FLIGHT:
                    await in_flight.popleft()
            await bus.wait_until_idle()

        return run

    return build


_BUBUS_BUSES: list[Any] = []


def _goal(column: dict[str, Sample], other: str, name: str) -> Goal:
    # Time per event of aioevents over the peer's: under 1 is more events per second.
    return Goal.ratio(
        f"background, {name}: aioevents time per event ÷ {name}'s (ahead in events/s)",
        column[AIOEVENTS],
        column[other],
        1.0,
    )


def _print_table(
    columns: dict[str, tuple[dict[str, Sample], dict[str, Latencies]]],
) -> None:
    print("\n== background delivery: a burst of n events, 1 no-op async handler ==")
    print("   events/s: n ÷ (first publish to last handled), median over the repetitions;")
    print("   vs aioevents: this row's events/s ÷ aioevents' in the same repetition (<1: fewer);")
    print("   latency: publish to handler start over every event of the timed runs, in µs")
    print(f"{'':<64}{'n':>6}{'events/s':>11}{'vs aioevents':>14}{'p50 µs':>10}{'p99 µs':>11}")
    for title, (column, latencies) in columns.items():
        print(f"  {title}")
        reference = column[AIOEVENTS]
        for name, sample in column.items():
            vs = statistics.median(1 / r for r in sample.ratios_to(reference))
            p50, p99 = _percentiles(latencies[name].by_n.get(sample.n, []))
            print(
                f"{name:<64}{sample.n:>6}{1e6 / sample.median_us:>11,.0f}{vs:>13.2f}x"
                f"{p50:>10,.0f}{p99:>11,.0f}"
            )


def _percentiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return float("nan"), float("nan")
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49] * 1e6, cuts[98] * 1e6
