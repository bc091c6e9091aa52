"""EventBus: subscribe handlers to event types and emit events to them.

The hot path is `EventBus.emit`, top to bottom in this file: look up the cached route for the
event's type; no handler returns the shared empty report; one handler runs inline in the
emitter's task (in a copy of its context, as a task would); several run concurrently, as
asyncio tasks counted down by `_run_on_asyncio` when on asyncio, and in an anyio task group
elsewhere (trio). Both give the same contract: started in subscription order, each isolated,
all finished or cancelled before emit returns.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import sys
import types
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack
from contextvars import copy_context
from time import perf_counter
from types import MappingProxyType
from typing import Any, Self, TypeVar, cast

import anyio
import anyio.abc
import anyio.lowlevel

from ._background import Background, DrainReport, log_undelivered
from ._cancelling import current_asyncio_task, left_by_a_task_group, pending_cancellations
from ._checks import (
    check_callable,
    check_event_type,
    check_instance,
    check_positive_int,
    check_seconds,
    check_subscription,
)
from ._decorators import HandlerDecorators
from ._dispatch import (
    FINISHED,
    Guarded,
    Hook,
    Runners,
    has_switch,
    hook_failed,
    new_subscription,
    record_failure,
    record_stray_cancellation,
    run_guarded,
    run_to_the_end,
    wait_out,
)
from ._exceptions import BusStateError, SubscriptionError
from ._names import event_name
from ._policies import BatchPolicy, Durable, Options, Retry, durable_policy
from ._registry import Registry, Route
from ._result import EmitResult, HandlerError
from ._router import Router
from ._subscription import Subscription

__all__ = ["EventBus"]

E = TypeVar("E")
_get_running_loop = asyncio._get_running_loop  # None when not on asyncio (trio)
_EAGER_START = sys.version_info >= (3, 12)  # asyncio.Task(..., eager_start=True)
_Task: Any = asyncio.Task  # untyped: mypy checks as Python 3.11, which has no eager_start


class EventBus(HandlerDecorators):
    """Dispatches events to the handlers subscribed to their type or to a base class of it.

    ``max_concurrency`` bounds how many handlers run at once across every emit of this bus;
    ``hooks`` are called around every handler call (see `Hook`). A hook may say with its
    ``active`` whether it is to be called: it is asked once per emit (and per outbox delivery,
    stream entry and background batch), and while no hook is active the handlers run as on a
    bus without hooks.

    Within ``async with bus:`` the bus also delivers in the background: `publish` queues an
    event (at most ``queue_size``, by priority) for ``workers`` tasks, and leaving the block
    drains the queue within ``drain_timeout`` seconds. ``on_error`` is called with every
    `HandlerError` of a background delivery (emit returns its errors to the caller instead).

    >>> import anyio
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class UserSignedUp:
    ...     user_id: int
    >>> bus = EventBus()
    >>> @bus.on(UserSignedUp)
    ... async def send_welcome(event: UserSignedUp) -> None:
    ...     print("welcome", event.user_id)
    >>> result = anyio.run(bus.emit, UserSignedUp(user_id=7))
    welcome 7
    >>> result.ok, result.handled
    (True, 1)
    """

    def __init__(
        self,
        *,
        max_concurrency: int | None = None,
        hooks: Iterable[Hook] = (),
        workers: int = 4,
        queue_size: int = 1024,
        drain_timeout: float = 30.0,
        on_error: Callable[[HandlerError], object] | None = None,
    ) -> None:
        check_positive_int("max_concurrency", max_concurrency, none=True)
        check_positive_int("workers", workers)
        check_positive_int("queue_size", queue_size)
        check_seconds("drain_timeout", drain_timeout)
        check_callable("on_error", on_error, none=True)
        self._new_background = functools.partial(
            Background, workers=workers, queue_size=queue_size, on_error=on_error
        )
        self._drain_timeout = drain_timeout
        self._background: Background | None = None
        self._last_drain: DrainReport | None = None
        self._owner: int | None = None  # the task that entered `async with bus:`
        self._registry = Registry()
        self._routes = self._registry.routes
        self._durable: tuple[int, Mapping[str, Subscription]] = (-1, MappingProxyType({}))
        self._limiter = anyio.CapacityLimiter(max_concurrency) if max_concurrency else None
        self._hooks: list[Hook] = [_checked_hook(hook) for hook in _hook_list(hooks)]
        self._taps: list[Callable[[object], None]] = []
        self._update_runner()
        # Run while the bus runs (an outbox's relay): see _attach.
        self._services: list[Callable[[], AbstractAsyncContextManager[object]]] = []
        self._running_services: AsyncExitStack | None = None

    def __repr__(self) -> str:
        return f"<EventBus subscriptions={len(self._registry.all())}>"

    # -- subscribing -----------------------------------------------------------------------

    def subscribe(
        self,
        event_type: type[E],
        handler: Callable[[E], object],
        *,
        timeout: float | None = None,
        once: bool = False,
        retry: Retry | None = None,
        name: str | None = None,
        durable: bool | Durable = False,
    ) -> Subscription:
        """Subscribe ``handler`` to events of ``event_type`` and of its subclasses.

        An ``async def`` handler runs in the event loop; a plain function runs in a worker
        thread. A handler that runs longer than ``timeout`` seconds is recorded as failed with
        a `TimeoutError`. With ``once=True`` the subscription ends after its first event.
        With ``retry`` a failure of the chosen kinds is retried with backoff (see `Retry`).
        ``name`` is how logs and reports call it (its qualified name by default). With
        ``durable`` events recorded in a transaction reach it through the outbox (see
        `aioevents.outbox`); its name is then what its stored deliveries are addressed to.
        """
        options = Options(
            timeout=timeout, once=once, retry=retry, name=name, durable=durable_policy(durable)
        )
        return self._add(event_type, handler, options)

    def subscribe_batch(
        self,
        event_type: type[E],
        handler: Callable[[Sequence[E]], object],
        *,
        max_size: int = 100,
        max_wait: float = 1.0,
        timeout: float | None = None,
        retry: Retry | None = None,
        name: str | None = None,
    ) -> Subscription:
        """Subscribe ``handler`` to receive ``event_type`` events in batches; see `on_batch`."""
        batch = BatchPolicy(max_size, max_wait)
        options = Options(timeout=timeout, retry=retry, batch=batch, name=name)
        return self._add(event_type, handler, options)

    def _add(
        self, event_type: type[Any], handler: Callable[[Any], object], options: Options
    ) -> Subscription:
        check_subscription(event_type, handler)
        order = self._registry.next_order()
        sub = new_subscription(event_type, handler, options, order=order, owner=self._registry)
        if sub.durable is not None and sub.name in self.durable_handlers:
            raise SubscriptionError(
                f"a durable handler named {sub.name} is already subscribed: stored deliveries "
                f"are addressed by name, so give this one another with name=..."
            )
        self._registry.add(sub)
        if sub.batch is not None and self._background is not None:
            self._background.add_batch(sub)
        return sub

    def unsubscribe(self, subscription: Subscription) -> None:
        """End a subscription. A second call for the same subscription does nothing."""
        check_instance(subscription, Subscription, "unsubscribe() takes a Subscription")
        if subscription.owner is not self._registry:
            raise SubscriptionError(
                f"{subscription.name} was subscribed on another bus; unsubscribe it there"
            )
        subscription = subscription.origin or subscription
        if self._registry.remove(subscription) and subscription.batch is not None:
            if self._background is not None:  # what its batch holds is still delivered
                self._background.remove_batch(subscription)

    def include(self, router: Router) -> tuple[Subscription, ...]:
        """Subscribe every handler of a `Router`, in the order the router recorded them."""
        check_instance(router, Router, "include() takes a Router")
        entries = router.entries_for(self)
        return tuple(self._add(entry.event_type, entry.handler, entry.options) for entry in entries)

    # -- looking at what is subscribed --------------------------------------------------------

    @property
    def subscriptions(self) -> tuple[Subscription, ...]:
        """Every subscription on this bus, in subscription order."""
        return self._registry.all()

    @property
    def durable_handlers(self) -> Mapping[str, Subscription]:
        """The durable subscriptions, by the name their stored deliveries are addressed to."""
        version, durable = self._durable
        if version != self._registry.version:  # a relay reads this once per delivery
            subs = self._registry.all()
            durable = MappingProxyType({sub.name: sub for sub in subs if sub.durable is not None})
            self._durable = (self._registry.version, durable)
        return durable

    def handlers_for(self, event_type: type) -> tuple[Subscription, ...]:
        """The subscriptions an event of ``event_type`` is dispatched to, in start order."""
        check_event_type(event_type)
        return self._registry.matching(event_type)

    # -- hooks -------------------------------------------------------------------------------

    def add_hook(self, hook: Hook) -> None:
        """Call ``hook`` around every handler call from now on."""
        self._hooks.append(_checked_hook(hook))
        self._update_runner()

    def remove_hook(self, hook: Hook) -> None:
        """Stop calling ``hook``; `SubscriptionError` if it was not added."""
        if hook not in self._hooks:
            raise SubscriptionError(f"hook {hook!r} is not added to this bus")
        self._hooks.remove(hook)
        self._update_runner()

    def _update_runner(self) -> None:
        self._runners = Runners(self._limiter, self._hooks)
        # What emit runs when no hook has an `active` switch to ask (None when one has): the
        # runner, and its hook when emit's tasks may call it themselves.
        self._choice = self._runners.fixed
        self._runner = None if self._choice is None else self._choice[0]

    @property
    def _guarded(self) -> Guarded:
        """The runner for the hooks active now: the relay, consumers and batches ask per run."""
        return self._runners.now()[0]

    # -- emitting ----------------------------------------------------------------------------

    async def emit(self, event: object, *, strict: bool = False) -> EmitResult:
        """Run every handler subscribed to the event's type (or a base of it); wait for all.

        Returns an `EmitResult` naming the handlers that ran and the failures among them.
        With ``strict=True`` failures are raised, once every handler has finished, as an
        `ExceptionGroup` of the handlers' exceptions.
        """
        if strict is not False and strict is not True:
            raise TypeError(f"strict must be a bool, got {strict!r}")
        try:
            route = self._routes[type(event)]
        except KeyError:
            route = self._new_route(event)
        if route.needs_preparation:
            self._prepare(route, event)
        subs = route.subscriptions
        if not subs:
            return route.ok_result
        errors: list[HandlerError] = []
        if len(subs) == 1:
            # Inline in the emitter's task, in a copy of its context as a task would have:
            # this loop does for the handler's coroutine what a task would. It is written out
            # here, not in a helper, so that nested emits cost no more stack than awaits.
            sub, context = subs[0], copy_context()
            guarded = self._runner
            if guarded is None:  # a hook has an `active` switch: asked here, once per emit
                guarded = self._runners.now()[0]
            plain = guarded is run_guarded  # then not even the guard's coroutine
            step = (sub.invoke(event) if plain else guarded(sub, event, errors)).__await__()
            yielded = FINISHED  # until it suspends, when the emitter's task is looked up
            try:
                # next() with a default: a handler that never suspends costs no StopIteration
                yielded = context.run(next, step, FINISHED)
                if yielded is not FINISHED:
                    task = current_asyncio_task()
                    pending = pending_cancellations(task)
                    while True:
                        try:
                            value = await _suspend(yielded)
                        except BaseException as exc:  # a cancellation goes on into the handler
                            yielded = context.run(step.throw, exc)
                        else:
                            yielded = context.run(step.send, value)
            except StopIteration:
                pass
            except Exception as exc:
                record_failure(sub, event, exc, errors)
            except asyncio.CancelledError as exc:
                if yielded is not FINISHED and task is not None and task.cancelling() > pending:
                    raise  # the emitter's own cancellation
                record_stray_cancellation(sub, event, exc, errors)
            if yielded is not FINISHED:
                await _cancelled_again(task, pending, errors)
        elif (loop := _get_running_loop()) is not None:
            guarded, hook = self._choice or self._runners.now()
            await _run_on_asyncio(loop, guarded, hook, subs, event, errors)
        else:
            await _run_on_trio((self._choice or self._runners.now())[0], subs, event, errors)
        if not errors:
            return route.ok_result
        if strict:
            raise _failures_group(event, errors, route)
        return EmitResult(route.handlers, tuple(errors))

    def _new_route(self, event: object) -> Route:
        if isinstance(event, type):
            raise TypeError(
                f"emit() takes an event instance, got the class {event.__qualname__}; "
                f"did you mean emit({event.__qualname__}(...))?"
            )
        return self._registry.route(type(event))

    def _prepare(self, route: Route, event: object) -> None:
        for tap in self._taps:
            tap(event)
        # Claimed here, before anything awaits: a concurrent emit can no longer see them.
        for sub in route.subscriptions:
            if sub.once:
                self._registry.remove(sub)
        if route.batches:
            self._feed_batches(route.batches, event)

    def _feed_batches(self, batch_subs: Sequence[Subscription], event: object) -> None:
        assert self._background is not None  # routes have batches only while it runs
        for sub in batch_subs:
            self._background.feed(sub, event)

    # -- background delivery ---------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if self._background is not None:
            raise BusStateError(f"{self!r} is already running")
        background = self._new_background(self.emit, lambda: self._guarded)
        batch_subs = [sub for sub in self._registry.all() if sub.batch is not None]
        self._owner = anyio.get_current_task().id
        await background.start(batch_subs)
        self._background = background
        self._registry.set_batching(True)
        if self._services:
            await self._start_services()
        return self

    async def _start_services(self) -> None:
        services = AsyncExitStack()
        try:
            for service in self._services:
                await services.enter_async_context(service())
        except BaseException:
            try:
                await services.aclose()
            finally:
                await self.stop()
            raise
        self._running_services = services

    async def __aexit__(self, *exc_info: object) -> None:
        if self._background is not None:
            await self.stop()

    @property
    def running(self) -> bool:
        """True between entering ``async with bus:`` and the end of its drain."""
        return self._background is not None

    @property
    def queued(self) -> int:
        """Events published for background delivery that no worker has taken yet (0 while
        the bus does not run); read without a lock, as metrics do at scrape time."""
        background = self._background
        return 0 if background is None else len(background._queue)

    @property
    def last_drain(self) -> DrainReport | None:
        """The report of the last time this bus stopped, or None if it never ran.

        Leaving ``async with bus:`` has no value to return it as: read it here, for example
        to persist or publish again the events it could not deliver.
        """
        return self._last_drain

    async def stop(self, *, drain_timeout: float | None = None) -> DrainReport:
        """Stop taking events, deliver what is queued and batched, and report.

        Leaving the block does this. Delivery goes on, shielded from cancellation, for at
        most ``drain_timeout`` seconds (the bus's own by default); then the rest is cancelled,
        returned in the `DrainReport` (also kept as `last_drain`) and logged. A `BaseException`
        a handler raised ends the drain at once; it is raised here after the report is kept.
        Call it from the task that entered the bus.
        """
        check_seconds("drain_timeout", drain_timeout, none=True)
        background = self._stoppable()
        services, self._running_services = self._running_services, None
        if services is not None:
            # First, while publish still works: what their handlers publish is then drained.
            try:
                await services.aclose()
            except BaseException:
                await self._drain_and_close(background, drain_timeout)
                raise
        return await self._drain_and_close(background, drain_timeout)

    async def _drain_and_close(
        self, background: Background, drain_timeout: float | None
    ) -> DrainReport:
        background.stopping = True
        drain_timeout = drain_timeout or self._drain_timeout
        try:
            # Whatever cancels the owner meanwhile (a timeout, a failing sibling, Ctrl-C), the
            # drain runs its course; the cancellation is raised after the report is kept.
            await run_to_the_end(background.drain(drain_timeout), what="the drain")
        finally:
            self._registry.set_batching(False)
            # Here, not in the drain's task: the task group was entered by the owner, so it is
            # left by the owner. Whatever that raises, the report is kept first.
            try:
                await background.close()
            finally:
                self._background = None
                left = background.left()
                timed_out = background.timed_out
                self._last_drain = DrainReport(background.delivered, tuple(left), timed_out)
                if left:
                    log_undelivered(left, _why_left(background.fatal, timed_out, drain_timeout))
        return self._last_drain

    def _stoppable(self) -> Background:
        background = self._background
        if background is None:
            raise BusStateError(f"{self!r} is not running: there is nothing to stop")
        if anyio.get_current_task().id != self._owner or _inside_emit():
            raise BusStateError(
                f"stop() is called by the task that entered `async with {self!r}:` (the task "
                f"group of its workers lives there); to stop it from elsewhere, signal that "
                f"task, for example with an anyio.Event it waits for"
            )
        if background.stopping:
            raise BusStateError(f"{self!r} is already stopping")
        return background

    async def publish(self, event: object, *, priority: int = 0) -> None:
        """Queue ``event`` for background delivery and return; higher ``priority`` goes first.

        Waits while the queue is full (back-pressure). Handler failures go to ``on_error``
        and the log, never to the publisher.
        """
        background = self._background
        if (  # one test for the common case: running, an int priority, a known event type
            background is None
            or not background.accepting
            or type(priority) is not int
            or type(event) not in self._routes
        ):
            self._check_publishable(event, priority)  # raises what is wrong, or builds the route
            background = self._require_running()
        await background.publish(event, priority)

    def publish_nowait(self, event: object, *, priority: int = 0) -> None:
        """Like `publish`, but raise `QueueFullError` instead of waiting for a free place."""
        self._check_publishable(event, priority)
        self._require_running().publish_nowait(event, priority)

    def _require_running(self) -> Background:
        if self._background is None or not self._background.accepting:
            raise BusStateError(
                f"{self!r} is not running: publish inside `async with bus:` (for example in "
                f"the application's lifespan), or await bus.emit(event) to deliver now"
            )
        return self._background

    def _check_publishable(self, event: object, priority: int) -> None:
        if isinstance(event, type):
            raise TypeError(
                f"publish() takes an event instance, got the class {event.__qualname__}"
            )
        if type(priority) is not int:
            raise TypeError(f"priority must be an int, got {priority!r}")
        if type(event) not in self._routes:  # a type no event may have is refused here
            self._new_route(event)

    # -- for the integrations: aioevents.outbox and aioevents.sqlalchemy ----------------------

    def _attach(self, service: Callable[[], AbstractAsyncContextManager[object]]) -> None:
        """Run ``service()`` for as long as the bus runs, from now on.

        It is entered once the workers run, and left first when the bus stops, while
        `publish` still works: what its handlers publish is drained with the rest.
        """
        if self._background is not None:
            raise BusStateError(f"attach services before entering `async with {self!r}:`")
        self._services.append(service)

    def _route(self, event: object) -> Route:
        return self._routes.get(type(event)) or self._new_route(event)

    async def _emit_volatile(self, event: object) -> EmitResult:
        """Emit to the handlers that are not durable: those get stored deliveries instead."""
        route = self._route(event)
        if not route.durable:
            return await self.emit(event)
        if route.needs_preparation:
            self._prepare(route, event)
        subs, errors = route.volatile, list[HandlerError]()
        guarded, hook = self._choice or self._runners.now()
        if subs and (loop := _get_running_loop()) is not None:
            await _run_on_asyncio(loop, guarded, hook, subs, event, errors)
        elif subs:
            await _run_on_trio(guarded, subs, event, errors)
        return EmitResult(tuple(sub.name for sub in subs), tuple(errors))

    # -- for aioevents.testing ------------------------------------------------------------

    def _add_tap(self, tap: Callable[[object], None]) -> None:
        self._taps.append(tap)
        self._registry.set_observed(True)

    def _remove_tap(self, tap: Callable[[object], None]) -> None:
        self._taps.remove(tap)
        self._registry.set_observed(bool(self._taps))

    def _set_muted(self, subs: Sequence[Subscription], muted: bool) -> None:
        for sub in subs:
            if sub not in self._registry:
                raise SubscriptionError(f"{sub.name} is not subscribed on this bus")
        self._registry.set_muted(subs, muted)


@types.coroutine
def _suspend(yielded: Any) -> Generator[Any, Any, Any]:
    """Hand what an inline handler yielded to the event loop; return what the loop sends.

    A handler's coroutine suspends by yielding to whoever drives it: the loop's task (an
    asyncio future, or a trio trap). emit drives an inline handler, so it passes that on.
    """
    return (yield yielded)


async def _cancelled_again(
    task: asyncio.Task[Any] | None, pending: int, errors: list[HandlerError]
) -> None:
    """Raise the emitter's cancellation if an inline handler swallowed it.

    A handler may catch the cancellation thrown into it and return, or raise something else;
    the emitter is cancelled all the same. anyio cancel scopes (and trio) are level-triggered:
    a checkpoint delivers their cancellation again, with what lets the scope recognise it.
    asyncio's own (task.cancel(), asyncio.timeout) are delivered once: the task's count of
    pending cancellations says one was requested (a handler's own timeouts take theirs back),
    and a CancelledError is raised for it.

    Except after an asyncio.TaskGroup in the handler failed, on Python 3.11 and 3.12: it
    cancels the task it runs in, the emitter's, and then leaves the count raised (fixed in
    3.13). Its ExceptionGroup is the handler's failure, recorded; no cancellation is made up.
    """
    if task is None:  # trio
        await anyio.lowlevel.checkpoint_if_cancelled()
    elif task.cancelling() > pending:
        await anyio.lowlevel.checkpoint_if_cancelled()
        if not (errors and left_by_a_task_group(errors[0].exception)):
            raise asyncio.CancelledError


async def _run_on_asyncio(
    loop: asyncio.AbstractEventLoop,
    guarded: Guarded,
    hook: Hook | None,
    subs: Sequence[Subscription],
    event: object,
    errors: list[HandlerError],
) -> None:
    """Run handlers as asyncio tasks and wait for all: a task group cut to what emit needs.

    Each task counts itself down as it ends and the last one wakes the emitter: one future
    instead of asyncio.TaskGroup's done-callback per task, about a third less time per
    handler. What a structured group guarantees still holds: when the emitter is cancelled,
    or a handler raises a BaseException, the others are cancelled and waited for, and the
    BaseException is raised here. With ``hook`` (the runner's hooks, when it adds no limit)
    each task calls it itself.
    """
    group = _Countdown(loop, len(subs), errors)
    # What each task runs: the handler in the runner, or with the hook around it.
    counted: Any = _counted if hook is None else _observed
    runner: Any = guarded if hook is None else hook
    if _EAGER_START and loop.get_task_factory() is None:
        # Python 3.12+: each handler runs at once, up to its first suspension, as its task
        # is made (in subscription order still); one that never suspends costs no loop turn.
        tasks = [
            _Task(counted(runner, sub, event, group), loop=loop, eager_start=True) for sub in subs
        ]
    else:
        tasks = [loop.create_task(counted(runner, sub, event, group)) for sub in subs]
    try:
        await group.done
    finally:
        if group.remaining:  # the emitter was cancelled, or a handler raised a BaseException
            group.cancelling = True
            await _cancel_and_wait(tasks)
        # Raised from here, a handler's KeyboardInterrupt or SystemExit also replaces the
        # emitter's own cancellation: it must never be swallowed.
        if len(group.failures) == 1:
            raise group.failures[0]
        if group.failures:
            raise BaseExceptionGroup("handlers raised", group.failures)


class _Countdown:
    __slots__ = ("cancelling", "done", "errors", "failures", "remaining")

    def __init__(
        self, loop: asyncio.AbstractEventLoop, count: int, errors: list[HandlerError]
    ) -> None:
        self.done: asyncio.Future[None] = loop.create_future()
        self.errors = errors
        self.failures: list[BaseException] = []
        self.remaining = count
        self.cancelling = False  # set when the emitter cancels what is left

    def finish(self) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def _counted(guarded: Guarded, sub: Subscription, event: object, group: _Countdown) -> None:
    # A task cancelled before its first step never runs this; only the emitter holds these
    # tasks, and it cancels them only after it has stopped counting (in _cancel_and_wait).
    try:
        # One coroutine frame per handler with the plain runner: the handler's own call.
        await (sub.invoke(event) if guarded is run_guarded else guarded(sub, event, group.errors))
    except Exception as exc:  # the plain runner's isolation, done here
        record_failure(sub, event, exc, group.errors)
    except asyncio.CancelledError as exc:
        if not group.cancelling:  # not the emitter's doing: the handler's own failure
            record_stray_cancellation(sub, event, exc, group.errors)
    except BaseException as exc:  # KeyboardInterrupt and the like: the emitter raises them
        group.failures.append(exc)
        group.finish()
    finally:
        group.remaining -= 1
        if not group.remaining:
            group.finish()


async def _observed(hook: Hook, sub: Subscription, event: object, group: _Countdown) -> None:
    """`_counted` with the runner's hook called around the handler, in the same frame.

    What `_dispatch.hooked_runner` does, written out here: a coroutine frame less per handler.
    """
    try:
        try:
            token = hook.handler_started(event, sub)
        except Exception:
            token = None
            hook_failed(hook.handler_started)
        error: BaseException | None = None
        started = perf_counter()
        try:
            await sub.invoke(event)
        except BaseException as exc:
            error = exc
            raise
        finally:
            duration = perf_counter() - started
            try:
                hook.handler_finished(event, sub, token=token, duration=duration, error=error)
            except Exception:
                hook_failed(hook.handler_finished)
    except Exception as exc:
        record_failure(sub, event, exc, group.errors)
    except asyncio.CancelledError as exc:
        if not group.cancelling:
            record_stray_cancellation(sub, event, exc, group.errors)
    except BaseException as exc:
        group.failures.append(exc)
        group.finish()
    finally:
        group.remaining -= 1
        if not group.remaining:
            group.finish()


async def _cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    await wait_out(tasks)


async def _run_on_trio(
    guarded: Guarded, subs: Sequence[Subscription], event: object, errors: list[HandlerError]
) -> None:
    """Run handlers in a trio nursery, started in subscription order, and wait for all.

    trio runs the tasks made in one scheduling round in their order or reversed, at random
    (on purpose: code must not depend on it). So each task takes its turn from a `_Turns`:
    one that comes before its turn parks, and the first to start wakes those parked, in
    order, for the next round. In order, nothing parks; reversed, one round more or two.
    """
    import trio  # reached on trio only: the core imports with anyio alone
    import trio.lowlevel

    turns = _Turns(trio.lowlevel)
    try:
        async with trio.open_nursery() as nursery:
            for index, sub in enumerate(subs):
                nursery.start_soon(_in_turn, turns, index, guarded, sub, event, errors)
    except BaseExceptionGroup as group:
        raised = _as_on_asyncio(group)
    else:
        return
    raise raised  # out of the except block: it keeps its own __cause__ and __context__


class _Turns:
    """Whose turn it is to start, and the trio tasks parked until theirs."""

    __slots__ = ("lowlevel", "next", "parked")

    def __init__(self, lowlevel: types.ModuleType) -> None:
        self.lowlevel: Any = lowlevel  # trio.lowlevel
        self.next = 0
        self.parked: dict[int, Any] = {}


async def _in_turn(
    turns: _Turns,
    index: int,
    guarded: Guarded,
    sub: Subscription,
    event: object,
    errors: list[HandlerError],
) -> None:
    lowlevel = turns.lowlevel
    while turns.next != index:
        turns.parked[index] = lowlevel.current_task()

        def unpark(_: object) -> object:  # cancelled while parked: it never started
            turns.parked.pop(index, None)
            return lowlevel.Abort.SUCCEEDED

        await lowlevel.wait_task_rescheduled(unpark)
    turns.next = index + 1
    if turns.parked:
        for waiting in sorted(turns.parked):  # they run in the next round, in order
            lowlevel.reschedule(turns.parked.pop(waiting))
    await guarded(sub, event, errors)


def _as_on_asyncio(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """What a trio nursery of handlers raised, as the asyncio path raises it.

    A handler's BaseException replaces the cancellations it caused among its siblings, and
    one exception is raised as itself, as an inline handler's would be.
    """
    _, others = group.split(anyio.get_cancelled_exc_class())
    if others is None:  # cancelled: one cancellation says it (trio's is level-triggered)
        return group.exceptions[0]
    failures = list(others.exceptions)
    if len(failures) == 1:
        return failures[0]
    return BaseExceptionGroup("handlers raised", failures)


def _inside_emit() -> bool:
    """True when called from a handler that runs inline in an emit of the owner's task."""
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:  # a rare call (stop): the stack may be walked
        if frame.f_code is EventBus.emit.__code__:
            return True
        frame = frame.f_back
    return False


def _why_left(fatal: BaseException | None, timed_out: bool, drain_timeout: float) -> str:
    if fatal is not None:
        return f"a handler raised {fatal!r}"
    if timed_out:
        return f"the drain timed out after {drain_timeout}s"
    return "their delivery was cut short outside any handler's own failure"


def _hook_list(hooks: object) -> list[Hook]:
    if isinstance(hooks, str | bytes) or not isinstance(hooks, Iterable):
        raise TypeError(f"hooks must be an iterable of hooks (see aioevents.Hook), got {hooks!r}")
    return list(hooks)


def _checked_hook(hook: Hook) -> Hook:
    if has_switch(hook) and not isinstance(active := cast(Any, hook).active, bool):
        raise TypeError(
            f"{type(hook).__qualname__}.active must be a bool (see aioevents.Hook), got {active!r}"
        )
    for method in ("handler_started", "handler_finished"):
        if not callable(getattr(hook, method, None)):
            raise TypeError(f"a hook needs a {method}() method (see aioevents.Hook), got {hook!r}")
        if inspect.iscoroutinefunction(getattr(hook, method)):
            raise TypeError(
                f"{type(hook).__qualname__}.{method} is async: hook methods are called, not "
                f"awaited, on the hot path; make them plain functions (see aioevents.Hook)"
            )
    return hook


def _failures_group(
    event: object, errors: list[HandlerError], route: Route
) -> ExceptionGroup[Exception]:
    return ExceptionGroup(
        f"{len(errors)} of {len(route.subscriptions)} handlers failed on event {event_name(event)}",
        [error.exception for error in errors],
    )
