"""Scenario 3: fire-and-forget throughput, publish to handled, and the latency to handler start.

A burst of n events, each for one no-op async handler, published without waiting for their
handlers, then waited for until every one was handled; the time runs from the first publish
until the last is handled. Every event carries the ``perf_counter()`` of its publish, and the
handler records how long it waited to start.

- aioevents: ``await bus.publish(ev)`` n times inside ``async with bus:`` (4 workers, the
  default queue of 1024 with back-pressure), then leaving the block, which drains. Entering
  the block is not timed; leaving it is.
- plain queue: the floor. An ``asyncio.Queue`` of the same size (1024) and 4 worker tasks
  started before the timing, each taking an event and awaiting the same handler in
  try/except; ``await queue.put(ev)`` n times, then one ``None`` per worker to stop it and
  waiting for the workers (as leaving aioevents' block stops its workers).
- pyee: ``emit(...)`` n times (a task per event at once: no queue, no limit), then
  ``await wait_for_complete()``.
- bubus: ``dispatch(Ev(...))`` n times, then ``await wait_until_idle()``. It runs one event
  at a time in its own loop, and its queue holds 50: with its default history it refuses a
  dispatch when 100 are pending, and with ``max_history_size=None`` every step scans the
  whole history (the burst gets quadratically slower). So at most 50 are in flight: once 50
  are, the publisher awaits the oldest (``await event``, its documented way to wait for one).
"""

from __future__ import annotations

import asyncio
import statistics
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from pyee.asyncio import AsyncIOEventEmitter

from aioevents import EventBus

from ._timing import Case, Goal, Run, Sample, Settings, Verdict, measure, run_on

WORKERS = 4
QUEUE_SIZE = 1024  # aioevents' default, and the plain queue's: the same back-pressure
BURST = 5_000  # issue 14, goal 3: a burst of 5,000 to one no-op handler
RATE_GOAL = 300_000  # events/s at least
P99_GOAL = 100.0  # µs from publish to handler start, at most
PLAIN_GOAL = 3.0  # aioevents' time per event ÷ the plain queue's, at most
BUBUS_IN_FLIGHT = 50  # bubus' queue size with its default history
AIOEVENTS = f"aioevents  publish(); leave `async with bus` ({WORKERS} workers)"
PLAIN = f"plain      asyncio.Queue({QUEUE_SIZE}) + {WORKERS} worker tasks (the floor)"
PYEE = "pyee       emit(); await wait_for_complete()"
BUBUS = f"bubus      dispatch(), {BUBUS_IN_FLIGHT} in flight; await wait_until_idle()"


@dataclass(frozen=True, slots=True, kw_only=True)
class Stamped:
    at: float  # perf_counter() when published


@dataclass
class Latencies:
    """Seconds from publish to handler start, one list per run, by run size: the timed runs
    of a table are the last ``repetitions`` runs of its size."""

    by_n: dict[int, list[list[float]]] = field(default_factory=dict)
    current: list[float] = field(default_factory=list)

    def start(self, n: int) -> None:
        self.current = []
        self.by_n.setdefault(n, []).append(self.current)

    def timed_runs(self, sample: Sample) -> list[list[float]]:
        return self.by_n.get(sample.n, [])[-len(sample.per_op) :]

    async def handle(self, event: Any) -> None:
        self.current.append(perf_counter() - event.at)


def main(settings: Settings) -> list[Verdict]:
    columns: dict[str, tuple[dict[str, Sample], dict[str, Latencies]]] = {}
    burst: dict[str, Builder] = {AIOEVENTS: _aioevents, PLAIN: _plain_queue, PYEE: _pyee}
    title = f"aioevents, the plain queue and pyee: a burst of {BURST:,}"
    columns[title] = _column(burst, settings, BURST)
    goals: list[Verdict] = [*_burst_goals(*columns[title]), _goal(columns[title][0], PYEE, "pyee")]
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


def _burst_goals(column: dict[str, Sample], latencies: dict[str, Latencies]) -> list[Goal]:
    """Issue 14, goal 3: events/s and p99 latency of each timed run, and the plain queue."""
    sample = column[AIOEVENTS]
    where = f"{WORKERS} workers, burst of {BURST:,}"
    p99s = [_percentiles(run)[1] for run in latencies[AIOEVENTS].timed_runs(sample)]
    return [
        Goal(
            f"[14.3] background ({where}): aioevents events/s",
            [1 / per_event for per_event in sample.per_op],
            RATE_GOAL,
            ">=",
        ),
        Goal(
            f"[14.3] background ({where}): p99 publish to handler start, µs", p99s, P99_GOAL, "<="
        ),
        Goal.ratio(
            f"[14.3] background ({where}): aioevents time per event ÷ the plain queue's",
            sample,
            column[PLAIN],
            PLAIN_GOAL,
            "<=",
        ),
    ]


Builder = Callable[["Latencies"], Run]


def _column(
    builders: dict[str, Builder], settings: Settings, n: int | None = None
) -> tuple[dict[str, Sample], dict[str, Latencies]]:
    latencies = {name: Latencies() for name in builders}
    cases = [Case(name, build(latencies[name])) for name, build in builders.items()]
    if n is None:  # sized like the other tables: a burst past aioevents' queue size
        settings = Settings(settings.repetitions, settings.target * 2.5)
    return measure(cases, settings, n), latencies


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


def _plain_queue(latencies: Latencies) -> Run:
    handle = latencies.handle

    async def work(queue: asyncio.Queue[Stamped | None]) -> None:
        while (event := await queue.get()) is not None:
            try:
                await handle(event)
            except Exception:  # isolated, as aioevents' workers isolate a failing handler
                pass

    async def run(n: int) -> float:
        latencies.start(n)
        queue: asyncio.Queue[Stamped | None] = asyncio.Queue(QUEUE_SIZE)
        workers = [asyncio.create_task(work(queue)) for _ in range(WORKERS)]
        started = perf_counter()
        for _ in range(n):
            await queue.put(Stamped(at=perf_counter()))
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
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
        import bubus  # type: ignore[import-not-found, import-untyped, unused-ignore]  # only the bench env has it
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
    print(
        "   latency: publish to handler start, each timed run's p50 and p99, median over the runs"
    )
    print(f"{'':<64}{'n':>6}{'events/s':>11}{'vs aioevents':>14}{'p50 µs':>10}{'p99 µs':>11}")
    for title, (column, latencies) in columns.items():
        print(f"  {title}")
        reference = column[AIOEVENTS]
        for name, sample in column.items():
            vs = statistics.median(1 / r for r in sample.ratios_to(reference))
            p50, p99 = _median_percentiles(latencies[name].timed_runs(sample))
            print(
                f"{name:<64}{sample.n:>6}{1e6 / sample.median_us:>11,.0f}{vs:>13.2f}x"
                f"{p50:>10,.0f}{p99:>11,.0f}"
            )


def _median_percentiles(runs: Sequence[Sequence[float]]) -> tuple[float, float]:
    cuts = [_percentiles(run) for run in runs]
    if not cuts:
        return float("nan"), float("nan")
    return statistics.median(p50 for p50, _ in cuts), statistics.median(p99 for _, p99 in cuts)


def _percentiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return float("nan"), float("nan")
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[49] * 1e6, cuts[98] * 1e6
