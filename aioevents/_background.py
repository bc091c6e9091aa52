"""Background delivery: a bounded priority queue, worker tasks, batches, graceful drain.

Everything runs in one task group that the bus owns between ``async with bus:`` and its exit:
no task outlives the block, and no event is dropped without being reported. Workers deliver
each queued event with `EventBus.emit`, so a background handler gets exactly the isolation,
timeout, retry and logging of an awaited one.

Workers and batch flushers each run in a shielded cancel scope of their own: a cancellation
of the task that owns the bus (a timeout around it, a failing sibling in its task group) ends
the owner's block, whose drain then still has workers to deliver with. Only the bus cancels
them: when the drain is over, or at once when a handler raised a `BaseException`.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from contextvars import Context, copy_context
from dataclasses import dataclass, field, replace
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel

from ._cancelling import current_asyncio_task
from ._dispatch import FINISHED, Guarded, resume_in_context, run_in_context
from ._exceptions import BusStateError, QueueFullError
from ._names import event_name
from ._policies import BatchPolicy
from ._result import EmitResult, HandlerError
from ._subscription import Subscription

__all__ = ["Background", "DrainReport"]

logger = logging.getLogger("aioevents")
_get_running_loop = asyncio._get_running_loop  # None when not on asyncio (trio)

ErrorHook = Callable[[HandlerError], object]
_LOGGED_EVENTS = 20  # how many undelivered events the log names one by one


@dataclass(frozen=True, slots=True)
class DrainReport:
    """What stopping a running bus delivered and what it could not.

    ``delivered`` counts the events workers handed to their handlers (for a batch handler:
    added to its batch). ``undelivered`` holds the events that were still queued or batched,
    or whose handlers were interrupted, when the drain timed out or a handler raised a
    `BaseException`: persist or re-publish them, they are not lost. An interrupted event may
    have been handled in part (a handler that had finished, a sync handler's thread that ran
    to its end): publishing it again is at least once. The last report of a bus stays
    readable as `EventBus.last_drain`.
    """

    delivered: int
    undelivered: tuple[object, ...] = ()
    timed_out: bool = False


class _PriorityQueue:
    """Bounded; higher priority first, first in first out within a priority."""

    def __init__(self, capacity: int) -> None:
        # (-priority, arrival, event, the publisher's context): handlers see its contextvars
        self.heap: list[tuple[int, int, object, Context]] = []
        self._order = itertools.count()
        # Free places, counted here: anyio's Semaphore cost a quarter of the time per event.
        # Publishers waiting for one wait in line; a freed place goes to the first of them.
        self.free = capacity
        self._publishers: collections.deque[anyio.Event] = collections.deque()
        # Workers that found the queue empty wait for one event together: a publisher wakes
        # them when the queue fills again, not once per event.
        self._arrived = anyio.Event()
        self._idle_workers = 0
        self._waking = False  # _arrived is set: the idle workers are being woken
        self.closed = False

    def __len__(self) -> int:
        return len(self.heap)

    # Background.publish takes a free place itself (self.free -= 1), then pushes: one
    # coroutine frame less per event on the path every background event takes.

    async def wait_for_place(self) -> None:
        """Back-pressure: wait in line until a place is handed over (first come, first in)."""
        handed = anyio.Event()
        self._publishers.append(handed)
        try:
            await handed.wait()
        except BaseException:
            if handed.is_set():  # handed a place, but cancelled before taking it: pass it on
                self.give_back()
            else:
                self._publishers.remove(handed)
            raise
        if self.closed:
            raise BusStateError("the bus stopped before this event found a place in its queue")

    def give_back(self) -> None:
        """A place is free again: the first publisher waiting gets it, else it is counted."""
        if self._publishers and not self.closed:
            self._publishers.popleft().set()
        else:
            self.free += 1

    def close(self) -> None:
        """Refuse the events of publishers still waiting for a place (they get an error)."""
        self.closed = True
        while self._publishers:
            self._publishers.popleft().set()

    def put_nowait(self, event: object, priority: int, context: Context) -> None:
        if not self.free:
            raise QueueFullError(
                f"the background queue is full ({len(self)} events); await publish() to wait "
                f"for a free place, or raise queue_size"
            )
        self.free -= 1
        self.push(event, priority, context)

    def push(self, event: object, priority: int, context: Context) -> None:
        heapq.heappush(self.heap, (-priority, next(self._order), event, context))
        if self._idle_workers and not self._waking:
            self._waking = True
            self._arrived.set()

    async def wait_for_events(self) -> None:
        """Wait until the queue holds an event (another worker may take it first)."""
        self._idle_workers += 1
        try:
            await self._arrived.wait()
        finally:
            self._idle_workers -= 1
            if not self._idle_workers and self._waking:
                self._arrived = anyio.Event()  # every waiter woke: the next ones wait anew
                self._waking = False

    def pop(self) -> tuple[object, Context]:
        _, _, event, context = heapq.heappop(self.heap)
        if self._publishers:
            self.give_back()
        else:
            self.free += 1
        return event, context

    def take_all(self) -> list[object]:
        return [heapq.heappop(self.heap)[2] for _ in range(len(self.heap))]


# Places (publishers) or events (workers) taken between two yields to the event loop: a
# yield on each cost three quarters of the time per event; 16 keeps the p99 from publish to
# handler start well under 100 µs (benchmarks/bench_background.py).
_YIELD_EVERY = 16


async def _surviving_strays(
    background: Background, what: str, work: Callable[..., Awaitable[None]], *args: Any
) -> None:
    """Run ``work`` again after a cancellation that a handler made of the task's own.

    A handler runs in the task that delivers it (a single one inline): one that cancels
    ``asyncio.current_task()`` and returns at once leaves that cancellation to land anywhere
    in the worker's loop. Only the bus cancels its tasks, and says so with its closing flag.
    """
    while True:
        try:
            await work(*args)
            return
        except anyio.get_cancelled_exc_class():
            if background.closing:
                raise
            _forget_stray_cancellation(f"a handler run by a {what}", f"the {what} goes on")


def _forget_stray_cancellation(who: str, consequence: str) -> None:
    """A handler cancelled the task delivering it: take that request back (on asyncio)."""
    task = current_asyncio_task()
    if task is not None and task.cancelling():
        task.uncancel()
    logger.error("%s cancelled the task delivering it (its own task); %s", who, consequence)


async def _yield_or_give_back(queue: _PriorityQueue) -> None:
    try:
        await _yield()
    except BaseException:
        queue.give_back()
        raise


async def _yield() -> None:
    if _get_running_loop() is not None:
        await asyncio.sleep(0)  # a bare yield: no cancel scope machinery
    else:
        await anyio.lowlevel.checkpoint()


@dataclass(eq=False)
class _Batch:
    """Events waiting for one batch subscription; flushed by its own task."""

    sub: Subscription
    policy: BatchPolicy
    events: list[object] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # when each event arrived
    arrived: anyio.Event = field(default_factory=anyio.Event)
    full: anyio.Event = field(default_factory=anyio.Event)
    lock: anyio.Lock = field(default_factory=anyio.Lock)
    closed: bool = False  # unsubscribed: what it holds is flushed, then its task ends

    def add(self, event: object) -> None:
        self.events.append(event)
        self.arrivals.append(anyio.current_time())
        self.arrived.set()
        if len(self.events) >= self.policy.max_size:
            self.full.set()

    def close(self) -> None:
        self.closed = True
        self.arrived.set()
        self.full.set()

    def due_in(self) -> float:
        """Seconds until the oldest event has waited ``max_wait``: a slow flush counts."""
        return self.arrivals[0] + self.policy.max_wait - anyio.current_time()

    def take(self) -> list[object]:
        size = self.policy.max_size
        taken, self.events = self.events[:size], self.events[size:]
        del self.arrivals[:size]
        if not self.events and not self.closed:
            self.arrived = anyio.Event()
        if len(self.events) < size and not self.closed:
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
        # Free places taken and events taken: each end yields every _YIELD_EVERY of them.
        self._places_taken = self._events_taken = 0
        self._on_error = on_error
        self._task_group = anyio.create_task_group()
        self._scopes: list[anyio.CancelScope] = []  # one shield per worker and flusher
        self._batches: dict[Subscription, _Batch] = {}
        self._unfinished = 0  # queued, waiting for a place, or being delivered
        self._idle = anyio.Event()
        self._undelivered: list[object] = []  # interrupted, or failed outside any handler
        self._fatal: BaseException | None = None  # a handler's BaseException ends it all
        self.closing = False  # the bus cancels its tasks: their cancellation is its own
        self.delivered = 0
        self.accepting = False  # publishes are taken from start() to close(), the drain too
        self.stopping = False
        self.timed_out = False

    async def start(self, batch_subs: Sequence[Subscription]) -> None:
        await self._task_group.__aenter__()
        for _ in range(self._workers):
            self._spawn_shielded(self._work)
        for sub in batch_subs:
            self.add_batch(sub)
        self.accepting = True

    def _spawn_shielded(self, work: Callable[..., Coroutine[Any, Any, None]], *args: Any) -> None:
        # The scope is made here, not in the task: cancelled before the task first runs, it
        # still ends it, so nothing started by the bus can outlive close().
        scope = anyio.CancelScope(shield=True)
        self._scopes.append(scope)
        self._task_group.start_soon(self._shielded, scope, work, *args)

    @staticmethod
    async def _shielded(
        scope: anyio.CancelScope, work: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        with scope:
            await work(*args)

    # -- queue -------------------------------------------------------------------------------

    async def publish(self, event: object, priority: int) -> None:
        """Take a free place and queue the event; wait while the queue is full.

        anyio's ``acquire`` pays for a cancel scope and a checkpoint even when a place is
        free, which made queueing cost more than delivering: a free place is taken directly.
        A yield every ``_YIELD_EVERY`` places stays, so that a publishing loop lets the
        workers run; a cancellation during it gives the place back, so nothing is half-queued.
        """
        queue = self._queue
        self._unfinished += 1
        try:
            if not queue.free:
                await queue.wait_for_place()  # back-pressure
            else:
                queue.free -= 1
                self._places_taken += 1
                if not self._places_taken % _YIELD_EVERY:
                    await _yield_or_give_back(queue)
        except BaseException:
            self._finished()
            raise
        queue.push(event, priority, copy_context())

    def publish_nowait(self, event: object, priority: int) -> None:
        self._queue.put_nowait(event, priority, copy_context())
        self._unfinished += 1

    async def _work(self) -> None:
        await _surviving_strays(self, "worker", self._take_and_deliver)

    async def _take_and_deliver(self) -> None:
        queue, waiting = self._queue, self._queue.heap
        while True:
            if not waiting:
                await queue.wait_for_events()
                continue
            event, context = queue.pop()
            try:
                await self._deliver_in(context, event)
            finally:
                self._unfinished -= 1  # what _finished() does, without the call per event
                if not self._unfinished:
                    self._now_idle()
            self._events_taken += 1
            if not self._events_taken % _YIELD_EVERY:  # the others, publishers too, get a turn
                await _yield()

    async def _deliver_in(self, context: Context, event: object) -> None:
        """Deliver one event in the publisher's context, as emit would have run there."""
        try:
            step = self._deliver(event).__await__()
            yielded = context.run(next, step, FINISHED)  # run_in_context, written out
            if yielded is not FINISHED:
                await resume_in_context(context, step, yielded)
        except anyio.get_cancelled_exc_class():
            self._undelivered.append(event)  # its handlers were stopped by the bus
            if self.closing:
                raise
            _forget_stray_cancellation(
                f"a handler of {event!r}", "the event is reported undelivered"
            )
        except Exception:  # not a handler's failure (those are isolated): emit itself failed
            logger.exception("could not deliver %r; it is reported undelivered", event)
            self._undelivered.append(event)
        except BaseException as exc:
            self._undelivered.append(event)
            self._die(exc)
            raise
        else:
            self.delivered += 1

    async def _deliver(self, event: object) -> None:
        result = await self._emit(event)
        if result.errors:
            await self._report(result.errors)

    def _finished(self) -> None:
        self._unfinished -= 1
        if not self._unfinished:
            self._now_idle()

    def _now_idle(self) -> None:
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

    def _die(self, exc: BaseException) -> None:
        """A handler raised a BaseException: stop all delivery now, so the drain ends."""
        if self._fatal is None:
            self._fatal = exc
        self._cancel_own_tasks()
        self._idle.set()  # wake a drain waiting for the queue

    def _cancel_own_tasks(self) -> None:
        """Take no more events and cancel every worker and flusher; they know it is the bus."""
        self.accepting = False
        self.closing = True
        for scope in self._scopes:
            scope.cancel()

    # -- batches ---------------------------------------------------------------------------

    def add_batch(self, sub: Subscription) -> None:
        assert sub.batch is not None
        batch = self._batches[sub] = _Batch(sub, sub.batch)
        self._spawn_shielded(self._flush_when_due, batch)

    def remove_batch(self, sub: Subscription) -> None:
        """Unsubscribed while running: deliver what it holds, then end its task."""
        batch = self._batches.get(sub)
        if batch is not None:
            batch.close()

    def feed(self, sub: Subscription, event: object) -> None:
        self._batches[sub].add(event)

    async def _flush_when_due(self, batch: _Batch) -> None:
        try:
            await _surviving_strays(self, "batch flusher", self._flush_in_turn, batch)
        finally:
            if batch.closed and not batch.events:
                del self._batches[batch.sub]

    async def _flush_in_turn(self, batch: _Batch) -> None:
        while not batch.closed or batch.events:
            await batch.arrived.wait()
            if batch.events:
                with anyio.move_on_after(batch.due_in()):
                    await batch.full.wait()
            await self._flush(batch)

    async def _flush(self, batch: _Batch) -> None:
        async with batch.lock:
            events = batch.take()
            if not events:
                return
            errors: list[HandlerError] = []
            try:  # the bus's runner: isolation, logging, hooks and max_concurrency, as in emit
                # In a copy of the context: a batch flushed by the drain runs in the owner's
                # task, which must not see what the handler sets.
                call = self._guarded()(batch.sub, events, errors)
                await run_in_context(copy_context(), call)
            except anyio.get_cancelled_exc_class():
                self._undelivered.extend(events)  # stopped by the bus: reported
                if self.closing:
                    raise
                _forget_stray_cancellation(
                    f"the batch handler {batch.sub.name}", "its batch is reported undelivered"
                )
                return
            except BaseException as exc:
                self._undelivered.extend(events)
                self._die(exc)
                raise
            if errors:  # every event of a failed batch is reported
                await self._report([replace(errors[0], event=event) for event in events])

    # -- stopping ----------------------------------------------------------------------------

    async def drain(self, drain_timeout: float) -> None:
        """Deliver what is queued and batched; ``timed_out`` says if time ran out.

        Runs to a fixed point: handlers may emit or publish events that fill a batch or the
        queue again (publishes are taken until close()), so it goes round until a whole round
        found nothing to deliver. A `BaseException` in a handler ends it at once.
        """
        with anyio.move_on_after(drain_timeout) as deadline:
            while self._fatal is None:
                try:
                    while self._unfinished and self._fatal is None:
                        await self._idle.wait()
                    if not await self._flush_batches() and not self._unfinished:
                        break
                except anyio.get_cancelled_exc_class():
                    if deadline.cancel_called:  # its own timeout
                        raise
                    _forget_stray_cancellation("a batch handler", "the drain goes on")
        self.timed_out = deadline.cancelled_caught

    async def _flush_batches(self) -> bool:
        """Flush every batch, and wait for flushes their own tasks had begun; True if any."""
        flushed = False
        for batch in list(self._batches.values()):
            while batch.events and self._fatal is None:
                await self._flush_caught(batch)
                flushed = True
            if batch.lock.locked():
                flushed = True  # what that flush emits must be looked at again
                async with batch.lock:
                    pass
        return flushed

    async def _flush_caught(self, batch: _Batch) -> None:
        # The drain runs in the owner's task: a handler's BaseException ends the drain and
        # is raised by close(), after the report, like one raised in a worker.
        try:
            await self._flush(batch)
        except anyio.get_cancelled_exc_class():
            raise
        except BaseException as exc:  # an on_error hook's too
            self._die(exc)

    async def close(self) -> None:
        """Cancel what still runs and end the task group; raise the `BaseException` a
        handler raised, if one did. `left` then says what was not delivered."""
        self._cancel_own_tasks()
        self._task_group.cancel_scope.cancel()
        try:
            await self._task_group.__aexit__(None, None, None)
        except BaseExceptionGroup:
            if self._fatal is None:  # pragma: no cover  (every task failure goes through _die)
                raise
        finally:
            self._queue.close()
        if self._fatal is not None:
            raise self._fatal

    @property
    def fatal(self) -> BaseException | None:
        return self._fatal

    def left(self) -> list[object]:
        """What was not delivered: interrupted, still queued, or still batched."""
        left = [*self._undelivered, *self._queue.take_all()]
        for batch in self._batches.values():
            left.extend(batch.events)
        return left


def log_undelivered(undelivered: Sequence[object], why: str) -> None:
    """Name every undelivered event in the log (up to a limit), not only their count."""
    named = ", ".join(f"{event_name(event)} {event!r}" for event in undelivered[:_LOGGED_EVENTS])
    more = len(undelivered) - _LOGGED_EVENTS
    logger.error(
        "the bus stopped with %d undelivered events (%s): %s%s; bus.last_drain.undelivered "
        "holds them, to persist or publish again",
        len(undelivered),
        why,
        named,
        f" and {more} more" if more > 0 else "",
    )
