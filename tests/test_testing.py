from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest

from aioevents import EventBus, SubscriptionError
from aioevents.testing import capture, muted
from tests.events import AppEvent, AppWasCreated, TenantWasCreated

pytestmark = pytest.mark.anyio


async def test_capture_records_every_event_emitted_in_the_block() -> None:
    bus = EventBus()
    await bus.emit(TenantWasCreated(tenant_id="before"))
    with capture(bus) as events:
        await bus.emit(AppWasCreated(app_id="a1"))
        await bus.emit(TenantWasCreated(tenant_id="t1"))
        await bus.emit(AppWasCreated(app_id="a2"))
    await bus.emit(TenantWasCreated(tenant_id="after"))

    assert list(events) == [
        AppWasCreated(app_id="a1"),
        TenantWasCreated(tenant_id="t1"),
        AppWasCreated(app_id="a2"),
    ]
    assert len(events) == 3 and events[1] == TenantWasCreated(tenant_id="t1")
    assert events.of_type(AppEvent) == [AppWasCreated(app_id="a1"), AppWasCreated(app_id="a2")]
    assert events.assert_emitted(AppWasCreated, count=2) == AppWasCreated(app_id="a2")
    assert events.assert_emitted(AppWasCreated, app_id="a1") == AppWasCreated(app_id="a1")
    events.assert_not_emitted(TenantWasCreated, tenant_id="after")
    assert "CapturedEvents([" in repr(events)


async def test_capture_assertions_fail_with_what_was_emitted() -> None:
    bus = EventBus()
    with capture(bus) as events:
        await bus.emit(AppWasCreated(app_id="a1"))
    with pytest.raises(AssertionError, match=r"expected a TenantWasCreated event, got \[AppWas"):
        events.assert_emitted(TenantWasCreated)
    with pytest.raises(AssertionError, match=r"expected 2 AppWasCreated event with .* got 1"):
        events.assert_emitted(AppWasCreated, count=2, app_id="a1")
    with pytest.raises(
        AssertionError, match=re.escape("expected a AppWasCreated event with {'app_id': 'x'}")
    ):
        events.assert_emitted(AppWasCreated, app_id="x")
    with pytest.raises(AssertionError, match="expected no AppWasCreated event"):
        events.assert_not_emitted(AppWasCreated)


async def test_handlers_still_run_under_capture() -> None:
    bus, seen = EventBus(), []

    @bus.on(AppWasCreated)
    async def handler(event: AppWasCreated) -> None:
        seen.append(event)

    with capture(bus):
        assert (await bus.emit(AppWasCreated())).handled == 1
    assert seen == [AppWasCreated()]


async def test_muted_handlers_do_not_run_within_the_block() -> None:
    bus, seen = EventBus(), []

    @bus.on(AppWasCreated)
    async def sends_mail(event: AppWasCreated) -> None:
        seen.append("mail")

    @bus.on(AppWasCreated)
    async def writes_row(event: AppWasCreated) -> None:
        seen.append("row")

    row_sub = bus.subscriptions[1]
    with muted(bus, sends_mail):
        assert (await bus.emit(AppWasCreated())).handled == 1
    with muted(bus, row_sub):
        await bus.emit(AppWasCreated())
    await bus.emit(AppWasCreated())
    assert seen == ["row", "mail", "mail", "row"]


async def test_muting_a_handler_that_is_not_subscribed_is_refused() -> None:
    bus, other = EventBus(), EventBus()

    async def stray(event: object) -> None: ...

    foreign = other.subscribe(AppWasCreated, stray)
    with pytest.raises(SubscriptionError, match="is not subscribed on"), muted(bus, stray):
        pass
    with (
        pytest.raises(SubscriptionError, match="is not subscribed on this bus"),
        muted(bus, foreign),
    ):
        pass


@pytest.mark.parametrize("helper", [capture, muted], ids=["capture", "muted"])
def test_helpers_refuse_what_is_not_a_bus(
    helper: Callable[..., AbstractContextManager[object]],
) -> None:
    with pytest.raises(TypeError, match=rf"{helper.__name__}\(\) takes an EventBus, got 5"):
        helper(5)


def test_muted_refuses_what_is_neither_a_handler_nor_a_subscription() -> None:
    with pytest.raises(
        TypeError, match=r"muted\(\) takes handlers or subscriptions, got 'sends_mail'"
    ):
        muted(EventBus(), "sends_mail")  # type: ignore[arg-type]
