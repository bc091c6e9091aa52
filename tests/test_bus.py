"""The core contract of EventBus, on asyncio and on trio (see the anyio_backend fixture)."""

from __future__ import annotations

import asyncio
import contextvars
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Iterator
from typing import Any, Protocol

import anyio
import anyio.lowlevel
import pytest

from aioevents import (
    ConfigurationError,
    EmitResult,
    EventBus,
    HandlerCancelledError,
    HandlerError,
    SubscriptionError,
)
from tests.events import AppEvent, AppWasCreated, TenantWasCreated

pytestmark = pytest.mark.anyio

request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="none")


class Stop(BaseException):
    """A BaseException that is not an Exception: must never be swallowed."""


def recorder(log: list[str], name: str) -> Callable[[object], Awaitable[None]]:
    async def handler(event: object) -> None:
        log.append(name)

    handler.__qualname__ = name
    return handler


def leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for exc in group.exceptions for leaf in leaves(exc)]
    return [group]


# -- dispatch --------------------------------------------------------------------------------


async def test_handler_receives_the_event_and_result_reports_it() -> None:
    bus, received = EventBus(), []

    @bus.on(AppWasCreated)
    async def handler(event: AppWasCreated) -> None:
        received.append(event)

    event = AppWasCreated(app_id="a1")
    result = await bus.emit(event)
    assert received == [event]
    assert isinstance(result, EmitResult)
    assert (result.ok, result.handled, result.errors) == (True, 1, ())
    assert result.handlers == (f"{__name__}.{handler.__qualname__}",)


async def test_emit_with_no_handlers_reports_nothing_ran() -> None:
    result = await EventBus().emit(AppWasCreated())
    assert (result.ok, result.handled, result.handlers) == (True, 0, ())


async def test_handler_of_a_base_class_receives_subclass_events_but_not_the_reverse() -> None:
    bus, log = EventBus(), list[str]()
    bus.subscribe(AppEvent, recorder(log, "base"))
    bus.subscribe(AppWasCreated, recorder(log, "derived"))
    bus.subscribe(object, recorder(log, "everything"))

    await bus.emit(AppWasCreated())
    await bus.emit(AppEvent())
    await bus.emit(TenantWasCreated())
    assert log == ["base", "derived", "everything", "base", "everything", "everything"]


async def test_handlers_start_in_subscription_order_across_the_mro() -> None:
    bus, log = EventBus(), list[str]()
    for index, event_type in enumerate([AppWasCreated, object, AppEvent, AppWasCreated]):
        bus.subscribe(event_type, recorder(log, f"h{index}"))
    assert (await bus.emit(AppWasCreated())).handled == 4
    assert log == ["h0", "h1", "h2", "h3"]


async def test_handlers_run_concurrently() -> None:
    bus = EventBus()

    async def slow(event: object) -> None:
        await anyio.sleep(0.3)

    bus.subscribe(AppWasCreated, slow)
    bus.subscribe(AppWasCreated, slow)
    started = anyio.current_time()
    result = await bus.emit(AppWasCreated())
    elapsed = anyio.current_time() - started
    assert result.handled == 2
    assert elapsed < 0.5, f"two 0.3 s handlers took {elapsed:.2f} s: they ran one after another"


async def test_one_handler_waits_for_a_sibling_that_started_later() -> None:
    # Proves concurrency without timing: sequential dispatch would deadlock here.
    bus, second_started = EventBus(), anyio.Event()

    async def first(event: object) -> None:
        with anyio.fail_after(5):
            await second_started.wait()

    async def second(event: object) -> None:
        second_started.set()

    bus.subscribe(AppWasCreated, first)
    bus.subscribe(AppWasCreated, second)
    assert (await bus.emit(AppWasCreated())).ok


# -- isolation and reporting -----------------------------------------------------------------


