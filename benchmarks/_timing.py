"""Interleaved timing of async emit loops, and the tables and goals printed from it.

A case is ``run(n)``: a coroutine function that awaits ``n`` emits in a tight loop (or, if it
returns the seconds it timed itself, does ``n`` operations of which it times a part). Every
case of a table cell runs with the same n, sized so that one repetition of them all takes
about ``Settings.target`` seconds. One repetition runs every case once, in an order rotated
by one per repetition, so that a slow spell of this shared machine hits every case alike; a
cell is the median over the repetitions. Ratios are taken within each repetition (the two
runs were close in time), and their median is reported.
"""

from __future__ import annotations

import asyncio
import gc
import statistics
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any, TypeVar

__all__ = [
    "Case",
    "Check",
    "Goal",
    "Run",
    "Sample",
    "Settings",
    "Skipped",
    "Verdict",
    "add_loop",
    "close_loops",
    "figure",
    "measure",
    "middle_half",
    "print_table",
    "run_on",
]

Run = Callable[[int], Awaitable[float | None]]  # a float: the seconds it timed itself
T = TypeVar("T")
# One runner (one event loop) per kind, kept open for the whole run: a loop is made once.
_runners: dict[str, asyncio.Runner] = {}
_loop_factories: dict[str, Callable[[], asyncio.AbstractEventLoop] | None] = {"asyncio": None}


@dataclass(frozen=True)
class Settings:
    repetitions: int
    target: float  # seconds one repetition of a cell (every case once) should take
    quick: bool = False  # a smoke run: the scenarios with sizes of their own run small too
    # Other Pythons to time emit on ("3.12" -> its interpreter), for the versions scenario.
    pythons: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Case:
    name: str
    run: Run
    loop: str = "asyncio"


@dataclass
class Sample:
    """Seconds per emit, one value per repetition."""

    name: str
    per_op: list[float] = field(default_factory=list)
    n: int = 0  # operations per timed run

    @property
    def median_us(self) -> float:
        return statistics.median(self.per_op) * 1e6

    @property
    def spread(self) -> float:
        """Interquartile range over the median: how steady this cell was."""
        q1, _, q3 = statistics.quantiles(self.per_op, n=4, method="inclusive")
        return (q3 - q1) / statistics.median(self.per_op)

    def ratios_to(self, other: Sample) -> list[float]:
        """This time divided by ``other``'s in the same repetition, one per repetition."""
        return [a / b for a, b in zip(self.per_op, other.per_op, strict=True)]

    def ratio_to(self, other: Sample) -> float:
        return statistics.median(self.ratios_to(other))


@dataclass(frozen=True)
class Goal:
    """The median of ``values`` must pass ``compare limit``; judged on the median, with the
    middle half of the values shown.

    Each value is one repetition's: a ratio between two runs of the same repetition, or one
    run's own figure. The median of per-repetition values is the one kind of figure judged.
    """

    text: str
    values: Sequence[float]  # one per repetition
    limit: float
    compare: str = "<"  # "<", "<=" or ">="

    @classmethod
    def ratio(
        cls, text: str, sample: Sample, other: Sample, limit: float, compare: str = "<"
    ) -> Goal:
        return cls(text, sample.ratios_to(other), limit, compare)

    @classmethod
    def cost(cls, text: str, sample: Sample, other: Sample, limit_percent: float) -> Goal:
        """How much slower ``sample`` is than ``other``, in percent."""
        return cls(text, [(r - 1) * 100 for r in sample.ratios_to(other)], limit_percent)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def met(self) -> bool:
        return _holds(self.median, self.compare, self.limit)

    def __str__(self) -> str:
        q1, q3 = middle_half(self.values)
        verdict = "met" if self.met else "MISSED"
        if _holds(q1, self.compare, self.limit) != _holds(q3, self.compare, self.limit):
            verdict += " (borderline: the limit is inside the middle half)"
        return (
            f"goal: {self.text} {self.compare} {figure(self.limit)}: {figure(self.median)} "
            f"(middle half {figure(q1)} to {figure(q3)}) ... {verdict}"
        )


def _holds(value: float, compare: str, limit: float) -> bool:
    if compare == "<":
        return value < limit
    if compare == "<=":
        return value <= limit
    assert compare == ">=", compare
    return value >= limit


def middle_half(values: Sequence[float]) -> tuple[float, float]:
    """The first and third quartiles: the interquartile range is the spread printed."""
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def figure(value: float) -> str:
    """Ratios with two decimals; rates, counts and microseconds past 1,000 as whole numbers."""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.2f}" if abs(value) >= 0.1 or value == 0 else f"{value:.3f}"


