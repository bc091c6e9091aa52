"""Buses for the worker command's tests: one fed from streams, one that is not."""

from __future__ import annotations

from dataclasses import dataclass

from aioevents import EventBus
from aioevents.streams import MemoryStreams, Streams, consume


@dataclass(frozen=True, slots=True)
class TaskWasQueued:
    n: int


bus = EventBus()
plain_bus = EventBus()
streams = Streams(MemoryStreams(), prefix="cli")


@bus.on(TaskWasQueued, name="run-task")
async def run_task(event: TaskWasQueued) -> None:
    pass


@bus.on(TaskWasQueued, name="log-task")
async def log_task(event: TaskWasQueued) -> None:
    pass


consumer = consume(bus, TaskWasQueued, streams=streams, concurrency=16)
