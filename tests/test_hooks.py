from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from aioevents import EventBus, HandlerCancelledError, Subscription, SubscriptionError
from aioevents._dispatch import run_guarded
from aioevents._streams_kit import until
from aioevents.sqlalchemy import TransactionalEvents
from aioevents.streams import MemoryStreams, Streams, consume
from tests.events import AppWasCreated
from tests.outbox_support import open_database, record

pytestmark = pytest.mark.anyio


@dataclass
class RecordingHook:
    calls: list[tuple[str, str, object]] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)

    def handler_started(self, event: object, subscription: Subscription) -> object:
        self.calls.append(("started", subscription.name.rsplit(".", 1)[-1], event))
        return f"token-{subscription.name}"

    def handler_finished(
        self,
        event: object,
        subscription: Subscription,
        *,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        assert token == f"token-{subscription.name}"
        self.calls.append(("finished", subscription.name.rsplit(".", 1)[-1], error))
        self.durations.append(duration)


async def sleepy(event: object) -> None:
    await anyio.sleep(0.05)


async def failing(event: object) -> None:
    raise ValueError("nope")


async def test_hooks_see_start_finish_duration_and_outcome() -> None:
    hook = RecordingHook()
    bus = EventBus(hooks=[hook])
    bus.subscribe(AppWasCreated, sleepy)
    await bus.emit(AppWasCreated())
    bus.subscribe(AppWasCreated, failing)
    result = await bus.emit(AppWasCreated())

    assert len(result.errors) == 1
    event = AppWasCreated()
    assert hook.calls[:2] == [("started", "sleepy", event), ("finished", "sleepy", None)]
    finished = {name: error for kind, name, error in hook.calls[2:] if kind == "finished"}
    assert finished["sleepy"] is None
    assert isinstance(finished["failing"], ValueError)
    assert hook.durations[0] >= 0.04


async def test_hooks_see_a_cancellation() -> None:
    hook = RecordingHook()
    bus = EventBus(hooks=[hook])
    bus.subscribe(AppWasCreated, sleepy)
    with anyio.move_on_after(0.01):
        await bus.emit(AppWasCreated())
    [(kind, _, error)] = hook.calls[1:]
    assert kind == "finished" and isinstance(error, anyio.get_cancelled_exc_class())


@pytest.mark.parametrize("count", [1, 3], ids=["inline", "tasks"])
async def test_a_failing_hook_is_logged_and_does_not_fail_the_handler(
    count: int, caplog: pytest.LogCaptureFixture
) -> None:
    class BrokenHook(RecordingHook):
        def handler_started(self, event: object, subscription: Subscription) -> object:
            raise RuntimeError("metrics backend down")

        def handler_finished(self, event: object, subscription: Subscription, **_: object) -> None:
            self.calls.append(("finished", subscription.name, None))

    bus, ran = EventBus(), []
    bus.add_hook(BrokenHook())

    async def handler(event: AppWasCreated) -> None:
        ran.append(True)

    for _ in range(count):
        bus.subscribe(AppWasCreated, handler)
    with caplog.at_level(logging.ERROR, logger="aioevents"):
        result = await bus.emit(AppWasCreated())
    assert result.ok and ran == [True] * count
    message = "BrokenHook.handler_started failed; the handler is not affected"
    assert caplog.text.count(message) == count


def test_a_hook_without_the_hook_methods_is_refused() -> None:
    with pytest.raises(TypeError, match=r"a hook needs a handler_started\(\) method"):
        EventBus(hooks=[object()])  # type: ignore[list-item]
    with pytest.raises(TypeError, match=r"needs a handler_finished\(\) method"):
        EventBus().add_hook(type("Half", (), {"handler_started": print})())


async def test_removed_hooks_are_no_longer_called() -> None:
    hook, bus = RecordingHook(), EventBus()
    bus.subscribe(AppWasCreated, sleepy)
    bus.add_hook(hook)
    bus.remove_hook(hook)
    await bus.emit(AppWasCreated())
    assert hook.calls == []
    with pytest.raises(SubscriptionError, match="is not added to this bus"):
        bus.remove_hook(hook)


# -- the active switch --------------------------------------------------------------------------


@dataclass
class SwitchedHook(RecordingHook):
    """A recording hook with an ``active`` switch (off at first)."""

    active: bool = False


class CountedSwitch(RecordingHook):
    """A switch that counts how often the bus asks it."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    @property
    def active(self) -> bool:
        self.asked += 1
        return True


class Fatal(BaseException):
    pass


def names(hook: RecordingHook, kind: str = "started") -> list[str]:
    return [name for what, name, _ in hook.calls if what == kind]


async def quick(event: object) -> None:
    await anyio.lowlevel.checkpoint()


async def other(event: object) -> None:
    await anyio.lowlevel.checkpoint()


async def third(event: object) -> None:
    await anyio.lowlevel.checkpoint()


HANDLERS = [quick, other, third]


@pytest.mark.parametrize("count", [1, 3], ids=["inline", "tasks"])
async def test_an_inactive_hook_is_not_called_and_handlers_run_the_plain_path(count: int) -> None:
    hook = SwitchedHook()
    bus = EventBus(hooks=[hook])
    for handler in HANDLERS[:count]:
        bus.subscribe(AppWasCreated, handler)
    bus.subscribe(AppWasCreated, failing)

    result = await bus.emit(AppWasCreated())

    assert hook.calls == []
    assert result.handled == count + 1 and len(result.errors) == 1
    assert bus._guarded is run_guarded  # the runner of a bus without hooks


@pytest.mark.parametrize("count", [1, 3], ids=["inline", "tasks"])
async def test_a_hook_switched_on_is_called_from_the_next_emit_and_off_again(count: int) -> None:
    hook, bus = SwitchedHook(), EventBus()
    bus.add_hook(hook)
    for handler in HANDLERS[:count]:
        bus.subscribe(AppWasCreated, handler)
    await bus.emit(AppWasCreated())
    hook.active = True
    await bus.emit(AppWasCreated())
    hook.active = False
    await bus.emit(AppWasCreated())

    expected = [handler.__name__ for handler in HANDLERS[:count]]
    assert names(hook) == expected  # started in order; trio may finish them in any
    assert sorted(names(hook, "finished")) == sorted(expected)


async def test_the_switch_is_asked_once_per_emit_whatever_the_number_of_handlers() -> None:
    hook = CountedSwitch()
    bus = EventBus(hooks=[hook])
    for handler in HANDLERS:
        bus.subscribe(AppWasCreated, handler)
    asked = hook.asked  # adding the hook looked at it once
    await bus.emit(AppWasCreated())
    await bus.emit(AppWasCreated())
    assert hook.asked - asked == 2
    assert len(names(hook)) == 6


async def test_of_several_hooks_the_active_ones_are_called_each_with_its_own_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class FailsAtTheEnd(RecordingHook):
        def handler_finished(self, event: object, subscription: Subscription, **_: object) -> None:
            raise RuntimeError("exporter down")

    always, off, on, broken = (
        RecordingHook(),
        SwitchedHook(),
        SwitchedHook(active=True),
        FailsAtTheEnd(),
    )
    bus = EventBus(hooks=[always, off, on, broken])
    bus.subscribe(AppWasCreated, quick)
    bus.subscribe(AppWasCreated, other)

    with caplog.at_level(logging.ERROR, logger="aioevents"):
        result = await bus.emit(AppWasCreated())

    assert result.ok
    assert sorted(names(always, "finished")) == sorted(names(on, "finished")) == ["other", "quick"]
    assert names(broken) == ["quick", "other"] and names(broken, "finished") == []
    assert off.calls == []
    assert caplog.text.count("FailsAtTheEnd.handler_finished failed") == 2


@pytest.mark.parametrize("count", [1, 3], ids=["inline", "tasks"])
async def test_a_failing_handler_finished_is_logged_and_the_emit_goes_on(
    count: int, caplog: pytest.LogCaptureFixture
) -> None:
    class FailsAtTheEnd(RecordingHook):
        def handler_finished(self, event: object, subscription: Subscription, **_: object) -> None:
            raise RuntimeError("exporter down")

    bus = EventBus(hooks=[FailsAtTheEnd()])
    for handler in HANDLERS[:count]:
        bus.subscribe(AppWasCreated, handler)
    with caplog.at_level(logging.ERROR, logger="aioevents"):
        result = await bus.emit(AppWasCreated())
    assert result.ok and result.handled == count
    assert caplog.text.count("FailsAtTheEnd.handler_finished failed") == count


@pytest.mark.parametrize("count", [1, 3], ids=["inline", "tasks"])
async def test_a_hook_sees_a_base_exception_that_the_emitter_then_raises(count: int) -> None:
    hook = RecordingHook()
    bus = EventBus(hooks=[hook])

    async def fatal(event: object) -> None:
        raise Fatal

    bus.subscribe(AppWasCreated, fatal)
    for handler in HANDLERS[: count - 1]:
        bus.subscribe(AppWasCreated, handler)

    with pytest.raises(Fatal):
        await bus.emit(AppWasCreated())

    # Every handler that started was seen to finish (on trio the others may be cancelled
    # before their turn to start).
    finished = {name: error for kind, name, error in hook.calls if kind == "finished"}
    assert isinstance(finished["fatal"], Fatal)
    assert sorted(finished) == sorted(names(hook))


@pytest.mark.parametrize("count", [1, 3], ids=["inline", "tasks"])
async def test_a_base_exception_from_handler_started_is_raised_by_the_emitter(count: int) -> None:
    class Interrupting(RecordingHook):
        def handler_started(self, event: object, subscription: Subscription) -> object:
            if subscription.name.endswith("quick"):
                raise Fatal
            return super().handler_started(event, subscription)

    hook = Interrupting()
    bus = EventBus(hooks=[hook])
    for handler in HANDLERS[:count]:
        bus.subscribe(AppWasCreated, handler)
    with pytest.raises(Fatal):
        await bus.emit(AppWasCreated())
    assert "quick" not in names(hook, "finished")  # its handler never ran


async def test_a_switch_that_fails_is_logged_and_its_hook_called(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unsure(RecordingHook):
        broken = False

        @property
        def active(self) -> bool:
            if self.broken:
                raise RuntimeError("cannot tell")
            return False

    hook, bus = Unsure(), EventBus()
    bus.add_hook(hook)
    bus.subscribe(AppWasCreated, quick)
    hook.broken = True
    with caplog.at_level(logging.ERROR, logger="aioevents"):
        assert (await bus.emit(AppWasCreated())).ok
    assert names(hook) == ["quick"]
    assert "reading its active failed" in caplog.text


def test_a_switch_that_is_not_a_bool_is_refused() -> None:
    class Vague(RecordingHook):
        active = "yes"

    with pytest.raises(TypeError, match=r"Vague.active must be a bool .* got 'yes'"):
        EventBus(hooks=[Vague()])
    with pytest.raises(TypeError, match=r"Vague.active must be a bool"):
        EventBus().add_hook(Vague())


async def test_with_a_limit_and_no_hook_active_the_limit_still_holds() -> None:
    hook, steps = SwitchedHook(), list[str]()
    bus = EventBus(hooks=[hook], max_concurrency=1)

    def stepping(name: str) -> Callable[[object], Awaitable[None]]:
        async def handler(event: object) -> None:
            steps.append(f"{name} in")
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            steps.append(f"{name} out")

        return handler

    bus.subscribe(AppWasCreated, stepping("a"))
    bus.subscribe(AppWasCreated, stepping("b"))
    await bus.emit(AppWasCreated())
    assert steps == ["a in", "a out", "b in", "b out"]
    assert hook.calls == []


async def test_background_delivery_and_batches_honour_the_switch() -> None:
    hook = SwitchedHook()
    bus = EventBus(hooks=[hook])
    bus.subscribe(AppWasCreated, quick)

    @bus.on_batch(AppWasCreated, max_size=1)
    async def bulk(events: Sequence[AppWasCreated]) -> None: ...

    async with bus:
        await bus.publish(AppWasCreated(app_id="off"))
    hook.active = True
    async with bus:
        await bus.publish(AppWasCreated(app_id="on"))

    assert sorted(names(hook)) == ["bulk", "quick"]
    seen = [event for kind, _, event in hook.calls if kind == "started"]
    assert AppWasCreated(app_id="on") in seen and [AppWasCreated(app_id="on")] in seen
    assert AppWasCreated(app_id="off") not in seen


async def test_a_stream_consumer_honours_the_switch() -> None:
    hook, handled = SwitchedHook(), list[str]()
    streams = Streams(MemoryStreams(), prefix="hooks")
    bus = EventBus(hooks=[hook])

    @bus.on(AppWasCreated, name="on-app")
    async def on_app(event: AppWasCreated) -> None:
        handled.append(event.app_id)

    consume(bus, AppWasCreated, streams=streams, wait_initial=0.01, wait_max=0.05)
    async with bus:
        await streams.publish(AppWasCreated(app_id="off"))
        await until(lambda: handled == ["off"], "the first entry handled")
        hook.active = True
        await streams.publish(AppWasCreated(app_id="on"))
        await until(lambda: handled == ["off", "on"], "the second entry handled")

    assert hook.calls[0] == ("started", "on-app", AppWasCreated(app_id="on"))
    assert [kind for kind, _, _ in hook.calls] == ["started", "finished"]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # SQLAlchemy's asyncio engine
async def test_the_outbox_relay_honours_the_switch(tmp_path: Path) -> None:
    hook = SwitchedHook()
    bus = EventBus(hooks=[hook])

    @bus.on(AppWasCreated, durable=True, name="index")
    async def index(event: AppWasCreated) -> None: ...

    @bus.on(AppWasCreated, name="notify")
    async def notify(event: AppWasCreated) -> None: ...

    async with open_database("sqlite", f"sqlite+aiosqlite:///{tmp_path / 'o.db'}") as db:
        events = TransactionalEvents(bus, outbox=db.outbox)
        async with bus:
            await record(db, events, AppWasCreated(app_id="off"))
            await db.wait_for_statuses({"completed": 1})
            hook.active = True
            await record(db, events, AppWasCreated(app_id="on"))
            await db.wait_for_statuses({"completed": 2})

    assert sorted(names(hook, "finished")) == ["index", "notify"]
    on = AppWasCreated(app_id="on")
    assert [event for kind, _, event in hook.calls if kind == "started"] == [on, on]


async def test_of_several_hooks_one_failing_at_the_start_leaves_the_others_their_tokens(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class FailsAtTheStart(RecordingHook):
        def handler_started(self, event: object, subscription: Subscription) -> object:
            raise RuntimeError("exporter down")

        def handler_finished(
            self, event: object, subscription: Subscription, **seen: object
        ) -> None:
            self.calls.append(("finished", subscription.name.rsplit(".", 1)[-1], seen["token"]))

    broken, working = FailsAtTheStart(), RecordingHook()  # working checks its own tokens
    bus = EventBus(hooks=[broken, working])
    bus.subscribe(AppWasCreated, quick)
    with caplog.at_level(logging.ERROR, logger="aioevents"):
        assert (await bus.emit(AppWasCreated())).ok
    assert broken.calls == [("finished", "quick", None)]
    assert names(working, "finished") == ["quick"]
    assert "FailsAtTheStart.handler_started failed" in caplog.text


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize("count", [1, 3], ids=["inline", "tasks"])
async def test_a_hook_sees_a_cancellation_its_handler_died_of_that_no_one_asked_for(
    count: int,
) -> None:
    hook = RecordingHook()
    bus = EventBus(hooks=[hook])

    async def awaits_a_cancelled_future(event: object) -> None:
        shared = asyncio.get_running_loop().create_future()
        shared.cancel()  # say, a shared request that another task gave up on
        await shared

    for _ in range(count):
        bus.subscribe(AppWasCreated, awaits_a_cancelled_future)
    result = await bus.emit(AppWasCreated())
    assert [type(error.exception) for error in result.errors] == [HandlerCancelledError] * count
    errors = [error for kind, _, error in hook.calls if kind == "finished"]
    assert len(errors) == count
    assert all(isinstance(error, asyncio.CancelledError) for error in errors)