@dataclass(frozen=True)
class Check:
    """A goal judged on a count rather than on timings: it is met or it is not."""

    text: str
    met: bool

    def __str__(self) -> str:
        return f"goal: {self.text} ... {'met' if self.met else 'MISSED'}"


@dataclass(frozen=True)
class Skipped:
    """A goal this run cannot judge (a Python version or a service it lacks), and why."""

    text: str
    reason: str
    met = False

    def __str__(self) -> str:
        return f"goal: {self.text} ... skipped: {self.reason}"


Verdict = Goal | Check | Skipped


def add_loop(name: str, factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    _loop_factories[name] = factory


def close_loops() -> None:
    for runner in _runners.values():
        runner.close()
    _runners.clear()


def measure(cases: Sequence[Case], settings: Settings, n: int | None = None) -> dict[str, Sample]:
    """Time every case with the same n, interleaved; the first case is the reference.

    ``n`` fixes the run size (a goal stated for a burst of 5,000, say); by default it is
    sized so that one repetition takes about ``settings.target`` seconds.
    """
    gc.collect()
    gc.freeze()  # what exists now is never garbage: the collection before each run stays short
    try:
        if n is None:
            n = _repetition_size(cases, settings.target)
        else:
            for case in cases:  # the warm-up the sizing does otherwise
                _time(case, n)
        samples = {case.name: Sample(case.name, n=n) for case in cases}
        for repetition in range(settings.repetitions):
            shift = repetition % len(cases)
            for case in [*cases[shift:], *cases[:shift]]:
                samples[case.name].per_op.append(_time(case, n) / n)
    finally:
        gc.unfreeze()
    return samples


def _repetition_size(cases: Sequence[Case], target: float) -> int:
    """The n for which one repetition of every case takes about ``target`` seconds.

    Sized on the sum rather than on one case: a fast case then runs short, a slow one long,
    and the whole run stays within its budget. Short repetitions keep the runs compared in
    one close in time: this machine has fast and slow spells (the other core's load), and a
    ratio is only fair between runs of the same spell.
    """
    per_op = 0.0
    for case in cases:  # also the warm-up: caches, the loop's first tasks, lazy imports
        n = 1
        while (elapsed := _time(case, n)) < target / 50:
            n *= 4
        per_op += elapsed / n
    return max(3, round(target / per_op))


def run_on(loop: str, coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the event loop of that kind that every case of that kind runs on.

    trio has no loop to keep: each call is a ``trio.run`` of its own.
    """
    if loop == "trio":
        import trio  # the trio scenario's cases only: the others run without it

        return trio.run(_awaited, coro)
    runner = _runners.get(loop)
    if runner is None:
        runner = _runners[loop] = asyncio.Runner(loop_factory=_loop_factories[loop])
    return runner.run(coro)


async def _awaited(coro: Coroutine[Any, Any, T]) -> T:
    return await coro


def _time(case: Case, n: int) -> float:
    gc.collect()  # start every run with the same clean heap
    return run_on(case.loop, _timed(case.run, n))


async def _timed(run: Run, n: int) -> float:
    # Untimed first: the case before this one (anyio, say) left the CPU caches full of its own
    # code, and a fast case's run is short enough for that to show.
    await run(max(1, n // 5))
    started = perf_counter()
    timed = await run(n)
    return perf_counter() - started if timed is None else timed


def print_table(title: str, columns: dict[str, dict[str, Sample]], unit: str = "emit") -> None:
    """One row per case, one column per cell: the median µs per emit, the median of this row's
    per-repetition ratios to the first row's, and those ratios' interquartile range."""
    rows = list(dict.fromkeys(name for cell in columns.values() for name in cell))
    reference = rows[0]
    width = max(len(name) for name in rows) + 2
    print(f"\n== {title} ==")
    print(f"   cells: median µs per {unit}; this row's time ÷ the first row's, the median of the")
    print("   per-repetition ratios; ± half the interquartile range of those ratios.")
    print("   spread: the widest interquartile range of the row's times, over their median")
    print(" " * width + "".join(f"{column:>26}" for column in columns) + "   spread")
    for name in rows:
        line, spreads = name.ljust(width), []
        for cell in columns.values():
            sample = cell.get(name)
            if sample is None:
                line += f"{'-':>26}"
                continue
            line += _cell(sample, cell[reference])
            spreads.append(sample.spread)
        print(f"{line}   {max(spreads):>5.1%}")


def _cell(sample: Sample, reference: Sample) -> str:
    ratios = sample.ratios_to(reference)
    q1, q3 = middle_half(ratios)
    ratio, half_range = statistics.median(ratios), (q3 - q1) / 2
    return f"{sample.median_us:>11.2f} {ratio:>6.2f}x ±{half_range:<5.2f}"
