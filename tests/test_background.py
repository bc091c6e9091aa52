"""Background delivery: publish, priorities, back-pressure, drain, batches (asyncio and trio)."""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import anyio.lowlevel
import pytest

from aioevents import (
    BusStateError,
    ConfigurationError,
    DrainReport,
    EventBus,
    HandlerError,
    QueueFullError,
    Subscription,
)

pytestmark = pytest.mark.anyio


@dataclass(frozen=True, slots=True)
class Job:
    number: int
    priority: int = 0


class Gate:
    """Holds the first delivered job until opened, so a test can fill the queue behind it."""

    def __init__(self) -> None:
        self.entered = anyio.Event()
        self.opened = anyio.Event()

    async def hold(self) -> None:
        self.entered.set()
        await self.opened.wait()


async def settle() -> None:
    for _ in range(20):
        await anyio.lowlevel.checkpoint()


async def test_publish_returns_at_once_and_leaving_the_block_delivers_everything() -> None:
    bus, handled, running = EventBus(workers=2), list[int](), list[bool]()

    @bus.on(Job)
    async def slow(job: Job) -> None:
        await anyio.sleep(0.01)
        handled.append(job.number)

    async with bus:
        running.append(bus.running)
        for number in range(20):
            await bus.publish(Job(number))
        assert len(handled) < 20
    running.append(bus.running)
    assert running == [True, False]
    assert sorted(handled) == list(range(20))


async def test_one_event_published_twice_is_delivered_twice() -> None:
    bus, handled = EventBus(workers=2), list[Job]()

    @bus.on(Job)
    async def record(job: Job) -> None:
        await anyio.sleep(0.01)
        handled.append(job)

    job = Job(1)
    async with bus:
        await bus.publish(job)
        await bus.publish(job)
    assert handled == [job, job]


async def test_higher_priority_first_and_fifo_within_a_priority() -> None:
    bus, gate, order = EventBus(workers=1), Gate(), list[int]()

    @bus.on(Job)
    async def record(job: Job) -> None:
        if job.number == 0:
            await gate.hold()
        order.append(job.number)

    async with bus:
        await bus.publish(Job(0))
        await gate.entered.wait()  # the only worker is busy: the rest queue up
        jobs = [Job(1, 0), Job(2, 5), Job(3, 0), Job(4, 9), Job(5, 5), Job(6, -1)]
        for job in jobs:
            bus.publish_nowait(job, priority=job.priority)
        gate.opened.set()
    assert order == [0, 4, 2, 5, 1, 3, 6]


async def test_a_full_queue_blocks_publish_until_a_place_frees() -> None:
    bus, gate, handled = EventBus(workers=1, queue_size=2), Gate(), list[int]()

    @bus.on(Job)
    async def record(job: Job) -> None:
        if job.number == 0:
            await gate.hold()
        handled.append(job.number)

    published = anyio.Event()

    async def publish_third() -> None:
        await bus.publish(Job(3))
        published.set()

    async with bus, anyio.create_task_group() as tasks:
        await bus.publish(Job(0))
        await gate.entered.wait()
        await bus.publish(Job(1))
        await bus.publish(Job(2))
        assert bus.queued == 2  # Job(0) was taken by the worker
        with pytest.raises(QueueFullError, match="queue is full"):
            bus.publish_nowait(Job(99))
        tasks.start_soon(publish_third)
        await settle()
        assert not published.is_set(), "publish did not wait for a free place"
        gate.opened.set()
        await published.wait()
    assert handled == [0, 1, 2, 3]
    assert bus.queued == 0  # not running


async def test_the_drain_timeout_reports_what_was_not_delivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus, finished = EventBus(workers=1, drain_timeout=0.1), list[int]()

    @bus.on(Job)
    async def hangs(job: Job) -> None:
        await anyio.sleep(30)
        finished.append(job.number)

    with caplog.at_level(logging.ERROR, logger="aioevents"):
        async with bus:
            for number in range(3):
                await bus.publish(Job(number))
            await settle()
            report = await bus.stop()
    assert report == DrainReport(delivered=0, undelivered=(Job(0), Job(1), Job(2)), timed_out=True)
    assert "3 undelivered events" in caplog.text
    await anyio.sleep(0.05)
    assert finished == [], "a handler ran on after the bus had exited"


