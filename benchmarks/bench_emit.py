"""Scenario 1: the cost of one awaited emit, against the peers, the raw idioms and the floor.

Four tables: no-op handlers on the default asyncio loop (with the floor, N bare tasks created
and awaited, and on Python 3.12+ a raw TaskGroup on a loop with `asyncio.eager_task_factory`);
handlers that each sleep 1 ms, where running them concurrently pays; aioevents and a raw
TaskGroup on uvloop and on asyncio; and bubus, apart, because it is three orders of magnitude
slower and needs longer repetitions.
"""

from __future__ import annotations

import asyncio
import statistics
import sys
from collections.abc import Sequence
from importlib import metadata
from typing import Any

from . import _contenders as c
from ._timing import (
    Case,
    Goal,
    Run,
    Sample,
    Settings,
    add_loop,
    measure,
    middle_half,
    print_table,
    run_on,
)

AIOEVENTS = "aioevents  await bus.emit(ev)"
AIOSIGNAL = "aiosignal  await Signal.send(ev)"
BLINKER = "blinker    await Signal.send_async(ev)"
PYEE = "pyee       emit(); await wait_for_complete()"
PYEE_BEST = "pyee       emit(); poll .complete, sleep(0) (its best)"
TASK_GROUP = "raw asyncio.TaskGroup + try/except"
EAGER = "raw asyncio.TaskGroup + try/except, eager_task_factory"
ANYIO = "raw anyio task group + try/except"
BARE = "raw asyncio tasks, create + await (the floor)"
PYTHON = f"Python {sys.version_info[0]}.{sys.version_info[1]}"
BARE_LIMIT = 1.10  # issue 14, goal 1

NOOP_CONTENDERS: dict[str, c.Builder] = {
    AIOEVENTS: c.aioevents_emit,
    AIOSIGNAL: c.aiosignal_send,
    BLINKER: c.blinker_send_async,
    PYEE_BEST: c.pyee_emit_and_poll,
    PYEE: c.pyee_emit_and_wait,
    "Django-style sequential + try/except": c.sequential_robust,
    "raw asyncio.gather(return_exceptions=True)": c.gather,
    TASK_GROUP: c.task_group,
    ANYIO: c.anyio_task_group,
    BARE: c.bare_tasks,
    "raw sequential await (lower bound)": c.sequential,
}
SLEEP_CONTENDERS: dict[str, c.Builder] = {
    name: NOOP_CONTENDERS[name] for name in (AIOEVENTS, BLINKER, AIOSIGNAL, PYEE, TASK_GROUP)
}


def main(settings: Settings) -> list[Goal]:
    return [
        *_noop_handlers(settings),
        *_sleeping_handlers(settings),
        *_uvloop(settings),
        *_bubus(settings),
    ]


def _column(
    contenders: dict[str, c.Builder],
    count: int,
    settings: Settings,
    *,
    sleep: float = 0.0,
    eager: bool = False,
) -> dict[str, Sample]:
    event, handlers = c.Ping(seq=1), c.make_handlers(count, sleep=sleep)
    cases = [Case(name, build(handlers, event)) for name, build in contenders.items()]
    if eager:
        cases.append(Case(EAGER, c.task_group(handlers, event), "eager"))
    return measure(cases, settings)


def _eager_loop() -> asyncio.AbstractEventLoop:
    loop = asyncio.new_event_loop()
    loop.set_task_factory(asyncio.eager_task_factory)  # type: ignore[attr-defined, unused-ignore]
    return loop


def _label(count: int) -> str:
    return f"{count} handler" + ("" if count == 1 else "s")


def _noop_handlers(settings: Settings) -> list[Goal]:
    eager = sys.version_info >= (3, 12)  # eager_task_factory is new in 3.12
    if eager:
        add_loop("eager", _eager_loop)
    columns = {
        _label(n): _column(NOOP_CONTENDERS, n, settings, eager=eager) for n in (0, 1, 2, 4, 16)
    }
    print_table(f"emit, no-op async handlers, default asyncio loop, {PYTHON}", columns)
    goals = [
        _goal(columns[label], AIOSIGNAL, f"{label}: aioevents ÷ aiosignal", 2.0)
        for label in (_label(0), _label(1))
    ]
    for label in (_label(4), _label(16)):
        column = columns[label]
        goals += [
            _goal(column, TASK_GROUP, f"{label}: aioevents ÷ raw asyncio.TaskGroup", 1.1),
            _goal(column, ANYIO, f"{label}: aioevents ÷ raw anyio task group", 0.4),
            _goal(column, PYEE, f"{label}: aioevents ÷ pyee emit-and-wait (1.5x as fast)", 1 / 1.5),
            _goal(
                column, PYEE_BEST, f"{label}: aioevents ÷ pyee at its best (1.5x as fast)", 1 / 1.5
            ),
        ]
    goals += [
        _goal(
            columns[_label(n)],
            BARE,
            f"[14.1] {PYTHON}, {_label(n)}: aioevents ÷ {n} bare asyncio tasks",
            BARE_LIMIT,
            "<=",
        )
        for n in (2, 4, 16)
    ]
    return _show(goals)


