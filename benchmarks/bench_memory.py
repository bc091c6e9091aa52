"""Scenario: memory held per in-flight emit (issue 14, goal 6).

1,000 emits, each to 4 handlers that ``await asyncio.sleep(0.5)``, all in flight at once:
each emit is a task of its own (``create_task(bus.emit(ev))``, as ``asyncio.gather`` would
make). `tracemalloc` traces from just before the tasks are created until all are done; the
figure is its peak over 1,000: everything an in-flight emit holds, its task and the handlers'
frames and timers included. Every handler must have started before the first one wakes up
(checked; the sleep is doubled and the run redone if not). The raw idioms, over the same
handlers, a task each per emit too, show how much of that any concurrent emit needs.
"""

from __future__ import annotations

import asyncio
import functools
import statistics
import tracemalloc
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from aioevents import EventBus

from . import _floors as f
from ._timing import Goal, Settings, figure, middle_half, run_on

EMITS = 1_000
HANDLERS = 4
SLEEP = 0.5
LIMIT_KB = 8.6
AIOEVENTS = "aioevents  create_task(bus.emit(ev))"
Emit = Callable[[], Coroutine[Any, Any, object]]


def _aioevents(handlers: Sequence[f.Handler], event: f.Ping) -> Emit:
    bus = EventBus()
    for handler in handlers:
        bus.subscribe(f.Ping, handler)
    return functools.partial(bus.emit, event)


def _raw(build: f.Builder) -> Callable[[Sequence[f.Handler], f.Ping], Emit]:
    # run(1) is one emit: its loop runs once, its frame is the emit's own
    return lambda handlers, event: functools.partial(build(handlers, event), 1)


CONTENDERS: dict[str, Callable[[Sequence[f.Handler], f.Ping], Emit]] = {
    AIOEVENTS: _aioevents,
    "raw asyncio.TaskGroup + try/except": _raw(f.task_group),
    "raw asyncio tasks, create + await (the floor)": _raw(f.bare_tasks),
}


class Sleepers:
    """Handlers that sleep, and whether all of them had started when the first woke up."""

    def __init__(self, sleep: float) -> None:
        self.sleep = sleep
        self.started = 0
        self.started_when_first_woke: int | None = None

    def handlers(self) -> list[f.Handler]:
        return [self._handler(index) for index in range(HANDLERS)]

    @property
    def overlapped(self) -> bool:
        return self.started_when_first_woke == EMITS * HANDLERS

    def _handler(self, index: int) -> f.Handler:
        async def handle(event: f.Ping) -> None:
            self.started += 1
            await asyncio.sleep(self.sleep)
            if self.started_when_first_woke is None:
                self.started_when_first_woke = self.started

        handle.__name__ = handle.__qualname__ = f"sleeper_{index}"
        return handle


def main(settings: Settings) -> list[Goal]:
    repetitions = 2 if settings.quick else 5
    peaks: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for repetition in range(repetitions):
        names = list(CONTENDERS)
        shift = repetition % len(names)
        for name in [*names[shift:], *names[:shift]]:
            peaks[name].append(run_on("asyncio", _peak_per_emit(CONTENDERS[name])))
    print(
        f"\n== memory: {EMITS:,} concurrent emits, {HANDLERS} handlers that sleep {SLEEP} s each =="
    )
    print(f"   peak traced memory per in-flight emit, KB: median over {repetitions} repetitions,")
    print("   middle half in brackets")
    for name, values in peaks.items():
        q1, q3 = middle_half(values)
        print(f"{name:<50}{figure(statistics.median(values)):>8} [{figure(q1)}, {figure(q3)}]")
    goal = Goal(
        f"[14.6] {EMITS:,} concurrent emits, {HANDLERS} sleeping handlers: peak KB per emit",
        peaks[AIOEVENTS],
        LIMIT_KB,
        "<=",
    )
    print(f"   {goal}")
    return [goal]


async def _peak_per_emit(build: Callable[[Sequence[f.Handler], f.Ping], Emit]) -> float:
    sleep = SLEEP
    while True:
        sleepers = Sleepers(sleep)
        emit = build(sleepers.handlers(), f.Ping(seq=1))
        tracemalloc.start()
        try:
            await asyncio.gather(*[asyncio.create_task(emit()) for _ in range(EMITS)])
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        if sleepers.overlapped:
            return peak / EMITS / 1024
        sleep *= 2  # the machine was too slow to start them all within one sleep
