"""Running one handler: isolation, timeout, thread offload, concurrency limit, hooks.

Everything here is backend-neutral (anyio), so the same code runs a handler on asyncio and on
trio; only how handlers are spawned differs, and that lives in `_bus`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import types
from collections.abc import Awaitable, Callable, Coroutine, Generator, Sequence
from contextvars import Context
from time import perf_counter
from typing import Any, Protocol, TypeVar, cast

import anyio
import anyio.to_thread

from ._checks import is_async_handler
from ._exceptions import HandlerCancelledError
from ._names import event_name, handler_name
from ._policies import Options
from ._result import HandlerError
from ._retry import attempts_of, with_retry
from ._subscription import Handler, Invoke, Subscription

__all__ = [
    "FINISHED",
    "Choice",
    "Guarded",
    "Hook",
    "Runners",
    "has_switch",
    "hook_failed",
    "hooked_runner",
    "joined",
    "limited_runner",
    "new_subscription",
    "record_failure",
    "record_stray_cancellation",
    "resume_in_context",
    "run_guarded",
    "run_in_context",
    "run_to_the_end",
    "wait_out",
]

logger = logging.getLogger("aioevents")
_get_running_loop = asyncio._get_running_loop  # None when not on asyncio (trio)

T = TypeVar("T")
Guarded = Callable[[Subscription, object, list[HandlerError]], Coroutine[Any, Any, None]]


class Hook(Protocol):
    """Called around every handler call, in the handler's own task and context.

    ``handler_started`` returns a token (anything, ``None`` included) that is handed back to
    ``handler_finished``: a tracing hook returns its span there. ``duration`` is the handler
    call's, in seconds (the hook's own calls not included). ``error`` is the handler's
    exception, a `TimeoutError` for a timeout, or the cancellation that stopped it.
    Exceptions a hook raises are logged and otherwise ignored: a hook never fails a handler.

    A hook may also define ``active``, a `bool` attribute or property: the bus reads it once
    per emit (and per outbox delivery, stream entry and background batch) and skips the hook
    while it is False, at next to no cost: with no hook active the handlers run exactly as on
    a bus without hooks. A tracing hook is inactive while no tracer provider is configured,
    say; a switch turned on is seen by the next emit. A hook without ``active`` is always
    called.
    """

    def handler_started(self, event: object, subscription: Subscription) -> object: ...

    def handler_finished(
        self,
        event: object,
        subscription: Subscription,
        *,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None: ...


def new_subscription(
    event_type: type, handler: Handler, options: Options, *, order: int, owner: object
) -> Subscription:
    """Make the subscription record, with the call that runs its handler built once."""
    name = options.name or handler_name(handler)
    is_async = is_async_handler(handler)
    return Subscription(
        event_type=event_type,
        handler=handler,
        name=name,
        timeout=options.timeout,
        once=options.once,
        is_async=is_async,
        retry=options.retry,
        batch=options.batch,
        durable=options.durable,
        order=order,
        owner=owner,
        invoke=_make_invoke(handler, name, options, is_async=is_async),
    )


def _make_invoke(handler: Handler, name: str, options: Options, *, is_async: bool) -> Invoke:
    """The awaitable call for a subscription: retry around thread offload or timeout."""
    if not is_async:
        invoke = _in_thread(handler, name, options.timeout)
    elif options.timeout is not None:
        invoke = _with_timeout(handler, options.timeout)  # type: ignore[arg-type]
    else:
        invoke = cast(Invoke, handler)  # an async handler returns its coroutine
    return invoke if options.retry is None else with_retry(invoke, options.retry)


def _with_timeout(handler: Callable[[object], Awaitable[object]], timeout: float) -> Invoke:
    async def invoke(event: object) -> None:
        with anyio.fail_after(timeout):
            await handler(event)

    return invoke


def _in_thread(handler: Handler, name: str, timeout: float | None) -> Invoke:
    async def invoke(event: object) -> None:
        started = anyio.current_time()
        # A thread cannot be interrupted; it is waited for, so that nothing of this emit is
        # still running once emit returns, and an overrun is reported as a timeout after it.
        await _thread_to_its_end(_call_sync, handler, name, event, name=name)
        if timeout is not None and anyio.current_time() - started > timeout:
            raise TimeoutError(f"sync handler {name} ran longer than its {timeout}s timeout")

    return invoke


async def _thread_to_its_end(func: Callable[..., T], *args: object, name: str) -> T | None:
    """``anyio.to_thread.run_sync``, waited for to its end whatever cancels the caller.

    anyio shields the wait for a running thread from its own cancel scopes; on asyncio a
    native ``task.cancel()`` (``asyncio.timeout`` too) would go through that shield, and the
    thread run on after the emit returned: see `run_to_the_end`. Waiting for a free thread
    is not shielded: a cancellation then stops the handler before it started.
    """
    if _get_running_loop() is None:  # trio: every cancellation goes through anyio's shield
        return await anyio.to_thread.run_sync(func, *args)
    waiting = anyio.CancelScope()  # a running thread is shielded from it by anyio
    return await run_to_the_end(
        _in_scope(waiting, anyio.to_thread.run_sync(func, *args)),
        if_cancelled=waiting.cancel,
        what=f"sync handler {name}",
    )


async def wait_out(tasks: list[asyncio.Task[Any]]) -> None:
    """Wait until every one of ``tasks`` has ended, whatever cancels the caller meanwhile.

    A shield keeps an anyio scope from repeating its cancellation at every turn; a native
    cancellation is waited through.
    """
    with anyio.CancelScope(shield=True):
        while not all(task.done() for task in tasks):
            try:
                await asyncio.wait(tasks)
            except asyncio.CancelledError:  # another native cancel: they still run
                continue


async def _in_scope(scope: anyio.CancelScope, call: Awaitable[T]) -> T | None:
    with scope:
        return await call
    return None  # the scope was cancelled before the thread started


async def run_to_the_end(
    call: Coroutine[Any, Any, T],
    *,
    if_cancelled: Callable[[], object] | None = None,
    what: str,
) -> T:
    """Await ``call`` to its end whatever cancels the caller; then raise the cancellation.

    anyio's shield holds against anyio's cancel scopes (and so on trio), but on asyncio a
    native ``task.cancel()`` goes through it. So on asyncio the call runs in a task of its
    own, which no cancellation of the caller reaches; the caller waits for it, then raises
    its cancellation. ``if_cancelled`` is told when that happens. What the call raised after
    its caller was cancelled has nobody left to report to: it is logged, naming ``what``.
    """
    if _get_running_loop() is None:
        with anyio.CancelScope(shield=True):
            return await call
    task = asyncio.ensure_future(call)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        if if_cancelled is not None:
            if_cancelled()
        await wait_out([task])
        if not task.cancelled() and (error := task.exception()) is not None:
            logger.error("%s failed after its caller was cancelled", what, exc_info=error)
        raise


def _call_sync(handler: Handler, name: str, event: object) -> None:
    """Run a sync handler (in the worker thread); refuse an awaitable it returns."""
    result = handler(event)
    if inspect.isawaitable(result):
        close = getattr(result, "close", None)
        if close is not None:  # a coroutine never awaited: close it so it does not warn later
            close()
        raise TypeError(f"sync handler {name} returned an awaitable; declare it with async def")


def record_failure(
    sub: Subscription, event: object, exc: Exception, errors: list[HandlerError]
) -> None:
    errors.append(
        HandlerError(sub.name, exc, event=event, subscription=sub, attempts=attempts_of(exc))
    )
    if not logger.isEnabledFor(logging.ERROR):  # naming the event costs: only when logged
        return
    if sub.batch is not None:  # a batch handler's "event" is the list of its batch
        what = f"batch of {len(cast(list[object], event))}"
    else:
        what = event_name(event)
    logger.error(
        "handler %s failed on event %s",
        sub.name,
        what,
        exc_info=exc,
        extra={"handler": sub.name, "event_name": what},
    )


def record_stray_cancellation(
    sub: Subscription, event: object, cancellation: BaseException, errors: list[HandlerError]
) -> None:
    """Record a handler that died of someone else's cancellation as a failure of its own."""
    error = HandlerCancelledError(f"{sub.name} ended with a cancellation its emit did not ask for")
    error.__cause__ = cancellation
    record_failure(sub, event, error, errors)


