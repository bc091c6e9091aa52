"""Scenario: a change of subscriptions on a bus with many cached routes (issue 14, goal 5).

A bus caches, per concrete event type, the handlers its events go to (its route). Two buses
are compared: one with the 10 routes of the event types an application emits, and one that
also has routes cached for 99,990 other types, 100,000 in all. Each has one no-op handler on
the base class of the 10. The changes timed, one per repetition on each bus:

- subscribe + unsubscribe: a handler subscribed to one of the 10 types, then unsubscribed;
- once: a ``once=True`` handler subscribed to one of the 10, then an emit of that type, which
  runs it and ends the subscription;

each followed by one emit of every one of the 10 types: if the change dropped their routes,
rebuilding them is part of its cost. The 99,990 other types are emitted again before each
repetition, untimed, so that every change finds all 100,000 routes cached; that refill's time
is printed too: a change that left them to be rebuilt later shows there (about 7 µs a route)
rather than in the goal. The goal compares the two buses within each repetition.
"""

from __future__ import annotations

import gc
import statistics
from collections.abc import Awaitable, Callable, Sequence
from time import perf_counter

from aioevents import EventBus

from ._timing import Goal, Settings, figure, middle_half, run_on

ROUTES = 100_000
USED = 10
LIMIT = 2.0


class Used:
    """The base of the event types the application emits."""

    __slots__ = ()


class Other:
    __slots__ = ()


async def _no_op(event: object) -> None:
    pass


Change = Callable[[EventBus, Sequence[object]], Awaitable[None]]


async def _subscribe_unsubscribe(bus: EventBus, used: Sequence[object]) -> None:
    bus.unsubscribe(bus.subscribe(type(used[0]), _no_op))
    for event in used:
        await bus.emit(event)


async def _once_fires(bus: EventBus, used: Sequence[object]) -> None:
    bus.subscribe(type(used[0]), _no_op, once=True)
    for event in used:  # the first runs the once handler, which ends its subscription
        await bus.emit(event)


CHANGES: dict[str, Change] = {
    "subscribe + unsubscribe": _subscribe_unsubscribe,
    "once handler fires": _once_fires,
}


def main(settings: Settings) -> list[Goal]:
    repetitions = 3 if settings.quick else 21
    used = [type(f"Used{index}", (Used,), {"__slots__": ()})() for index in range(USED)]
    others = [
        type(f"Other{index}", (Other,), {"__slots__": ()})() for index in range(ROUTES - USED)
    ]
    buses = {USED: EventBus(), ROUTES: EventBus()}
    for bus in buses.values():
        bus.subscribe(Used, _no_op)
    gc.collect()
    gc.freeze()  # the 100,000 classes are never garbage: keep collections short
    try:
        results = {
            name: _measure(change, buses, used, others, repetitions)
            for name, change in CHANGES.items()
        }
    finally:
        gc.unfreeze()
    return _report(results, repetitions)


def _measure(
    change: Change,
    buses: dict[int, EventBus],
    used: Sequence[object],
    others: Sequence[object],
    repetitions: int,
) -> dict[str, list[float]]:
    """Seconds per change on each bus, and the refill of the large bus, per repetition."""
    times: dict[str, list[float]] = {"small": [], "large": [], "refill": []}
    for repetition in range(repetitions):
        order = [USED, ROUTES] if repetition % 2 else [ROUTES, USED]
        for routes in order:
            bus = buses[routes]
            refill = run_on(
                "asyncio", _emit_all(bus, [*used, *(others if routes == ROUTES else ())])
            )
            if routes == ROUTES:
                times["refill"].append(refill)
            gc.collect()
            times["large" if routes == ROUTES else "small"].append(
                run_on("asyncio", _timed(change, bus, used))
            )
    return times


async def _emit_all(bus: EventBus, events: Sequence[object]) -> float:
    emit, started = bus.emit, perf_counter()
    for event in events:
        await emit(event)
    return perf_counter() - started


async def _timed(change: Change, bus: EventBus, used: Sequence[object]) -> float:
    started = perf_counter()
    await change(bus, used)
    return perf_counter() - started


def _report(results: dict[str, dict[str, list[float]]], repetitions: int) -> list[Goal]:
    print(f"\n== invalidation: a change of subscriptions, {USED:,} vs {ROUTES:,} cached routes ==")
    print(f"   µs per change, then one emit of each of the {USED} types in use; medians over")
    print(f"   {repetitions} repetitions, middle half in brackets; ratio: large ÷ small bus per")
    print("   repetition, its median. refill: re-emitting all 100,000 types before the next")
    print("   repetition (untimed in the goal), ms.")
    header = f"{f'{USED} routes µs':>24}{f'{ROUTES:,} routes µs':>28}{'ratio':>22}{'refill ms':>12}"
    print(f"{'':<26}{header}")
    goals = []
    for name, times in results.items():
        ratios = [
            large / small for large, small in zip(times["large"], times["small"], strict=True)
        ]
        cells = [_spread([t * 1e6 for t in times[key]]) for key in ("small", "large")]
        refill = statistics.median(times["refill"]) * 1e3
        print(f"{name:<26}{cells[0]:>24}{cells[1]:>28}{_spread(ratios):>22}{refill:>12.1f}")
        goals.append(
            Goal(f"[14.5] {name}: {ROUTES:,} cached routes ÷ {USED} routes", ratios, LIMIT, "<=")
        )
    for goal in goals:
        print(f"   {goal}")
    return goals


def _spread(values: Sequence[float]) -> str:
    q1, q3 = middle_half(values)
    return f"{figure(statistics.median(values))} [{figure(q1)}, {figure(q3)}]"
