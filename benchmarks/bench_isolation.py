"""Scenario 2: what isolating handlers costs when one of 16 raises.

aioevents records the failure and logs it on the ``aioevents`` logger; the raw TaskGroup only
catches it into a list. Logging is part of aioevents' real cost, so it is timed twice: with the
logger disabled (``logger.disabled = True``: the call returns at its first check) and with a
``NullHandler`` and ``propagate = False`` (the record, its ``exc_info`` included, is built and
handed to a handler that drops it: what a service that filters these records pays).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from . import _contenders as c
from ._timing import Case, Goal, Run, Settings, measure, print_table

AIOEVENTS_DISABLED = "aioevents, aioevents logger disabled"
AIOEVENTS_NULL = "aioevents, aioevents logger -> NullHandler"
AIOEVENTS_OK = "aioevents, no handler raises (reference)"
TASK_GROUP = "raw asyncio.TaskGroup + try/except"
TASK_GROUP_OK = "raw asyncio.TaskGroup, no handler raises"
COUNT, RAISING = 16, 7


def main(settings: Settings) -> list[Goal]:
    event = c.Ping(seq=1)
    failing, passing = c.make_handlers(COUNT, raising=RAISING), c.make_handlers(COUNT)
    cases = [
        Case(AIOEVENTS_DISABLED, _logging(c.aioevents_emit(failing, event), disabled=True)),
        Case(TASK_GROUP, c.task_group(failing, event)),
        Case(AIOEVENTS_NULL, _logging(c.aioevents_emit(failing, event), disabled=False)),
        Case(AIOEVENTS_OK, c.aioevents_emit(passing, event)),
        Case(TASK_GROUP_OK, c.task_group(passing, event)),
    ]
    column = measure(cases, settings)
    print_table(
        f"isolation: {COUNT} no-op handlers, one raises ValueError",
        {f"{COUNT} handlers": column},
    )
    goals = [
        Goal.cost(
            f"isolation cost ({label}), % over raw TaskGroup + try/except",
            column[name],
            column[TASK_GROUP],
            5.0,
        )
        for name, label in (
            (AIOEVENTS_DISABLED, "logger disabled"),
            (AIOEVENTS_NULL, "NullHandler"),
        )
    ]
    for goal in goals:
        print(f"   {goal}")
    return goals


def _logging(run: Run, *, disabled: bool) -> Run:
    async def run_with_logging(n: int) -> None:
        with _aioevents_logger(disabled=disabled):
            await run(n)

    return run_with_logging


@contextmanager
def _aioevents_logger(*, disabled: bool) -> Iterator[None]:
    logger = logging.getLogger("aioevents")
    saved = logger.disabled, logger.propagate
    handler = logging.NullHandler()
    logger.disabled, logger.propagate = disabled, False
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.disabled, logger.propagate = saved
