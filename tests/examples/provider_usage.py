"""Helpers for the provider-usage tests, and the worker process the two-process test starts.

``python -m tests.examples.provider_usage URL SCHEMA REDIS_URL PREFIX SEED START COUNT`` emits
messages START .. START+COUNT-1 of SEED for the provider ``openai`` of `TENANT` from 8 tasks,
through the per-message handler on Redis and PostgreSQL, and prints a JSON line: how many
emits failed, how many ``last_used`` UPDATEs this process ran, and how its throttle answered
(claims granted by Redis, granted as fallbacks, denied as saturated).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

import anyio
from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

from aioevents import EmitResult, EventBus
from aioevents.throttle import Claim, RedisThrottle
from examples.llm_platform.cache import MemoryCache
from examples.llm_platform.db import create_engine, session_factory
from examples.llm_platform.deps import Deps
from examples.llm_platform.events import MessageWasCreated
from examples.llm_platform.handlers.update_provider_when_message_created import (
    UpdateProviderWhenMessageCreated,
)
from examples.llm_platform.throttling import PlatformThrottle

TENANT = "tenant-1"
PROVIDER = "openai"


def messages(
    seed: str,
    start: int,
    count: int,
    *,
    provider: str = PROVIDER,
    tenant: str = TENANT,
    model: str = "gpt-4o-mini",
) -> list[MessageWasCreated]:
    """Messages with ids derived from ``seed`` and their number: the same ones every time."""
    return [
        MessageWasCreated(
            message_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{seed}/{number}")),
            conversation_id="c",
            app_id="a",
            tenant_id=tenant,
            provider=provider,
            model=model,
            message_tokens=number % 7 + 1,
            answer_tokens=3,
        )
        for number in range(start, start + count)
    ]


def tokens(events: Sequence[MessageWasCreated]) -> int:
    return sum(event.message_tokens + event.answer_tokens for event in events)


class StatementCounter:
    """Counts what an engine runs: all statements, UPDATEs of providers, and by what they set."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self.statements = 0
        self.updates = 0
        self.quota_updates = 0
        self.last_used: list[float] = []  # when each last_used UPDATE ran (time.monotonic)
        event.listen(engine.sync_engine, "before_cursor_execute", self._count)

    def close(self) -> None:
        event.remove(self.engine.sync_engine, "before_cursor_execute", self._count)

    def _count(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.statements += 1
        if not statement.startswith("UPDATE providers SET"):
            return
        self.updates += 1
        if "last_used=" in statement:  # alone, or with the quota in one statement
            self.last_used.append(time.monotonic())
        if "quota_used=" in statement:
            self.quota_updates += 1


async def emit_concurrently(
    bus: EventBus, events: Sequence[object], *, tasks: int = 8
) -> list[EmitResult]:
    """Emit ``events`` from ``tasks`` concurrent tasks, each taking every tasks-th one."""
    results: list[EmitResult] = []

    async def emit_share(share: Sequence[object]) -> None:
        for one in share:
            results.append(await bus.emit(one))  # noqa: PERF401  (an await per event, in order)

    async with anyio.create_task_group() as task_group:
        for first in range(tasks):
            task_group.start_soon(emit_share, events[first::tasks])
    return results


class CountingThrottle(PlatformThrottle):
    """A `PlatformThrottle` that counts how its claims were answered."""

    def __init__(self, platform: PlatformThrottle) -> None:
        super().__init__(platform.throttle, platform._redis)
        self.granted = 0  # by Redis: at most one per key and window, whatever the load
        self.fallback_granted = 0  # without Redis: each of these may write too

    async def claim(self, key: str, window: float) -> Claim:
        claim = await super().claim(key, window)
        if claim.granted and claim.fallback:
            self.fallback_granted += 1
        elif claim.granted:
            self.granted += 1
        return claim

    @property
    def saturations(self) -> int:
        return self.throttle.saturations if isinstance(self.throttle, RedisThrottle) else 0

    @property
    def fallback_causes(self) -> dict[str, int]:
        redis = self.throttle if isinstance(self.throttle, RedisThrottle) else None
        return dict(redis.counter.causes) if redis is not None else {}


async def work(argv: Sequence[str]) -> dict[str, int]:
    url, schema, redis_url, prefix, seed, start, count = argv
    engine = create_engine(url, search_path=schema)
    counter = StatementCounter(engine)
    throttle = CountingThrottle(PlatformThrottle.redis(redis_url, prefix=prefix))
    try:
        deps = Deps(session_factory(engine), MemoryCache(), throttle)
        bus = EventBus()
        bus.subscribe(MessageWasCreated, UpdateProviderWhenMessageCreated(deps))
        results = await emit_concurrently(bus, messages(seed, int(start), int(count)))
    finally:
        await throttle.aclose()
        await engine.dispose()
    return {
        "emitted": len(results),
        "failed": sum(not result.ok for result in results),
        "last_used_writes": len(counter.last_used),
        "granted": throttle.granted,
        "fallback_granted": throttle.fallback_granted,
        "saturations": throttle.saturations,
        "timeouts": throttle.fallback_causes.pop("TimeoutError", 0),
        "other_fallbacks": sum(throttle.fallback_causes.values()),
    }


if __name__ == "__main__":
    print(json.dumps(anyio.run(work, sys.argv[1:])))
