"""The cancellation and fault matrix: every source of cancellation against every delivery shape.

Each cell cancels a delivery while its handlers run and asserts the same three properties:

(a) the cancellation reaches the caller as its source intends: an anyio scope absorbs its own,
    a timeout becomes `TimeoutError`, a native cancel ends the task cancelled, a failing
    sibling's error is the only one its task group raises; never more, never less (a
    handler's `BaseException` replaces the cancellation: it is never swallowed);
(b) nothing of the delivery runs after the call returned: every handler that started, sync
    handlers' threads included, ended before it;
(c) every published event is either delivered or in the `DrainReport`'s ``undelivered``.

A new source is one more entry in SOURCES, a new shape one more entry in SHAPES.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import anyio
import pytest

from aioevents import EventBus, Retry, Subscription

pytestmark = pytest.mark.anyio

SYNC_SECONDS = 0.2  # how long a sync handler's thread runs: it cannot be interrupted
DRAIN_SECONDS = 0.5


class Fatal(BaseException):
    """A BaseException a handler raises when it is cancelled."""


class Boom(Exception):
    """The failing sibling's error."""


@dataclass(frozen=True, slots=True)
class Job:
    number: int


@dataclass
class Probe:
    """What the handlers of one cell did, in order; the caller adds "returned"."""

    log: list[str] = field(default_factory=list)
    started: int = 0
    ended: int = 0
    completed: list[Job] = field(default_factory=list)
    hook_started: int = 0
    hook_finished: int = 0
    threads: int = 0  # sync handler calls still running
    published: int = 0  # events whose publish returned
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads_done: threading.Event = field(default_factory=threading.Event)

    def start(self) -> None:
        with self.lock:
            self.started += 1

    def end(self, what: str) -> None:
        with self.lock:
            self.ended += 1
            self.log.append(what)


# -- handlers, one factory per kind -----------------------------------------------------------

Handler = Callable[[Any], Any]


def sleeping(probe: Probe) -> Handler:
    async def sleeps(job: Job) -> None:
        probe.start()
        try:
            await anyio.sleep(30)
            probe.completed.append(job)
        finally:
            probe.end("end:sleep")

    return sleeps


def swallowing(probe: Probe) -> Handler:
    async def swallows(job: Job) -> None:
        probe.start()
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            return  # swallowed: its emitter is cancelled all the same
        finally:
            probe.end("end:swallow")

    return swallows


def fatal(probe: Probe) -> Handler:
    async def raises_fatal(job: Job) -> None:
        probe.start()
        try:
            await anyio.sleep(30)
        except anyio.get_cancelled_exc_class():
            raise Fatal from None
        finally:
            probe.end("end:fatal")

    return raises_fatal


def raising(probe: Probe) -> Handler:
    async def raises(job: Job) -> None:
        probe.start()
        probe.end("end:raise")
        raise ValueError("a handler's own failure")

    return raises


def sync(probe: Probe) -> Handler:
    def blocks(job: Job) -> None:
        with probe.lock:
            probe.threads += 1
            probe.threads_done.clear()
        probe.start()
        time.sleep(SYNC_SECONDS)
        probe.completed.append(job)
        probe.end("end:sync")
        with probe.lock:
            probe.threads -= 1
            if not probe.threads:
                probe.threads_done.set()

    return blocks


def sleeping_batch(probe: Probe) -> Handler:
    async def sleeps(jobs: Sequence[Job]) -> None:
        probe.start()
        try:
            await anyio.sleep(30)
            probe.completed.extend(jobs)
        finally:
            probe.end("end:batch")

    return sleeps


def sync_batch(probe: Probe) -> Handler:
    def blocks(jobs: Sequence[Job]) -> None:
        sync(probe)(jobs[0])
        probe.completed.extend(jobs[1:])

    return blocks


KINDS: dict[str, Callable[[Probe], Handler]] = {
    "sleep": sleeping,
    "swallow": swallowing,
    "fatal": fatal,
    "raise": raising,
    "sync": sync,
}


