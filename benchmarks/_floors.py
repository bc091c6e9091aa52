"""The handlers, aioevents' emit loop and the raw asyncio floors, with no peer library imported.

Split from `_contenders` so that the version workers (`_worker`), which run on interpreters
that have only aioevents and anyio installed, time exactly the same code as the main table.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from aioevents import EventBus

__all__ = [
    "Builder",
    "Handler",
    "Ping",
    "Run",
    "aioevents_emit",
    "bare_tasks",
    "guarded",
    "make_handlers",
    "sequential",
    "task_group",
]

Handler = Callable[["Ping"], Coroutine[Any, Any, object]]
Run = Callable[[int], Coroutine[Any, Any, None]]
Builder = Callable[[Sequence[Handler], "Ping"], Run]


@dataclass(frozen=True, slots=True, kw_only=True)
class Ping:
    seq: int


def make_handlers(count: int, *, sleep: float = 0.0, raising: int | None = None) -> list[Handler]:
    """``count`` distinct handlers: blinker and pyee ignore a function connected twice, and
    bubus warns about two handlers of the same name."""
    return [_handler(index, sleep, raising=index == raising) for index in range(count)]


def _handler(index: int, sleep: float, *, raising: bool) -> Handler:
    async def handle(event: Ping) -> None:
        if sleep:
            await asyncio.sleep(sleep)
        if raising:
            raise ValueError(f"handler failed on {event}")

    handle.__name__ = handle.__qualname__ = f"handler_{index}"
    return handle


def aioevents_emit(handlers: Sequence[Handler], event: Ping) -> Run:
    bus = EventBus()
    for handler in handlers:
        bus.subscribe(Ping, handler)
    emit = bus.emit

    async def run(n: int) -> None:
        for _ in range(n):
            await emit(event)

    return run


def bare_tasks(handlers: Sequence[Handler], event: Ping) -> Run:
    """The concurrent floor: a task per handler, made with the loop's own ``create_task`` (as
    aioevents does), then each awaited. No isolation (a failure is raised and the other
    tasks are left running), no report, no cancellation handling."""

    async def run(n: int) -> None:
        create_task = asyncio.get_running_loop().create_task
        for _ in range(n):
            tasks = [create_task(handler(event)) for handler in handlers]
            for task in tasks:
                await task

    return run


async def guarded(handler: Handler, event: Ping, errors: list[Exception]) -> None:
    try:
        await handler(event)
    except Exception as exc:
        errors.append(exc)


def task_group(handlers: Sequence[Handler], event: Ping) -> Run:
    async def run(n: int) -> None:
        for _ in range(n):
            errors: list[Exception] = []
            async with asyncio.TaskGroup() as tasks:
                for handler in handlers:
                    tasks.create_task(guarded(handler, event, errors))

    return run


def sequential(handlers: Sequence[Handler], event: Ping) -> Run:
    """The lower bound: await each handler in turn, no isolation, no report."""

    async def run(n: int) -> None:
        for _ in range(n):
            for handler in handlers:
                await handler(event)

    return run
