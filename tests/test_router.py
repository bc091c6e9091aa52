from __future__ import annotations

from collections.abc import Sequence

import pytest

from aioevents import EventBus, Router, SubscriptionError
from tests.events import AppWasCreated, TenantWasCreated

pytestmark = pytest.mark.anyio


async def on_app(event: AppWasCreated) -> None: ...


async def on_tenant(event: TenantWasCreated) -> None: ...


async def no_argument() -> None: ...


def test_a_router_subscribes_nothing_until_included() -> None:
    router, bus = Router(), EventBus()
    router.on(AppWasCreated, timeout=2, name="apps")(on_app)
    router.add(TenantWasCreated, on_tenant, once=True)
    assert bus.subscriptions == ()

    subs = bus.include(router)
    assert [(sub.event_type, sub.handler, sub.timeout, sub.once) for sub in subs] == [
        (AppWasCreated, on_app, 2, False),
        (TenantWasCreated, on_tenant, None, True),
    ]
    assert [sub.name for sub in subs] == ["apps", f"{__name__}.on_tenant"]
    assert bus.subscriptions == subs


async def test_included_handlers_receive_events() -> None:
    router, bus, seen = Router(), EventBus(), []

    @router.on(AppWasCreated)
    async def record(event: AppWasCreated) -> None:
        seen.append(event)

    bus.include(router)
    await bus.emit(AppWasCreated())
    assert seen == [AppWasCreated()]


async def test_a_router_records_batch_handlers() -> None:
    router, batches = Router(), list[list[AppWasCreated]]()

    async def bulk(events: Sequence[AppWasCreated]) -> None:
        batches.append(list(events))

    router.add_batch(AppWasCreated, bulk, max_size=2, max_wait=5)
    bus = EventBus()
    [sub] = bus.include(router)
    assert sub.batch is not None and sub.batch.max_size == 2
    async with bus:
        await bus.emit(AppWasCreated(app_id="a"))
        await bus.emit(AppWasCreated(app_id="b"))
    assert batches == [[AppWasCreated(app_id="a"), AppWasCreated(app_id="b")]]


def test_routers_compose_in_order() -> None:
    apps, tenants = Router(), Router()
    apps.add(AppWasCreated, on_app)
    tenants.add(TenantWasCreated, on_tenant)
    combined = Router(apps, tenants)
    assert len(combined) == 2
    subs = EventBus().include(combined)
    assert [sub.handler for sub in subs] == [on_app, on_tenant]
    assert "handlers=2" in repr(combined)


def test_including_a_router_twice_in_one_bus_is_refused() -> None:
    router, bus = Router(), EventBus()
    router.add(AppWasCreated, on_app)
    bus.include(router)
    EventBus().include(router)  # another bus is fine
    with pytest.raises(SubscriptionError, match="already included"):
        bus.include(router)
    assert len(bus.subscriptions) == 1


def test_bad_input_is_refused_when_recorded() -> None:
    router = Router()
    with pytest.raises(TypeError, match="must be a class"):
        router.on(on_app)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="cannot take the event"):
        router.add(AppWasCreated, no_argument)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="add_router\\(\\) takes a Router"):
        router.add_router(EventBus())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="include\\(\\) takes a Router"):
        EventBus().include([on_app])  # type: ignore[arg-type]
