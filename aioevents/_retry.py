"""Retries of a failing handler: exponential backoff with jitter, by stamina.

stamina (an optional extra, ``aioevents[retry]``) does the waiting, the jitter and the
instrumentation, on asyncio and trio; this module only carries the policy and counts attempts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._checks import check_positive_int, check_seconds

if TYPE_CHECKING:
    from ._dispatch import Invoke

__all__ = ["Retry", "attempts_of", "with_retry"]

_ATTEMPTS = "_aioevents_attempts"


@dataclass(frozen=True, slots=True, kw_only=True)
class Retry:
    """Retry a handler on the given exception types, waiting longer after each failure.

    The n-th retry waits ``min(wait_max, wait_initial * 2 ** (n - 1)) + random(0, wait_jitter)``
    seconds; after ``attempts`` attempts (the first included) the last failure is reported
    once, with the attempt count in `HandlerError.attempts`. A subscription's ``timeout``
    applies to each attempt. Needs the ``retry`` extra (stamina).

    >>> Retry(on=ConnectionError, attempts=5)
    Retry(on=<class 'ConnectionError'>, attempts=5, wait_initial=0.1, wait_max=5.0, wait_jitter=1.0)
    """

    on: type[Exception] | tuple[type[Exception], ...]
    attempts: int = 3
    wait_initial: float = 0.1
    wait_max: float = 5.0
    wait_jitter: float = 1.0

    def __post_init__(self) -> None:
        _check_exception_types(self.on)
        check_positive_int("attempts", self.attempts)
        for name in ("wait_initial", "wait_max", "wait_jitter"):
            check_seconds(name, getattr(self, name), zero=True)


def _check_exception_types(on: object) -> None:
    kinds = on if isinstance(on, tuple) else (on,)
    if not kinds or not all(isinstance(k, type) and issubclass(k, Exception) for k in kinds):
        raise TypeError(f"Retry(on=...) takes Exception types, got {on!r}")


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