async def test_a_publisher_still_waiting_when_the_drain_times_out_gets_an_error() -> None:
    bus = EventBus(workers=1, queue_size=1, drain_timeout=0.1)
    gate, outcome = Gate(), list[BaseException]()

    @bus.on(Job)
    async def hangs(job: Job) -> None:
        await gate.hold()

    async def publish_late() -> None:
        try:
            await bus.publish(Job(2))
        except BusStateError as exc:
            outcome.append(exc)

    async with anyio.create_task_group() as tasks, bus:
        await bus.publish(Job(0))
        await gate.entered.wait()
        await bus.publish(Job(1))
        tasks.start_soon(publish_late)
        await settle()
        report = await bus.stop()
    assert report.undelivered == (Job(0), Job(1))
    assert len(outcome) == 1 and "stopped before this event found a place" in str(outcome[0])


async def test_stop_reports_what_was_delivered_and_leaving_after_it_is_a_no_op() -> None:
    bus = EventBus()

    @bus.on(Job)
    async def handler(job: Job) -> None: ...

    async with bus:
        for number in range(5):
            await bus.publish(Job(number))
        assert await bus.stop() == DrainReport(delivered=5)
        with pytest.raises(BusStateError, match="is not running"):
            await bus.publish(Job(9))


async def test_publishing_without_a_running_bus_is_refused() -> None:
    bus = EventBus()
    with pytest.raises(BusStateError, match=r"not running: publish inside `async with bus:`"):
        await bus.publish(Job(1))
    with pytest.raises(BusStateError, match="not running"):
        bus.publish_nowait(Job(1))
    with pytest.raises(BusStateError, match="not running"):
        await bus.stop()


async def test_entering_a_running_bus_again_is_refused() -> None:
    bus = EventBus()
    async with bus:
        with pytest.raises(BusStateError, match="already running"):
            await bus.__aenter__()


async def test_bad_publish_input_is_refused() -> None:
    async with EventBus() as bus:
        with pytest.raises(TypeError, match="takes an event instance, got the class Job"):
            await bus.publish(Job)
        with pytest.raises(TypeError, match="priority must be an int"):
            await bus.publish(Job(1), priority="high")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("setting", "value", "error"),
    [
        ("workers", 0, ConfigurationError),
        ("queue_size", -1, ConfigurationError),
        ("drain_timeout", 0, ConfigurationError),
        ("workers", 2.0, TypeError),
        ("drain_timeout", "5", TypeError),
    ],
)
def test_background_settings_are_checked(setting: str, value: object, error: type) -> None:
    with pytest.raises(error, match=setting):
        EventBus(**{setting: value})  # type: ignore[arg-type]


async def test_background_failures_are_isolated_and_reach_the_error_hook() -> None:
    errors, handled = list[HandlerError](), list[int]()

    async def alert(error: HandlerError) -> None:
        errors.append(error)

    bus = EventBus(on_error=alert)

    @bus.on(Job)
    async def failing(job: Job) -> None:
        raise ValueError(f"job {job.number}")

    @bus.on(Job)
    async def working(job: Job) -> None:
        handled.append(job.number)

    async with bus:
        await bus.publish(Job(1))
        await bus.publish(Job(2))
    assert sorted(handled) == [1, 2]
    assert sorted(str(error.exception) for error in errors) == ["job 1", "job 2"]
    assert all(error.handler_name.endswith("failing") for error in errors)


async def test_without_an_error_hook_background_failures_are_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bus = EventBus()

    @bus.on(Job)
    async def failing(job: Job) -> None:
        raise ValueError(f"job {job.number}")

    async with bus:
        await bus.publish(Job(7))
    assert "failing failed on event job" in caplog.text
    assert "job 7" in caplog.text