class CountingHook:
    def __init__(self, probe: Probe) -> None:
        self.probe = probe

    def handler_started(self, event: object, subscription: Subscription) -> object:
        self.probe.hook_started += 1
        return None

    def handler_finished(self, event: object, subscription: Subscription, **_: object) -> None:
        self.probe.hook_finished += 1


# -- shapes -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    name: str
    kinds: tuple[str, ...]
    options: dict[str, Any] = field(default_factory=dict)
    max_concurrency: int | None = None
    hook: bool = False

    @property
    def fatal(self) -> bool:
        return "fatal" in self.kinds

    def bus(self, probe: Probe) -> EventBus:
        hooks = [CountingHook(probe)] if self.hook else []
        bus = EventBus(
            max_concurrency=self.max_concurrency, hooks=hooks, drain_timeout=DRAIN_SECONDS
        )
        for kind in self.kinds:
            bus.subscribe(Job, KINDS[kind](probe), **self.options)
        return bus

    def blocking(self) -> int:
        """How many handlers of one event start and are then still running (or blocked)."""
        started = len(self.kinds) if self.max_concurrency is None else self.max_concurrency
        return min(started, len(self.kinds))


def flaky(probe: Probe) -> Handler:
    async def fails(job: Job) -> None:
        probe.start()
        probe.end("end:attempt")
        raise ConnectionError("try again")

    return fails


SHAPES = [
    Shape("0 handlers", ()),
    Shape("1 async", ("sleep",)),
    Shape("1 sync", ("sync",)),
    Shape("1 swallowing", ("swallow",)),
    Shape("1 BaseException", ("fatal",)),
    Shape("3 async sync raising", ("sleep", "sync", "raise")),
    Shape("3 swallowing", ("swallow", "sleep", "raise")),
    Shape("3 with BaseException", ("fatal", "sleep", "sync")),
    Shape("1 with timeout", ("sleep",), {"timeout": 30.0}),
    Shape("1 sync with timeout", ("sync",), {"timeout": 30.0}),
    Shape("3 with max_concurrency", ("sleep", "sleep", "sync"), max_concurrency=1),
    Shape("3 with a hook", ("sleep", "sync", "raise"), hook=True),
    Shape("1 with a hook", ("swallow",), hook=True),
]


# -- how a delivery is made -------------------------------------------------------------------

Deliver = Callable[[EventBus, Probe, anyio.Event], Awaitable[Any]]


async def by_emit(bus: EventBus, probe: Probe, ready: anyio.Event) -> Any:
    return await bus.emit(Job(0))


async def by_publish(bus: EventBus, probe: Probe, ready: anyio.Event) -> Any:
    """The owner of ``async with bus:`` is cancelled while its handlers run; the drain goes on."""
    async with bus:
        for number in range(3):
            await bus.publish(Job(number))
            probe.published += 1
        await anyio.sleep(30)  # the cancellation lands here, while the handlers run
    return bus.last_drain


# -- sources of cancellation -------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """What reached the caller."""

    returned_normally: bool
    error: BaseException | None  # what the source's construct raised to the test
    task_cancelled: bool = False


Source = Callable[[Callable[[], Awaitable[Any]], Callable[[], Awaitable[None]]], Awaitable[Outcome]]


async def native_cancel(
    call: Callable[[], Awaitable[Any]], wait: Callable[[], Awaitable[None]]
) -> Outcome:
    returned = False

    async def caller() -> None:
        nonlocal returned
        await call()
        returned = True

    task = asyncio.ensure_future(caller())
    await asyncio.sleep(0)  # the caller begins before anything is cancelled
    await wait()
    task.cancel()
    await asyncio.wait([task])
    error = None if task.cancelled() else task.exception()
    return Outcome(returned, error, task_cancelled=task.cancelled())


async def asyncio_timeout(
    call: Callable[[], Awaitable[Any]], wait: Callable[[], Awaitable[None]]
) -> Outcome:
    returned = False

    async def expire(expiring: asyncio.Timeout) -> None:
        await wait()
        expiring.reschedule(asyncio.get_running_loop().time())

    async def caller() -> None:
        nonlocal returned
        async with asyncio.timeout(None) as timeout:
            expiry = asyncio.ensure_future(expire(timeout))
            try:
                await call()
                returned = True
            finally:
                expiry.cancel()

    return await _outcome(caller, lambda: returned)


