"""Retries of a failing handler: exponential backoff with jitter, by stamina.

stamina (an optional extra, ``aioevents[retry]``) does the waiting, the jitter and the
instrumentation, on asyncio and trio; this module only runs the `Retry` policy and counts
attempts.
"""

from __future__ import annotations

import asyncio
from typing import Any

import anyio
import anyio.lowlevel

from ._cancelling import current_asyncio_task, left_by_a_task_group, pending_cancellations
from ._policies import Retry
from ._subscription import Invoke

__all__ = ["attempts_of", "with_retry"]

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
        attempt_number, cancellations = 0, pending_cancellations(current_asyncio_task())
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


async def _no_retry_once_cancelled(before: int, failure: Exception) -> None:
    """Raise the cancellation that came while an attempt ran, instead of retrying.

    A handler may turn its cancellation into a retryable error (client libraries do):
    retrying would run the handler on after its emit was cancelled. anyio scopes (and trio)
    deliver theirs again at a checkpoint; asyncio's own are counted on the task, except after
    a failed asyncio.TaskGroup on Python 3.11 and 3.12, which leaves its own count behind.
    """
    await anyio.lowlevel.checkpoint_if_cancelled()
    now = pending_cancellations(current_asyncio_task())
    if now > before and not left_by_a_task_group(failure):
        raise asyncio.CancelledError


def attempts_of(exc: BaseException) -> int:
    """How many attempts a handler made before failing with ``exc`` (1 without retries)."""
    return int(getattr(exc, _ATTEMPTS, 1))