async def run_guarded(sub: Subscription, event: object, errors: list[HandlerError]) -> None:
    """Run one handler; an `Exception` is recorded and logged, never propagated."""
    try:
        await sub.invoke(event)
    except Exception as exc:
        record_failure(sub, event, exc, errors)


def limited_runner(limiter: anyio.CapacityLimiter, hook: Hook | None) -> Guarded:
    """`run_guarded` within the bus-wide limit, with ``hook`` (see `joined`) if one is active."""
    run = run_guarded if hook is None else hooked_runner(hook)

    async def run_limited(sub: Subscription, event: object, errors: list[HandlerError]) -> None:
        borrower = object()  # one token per call: a task may hold several (nested emits)
        await limiter.acquire_on_behalf_of(borrower)
        try:
            await run(sub, event, errors)
        finally:
            limiter.release_on_behalf_of(borrower)

    return run_limited


def hooked_runner(hook: Hook) -> Guarded:
    """`run_guarded` with ``hook`` called around the handler.

    emit's tasks do the same in `_bus._observed` (a coroutine frame less per handler): a
    change here is made there too.
    """

    async def run_hooked(sub: Subscription, event: object, errors: list[HandlerError]) -> None:
        try:
            token = hook.handler_started(event, sub)
        except Exception:
            token = None
            hook_failed(hook.handler_started)
        error: BaseException | None = None
        started = perf_counter()
        try:
            await sub.invoke(event)
        except Exception as exc:
            error = exc
            record_failure(sub, event, exc, errors)
        except BaseException as exc:
            error = exc
            raise
        finally:
            duration = perf_counter() - started
            try:
                hook.handler_finished(event, sub, token=token, duration=duration, error=error)
            except Exception:
                hook_failed(hook.handler_finished)

    return run_hooked


