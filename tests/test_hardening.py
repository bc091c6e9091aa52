"""The review's defects, one reproducer each (the matrix in test_cancellation_matrix.py covers
the cancellation ones across every source and shape)."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import sys
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest

from aioevents import BusStateError, ConfigurationError, DrainReport, EventBus, Retry

pytestmark = pytest.mark.anyio


@dataclass(frozen=True, slots=True)
class Job:
    number: int


@dataclass(frozen=True, slots=True)
class Step:
    number: int


class Fatal(BaseException):
    pass


async def test_a_cancelled_owner_still_has_workers_to_drain_with() -> None:
    bus, handled = EventBus(workers=2, drain_timeout=30), list[int]()

    @bus.on(Job)
    async def slow(job: Job) -> None:
        await anyio.sleep(0.01)
        handled.append(job.number)

    with anyio.move_on_after(0.05) as scope:
        async with bus:
            for number in range(50):
                bus.publish_nowait(Job(number))  # all queued before the timeout can land
            await anyio.sleep(30)
    assert scope.cancelled_caught
    assert sorted(handled) == list(range(50))
    assert bus.last_drain is not None and bus.last_drain.delivered == 50


async def test_a_base_exception_in_a_worker_ends_the_drain_at_once_and_reports_the_rest() -> None:
    bus = EventBus(workers=1, drain_timeout=60)

    @bus.on(Job)
    async def dies(job: Job) -> None:
        raise Fatal

    with pytest.raises(Fatal):
        async with bus:
            for number in range(5):
                bus.publish_nowait(Job(number))
            await anyio.sleep(30)  # the worker's Fatal cancels the owner's block
    report = bus.last_drain
    assert report is not None
    assert not report.timed_out  # it did not wait out its 60 s drain timeout
    assert sorted(job.number for job in report.undelivered) == [0, 1, 2, 3, 4]  # type: ignore[attr-defined]


async def test_the_drain_runs_chained_batches_to_a_fixed_point() -> None:
    bus, second = EventBus(drain_timeout=30), list[int]()

    @bus.on_batch(Step, max_size=100, max_wait=30)  # subscribed before the one that feeds it
    async def second_stage(steps: Sequence[Step]) -> None:
        second.extend(step.number for step in steps)

    @bus.on_batch(Job, max_size=100, max_wait=30)
    async def first_stage(jobs: Sequence[Job]) -> None:
        for job in jobs:
            await bus.emit(Step(job.number))

    async with bus:
        for number in range(10):
            await bus.publish(Job(number))
    assert sorted(second) == list(range(10))
    assert bus.last_drain is not None
    assert bus.last_drain.undelivered == () and not bus.last_drain.timed_out


@pytest.mark.parametrize("delivery", ["emit", "publish"])
async def test_an_event_with_a_bad_name_is_refused_before_any_handler_runs(delivery: str) -> None:
    bad = type("Bad", (), {"__event_name__": ""})
    bus, ran = EventBus(), list[object]()

    @bus.on(object)
    async def everything(event: object) -> None:
        ran.append(event)

    async with bus:
        with pytest.raises(ConfigurationError, match="__event_name__ must be a non-empty str"):
            if delivery == "emit":
                await bus.emit(bad())
            else:
                await bus.publish(bad())
        await bus.publish(Job(1))  # the bus, and its workers, go on
    assert ran == [Job(1)]


async def test_the_report_of_a_timed_out_drain_stays_readable_and_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus(workers=1, drain_timeout=0.1)

    @bus.on(Job)
    async def hangs(job: Job) -> None:
        await anyio.sleep(30)

    before = bus.last_drain
    async with bus:
        await bus.publish(Job(1))
        await bus.publish(Job(2))
    report = bus.last_drain
    assert before is None
    assert report is not None and report.timed_out
    assert set(report.undelivered) == {Job(1), Job(2)}
    [record] = [r for r in caplog.records if "undelivered" in r.getMessage()]
    assert record.levelno == logging.ERROR
    assert "job Job(number=1)" in record.getMessage()
    assert "bus.last_drain" in record.getMessage()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # where tasks can be counted
async def test_unsubscribing_a_batch_handler_while_running_delivers_and_ends_its_task() -> None:
    bus, received = EventBus(), list[int]()

    async def collect(jobs: Sequence[Job]) -> None:
        received.extend(job.number for job in jobs)

    async with bus:
        tasks_before = len(_tasks())
        for number in range(100):
            sub = bus.subscribe_batch(Job, collect, max_size=1000, max_wait=30)
            await bus.emit(Job(number))
            bus.unsubscribe(sub)
        for _ in range(20):
            await anyio.lowlevel.checkpoint()
        assert len(_tasks()) <= tasks_before
    assert sorted(received) == list(range(100))


def _tasks() -> set[asyncio.Task[object]]:
    return set(asyncio.all_tasks())


def test_a_batch_after_a_slow_flush_waits_from_its_oldest_event_not_from_the_flush() -> None:
    trio_testing = pytest.importorskip("trio.testing")
    flushes: list[tuple[float, list[int]]] = []

    async def main() -> None:
        bus = EventBus()

        @bus.on_batch(Job, max_size=100, max_wait=1.0)
        async def slow(jobs: Sequence[Job]) -> None:
            flushes.append((anyio.current_time(), [job.number for job in jobs]))
            await anyio.sleep(3.0)  # a slow flush

        async with bus:
            start = anyio.current_time()
            await bus.emit(Job(1))
            await anyio.sleep(1.5)  # the first batch is being flushed
            await bus.emit(Job(2))  # waits behind it
            await anyio.sleep(10)
        flushes[:] = [(at - start, numbers) for at, numbers in flushes]

    clock = trio_testing.MockClock(autojump_threshold=0)  # virtual time: exact, never flaky
    anyio.run(main, backend="trio", backend_options={"clock": clock})
    assert flushes == [(1.0, [1]), (4.0, [2])]  # not 5.0: it was already due when the flush ended


async def test_the_bus_is_running_until_its_drain_ends() -> None:
    bus, seen = EventBus(), list[bool]()

    @bus.on_batch(Job, max_size=100, max_wait=30)
    async def at_drain(jobs: Sequence[Job]) -> None:
        seen.append(bus.running)

    async with bus:
        await bus.publish(Job(1))
    assert seen == [True]
    assert not bus.running


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: EventBus(on_error=5), "on_error must be callable"),  # type: ignore[arg-type]
        (lambda: EventBus(hooks=5), "hooks must be an iterable of hooks"),  # type: ignore[arg-type]
        (lambda: EventBus(hooks=[5]), "a hook needs a handler_started"),  # type: ignore[list-item]
        (lambda: EventBus(workers="4"), "workers must be an int"),  # type: ignore[arg-type]
    ],
)
def test_bad_bus_arguments_are_a_type_error_at_once(make: object, match: str) -> None:
    with pytest.raises(TypeError, match=match):
        make()  # type: ignore[operator]


async def test_strict_must_be_a_bool() -> None:
    with pytest.raises(TypeError, match="strict must be a bool, got 'yes'"):
        await EventBus().emit(Job(1), strict="yes")  # type: ignore[arg-type]


async def test_a_partial_is_named_after_the_function_it_wraps() -> None:
    bus = EventBus()

    async def notify(channel: str, job: Job) -> None:
        raise ValueError(channel)

    sub = bus.subscribe(Job, functools.partial(functools.partial(notify), "email"))
    assert sub.name.endswith("test_a_partial_is_named_after_the_function_it_wraps.<locals>.notify")
    result = await bus.emit(Job(1))
    assert result.handlers == (sub.name,) and result.errors[0].handler_name == sub.name


def _frames() -> int:
    """How deep the Python stack is here."""
    frame: FrameType | None = sys._getframe(1)
    count = 0
    while frame is not None:
        frame, count = frame.f_back, count + 1
    return count


async def test_nested_single_handler_emits_cost_no_more_stack_than_awaits() -> None:
    seen: list[int] = []
    bus = EventBus()

    @bus.on(Job)
    async def deeper(job: Job) -> None:
        if job.number:
            await bus.emit(Job(job.number - 1))
            return
        seen.append(_frames())
        await anyio.lowlevel.checkpoint()  # and resumed through every level
        seen.append(_frames())

    async def plain_emit(number: int) -> None:  # the same nesting with plain awaits
        await plain_handler(number)

    async def plain_handler(number: int) -> None:
        if number:
            await plain_emit(number - 1)
            return
        seen.append(_frames())
        await anyio.lowlevel.checkpoint()
        seen.append(_frames())

    per_level = {}
    for name, nest in (("emit", lambda n: bus.emit(Job(n))), ("await", plain_emit)):
        seen.clear()
        await nest(20)
        await nest(60)
        shallow_first, shallow_resumed, deep_first, deep_resumed = seen
        per_level[name] = ((deep_first - shallow_first) / 40, (deep_resumed - shallow_resumed) / 40)
    # Before: 3 frames a level on the first step and 4 when resumed.
    assert per_level["emit"] == per_level["await"] == (2.0, 2.0)


@pytest.mark.parametrize("event", [42, "hello", {}, None, [1], 1.5, b"x"])
async def test_builtin_values_are_refused_as_events(event: object) -> None:
    with pytest.raises(TypeError, match="is not an event type: define an event class"):
        await EventBus().emit(event)


@pytest.mark.parametrize("event_type", [int, str, dict, list, type(None)])
def test_builtin_types_are_refused_as_event_types(event_type: type) -> None:
    with pytest.raises(TypeError, match="is not an event type: define an event class"):
        EventBus().subscribe(event_type, print)


async def test_object_stays_a_catch_all_subscription() -> None:
    bus = EventBus()
    seen: list[object] = []
    bus.subscribe(object, seen.append)
    assert (await bus.emit(Job(1))).handled == 1
    assert seen == [Job(1)]


def test_a_change_drops_only_the_routes_that_hold_the_changed_type() -> None:
    bus = EventBus()
    routes = bus._registry.routes
    bus.subscribe(Job, print)
    for event in (Job(1), Step(1)):
        anyio.run(bus.emit, event)
    assert set(routes) == {Job, Step}
    sub = bus.subscribe(Step, print)
    assert set(routes) == {Job}  # the Job route is still cached
    bus.unsubscribe(sub)
    anyio.run(bus.emit, Step(2))
    bus.subscribe(object, print)  # in every MRO: every route goes
    assert routes == {}


async def test_emit_result_of_an_inline_handler_is_the_same_as_of_a_task() -> None:
    bus = EventBus()

    @bus.on(Job)
    async def fails(job: Job) -> None:
        await anyio.lowlevel.checkpoint()
        raise ValueError("x")

    result = await bus.emit(Job(1))
    assert not result.ok and result.handled == 1


# -- found by the review of this work ----------------------------------------------------------


async def _cancel_owner_during_its_drain(
    source: str, body: Callable[[], Coroutine[Any, Any, None]]
) -> None:
    """Run ``body`` (which enters and leaves a bus) and cancel it once its drain began."""
    if source == "anyio":
        async with anyio.create_task_group() as tg:
            tg.start_soon(body)
            await anyio.sleep(0.05)
            tg.cancel_scope.cancel()
        return
    task = asyncio.ensure_future(body())
    await anyio.sleep(0.05)
    if source == "task.cancel()":
        task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("source", ["task.cancel()", "anyio"])
async def test_a_drain_cancelled_from_outside_still_runs_its_course_and_keeps_its_report(
    source: str,
) -> None:
    bus, handled, left = EventBus(workers=1, drain_timeout=30), list[int](), list[int]()

    @bus.on(Job)
    async def slow(job: Job) -> None:
        await anyio.sleep(0.01)
        handled.append(job.number)

    async def owner() -> None:
        async with bus:
            for number in range(10):
                await bus.publish(Job(number))
        # leaving at once: the drain delivers the ten, and is cancelled meanwhile

    await _cancel_owner_during_its_drain(source, owner)
    left.extend(handled)
    await anyio.sleep(0.2)
    assert handled == left  # nothing ran after the block was left
    assert sorted(handled) == list(range(10))
    assert bus.last_drain is not None and bus.last_drain.delivered == 10
    assert not bus.running
    async with bus:  # and it can be entered again
        pass


async def test_stop_from_another_task_is_refused_at_once() -> None:
    bus, refused = EventBus(), list[str]()

    @bus.on(Job)
    async def stops_the_bus(job: Job) -> None:
        try:
            await bus.stop()
        except BusStateError as exc:
            refused.append(str(exc))

    async with bus:
        await bus.publish(Job(1))
        async with anyio.create_task_group() as tg:

            async def other() -> None:
                with pytest.raises(BusStateError, match="called by the task that entered"):
                    await bus.stop()

            tg.start_soon(other)
    assert len(refused) == 1 and "signal that task" in refused[0]
    assert bus.last_drain is not None and bus.last_drain.delivered == 1


async def test_events_published_by_handlers_during_the_drain_are_delivered() -> None:
    bus, receipts = EventBus(workers=1), list[int]()

    @bus.on(Job)
    async def placed(job: Job) -> None:
        await anyio.sleep(0.001)
        await bus.publish(Step(job.number))

    @bus.on(Step)
    async def receipt(step: Step) -> None:
        receipts.append(step.number)

    async with bus:
        for number in range(5):
            await bus.publish(Job(number))
    assert sorted(receipts) == list(range(5))
    assert bus.last_drain == DrainReport(delivered=10)
    with pytest.raises(BusStateError, match="not running"):
        await bus.publish(Job(9))


async def test_a_batch_flushed_by_the_drain_does_not_leak_its_context_into_the_owner() -> None:
    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="none")
    bus = EventBus()

    async def sets_the_tenant(jobs: Sequence[Job]) -> None:
        tenant.set("set by the batch handler")
        await anyio.lowlevel.checkpoint()

    bus.subscribe_batch(Job, sets_the_tenant, max_size=100, max_wait=60)
    tenant.set("app")
    async with bus:
        await bus.emit(Job(1))
    assert tenant.get() == "app"


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("handlers", [1, 2])
async def test_a_cancellation_turned_into_a_retryable_error_is_not_retried(handlers: int) -> None:
    bus, attempts = EventBus(), list[int]()
    retry = Retry(on=ConnectionError, attempts=50, wait_initial=0.01, wait_max=0.01, wait_jitter=0)

    async def client_call(job: Job) -> None:
        attempts.append(1)
        try:
            await anyio.sleep(10)
        except asyncio.CancelledError:
            raise ConnectionError("connection reset") from None  # as some clients do

    for _ in range(handlers):
        bus.subscribe(Job, client_call, retry=retry)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await bus.emit(Job(1))
    assert len(attempts) == handlers  # one attempt each: no retry after the cancellation


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_sync_handler_waiting_for_a_thread_is_cancelled_before_it_starts() -> None:
    limiter = anyio.to_thread.current_default_thread_limiter()
    started, release = list[int](), threading.Event()
    bus = EventBus()

    def handler(job: Job) -> None:
        started.append(job.number)

    bus.subscribe(Job, handler)
    tokens = limiter.total_tokens
    limiter.total_tokens = 1
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(
                functools.partial(anyio.to_thread.run_sync, release.wait)
            )  # the one thread
            await anyio.sleep(0.05)
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await bus.emit(Job(1))
            release.set()
        assert started == []  # cancelled while it waited for a thread: it never ran
    finally:
        release.set()
        limiter.total_tokens = tokens


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_sync_handler_failing_after_its_emit_was_cancelled_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus, started, go = EventBus(), threading.Event(), threading.Event()

    def writes(job: Job) -> None:
        started.set()
        go.wait(30)
        raise OSError("disk full")

    bus.subscribe(Job, writes, name="writes")
    emitting = asyncio.ensure_future(bus.emit(Job(1)))
    await anyio.to_thread.run_sync(started.wait, 30)  # the handler runs: now cancel its emit
    emitting.cancel()
    go.set()
    with pytest.raises(asyncio.CancelledError):
        await emitting
    [record] = [r for r in caplog.records if "after its caller was cancelled" in r.getMessage()]
    assert "sync handler writes" in record.getMessage()
    assert record.exc_info is not None and isinstance(record.exc_info[1], OSError)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("handlers", [1, 2])
async def test_a_handler_whose_task_group_fails_is_a_failure_not_a_cancellation(
    handlers: int,
) -> None:
    bus = EventBus()

    async def uses_a_task_group(job: Job) -> None:
        async def child() -> None:
            raise ValueError("child failed")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(asyncio.sleep(1))
            tg.create_task(child())

    for _ in range(handlers):
        bus.subscribe(Job, uses_a_task_group)
    result = await bus.emit(Job(1))  # on 3.11 and 3.12 this raised CancelledError
    assert [type(error.exception) for error in result.errors] == [ExceptionGroup] * handlers


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_handler_cancelling_its_worker_does_not_stop_the_bus(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus, handled = EventBus(workers=1), list[int]()

    @bus.on(Job)
    async def cancels_its_own_task(job: Job) -> None:
        if job.number == 0:  # a home-made watchdog, which does not take its cancel back
            current = asyncio.current_task()
            assert current is not None
            asyncio.get_running_loop().call_later(0.01, current.cancel)
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                raise TimeoutError("took too long") from None
        handled.append(job.number)

    async with bus:
        await bus.publish(Job(0))
        await bus.publish(Job(1))
        await anyio.sleep(0.05)
    assert handled == [1]
    assert bus.last_drain == DrainReport(delivered=1, undelivered=(Job(0),))
    assert "cancelled the task delivering it" in caplog.text


async def test_a_handlers_base_exception_keeps_its_cause_whatever_the_handler_count() -> None:
    bus = EventBus()

    async def fails(job: Job) -> None:
        try:
            raise OSError("the database is gone")
        except OSError as exc:
            raise Fatal from exc

    async def waits(job: Job) -> None:
        await anyio.sleep(10)

    bus.subscribe(Job, fails)
    bus.subscribe(Job, waits)
    with pytest.raises(Fatal) as raised:
        await bus.emit(Job(1))
    assert isinstance(raised.value.__cause__, OSError)


def test_async_hook_methods_are_refused() -> None:
    class Tracing:
        async def handler_started(self, event: object, subscription: object) -> object:
            return None

        def handler_finished(self, event: object, subscription: object, **_: object) -> None:
            pass

    with pytest.raises(TypeError, match="handler_started is async"):
        EventBus(hooks=[Tracing()])


# -- found by a second review --------------------------------------------------------------------


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_handler_cancelling_its_worker_and_returning_at_once_does_not_stop_the_bus() -> (
    None
):
    bus, handled = EventBus(workers=1), list[int]()

    @bus.on(Job)
    async def cancels_and_returns(job: Job) -> None:
        if job.number == 0:
            current = asyncio.current_task()
            assert current is not None
            current.cancel()  # lands in the worker's loop, after the handler returned
        handled.append(job.number)

    async with bus:
        for number in range(5):
            await bus.publish(Job(number))
        await anyio.sleep(0.05)
    assert handled == [0, 1, 2, 3, 4]
    assert bus.last_drain == DrainReport(delivered=5)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("flushed_by", ["its flusher", "the drain"])
async def test_a_batch_handler_cancelling_its_own_task_loses_only_its_batch(
    flushed_by: str,
) -> None:
    bus, batches = EventBus(), list[list[int]]()

    async def cancels_itself(jobs: Sequence[Job]) -> None:
        batches.append([job.number for job in jobs])
        if jobs[0].number == 0:
            current = asyncio.current_task()
            assert current is not None
            current.cancel()
            await asyncio.sleep(0)

    bus.subscribe_batch(Job, cancels_itself, max_size=2, max_wait=60)
    async with bus:  # the owner is not cancelled by it
        await bus.emit(Job(0))
        await bus.emit(Job(1))  # a full batch: its flusher flushes it at once
        if flushed_by == "its flusher":
            await anyio.sleep(0.05)
        await bus.emit(Job(10))
        await bus.emit(Job(11))
    assert batches == [[0, 1], [10, 11]]
    assert bus.last_drain is not None and set(bus.last_drain.undelivered) == {Job(0), Job(1)}


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_retried_handler_whose_task_group_fails_is_retried_not_cancelled() -> None:
    bus, attempts = EventBus(), list[int]()

    async def uses_a_task_group(job: Job) -> None:
        attempts.append(1)

        async def child() -> None:
            raise ValueError("child failed")

        async with asyncio.TaskGroup() as tg:
            tg.create_task(asyncio.sleep(1))
            tg.create_task(child())

    retry = Retry(on=ExceptionGroup, attempts=3, wait_initial=0, wait_max=0, wait_jitter=0)
    bus.subscribe(Job, uses_a_task_group, retry=retry)
    [error] = (await bus.emit(Job(1))).errors
    assert len(attempts) == 3 and error.attempts == 3
    assert isinstance(error.exception, ExceptionGroup)


async def test_stop_from_a_handler_running_in_the_owners_task_is_refused() -> None:
    bus, refused = EventBus(), list[str]()

    @bus.on(Job)
    async def stops_the_bus(job: Job) -> None:
        with anyio.fail_after(10):  # a scope of its own, which stop() must not try to close
            try:
                await bus.stop()
            except BusStateError as exc:
                refused.append(str(exc))

    async with bus:
        await bus.emit(Job(1))  # one handler: it runs inline, in the owner's task
        assert bus.running
    assert len(refused) == 1
    assert bus.last_drain == DrainReport(delivered=0)