@pytest.mark.parametrize("siblings", [0, 1])
async def test_a_failing_handler_does_not_stop_a_slow_sibling(siblings: int) -> None:
    bus, finished = EventBus(), []
    boom = ValueError("boom")

    @bus.on(AppWasCreated)
    async def failing(event: AppWasCreated) -> None:
        raise boom

    async def slow(event: object) -> None:
        await anyio.sleep(0.1)
        finished.append(True)

    for _ in range(siblings):
        bus.subscribe(AppWasCreated, slow)

    result = await bus.emit(AppWasCreated())
    assert finished == [True] * siblings
    assert (result.ok, result.handled) == (False, 1 + siblings)
    [error] = result.errors
    assert isinstance(error, HandlerError)
    assert error.exception is boom
    assert error.handler_name.endswith("failing")
    assert error.event == AppWasCreated()


async def test_a_failure_is_logged_with_handler_and_event_name(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()

    @bus.on(AppWasCreated)
    async def failing(event: AppWasCreated) -> None:
        raise RuntimeError("db down")

    with caplog.at_level(logging.ERROR, logger="aioevents"):
        await bus.emit(AppWasCreated())
    [record] = caplog.records
    assert record.name == "aioevents"
    assert "test_a_failure_is_logged_with_handler_and_event_name.<locals>.failing" in record.message
    assert "app-was-created" in record.message
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)


async def test_a_failure_is_recorded_when_the_logger_is_off() -> None:
    bus, logger = EventBus(), logging.getLogger("aioevents")

    @bus.on(AppWasCreated)
    async def failing(event: AppWasCreated) -> None:
        raise RuntimeError("quiet")

    logger.disabled = True
    try:
        [error] = (await bus.emit(AppWasCreated())).errors
    finally:
        logger.disabled = False
    assert str(error.exception) == "quiet"


async def test_strict_raises_an_exception_group_after_every_handler_finished() -> None:
    bus, finished = EventBus(), []

    async def failing(event: object) -> None:
        raise KeyError("k")

    async def slow(event: object) -> None:
        await anyio.sleep(0.1)
        finished.append(True)

    bus.subscribe(AppWasCreated, failing)
    bus.subscribe(AppWasCreated, slow)
    with pytest.raises(
        ExceptionGroup, match="1 of 2 handlers failed on event app-was-created"
    ) as info:
        await bus.emit(AppWasCreated(), strict=True)
    assert finished == [True]
    assert [type(exc) for exc in info.value.exceptions] == [KeyError]


async def test_strict_returns_the_result_when_nothing_failed() -> None:
    bus, log = EventBus(), list[str]()
    bus.subscribe(AppWasCreated, recorder(log, "h"))
    assert (await bus.emit(AppWasCreated(), strict=True)).ok


@pytest.mark.parametrize("handlers", [1, 3])
async def test_a_base_exception_from_a_handler_is_not_swallowed(handlers: int) -> None:
    bus = EventBus()

    async def stopping(event: object) -> None:
        raise Stop

    for _ in range(handlers):
        bus.subscribe(AppWasCreated, stopping)
    with pytest.raises(BaseException) as info:
        await bus.emit(AppWasCreated())
    assert leaves(info.value) and all(isinstance(exc, Stop) for exc in leaves(info.value))


# -- timeouts ----------------------------------------------------------------------------------


@pytest.mark.parametrize("siblings", [0, 1])
async def test_a_handler_over_its_timeout_is_recorded_with_timeout_error(siblings: int) -> None:
    bus, log = EventBus(), list[str]()

    @bus.on(AppWasCreated, timeout=0.05)
    async def hanging(event: AppWasCreated) -> None:
        await anyio.sleep(10)

    for _ in range(siblings):
        bus.subscribe(AppWasCreated, recorder(log, "sibling"))
    started = anyio.current_time()
    result = await bus.emit(AppWasCreated())
    assert anyio.current_time() - started < 2
    [error] = result.errors
    assert isinstance(error.exception, TimeoutError)
    assert log == ["sibling"] * siblings


async def test_a_handler_within_its_timeout_succeeds() -> None:
    bus = EventBus()

    @bus.on(AppWasCreated, timeout=5)
    async def quick(event: AppWasCreated) -> None:
        await anyio.lowlevel.checkpoint()

    assert (await bus.emit(AppWasCreated())).ok