def _anyio_scope(fail: bool) -> Source:
    async def source(
        call: Callable[[], Awaitable[Any]], wait: Callable[[], Awaitable[None]]
    ) -> Outcome:
        scopes: list[anyio.CancelScope] = []
        reached: list[BaseException] = []
        returned = False

        async def caller() -> None:
            nonlocal returned
            try:
                with anyio.fail_after(None) if fail else anyio.move_on_after(None) as scope:
                    scopes.append(scope)
                    await call()
                    returned = True
            except BaseException as exc:  # what reached the caller is the point
                reached.append(exc)

        async with anyio.create_task_group() as tg:
            tg.start_soon(caller)
            await wait()
            await until(lambda: bool(scopes))
            scopes[0].deadline = anyio.current_time()
        return Outcome(returned, reached[0] if reached else None)

    return source


async def failing_sibling(
    call: Callable[[], Awaitable[Any]], wait: Callable[[], Awaitable[None]]
) -> Outcome:
    returned = False

    async def caller() -> None:
        nonlocal returned
        async with anyio.create_task_group() as tg:

            async def sibling() -> None:
                await wait()
                raise Boom

            tg.start_soon(sibling)
            await call()
            returned = True

    return await _outcome(caller, lambda: returned)


async def _outcome(caller: Callable[[], Awaitable[None]], returned: Callable[[], bool]) -> Outcome:
    try:
        await caller()
    except BaseException as exc:  # whatever reached the caller is the point
        return Outcome(returned(), exc)
    return Outcome(returned(), None)


SOURCES: dict[str, tuple[Source, tuple[str, ...]]] = {
    "task.cancel()": (native_cancel, ("asyncio",)),
    "asyncio.timeout": (asyncio_timeout, ("asyncio",)),
    "anyio.move_on_after": (_anyio_scope(fail=False), ("asyncio", "trio")),
    "anyio.fail_after": (_anyio_scope(fail=True), ("asyncio", "trio")),
    "failing sibling": (failing_sibling, ("asyncio", "trio")),
}


def _cells() -> list[Any]:
    return [
        pytest.param(name, shape, mode, backend, id=f"{backend}-{name}-{shape.name}-{mode}")
        for name, (_, backends) in SOURCES.items()
        for backend in backends
        for shape in SHAPES
        for mode in ("emit", "publish")
    ]


async def until(condition: Callable[[], bool]) -> None:
    """Wait for what handlers (sync ones in threads too) report: polled, so any thread may."""
    while not condition():  # noqa: ASYNC110  (an anyio.Event cannot be set from any thread)
        await anyio.sleep(0.001)


# -- the three properties ---------------------------------------------------------------------


def assert_reached_as_intended(source: str, shape: Shape, outcome: Outcome) -> None:
    """(a): the source's own outcome, or the handler's BaseException instead."""
    assert not outcome.returned_normally, "the caller went on as if nothing was cancelled"
    error = outcome.error
    if shape.fatal:
        if source == "failing sibling":
            assert isinstance(error, BaseExceptionGroup)
            assert {type(e) for e in error.exceptions} == {Boom, Fatal}, error.exceptions
        else:
            assert isinstance(error, Fatal), repr(error)
        return
    if source == "task.cancel()":
        assert outcome.task_cancelled, f"the task ended with {error!r}, not cancelled"
    elif source in ("asyncio.timeout", "anyio.fail_after"):
        assert isinstance(error, TimeoutError), repr(error)
    elif source == "anyio.move_on_after":
        assert error is None, repr(error)  # absorbed by its own scope
    else:
        assert isinstance(error, BaseExceptionGroup), repr(error)
        assert [type(e) for e in error.exceptions] == [Boom], error.exceptions


async def assert_nothing_runs_after_return(probe: Probe) -> None:
    """(b): every handler that started had ended (its thread too) before the call returned."""
    await anyio.to_thread.run_sync(probe.threads_done.wait, 30)
    await anyio.sleep(0.05)  # anything still scheduled would log now
    assert probe.log[-1] == "returned", probe.log
    assert probe.ended == probe.started, probe.log
    assert probe.hook_finished == probe.hook_started


