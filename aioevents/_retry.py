"""Retries of a failing handler: exponential backoff with jitter, by stamina.

stamina (an optional extra, ``aioevents[retry]``) does the waiting, the jitter and the
instrumentation, on asyncio and trio; this module only runs the `Retry` policy and counts
attempts.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import anyio
import anyio.lowlevel

from ._policies import Retry
from ._subscription import Invoke

__all__ = ["TASKGROUP_LEAVES_COUNT", "attempts_of", "is_group", "with_retry"]

_ATTEMPTS = "_aioevents_attempts"


def with_retry(invoke: Invoke, retry: Retry) -> Invoke:
    """Wrap a subscription's call in stamina's retry loop, counting the attempts made."""
    try:
        import stamina
    except ImportError:  # pragma: no cover  (the dev environment always has it)
        raise ImportError(
            "retry=Retry(...) needs stamina: install the extra with pip install 'aioevents[retry]'"
        ) from None

    async def invoke_with_retry(event: Any) -> None:
        attempt_number, cancellations = 0, _cancellations()
        try:
            async for attempt in stamina.retry_context(
                on=retry.on,
                attempts=retry.attempts,
                timeout=None,
                wait_initial=retry.wait_initial,
                wait_max=retry.wait_max,
                wait_jitter=retry.wait_jitter,
            ):
                with attempt:
                    attempt_number = attempt.num
                    try:
                        await invoke(event)
                    except retry.on as exc:
                        await _no_retry_once_cancelled(cancellations, exc)
                        raise
        except Exception as exc:
            setattr(exc, _ATTEMPTS, attempt_number)
            raise

    return invoke_with_retry


def _cancellations() -> int:
    """The current asyncio task's pending cancellations (0 on trio)."""
    task = asyncio.current_task() if asyncio._get_running_loop() is not None else None
    return task.cancelling() if task is not None else 0


async def _no_retry_once_cancelled(before: int, failure: Exception) -> None:
    """Raise the cancellation that came while an attempt ran, instead of retrying.

    A handler may turn its cancellation into a retryable error (client libraries do):
    retrying would run the handler on after its emit was cancelled. anyio scopes (and trio)
    deliver theirs again at a checkpoint; asyncio's own are counted on the task, except after
    a failed asyncio.TaskGroup on Python 3.11 and 3.12, which leaves its own count behind.
    """
    await anyio.lowlevel.checkpoint_if_cancelled()
    if _cancellations() > before and not (TASKGROUP_LEAVES_COUNT and is_group(failure)):
        raise asyncio.CancelledError


# On Python 3.11 and 3.12 an asyncio.TaskGroup whose child failed cancels the task it runs in
# and leaves that task's count of pending cancellations raised (fixed in 3.13): after its
# ExceptionGroup a raised count is not somebody else's cancellation. Read by the bus too.
TASKGROUP_LEAVES_COUNT = sys.version_info < (3, 13)


def is_group(exc: BaseException) -> bool:
    return isinstance(exc, BaseExceptionGroup)


def attempts_of(exc: BaseException) -> int:
    """How many attempts a handler made before failing with ``exc`` (1 without retries)."""
    return int(getattr(exc, _ATTEMPTS, 1))
