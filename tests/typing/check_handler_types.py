"""Checked by ``mypy --strict`` (nox -s typing), not run by pytest.

Lines marked ``# type: ignore[...]`` must fail type checking: strict mode reports an unused
ignore if the error ever disappears, so a regression in the decorator typing fails the check.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import assert_type

from aioevents import EventBus, Router, Subscription
from tests.events import AppEvent, AppWasCreated, TenantWasCreated

bus = EventBus()
router = Router()


@bus.on(AppWasCreated)
async def exact(event: AppWasCreated) -> None: ...


@bus.on(AppWasCreated)  # a handler for a base class takes the subclass's events too
async def for_base(event: AppEvent) -> None: ...


@bus.on(AppWasCreated, timeout=5.0)
def sync_handler(event: AppWasCreated) -> int:
    return 1


assert_type(sync_handler, Callable[[AppWasCreated], int])  # the function comes back unchanged


@bus.on(AppWasCreated)  # type: ignore[arg-type]
async def wrong_event(event: TenantWasCreated) -> None: ...


@bus.once(AppEvent)  # type: ignore[arg-type]
async def too_narrow(event: AppWasCreated) -> None: ...


@router.on(TenantWasCreated)  # type: ignore[arg-type]
async def wrong_in_router(event: AppWasCreated) -> None: ...


async def wrong_arity(event: AppWasCreated, extra: int) -> None: ...


subscription: Subscription = bus.subscribe(AppWasCreated, exact)
bus.subscribe(TenantWasCreated, exact)  # type: ignore[arg-type]
bus.subscribe(AppWasCreated, wrong_arity)  # type: ignore[arg-type]
