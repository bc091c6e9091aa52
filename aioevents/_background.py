"""Background delivery: a bounded priority queue, worker tasks, batches, graceful drain.

Everything runs in one task group that the bus owns between ``async with bus:`` and its exit:
no task outlives the block, and no event is dropped without being reported. Workers deliver
each queued event with `EventBus.emit`, so a background handler gets exactly the isolation,
timeout, retry and logging of an awaited one.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Sequence
from contextvars import Context, copy_context
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import anyio
import anyio.abc
import anyio.lowlevel

from ._checks import check_positive_int, check_seconds
from ._dispatch import FINISHED, Guarded, first_step, resume_in_context
from ._exceptions import BusStateError, QueueFullError
from ._result import EmitResult, HandlerError

if TYPE_CHECKING:
    from ._registry import Subscription

__all__ = ["Background", "BatchPolicy", "DrainReport"]

logger = logging.getLogger("aioevents")
_get_running_loop = asyncio._get_running_loop  # None when not on asyncio (trio)

ErrorHook = Callable[[HandlerError], object]


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When to deliver to a batch handler: ``max_size`` events wait, or the oldest waited
    ``max_wait`` seconds."""

    max_size: int
    max_wait: float

    def __post_init__(self) -> None:
        check_positive_int("max_size", self.max_size)
        check_seconds("max_wait", self.max_wait)


@dataclass(frozen=True, slots=True)
class DrainReport:
    """What stopping a running bus delivered and what it could not.

    ``delivered`` counts the events workers handed to their handlers (for a batch handler:
    added to its batch). ``undelivered`` holds the events that were still queued, or whose
    handlers (batches included) were interrupted, when the drain timed out: persist or
    re-publish them, they are not lost.
    """

    delivered: int
    undelivered: tuple[object, ...] = ()
    timed_out: bool = False


class _PriorityQueue:
    """Bounded; higher priority first, first in first out within a priority."""

    def __init__(self, capacity: int) -> None:
        # (-priority, arrival, event, the publisher's context): handlers see its contextvars
        self._heap: list[tuple[int, int, object, Context]] = []
        self._order = itertools.count()
        self.free = anyio.Semaphore(capacity)
        self.queued = anyio.Semaphore(0)
        self._waiting = 0
        self.closed = False

    def __len__(self) -> int:
        return len(self._heap)

    # Background.publish and ._work take the tokens themselves (with _acquire), then push or
    # pop: one coroutine frame less per event on the path every background event takes.

    async def wait_for_place(self) -> None:
        self._waiting += 1
        try:
            await self.free.acquire()  # back-pressure: waits while the queue is full
        finally:
            self._waiting -= 1
        if self.closed:
            raise BusStateError("the bus stopped before this event found a place in its queue")

    def close(self) -> None:
        """Refuse the events of publishers still waiting for a place (they get an error)."""
        self.closed = True
        for _ in range(self._waiting):
            self.free.release()

    def put_nowait(self, event: object, priority: int, context: Context) -> None:
        try:
            self.free.acquire_nowait()
        except anyio.WouldBlock:
            raise QueueFullError(
                f"the background queue is full ({len(self)} events); await publish() to wait "
                f"for a free place, or raise queue_size"
            ) from None
        self.push(event, priority, context)

    def push(self, event: object, priority: int, context: Context) -> None:
        heapq.heappush(self._heap, (-priority, next(self._order), event, context))
        self.queued.release()

    def pop(self) -> tuple[object, Context]:
        _, _, event, context = heapq.heappop(self._heap)
        self.free.release()
        return event, context

    def take_all(self) -> list[object]:
        return [heapq.heappop(self._heap)[2] for _ in range(len(self._heap))]


async def _acquire(semaphore: anyio.Semaphore, wait: Callable[[], Awaitable[None]]) -> None:
    """Take a token at once if there is one, else wait for it; either way, yield once.

    anyio's ``acquire`` pays for a cancel scope and a checkpoint even when a token is free,
    which made queueing cost more than delivering. The one yield stays: without it, one
    worker would drain the whole queue while the others and the publisher starve. A
    cancellation during that yield gives the token back, so nothing is taken half-way.
    """
    try:
        semaphore.acquire_nowait()
    except anyio.WouldBlock:
        await wait()
        return
    try:
        if _get_running_loop() is not None:
            await asyncio.sleep(0)
        else:
            await anyio.lowlevel.checkpoint()
    except BaseException:
        semaphore.release()
        raise


@dataclass(eq=False)
class _Batch:
    """Events waiting for one batch subscription; flushed by its own task."""

    sub: Subscription
    policy: BatchPolicy
    events: list[object] = field(default_factory=list)
    arrived: anyio.Event = field(default_factory=anyio.Event)
    full: anyio.Event = field(default_factory=anyio.Event)
    lock: anyio.Lock = field(default_factory=anyio.Lock)

    def add(self, event: object) -> None:
        self.events.append(event)
        self.arrived.set()
        if len(self.events) >= self.policy.max_size:
            self.full.set()

    def take(self) -> list[object]:
        taken, self.events = (
            self.events[: self.policy.max_size],
            self.events[self.policy.max_size :],
        )
        if not self.events:
            self.arrived = anyio.Event()
        if len(self.events) < self.policy.max_size:
            self.full = anyio.Event()
        return taken


