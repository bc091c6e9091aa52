"""Scenario: emit under trio, against a raw trio nursery (issue 14, goal 4).

aioevents runs on trio through anyio. The floor is a raw ``trio.open_nursery()`` with each
no-op handler started by ``nursery.start_soon`` and wrapped in try/except (the isolation
aioevents gives); a raw anyio task group on trio is there for reference. Every case runs in a
``trio.run`` of its own per timed run, interleaved with the others as in every table.
"""

from __future__ import annotations

from . import _contenders as c
from ._timing import Case, Goal, Settings, Skipped, Verdict, measure, print_table

AIOEVENTS = "aioevents  await bus.emit(ev) on trio"
NURSERY = "raw trio nursery + try/except (the floor)"
ANYIO = "raw anyio task group + try/except on trio"
COUNTS = (4, 16)
LIMIT = 2.5


def main(settings: Settings) -> list[Verdict]:
    try:
        import trio
    except ImportError:
        print("\n== emit on trio: skipped, trio is not installed ==")
        return [Skipped("[14.4] trio: aioevents ÷ raw trio nursery", "trio is not installed")]
    columns = {}
    for count in COUNTS:
        event, handlers = c.Ping(seq=1), c.make_handlers(count)
        cases = [
            Case(AIOEVENTS, c.aioevents_emit(handlers, event), "trio"),
            Case(NURSERY, c.trio_nursery(handlers, event), "trio"),
            Case(ANYIO, c.anyio_task_group(handlers, event), "trio"),
        ]
        columns[f"{count} handlers"] = measure(cases, settings)
    print_table(f"emit on trio {trio.__version__}, no-op async handlers", columns)
    goals: list[Verdict] = [
        Goal.ratio(
            f"[14.4] trio, {label}: aioevents ÷ raw trio nursery",
            column[AIOEVENTS],
            column[NURSERY],
            LIMIT,
            "<=",
        )
        for label, column in columns.items()
    ]
    for goal in goals:
        print(f"   {goal}")
    return goals
