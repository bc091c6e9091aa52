from __future__ import annotations

import logging
from dataclasses import dataclass, field

import anyio
import pytest

from aioevents import EventBus, Subscription, SubscriptionError
from tests.events import AppWasCreated

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


async def test_a_failing_hook_is_logged_and_does_not_fail_the_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class BrokenHook(RecordingHook):
        def handler_started(self, event: object, subscription: Subscription) -> object:
            raise RuntimeError("metrics backend down")

        def handler_finished(self, event: object, subscription: Subscription, **_: object) -> None:
            self.calls.append(("finished", subscription.name, None))

    bus, ran = EventBus(), []
    bus.add_hook(BrokenHook())

    @bus.on(AppWasCreated)
    async def handler(event: AppWasCreated) -> None:
        ran.append(True)

    with caplog.at_level(logging.ERROR, logger="aioevents"):
        result = await bus.emit(AppWasCreated())
    assert result.ok and ran == [True]
    assert "BrokenHook.handler_started failed; the handler is not affected" in caplog.text


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