Choice = tuple[Guarded, Hook | None]  # a runner, and its hook when it adds nothing else
_PLAIN: Choice = (run_guarded, None)


class Runners:
    """The runner of a bus's handlers, chosen for the hooks that are active at the time.

    A hook with an ``active`` switch is asked once per `now`: once per emit, relay delivery,
    stream entry or batch. The runner for each set of active hooks is made once and kept;
    with none active and no limit it is `run_guarded`, as on a bus without hooks.
    """

    __slots__ = ("_bits", "_by_active", "_hooks", "_limiter", "_switches", "fixed")

    def __init__(self, limiter: anyio.CapacityLimiter | None, hooks: Sequence[Hook]) -> None:
        self._limiter = limiter
        self._hooks = tuple(hooks)
        switched = [cast(_Switchable, hook) for hook in hooks if has_switch(hook)]
        self._switches = tuple((1 << index, hook) for index, hook in enumerate(switched))
        # Each hook's bit in the key of `_by_active`; 0 for the hooks that are always on.
        bit_of = {id(hook): bit for bit, hook in self._switches}
        self._bits = tuple(bit_of.get(id(hook), 0) for hook in hooks)
        self._by_active: dict[int, Choice] = {}
        # The choice when no hook has a switch: then it is always the same (None otherwise).
        self.fixed = None if self._switches else self.now()

    def now(self) -> Choice:
        """The runner for the hooks active now, and the hook when it adds no limit."""
        active = 0
        for bit, hook in self._switches:
            try:
                if hook.active:
                    active |= bit
            except Exception:  # a hook that cannot tell is called, as one without a switch
                logger.exception("hook %r: reading its active failed", hook)
                active |= bit
        choice = self._by_active.get(active)
        if choice is None:
            choice = self._by_active[active] = self._choose(active)
        return choice

    def _choose(self, active: int) -> Choice:
        hooks = [
            hook
            for hook, bit in zip(self._hooks, self._bits, strict=True)
            if not bit or active & bit
        ]
        hook = joined(hooks)
        if self._limiter is None:
            return _PLAIN if hook is None else (hooked_runner(hook), hook)
        return limited_runner(self._limiter, hook), None


class _Switchable(Protocol):
    active: bool


def has_switch(hook: Hook) -> bool:
    """True when ``hook`` defines ``active`` (an attribute or a property)."""
    return inspect.getattr_static(hook, "active", _NO_SWITCH) is not _NO_SWITCH


_NO_SWITCH = object()


def hook_failed(method: Callable[..., object]) -> None:
    """Log the failure of a hook's method (being handled): a hook never fails a handler."""
    logger.exception("hook %s failed; the handler is not affected", method.__qualname__)


def joined(hooks: Sequence[Hook]) -> Hook | None:
    """The hooks as one: None for none, the hook itself for one, else a `_Hooks`."""
    if len(hooks) > 1:
        return _Hooks(tuple(hooks))
    return hooks[0] if hooks else None


class _Hooks:
    """Several hooks called as one, in their order; each one's failure logged on its own."""

    __slots__ = ("hooks",)

    def __init__(self, hooks: tuple[Hook, ...]) -> None:
        self.hooks = hooks

    def handler_started(self, event: object, subscription: Subscription) -> list[object]:
        tokens = []
        for hook in self.hooks:
            try:
                tokens.append(hook.handler_started(event, subscription))
            except Exception:
                tokens.append(None)
                hook_failed(hook.handler_started)
        return tokens

    def handler_finished(
        self,
        event: object,
        subscription: Subscription,
        *,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        for hook, its_token in zip(self.hooks, cast(list[object], token), strict=True):
            try:
                hook.handler_finished(
                    event, subscription, token=its_token, duration=duration, error=error
                )
            except Exception:
                hook_failed(hook.handler_finished)


FINISHED = object()  # what the first step of a handler returns when it ran to its end


async def run_in_context(context: Context, call: Coroutine[Any, Any, None]) -> None:
    """Await ``call`` inside ``context``, as a task of its own would run it.

    ``next`` with a default ends a call that never suspends without a StopIteration being
    raised and caught in Python: the common no-wait handler costs a plain call. emit and the
    background workers write these lines out, to save this frame on their hot paths.
    """
    step = call.__await__()
    yielded = context.run(next, step, FINISHED)
    if yielded is not FINISHED:
        await resume_in_context(context, step, yielded)


@types.coroutine
def resume_in_context(context: Context, step: Generator[Any, Any, Any], yielded: Any) -> Any:
    """Await the rest of ``step``, which suspended on ``yielded``, inside ``context``.

    This is what a task does for its coroutine, without the cost of a task: a handler run
    inline sees the emitter's context variables, and what it sets stays in its own copy, as
    it would in a task of its own.
    """
    while True:
        try:
            value, error = (yield yielded), None
        except BaseException as exc:  # cancellation and the like go on into the handler
            value, error = None, exc
        try:
            if error is None:
                yielded = context.run(step.send, value)
            else:
                yielded = context.run(step.throw, error)
        except StopIteration:
            return