async def test_a_sync_handler_over_its_timeout_is_reported_once_it_returns() -> None:
    bus = EventBus()

    @bus.on(AppWasCreated, timeout=0.05)
    def blocking(event: AppWasCreated) -> None:
        time.sleep(0.15)

    [error] = (await bus.emit(AppWasCreated())).errors
    assert isinstance(error.exception, TimeoutError)
    assert "0.05s timeout" in str(error.exception)


# -- sync handlers -----------------------------------------------------------------------------


async def test_sync_handlers_run_in_a_worker_thread_without_blocking_the_loop() -> None:
    bus, loop_ran = EventBus(), threading.Event()
    threads: list[int] = []

    @bus.on(AppWasCreated)
    def blocking(event: AppWasCreated) -> None:
        threads.append(threading.get_ident())
        # Waits for the async sibling: if this thread were the event loop's, it never comes.
        assert loop_ran.wait(timeout=5), "the event loop was blocked by a sync handler"

    @bus.on(AppWasCreated)
    async def ticking(event: AppWasCreated) -> None:
        await anyio.sleep(0.05)
        loop_ran.set()

    result = await bus.emit(AppWasCreated())
    assert result.ok, result.errors
    assert threads and threads[0] != threading.get_ident()


async def test_a_sync_handler_that_returns_an_awaitable_is_reported() -> None:
    bus = EventBus()

    async def real(event: object) -> None: ...

    def sync_wrapper(event: object) -> Awaitable[None]:
        return real(event)

    bus.subscribe(AppWasCreated, sync_wrapper)
    [error] = (await bus.emit(AppWasCreated())).errors
    assert isinstance(error.exception, TypeError)
    assert "declare it with async def" in str(error.exception)


class NotACoroutine:
    def __await__(self) -> Generator[None, None, None]:
        yield


async def test_a_sync_handler_that_returns_another_awaitable_is_reported() -> None:
    bus = EventBus()

    def returns_awaitable(event: object) -> NotACoroutine:
        return NotACoroutine()

    bus.subscribe(AppWasCreated, returns_awaitable)
    [error] = (await bus.emit(AppWasCreated())).errors
    assert isinstance(error.exception, TypeError)


async def test_a_callable_object_with_async_call_runs_as_async() -> None:
    bus, threads = EventBus(), []

    class Handler:
        async def __call__(self, event: object) -> None:
            threads.append(threading.get_ident())

    sub = bus.subscribe(AppWasCreated, Handler())
    await bus.emit(AppWasCreated())
    assert sub.is_async and threads == [threading.get_ident()]


# -- concurrency limit -----------------------------------------------------------------------


async def test_max_concurrency_bounds_running_handlers_across_emits() -> None:
    bus = EventBus(max_concurrency=2)
    running, peak = 0, 0

    async def counted(event: object) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(0.02)
        running -= 1

    for _ in range(5):
        bus.subscribe(AppWasCreated, counted)
    async with anyio.create_task_group() as tasks:
        for _ in range(3):
            tasks.start_soon(bus.emit, AppWasCreated())
    assert peak == 2


async def test_nested_emit_from_an_inline_handler_under_a_limit() -> None:
    bus, log = EventBus(max_concurrency=2), list[str]()

    @bus.on(AppWasCreated)
    async def outer(event: AppWasCreated) -> None:
        await bus.emit(TenantWasCreated())

    bus.subscribe(TenantWasCreated, recorder(log, "inner"))
    assert (await bus.emit(AppWasCreated())).ok
    assert log == ["inner"]


@pytest.mark.parametrize(
    ("value", "error"),
    [(0, ConfigurationError), (-1, ConfigurationError), (1.5, TypeError), (True, TypeError)],
)
def test_max_concurrency_must_be_a_positive_int(value: object, error: type) -> None:
    with pytest.raises(error, match="max_concurrency must be an int"):
        EventBus(max_concurrency=value)  # type: ignore[arg-type]


# -- cancellation ----------------------------------------------------------------------------