async def test_a_publish_cancelled_before_it_returns_queues_nothing() -> None:
    bus, handled, gate = EventBus(workers=1, queue_size=1), list[int](), Gate()

    @bus.on(Job)
    async def record(job: Job) -> None:
        if job.number == 0:
            await gate.hold()
        handled.append(job.number)

    async with bus:
        await bus.publish(Job(0))
        await gate.entered.wait()
        await bus.publish(Job(1))  # the queue is full now
        with anyio.move_on_after(0.01) as scope:
            await bus.publish(Job(2))  # waits for a place, and is cancelled waiting
        assert scope.cancelled_caught
        gate.opened.set()
    assert bus.last_drain == DrainReport(delivered=2)
    assert handled == [0, 1]


@pytest.mark.parametrize("publishes", [1, 15, 16, 17, 40])
async def test_publish_yields_every_so_often_and_a_cancellation_there_queues_nothing(
    publishes: int,
) -> None:
    bus, handled = EventBus(), list[int]()

    @bus.on(Job)
    async def record(job: Job) -> None:
        handled.append(job.number)

    published = 0
    async with bus:
        with anyio.CancelScope() as scope:
            scope.cancel()  # every yield of a publish raises the cancellation
            for number in range(publishes):
                await bus.publish(Job(number))
                published += 1
    # A publish that returned queued its event; the one that raised queued nothing.
    assert sorted(handled) == list(range(published))
    assert published == min(publishes, 15)  # the 16th place taken yields: it is cancelled
    assert scope.cancelled_caught == (publishes >= 16)


async def test_a_failing_error_hook_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    def broken(error: HandlerError) -> None:
        raise RuntimeError("pager down")

    bus = EventBus(on_error=broken)

    @bus.on(Job)
    async def failing(job: Job) -> None:
        raise ValueError("x")

    async with bus:
        await bus.publish(Job(1))
    assert "the on_error hook failed" in caplog.text


# -- batches -----------------------------------------------------------------------------------


async def test_batches_are_cut_at_max_size_and_the_rest_flushed_on_exit() -> None:
    bus, batches = EventBus(), list[list[int]]()

    @bus.on_batch(Job, max_size=3, max_wait=30)
    async def bulk(jobs: Sequence[Job]) -> None:
        batches.append([job.number for job in jobs])

    async with bus:
        for number in range(7):
            await bus.publish(Job(number))
    assert batches == [[0, 1, 2], [3, 4, 5], [6]]


async def test_a_partial_batch_is_delivered_after_max_wait() -> None:
    bus, delivered = EventBus(), anyio.Event()
    batches = list[list[int]]()

    async def bulk(jobs: Sequence[Job]) -> None:
        batches.append([job.number for job in jobs])
        delivered.set()

    bus.subscribe_batch(Job, bulk, max_size=100, max_wait=0.05)
    async with bus:
        await bus.publish(Job(1))
        await bus.publish(Job(2))
        with anyio.fail_after(5):
            await delivered.wait()
        assert batches == [[1, 2]]


async def test_emit_feeds_batches_while_running_and_hands_over_one_event_when_stopped() -> None:
    bus, batches = EventBus(), list[list[int]]()

    @bus.on_batch(Job, max_size=3, max_wait=30, name="bulk")
    async def bulk(jobs: Sequence[Job]) -> None:
        batches.append([job.number for job in jobs])

    assert (await bus.emit(Job(0))).handlers == ("bulk",)
    async with bus:
        for number in range(1, 8):  # no checkpoint between them: all wait before one flush
            result = await bus.emit(Job(number))
            assert result.handled == 0  # the batch handler runs later, with its batch
    assert (await bus.emit(Job(8))).handled == 1
    assert batches == [[0], [1, 2, 3], [4, 5, 6], [7], [8]]


async def test_a_batch_handler_subscribed_while_running_gets_events() -> None:
    bus, batches = EventBus(), list[list[int]]()

    async def bulk(jobs: Sequence[Job]) -> None:
        batches.append([job.number for job in jobs])

    async with bus:
        bus.subscribe_batch(Job, bulk, max_size=2)
        for number in range(2):
            await bus.publish(Job(number))
    assert batches == [[0, 1]]