def assert_nothing_lost(report: Any, probe: Probe) -> None:
    """(c): each published event delivered to every handler, or reported undelivered."""
    assert report is not None, "the drain report is lost"
    undelivered = {job.number for job in report.undelivered}
    published = probe.published
    assert report.delivered + len(undelivered) >= published, report
    for number in range(published):
        # a delivered event ran every handler that can complete (none blocks forever)
        assert number in undelivered or report.delivered >= published, (number, report)


@pytest.mark.parametrize(("source_name", "shape", "mode", "anyio_backend"), _cells())
async def test_cancellation_reaches_the_caller_and_nothing_is_lost(
    source_name: str, shape: Shape, mode: str, anyio_backend: str
) -> None:
    probe = Probe()
    probe.threads_done.set()
    bus = shape.bus(probe)
    deliver = by_emit if mode == "emit" else by_publish
    expected = shape.blocking()  # the cancellation comes once so many handlers run

    async def wait_until_running() -> None:
        await until(lambda: probe.started >= expected)

    report: list[Any] = []

    async def call() -> None:
        try:
            report.append(await deliver(bus, probe, anyio.Event()))
        finally:
            probe.log.append("returned")
            if mode == "publish":
                report.append(bus.last_drain)

    source, _ = SOURCES[source_name]
    outcome = await source(call, wait_until_running)
    if mode == "emit" and not shape.kinds:
        assert outcome.returned_normally  # nothing to wait for: it returned before the cancel
    else:
        assert_reached_as_intended(source_name, shape, outcome)
    await assert_nothing_runs_after_return(probe)
    if mode == "publish" and shape.kinds:
        assert_nothing_lost(report[-1], probe)


# -- batches ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sleep", "sync"])
@pytest.mark.parametrize("source_name", ["anyio.move_on_after", "failing sibling"])
async def test_a_cancelled_owner_still_flushes_its_batches_or_reports_them(
    kind: str, source_name: str
) -> None:
    probe = Probe()
    probe.threads_done.set()
    bus = EventBus(drain_timeout=DRAIN_SECONDS)
    handler = sleeping_batch(probe) if kind == "sleep" else sync_batch(probe)
    bus.subscribe_batch(Job, handler, max_size=100, max_wait=30)

    published: list[int] = []  # a cancellation may land while they are published

    async def call() -> None:
        try:
            async with bus:
                for number in range(5):
                    await bus.publish(Job(number))
                    published.append(number)
                await anyio.sleep(30)
        finally:
            probe.log.append("returned")

    async def at_once() -> None:
        await until(lambda: bus.running)

    source, _ = SOURCES[source_name]
    outcome = await source(call, at_once)
    assert_reached_as_intended(source_name, Shape("batch", (kind,)), outcome)
    await assert_nothing_runs_after_return(probe)
    report = bus.last_drain
    assert report is not None
    undelivered = cast(tuple[Job, ...], report.undelivered)
    accounted = {job.number for job in probe.completed} | {job.number for job in undelivered}
    assert accounted == set(published), (report, probe.completed)


@pytest.mark.parametrize(
    ("source_name", "anyio_backend"),
    [(name, backend) for name, (_, backends) in SOURCES.items() for backend in backends],
)
async def test_a_retry_wait_does_not_outlive_its_emit(source_name: str) -> None:
    probe = Probe()
    probe.threads_done.set()
    bus = EventBus()
    retry = Retry(
        on=ConnectionError, attempts=1000, wait_initial=0.01, wait_max=0.01, wait_jitter=0
    )
    bus.subscribe(Job, flaky(probe), retry=retry)

    async def call() -> None:
        try:
            await bus.emit(Job(0))
        finally:
            probe.log.append("returned")

    async def after_two_attempts() -> None:
        await until(lambda: probe.started >= 2)

    source, _ = SOURCES[source_name]
    outcome = await source(call, after_two_attempts)
    assert_reached_as_intended(source_name, Shape("retry", ("sleep",)), outcome)
    await assert_nothing_runs_after_return(probe)
