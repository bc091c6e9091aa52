"""The contenders: one emit loop per library or raw idiom, over the same handlers.

Each builder takes the handlers and the event and returns ``run(n)``, which awaits ``n`` emits
in a tight loop with no wrapper coroutine per emit, so each row pays only for its own dispatch.
Every library is used through its public API, the way its documentation shows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import anyio
import blinker
from aiosignal import Signal
from pyee.asyncio import AsyncIOEventEmitter

from aioevents import EventBus

__all__ = [
    "Ping",
    "aioevents_emit",
    "aiosignal_send",
    "anyio_task_group",
    "blinker_send_async",
    "gather",
    "make_handlers",
    "pyee_emit_and_wait",
    "sequential",
    "sequential_robust",
    "task_group",
]

Handler = Callable[["Ping"], Awaitable[object]]
Run = Callable[[int], Awaitable[None]]
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


async def _guarded(handler: Handler, event: Ping, errors: list[Exception]) -> None:
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
                    tasks.create_task(_guarded(handler, event, errors))

    return run


def anyio_task_group(handlers: Sequence[Handler], event: Ping) -> Run:
    async def run(n: int) -> None:
        for _ in range(n):
            errors: list[Exception] = []
            async with anyio.create_task_group() as tasks:
                for handler in handlers:
                    tasks.start_soon(_guarded, handler, event, errors)

    return run


def sequential(handlers: Sequence[Handler], event: Ping) -> Run:
    """The lower bound: await each handler in turn, no isolation, no report."""

    async def run(n: int) -> None:
        for _ in range(n):
            for handler in handlers:
                await handler(event)

    return run
