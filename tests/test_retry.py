"""Retries with backoff for handlers that ask for them (asyncio and trio)."""

from __future__ import annotations

import itertools

import anyio
import pytest

from aioevents import ConfigurationError, EventBus, Retry, Router
from tests.events import AppWasCreated

pytestmark = pytest.mark.anyio


def quick(
    on: type[Exception] | tuple[type[Exception], ...], attempts: int = 3, wait: float = 0.02
) -> Retry:
    """Short waits without jitter, so delays can be compared."""
    return Retry(on=on, attempts=attempts, wait_initial=wait, wait_max=5.0, wait_jitter=0.0)


async def test_a_handler_that_keeps_failing_is_retried_with_growing_delays() -> None:
    bus, attempts_at = EventBus(), list[float]()

    @bus.on(AppWasCreated, retry=quick(ConnectionError, attempts=4, wait=0.05))
    async def flaky(event: AppWasCreated) -> None:
        attempts_at.append(anyio.current_time())
        raise ConnectionError("refused")

    [error] = (await bus.emit(AppWasCreated())).errors
    assert len(attempts_at) == 4
    assert error.attempts == 4 and isinstance(error.exception, ConnectionError)
    delays = [later - earlier for earlier, later in itertools.pairwise(attempts_at)]
    assert delays[0] >= 0.045
    assert delays[0] < delays[1] < delays[2], delays


async def test_a_handler_that_recovers_succeeds() -> None:
    bus, calls = EventBus(), list[int]()

    @bus.on(AppWasCreated, retry=quick((ConnectionError, TimeoutError)))
    async def recovers(event: AppWasCreated) -> None:
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError

    assert (await bus.emit(AppWasCreated())).ok
    assert len(calls) == 3


async def test_other_exceptions_are_not_retried() -> None:
    bus, calls = EventBus(), list[int]()

    @bus.on(AppWasCreated, retry=quick(ConnectionError))
    async def buggy(event: AppWasCreated) -> None:
        calls.append(1)
        raise KeyError("bug")

    [error] = (await bus.emit(AppWasCreated())).errors
    assert calls == [1] and error.attempts == 1


async def test_the_timeout_applies_to_each_attempt() -> None:
    bus, calls = EventBus(), list[int]()

    @bus.on(AppWasCreated, timeout=0.05, retry=quick(TimeoutError, attempts=2))
    async def slow_once(event: AppWasCreated) -> None:
        calls.append(1)
        if len(calls) == 1:
            await anyio.sleep(10)

    assert (await bus.emit(AppWasCreated())).ok
    assert len(calls) == 2


async def test_sync_handlers_and_routers_take_retries_too() -> None:
    router, calls = Router(), list[int]()

    @router.on(AppWasCreated, retry=quick(OSError, attempts=2))
    def sync_flaky(event: AppWasCreated) -> None:
        calls.append(1)
        raise OSError("disk")

    bus = EventBus()
    bus.include(router)
    [error] = (await bus.emit(AppWasCreated())).errors
    assert error.attempts == 2 and len(calls) == 2


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"on": ValueError, "attempts": 0}, ConfigurationError, "attempts must be an int >= 1"),
        ({"on": ValueError, "wait_initial": -1}, ConfigurationError, "wait_initial must be"),
        ({"on": KeyboardInterrupt}, TypeError, "takes Exception types"),
        ({"on": ()}, TypeError, "takes Exception types"),
        ({"on": "ValueError"}, TypeError, "takes Exception types"),
    ],
)
def test_bad_retry_settings_are_refused(
    kwargs: dict[str, object], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Retry(**kwargs)  # type: ignore[arg-type]


def test_retry_must_be_a_retry() -> None:
    async def handler(event: object) -> None: ...

    with pytest.raises(TypeError, match=r"retry must be a Retry\(...\)"):
        EventBus().subscribe(AppWasCreated, handler, retry=3)  # type: ignore[arg-type]