@pytest.mark.parametrize("handlers", [1, 3])
async def test_cancelling_the_emitter_cancels_its_handlers(handlers: int) -> None:
    bus, cancelled, finished = EventBus(), [], []

    async def slow(event: object) -> None:
        try:
            await anyio.sleep(10)
            finished.append(True)
        except anyio.get_cancelled_exc_class():
            cancelled.append(True)
            raise

    for _ in range(handlers):
        bus.subscribe(AppWasCreated, slow)
    with anyio.move_on_after(0.05) as scope:
        await bus.emit(AppWasCreated())
    assert scope.cancelled_caught
    assert cancelled == [True] * handlers
    await anyio.sleep(0.05)
    assert finished == []


async def test_a_handler_that_finishes_its_cleanup_after_cancel_is_waited_for() -> None:
    bus, cleaned = EventBus(), []

    async def slow(event: object) -> None:
        try:
            await anyio.sleep(10)
        finally:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.05)
                cleaned.append(True)

    bus.subscribe(AppWasCreated, slow)
    bus.subscribe(AppWasCreated, slow)
    with anyio.move_on_after(0.05):
        await bus.emit(AppWasCreated())
    assert cleaned == [True, True], "emit returned before its handlers finished cleaning up"


# -- context variables -----------------------------------------------------------------------


@pytest.mark.parametrize("handlers", [1, 2])
async def test_handlers_see_the_emitters_context_and_cannot_change_it(handlers: int) -> None:
    bus, seen = EventBus(), []

    async def reading(event: object) -> None:
        seen.append(request_id.get())
        await anyio.lowlevel.checkpoint()
        request_id.set("changed by handler")
        await anyio.lowlevel.checkpoint()
        seen.append(request_id.get())

    for _ in range(handlers):
        bus.subscribe(AppWasCreated, reading)
    token = request_id.set("req-42")
    try:
        await bus.emit(AppWasCreated())
        assert request_id.get() == "req-42"
    finally:
        request_id.reset(token)
    assert sorted(seen) == sorted(["req-42", "changed by handler"] * handlers)


async def test_sync_handlers_see_the_emitters_context() -> None:
    bus, seen = EventBus(), []

    @bus.on(AppWasCreated)
    def reading(event: AppWasCreated) -> None:
        seen.append(request_id.get())

    token = request_id.set("req-7")
    try:
        await bus.emit(AppWasCreated())
    finally:
        request_id.reset(token)
    assert seen == ["req-7"]


# -- once, unsubscribe -----------------------------------------------------------------------


async def test_once_runs_for_one_event_even_under_concurrent_emits() -> None:
    bus, log = EventBus(), list[str]()

    @bus.once(AppWasCreated)
    async def first_only(event: AppWasCreated) -> None:
        await anyio.sleep(0.01)
        log.append(event.app_id)

    async with anyio.create_task_group() as tasks:
        for index in range(5):
            tasks.start_soon(bus.emit, AppWasCreated(app_id=str(index)))
    assert len(log) == 1
    assert bus.subscriptions == ()


async def test_subscribe_once_keeps_other_handlers() -> None:
    bus, log = EventBus(), list[str]()
    bus.subscribe(AppWasCreated, recorder(log, "once"), once=True)
    bus.subscribe(AppWasCreated, recorder(log, "always"))
    await bus.emit(AppWasCreated())
    await bus.emit(AppWasCreated())
    assert log == ["once", "always", "always"]


async def test_unsubscribe_stops_delivery_and_a_second_call_is_a_no_op() -> None:
    bus, log = EventBus(), list[str]()
    sub = bus.subscribe(AppWasCreated, recorder(log, "h"))
    await bus.emit(AppWasCreated())
    bus.unsubscribe(sub)
    bus.unsubscribe(sub)
    assert (await bus.emit(AppWasCreated())).handled == 0
    assert log == ["h"]


