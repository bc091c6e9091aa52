"""The review's defects, one reproducer each (the matrix in test_cancellation_matrix.py covers
the cancellation ones across every source and shape)."""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import pytest

from aioevents import ConfigurationError, EventBus

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
                await bus.publish(Job(number))
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


async def test_nested_single_handler_emits_cost_no_more_stack_than_awaits() -> None:
    depth = 300  # about 200 levels reached the recursion limit when each level cost 5 frames
    assert sys.getrecursionlimit() >= 1000
    bus, reached = EventBus(), list[int]()

    @bus.on(Job)
    async def deeper(job: Job) -> None:
        if job.number < depth:
            await bus.emit(Job(job.number + 1))
            return
        reached.append(job.number)
        await anyio.lowlevel.checkpoint()  # and resuming through every level works too

    result = await bus.emit(Job(0))
    assert result.ok, result.errors
    assert reached == [depth]


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