class Background:
    """The running state of a bus: its task group, queue, workers and batches."""

    def __init__(
        self,
        emit: Callable[[object], Awaitable[EmitResult]],
        guarded: Callable[[], Guarded],
        *,
        workers: int,
        queue_size: int,
        on_error: ErrorHook | None,
    ) -> None:
        self._emit = emit
        self._guarded = guarded  # the bus's current runner (it changes with its hooks)
        self._workers = workers
        self._queue = _PriorityQueue(queue_size)
        self._on_error = on_error
        self._task_group = anyio.create_task_group()
        self._batches: dict[Subscription, _Batch] = {}
        self._unfinished = 0  # queued or being delivered
        self._idle = anyio.Event()
        self._interrupted: list[object] = []
        self.delivered = 0
        self.accepting = False

    async def start(self, batch_subs: Sequence[Subscription]) -> None:
        await self._task_group.__aenter__()
        for _ in range(self._workers):
            self._task_group.start_soon(self._work)
        for sub in batch_subs:
            self.add_batch(sub)
        self.accepting = True

    # -- queue -------------------------------------------------------------------------------

    async def publish(self, event: object, priority: int) -> None:
        queue = self._queue
        self._unfinished += 1
        try:
            await _acquire(queue.free, queue.wait_for_place)
        except BaseException:
            self._finished()
            raise
        queue.push(event, priority, copy_context())

    def publish_nowait(self, event: object, priority: int) -> None:
        self._queue.put_nowait(event, priority, copy_context())
        self._unfinished += 1

    async def _work(self) -> None:
        queue = self._queue
        while True:
            await _acquire(queue.queued, queue.queued.acquire)
            event, context = queue.pop()
            try:
                # In the publisher's context, as emit would have run there; so is on_error.
                step = self._deliver(event).__await__()
                yielded = first_step(context, step)
                if yielded is not FINISHED:
                    await resume_in_context(context, step, yielded)
            except anyio.get_cancelled_exc_class():
                self._interrupted.append(event)  # its handlers were stopped by the drain timeout
                raise
            self.delivered += 1
            self._finished()

    async def _deliver(self, event: object) -> None:
        result = await self._emit(event)
        if result.errors:
            await self._report(result.errors)

    def _finished(self) -> None:
        self._unfinished -= 1
        if self._unfinished == 0:
            self._idle.set()
            self._idle = anyio.Event()

    async def _report(self, errors: Sequence[HandlerError]) -> None:
        if self._on_error is None:
            return
        for error in errors:
            try:
                outcome = self._on_error(error)
                if isinstance(outcome, Awaitable):
                    await outcome
            except Exception:
                logger.exception("the on_error hook failed on %s", error.handler_name)

    # -- batches ---------------------------------------------------------------------------

    def add_batch(self, sub: Subscription) -> None:
        assert sub.batch is not None
        batch = self._batches[sub] = _Batch(sub, sub.batch)
        self._task_group.start_soon(self._flush_when_due, batch)

    def feed(self, sub: Subscription, event: object) -> None:
        self._batches[sub].add(event)

    async def _flush_when_due(self, batch: _Batch) -> None:
        while True:
            await batch.arrived.wait()
            with anyio.move_on_after(batch.policy.max_wait):
                await batch.full.wait()
            await self._flush(batch)

    async def _flush(self, batch: _Batch) -> None:
        async with batch.lock:
            events = batch.take()
            if not events:
                return
            errors: list[HandlerError] = []
            try:  # the bus's runner: isolation, logging, hooks and max_concurrency, as in emit
                await self._guarded()(batch.sub, events, errors)
            except anyio.get_cancelled_exc_class():
                self._interrupted.extend(events)  # stopped by the drain timeout: reported
                raise
            if errors:  # every event of a failed batch is reported
                await self._report([replace(errors[0], event=event) for event in events])

    # -- stopping ----------------------------------------------------------------------------

    async def drain(self, drain_timeout: float) -> bool:
        """Stop taking events; deliver what is queued and batched. False if time ran out."""
        self.accepting = False
        with anyio.move_on_after(drain_timeout) as deadline:
            while self._unfinished:
                await self._idle.wait()
            for batch in self._batches.values():
                while batch.events:
                    await self._flush(batch)
                async with batch.lock:  # and wait for a flush its own task had begun
                    pass
        return not deadline.cancelled_caught

    async def close(self, drain_timeout: float, *, drained: bool) -> DrainReport:
        """Cancel what still runs, end the task group, and report what was left."""
        self.accepting = False
        self._task_group.cancel_scope.cancel()
        try:
            await self._task_group.__aexit__(None, None, None)
        finally:
            self._queue.close()
            report = self._report_left(drain_timeout, drained=drained)
        return report

    def _report_left(self, drain_timeout: float, *, drained: bool) -> DrainReport:
        undelivered = [*self._interrupted, *self._queue.take_all()]
        for batch in self._batches.values():
            undelivered.extend(batch.events)
        if undelivered:
            logger.error(
                "the bus stopped with %d undelivered events after its %ss drain timeout; "
                "they are in the DrainReport",
                len(undelivered),
                drain_timeout,
            )
        return DrainReport(self.delivered, tuple(undelivered), timed_out=not drained)