async def test_a_handler_can_be_given_the_name_reports_use() -> None:
    bus = EventBus()

    @bus.on(AppWasCreated, name="create-site")
    async def failing(event: AppWasCreated) -> None:
        raise ValueError

    [error] = (await bus.emit(AppWasCreated())).errors
    assert error.handler_name == "create-site"
    assert bus.subscriptions[0].name == "create-site"
    with pytest.raises(TypeError, match="name must be a non-empty str"):
        bus.subscribe(AppWasCreated, failing, name="")


def test_unsubscribing_another_buses_subscription_is_refused() -> None:
    sub = EventBus().subscribe(AppWasCreated, recorder([], "h"))
    with pytest.raises(SubscriptionError, match="subscribed on another bus"):
        EventBus().unsubscribe(sub)


def test_unsubscribe_takes_a_subscription() -> None:
    with pytest.raises(TypeError, match="takes a Subscription"):
        EventBus().unsubscribe("handler")  # type: ignore[arg-type]


# -- bad input ---------------------------------------------------------------------------------


async def handler_for_anything(event: object) -> None: ...


def test_subscribing_a_non_class_is_refused() -> None:
    with pytest.raises(TypeError, match="an event type must be a class, got 'AppWasCreated'"):
        EventBus().subscribe("AppWasCreated", handler_for_anything)  # type: ignore[arg-type]


def test_decorating_with_on_without_an_event_type_is_refused_with_a_hint() -> None:
    with pytest.raises(TypeError, match=r"did you write @bus.on instead of @bus.on\(EventType\)"):
        EventBus().on(handler_for_anything)  # type: ignore[arg-type]


def test_subscribing_a_non_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="a handler must be callable, got 42"):
        EventBus().subscribe(AppWasCreated, 42)  # type: ignore[arg-type]


async def no_argument() -> None: ...


async def two_arguments(event: object, other: object) -> None: ...


async def keyword_only(event: object, *, required: object) -> None: ...


@pytest.mark.parametrize("handler", [no_argument, two_arguments, keyword_only])
def test_a_handler_that_cannot_take_the_event_is_refused(handler: Callable[..., object]) -> None:
    with pytest.raises(TypeError, match="cannot take the event as its one positional argument"):
        EventBus().subscribe(AppWasCreated, handler)


async def varargs(*events: object, flag: bool = False) -> None: ...


def test_handlers_with_optional_extra_parameters_are_accepted() -> None:
    bus = EventBus()
    bus.subscribe(AppWasCreated, varargs)
    bus.subscribe(AppWasCreated, print)
    bus.subscribe(AppWasCreated, vars)  # a builtin with no signature to read: accepted
    assert len(bus.subscriptions) == 3


@pytest.mark.parametrize("timeout", [0, -1])
def test_timeout_must_be_positive_seconds(timeout: object) -> None:
    with pytest.raises(ConfigurationError, match="timeout must be a number of seconds > 0"):
        EventBus().subscribe(AppWasCreated, handler_for_anything, timeout=timeout)  # type: ignore[arg-type]


def test_a_timeout_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="timeout must be a number of seconds or None, got '5'"):
        EventBus().subscribe(AppWasCreated, handler_for_anything, timeout="5")  # type: ignore[arg-type]


async def test_emitting_a_class_instead_of_an_instance_is_refused() -> None:
    bus = EventBus()
    bus.subscribe(object, handler_for_anything)
    with pytest.raises(TypeError, match=r"did you mean emit\(AppWasCreated\(\.\.\.\)\)"):
        await bus.emit(AppWasCreated)
    assert (await bus.emit(AppWasCreated())).handled == 1


# -- listing -----------------------------------------------------------------------------------


def test_the_bus_lists_its_subscriptions_and_what_an_event_type_runs() -> None:
    bus = EventBus()
    on_app = bus.subscribe(AppEvent, handler_for_anything)
    on_tenant = bus.subscribe(TenantWasCreated, handler_for_anything, timeout=3)
    on_created = bus.subscribe(AppWasCreated, handler_for_anything)
    assert bus.subscriptions == (on_app, on_tenant, on_created)
    assert bus.handlers_for(AppWasCreated) == (on_app, on_created)
    assert bus.handlers_for(AppEvent) == (on_app,)
    assert on_tenant.timeout == 3 and on_tenant.event_type is TenantWasCreated
    assert on_tenant.name == f"{__name__}.handler_for_anything"
    assert "subscriptions=3" in repr(bus)
    with pytest.raises(TypeError, match="must be a class"):
        bus.handlers_for(AppWasCreated())  # type: ignore[arg-type]


