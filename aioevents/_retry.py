"""Retries of a failing handler: exponential backoff with jitter, by stamina.

stamina (an optional extra, ``aioevents[retry]``) does the waiting, the jitter and the
instrumentation, on asyncio and trio; this module only runs the `Retry` policy and counts
attempts.
"""

from __future__ import annotations

from typing import Any

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
        attempt_number = 0
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
                    await invoke(event)
        except Exception as exc:
            setattr(exc, _ATTEMPTS, attempt_number)
            raise

    return invoke_with_retry


def attempts_of(exc: BaseException) -> int:
    """How many attempts a handler made before failing with ``exc`` (1 without retries)."""
    return int(getattr(exc, _ATTEMPTS, 1))
