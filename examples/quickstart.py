"""The smallest useful aioevents program: typed events, isolated handlers, a report."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import anyio

from aioevents import EventBus, event_name


@dataclass(frozen=True, slots=True, kw_only=True)
class AppWasCreated:
    app_id: str
    tenant_id: str


bus = EventBus()


@bus.on(AppWasCreated)
async def create_site(event: AppWasCreated) -> None:
    await anyio.sleep(0.01)  # stands in for a database write
    print(f"  site created for app {event.app_id}")


@bus.on(AppWasCreated, timeout=1.0)
def index_app(event: AppWasCreated) -> None:  # plain function: runs in a worker thread
    print(f"  app {event.app_id} indexed")


@bus.on(AppWasCreated)
async def notify_owner(event: AppWasCreated) -> None:
    raise ConnectionError("mail server unreachable")  # isolated: the others still run


async def main() -> int:
    event = AppWasCreated(app_id="app-1", tenant_id="tenant-1")
    print(f"emitting {event_name(event)}")
    result = await bus.emit(event)
    print(f"{result.handled} handlers ran, {len(result.errors)} failed:")
    for error in result.errors:
        print(f"  {error.handler_name}: {error.exception!r}")
    return 0 if result.handled == 3 and len(result.errors) == 1 else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.CRITICAL)  # the failure is shown in the report above
    raise SystemExit(anyio.run(main))