# -- cancellation that is not the emitter's, and handlers that swallow it -----------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("handlers", [1, 2])
async def test_a_handler_swallowing_the_emitters_cancellation_does_not_undo_it(
    handlers: int,
) -> None:
    bus = EventBus()

    async def stubborn(event: object) -> None:
        try:
            await anyio.sleep(10)
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    for _ in range(handlers):
        bus.subscribe(AppWasCreated, stubborn)
    with pytest.raises(TimeoutError):  # asyncio.timeout sees its cancellation come back
        async with asyncio.timeout(0.05):
            await bus.emit(AppWasCreated())


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("handlers", [1, 2])
@pytest.mark.parametrize("suspend_first", [False, True])
async def test_a_handler_dying_of_someone_elses_cancellation_is_its_own_failure(
    handlers: int, suspend_first: bool
) -> None:
    bus = EventBus()

    async def awaits_a_cancelled_future(event: object) -> None:
        if suspend_first:
            await anyio.lowlevel.checkpoint()
        shared = asyncio.get_running_loop().create_future()
        shared.cancel()  # say, a shared request that another task gave up on
        await shared

    for _ in range(handlers):
        bus.subscribe(AppWasCreated, awaits_a_cancelled_future)
    result = await bus.emit(AppWasCreated())
    assert [type(error.exception) for error in result.errors] == [HandlerCancelledError] * handlers
    assert all(isinstance(e.exception.__cause__, asyncio.CancelledError) for e in result.errors)


async def test_a_base_exception_raised_while_the_emitter_is_cancelled_is_not_swallowed() -> None:
    bus = EventBus()

    async def stops_when_cancelled(event: object) -> None:
        try:
            await anyio.sleep(10)
        finally:
            raise Stop

    bus.subscribe(AppWasCreated, stops_when_cancelled)
    bus.subscribe(AppWasCreated, stops_when_cancelled)
    with pytest.raises(BaseException) as info, anyio.move_on_after(0.05):
        await bus.emit(AppWasCreated())
    assert leaves(info.value) and all(isinstance(exc, Stop) for exc in leaves(info.value))


# -- more bad input ------------------------------------------------------------------------


async def async_generator_handler(event: object) -> AsyncIterator[None]:
    yield


def generator_handler(event: object) -> Iterator[None]:
    yield


@pytest.mark.parametrize("handler", [async_generator_handler, generator_handler])
def test_generator_functions_are_refused(handler: Callable[[object], object]) -> None:
    with pytest.raises(TypeError, match="is a generator function"):
        EventBus().subscribe(AppWasCreated, handler)


class Readable(Protocol):
    def read(self) -> bytes: ...


@pytest.mark.parametrize("event_type", [Readable, Any])
def test_types_that_are_never_in_an_mro_are_refused(event_type: Any) -> None:
    with pytest.raises(TypeError, match=r"Protocol|must be a class"):
        EventBus().subscribe(event_type, handler_for_anything)


def test_nan_durations_and_non_bool_flags_are_refused() -> None:
    with pytest.raises(ConfigurationError, match="timeout must be a number"):
        EventBus().subscribe(AppWasCreated, handler_for_anything, timeout=float("nan"))
    with pytest.raises(ConfigurationError, match="drain_timeout must be a number"):
        EventBus(drain_timeout=float("inf"))
    with pytest.raises(TypeError, match="once must be a bool"):
        EventBus().subscribe(AppWasCreated, handler_for_anything, once="no")  # type: ignore[arg-type]


def test_a_bad_event_name_is_refused_when_subscribing() -> None:
    bad = type("Bad", (), {"__event_name__": ""})
    with pytest.raises(ConfigurationError, match="__event_name__ must be a non-empty str"):
        EventBus().subscribe(bad, handler_for_anything)