async def test_a_failed_batch_is_reported_for_every_event(caplog: pytest.LogCaptureFixture) -> None:
    errors = list[HandlerError]()
    bus = EventBus(on_error=errors.append)

    @bus.on_batch(Job, max_size=3)
    async def bulk(jobs: Sequence[Job]) -> None:
        raise ConnectionError("db gone")

    async with bus:
        for number in range(3):
            await bus.publish(Job(number))
    assert [error.event for error in errors] == [Job(0), Job(1), Job(2)]
    assert caplog.text.count("failed on event batch of 3") == 1


async def test_a_batch_of_one_that_fails_on_a_stopped_bus_is_in_the_emit_report() -> None:
    bus = EventBus()

    def bulk(jobs: Sequence[Job]) -> None:  # sync: runs in a worker thread, as always
        raise ConnectionError(f"{len(jobs)} job(s) lost the database")

    bus.subscribe_batch(Job, bulk, max_size=10)
    [error] = (await bus.emit(Job(1))).errors
    assert str(error.exception) == "1 job(s) lost the database"
    assert error.handler_name.endswith("bulk")
    assert error.subscription is not None
    bus.unsubscribe(error.subscription)  # the subscription a report names can be ended
    assert bus.subscriptions == ()


def test_batch_settings_are_checked() -> None:
    bus = EventBus()

    async def bulk(jobs: Sequence[Job]) -> None: ...

    with pytest.raises(ConfigurationError, match="max_size must be an int >= 1"):
        bus.subscribe_batch(Job, bulk, max_size=0)
    with pytest.raises(ConfigurationError, match="max_wait must be a number of seconds > 0"):
        bus.on_batch(Job, max_wait=-1)


async def test_a_batch_being_flushed_when_the_bus_stops_is_waited_for() -> None:
    bus, started, stored = EventBus(), anyio.Event(), list[int]()

    @bus.on_batch(Job, max_size=1)
    async def slow_bulk(jobs: Sequence[Job]) -> None:
        started.set()
        await anyio.sleep(0.1)
        stored.extend(job.number for job in jobs)

    async with bus:
        await bus.publish(Job(1))
        await started.wait()  # its own task has taken the batch and is running it
        report = await bus.stop()
    assert report.undelivered == () and stored == [1]


async def test_a_batch_cut_off_by_the_drain_timeout_is_reported_undelivered() -> None:
    bus, started = EventBus(drain_timeout=0.05), anyio.Event()

    @bus.on_batch(Job, max_size=2)
    async def hanging_bulk(jobs: Sequence[Job]) -> None:
        started.set()
        await anyio.sleep(30)

    async with bus:
        await bus.publish(Job(1))
        await bus.publish(Job(2))
        await started.wait()
        report = await bus.stop()
    assert report.timed_out and report.undelivered == (Job(1), Job(2))


async def test_background_handlers_and_the_error_hook_see_the_publishers_context() -> None:
    request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
    seen = list[str]()
    bus = EventBus(on_error=lambda error: seen.append(f"on_error {request_id.get()}"))

    @bus.on(Job)
    async def failing(job: Job) -> None:
        seen.append(f"handler {request_id.get()}")
        raise ValueError

    async with bus:
        token = request_id.set("req-42")
        await bus.publish(Job(1))
        request_id.reset(token)
    assert seen == ["handler req-42", "on_error req-42"]


async def test_hooks_and_the_limit_apply_to_batches_on_a_running_bus() -> None:
    calls = list[tuple[str, object]]()

    class Recording:
        def handler_started(self, event: object, subscription: Subscription) -> object:
            calls.append(("started", event))
            return None

        def handler_finished(self, event: object, subscription: Subscription, **_: object) -> None:
            calls.append(("finished", event))

    bus = EventBus(hooks=[Recording()], max_concurrency=1)

    @bus.on_batch(Job, max_size=2)
    async def bulk(jobs: Sequence[Job]) -> None: ...

    async with bus:
        await bus.publish(Job(1))
        await bus.publish(Job(2))
    assert calls == [("started", [Job(1), Job(2)]), ("finished", [Job(1), Job(2)])]