def _sleeping_handlers(settings: Settings) -> list[Goal]:
    columns = {_label(n): _column(SLEEP_CONTENDERS, n, settings, sleep=0.001) for n in (4, 16)}
    print_table("emit, handlers that each await asyncio.sleep(0.001)", columns)
    return _show(
        [
            _goal(
                columns[label], BLINKER, f"{label}, 1 ms each: aioevents ÷ blinker send_async", 1.0
            )
            for label in columns
        ]
    )


def _uvloop(settings: Settings) -> list[Goal]:
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]  # only the bench env has it
    except ImportError:
        print("\n== emit on uvloop: skipped, uvloop is not installed ==")
        return []
    add_loop("uvloop", uvloop.new_event_loop)
    columns = {}
    for count in (0, 1, 4, 16):
        event, handlers = c.Ping(seq=1), c.make_handlers(count)
        cases = [
            Case(f"{name} on {loop}", build(handlers, event), loop)
            for name, build in ((AIOEVENTS, c.aioevents_emit), (TASK_GROUP, c.task_group))
            for loop in ("asyncio", "uvloop")
        ]
        columns[_label(count)] = measure(cases, settings)
    print_table(
        f"emit, no-op async handlers, uvloop {metadata.version('uvloop')} vs the default loop",
        columns,
    )
    for label in (_label(4), _label(16)):
        ratios = columns[label][f"{AIOEVENTS} on uvloop"].ratios_to(
            columns[label][f"{TASK_GROUP} on uvloop"]
        )
        q1, q3 = middle_half(ratios)
        print(
            f"   on uvloop, {label}: aioevents ÷ raw asyncio.TaskGroup = "
            f"{statistics.median(ratios):.2f} (middle half {q1:.2f} to {q3:.2f})"
        )
    return []


def _bubus(settings: Settings) -> list[Goal]:
    try:
        import bubus  # type: ignore[import-not-found, import-untyped, unused-ignore]  # only the bench env has it
    except ImportError:
        print("\n== emit with bubus: skipped, bubus is not installed ==")
        return []
    # A bubus event is a pydantic model with an id of its own: one per dispatch, as its API wants.
    ping_type = type("Ping", (bubus.BaseEvent,), {"__annotations__": {"seq": int}})
    # Repetitions long enough for aioevents to run a few hundred emits against bubus' few.
    slow_peer = Settings(max(3, settings.repetitions // 6), settings.target * 10)
    columns, buses = {}, []
    for count in (1, 4):
        handlers = c.make_handlers(count)
        cases = [Case(AIOEVENTS, c.aioevents_emit(handlers, c.Ping(seq=1)))]
        for parallel in (False, True):
            bus = bubus.EventBus(parallel_handlers=parallel)
            for handler in handlers:
                bus.on(ping_type, handler)
            buses.append(bus)
            name = f"bubus      await dispatch(Ping()), parallel_handlers={parallel}"
            cases.append(Case(name, _bubus_dispatch(bus, ping_type)))
        columns[_label(count)] = measure(cases, slow_peer)
    for bus in buses:  # its queue loop polls while idle: stop it before anything else is timed
        run_on("asyncio", bus.stop(clear=True))
    title = f"emit with bubus {metadata.version('bubus')}: a queue with event history"
    print_table(title, columns)
    return []


def _bubus_dispatch(bus: Any, ping_type: Any) -> Run:
    dispatch = bus.dispatch

    async def run(n: int) -> None:
        for _ in range(n):
            await dispatch(ping_type(seq=1))

    return run


def _goal(
    column: dict[str, Sample], other: str, text: str, limit: float, compare: str = "<"
) -> Goal:
    return Goal.ratio(text, column[AIOEVENTS], column[other], limit, compare)


def _show(goals: Sequence[Goal]) -> list[Goal]:
    for goal in goals:
        print(f"   {goal}")
    return list(goals)
