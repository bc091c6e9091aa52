"""The contenders: one emit loop per library or raw idiom, over the same handlers.

Each builder takes the handlers and the event and returns ``run(n)``, which awaits ``n`` emits
in a tight loop with no wrapper coroutine per emit, so each row pays only for its own dispatch.
Every library is used through its public API, the way its documentation shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import anyio
import blinker
from aiosignal import Signal
from pyee.asyncio import AsyncIOEventEmitter

from ._floors import (
    Builder,
    Handler,
    Ping,
    Run,
    aioevents_emit,
    bare_tasks,
    guarded,
    make_handlers,
    sequential,
    task_group,
)

__all__ = [
    "Builder",
    "Ping",
    "aioevents_emit",
    "aiosignal_send",
    "anyio_task_group",
    "bare_tasks",
    "blinker_send_async",
    "gather",
    "make_handlers",
    "pyee_emit_and_poll",
    "pyee_emit_and_wait",
    "sequential",
    "sequential_robust",
    "task_group",
    "trio_nursery",
]


def aiosignal_send(handlers: Sequence[Handler], event: Ping) -> Run:
    signal: Signal[Ping] = Signal(owner=None)
    signal.extend(handlers)
    signal.freeze()
    send = signal.send

    async def run(n: int) -> None:
        for _ in range(n):
            await send(event)

    return run


def blinker_send_async(handlers: Sequence[Handler], event: Ping) -> Run:
    signal = blinker.Signal()
    for handler in handlers:  # weak references, blinker's default; `handlers` keeps them alive
        signal.connect(handler)
    send_async = signal.send_async

    async def run(n: int) -> None:
        for _ in range(n):
            await send_async(event)  # the event is the sender, as in the original module

    return run


def pyee_emit_and_wait(handlers: Sequence[Handler], event: Ping) -> Run:
    # pyee's emit schedules one task per coroutine handler and returns at once; its public way
    # to wait for them is wait_for_complete(), which awaits every task still pending: in this
    # loop, exactly the tasks of the emit just made.
    emitter = AsyncIOEventEmitter()
    for handler in handlers:
        emitter.add_listener("ping", handler)
    emit, wait = emitter.emit, emitter.wait_for_complete

    async def run(n: int) -> None:
        for _ in range(n):
            emit("ping", event)
            await wait()

    return run


def pyee_emit_and_poll(handlers: Sequence[Handler], event: Ping) -> Run:
    """pyee at its best: instead of wait_for_complete() (``asyncio.wait`` over its pending
    set, a waiter future and a callback per task), yield until its public ``complete``
    property says the pending set is empty."""
    emitter = AsyncIOEventEmitter()
    for handler in handlers:
        emitter.add_listener("ping", handler)
    emit = emitter.emit

    async def run(n: int) -> None:
        for _ in range(n):
            emit("ping", event)
            while not emitter.complete:  # noqa: ASYNC110  (polling is the point here)
                await asyncio.sleep(0)

    return run


def sequential_robust(handlers: Sequence[Handler], event: Ping) -> Run:
    """Django's Signal.send_robust, async: one handler after another, each in try/except."""

    async def run(n: int) -> None:
        for _ in range(n):
            responses: list[tuple[Handler, object]] = []
            for handler in handlers:
                try:
                    responses.append((handler, await handler(event)))
                except Exception as exc:
                    responses.append((handler, exc))

    return run


def gather(handlers: Sequence[Handler], event: Ping) -> Run:
    async def run(n: int) -> None:
        for _ in range(n):
            await asyncio.gather(*[handler(event) for handler in handlers], return_exceptions=True)

    return run


def anyio_task_group(handlers: Sequence[Handler], event: Ping) -> Run:
    async def run(n: int) -> None:
        for _ in range(n):
            errors: list[Exception] = []
            async with anyio.create_task_group() as tasks:
                for handler in handlers:
                    tasks.start_soon(guarded, handler, event, errors)

    return run


def trio_nursery(handlers: Sequence[Handler], event: Ping) -> Run:
    """A raw trio nursery, each handler wrapped in try/except: trio's TaskGroup."""
    import trio  # the trio scenario only; the bench session installs it

    async def run(n: int) -> None:
        for _ in range(n):
            errors: list[Exception] = []
            async with trio.open_nursery() as nursery:
                for handler in handlers:
                    nursery.start_soon(guarded, handler, event, errors)

    return run
