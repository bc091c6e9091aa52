"""How a handler is to be run: the plain policy records a subscription is made with.

They sit at the bottom of the package: checked when made (so a router fails where it records),
and read by the layers above that run handlers, batch events and retry failures.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._checks import check_flag, check_positive_int, check_seconds
from ._exceptions import ConfigurationError

__all__ = ["BatchPolicy", "Durable", "Options", "Retry", "durable_policy"]


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


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    """When to deliver to a batch handler: ``max_size`` events wait, or the oldest waited
    ``max_wait`` seconds."""

    max_size: int
    max_wait: float

    def __post_init__(self) -> None:
        check_positive_int("max_size", self.max_size)
        check_seconds("max_wait", self.max_wait)


@dataclass(frozen=True, slots=True, kw_only=True)
class Durable:
    """Deliver through the outbox: at least once, retried across processes until it succeeds.

    Events recorded with `aioevents.sqlalchemy.TransactionalEvents` (given an outbox) get one
    delivery row per durable handler, written in the recording transaction. A failed attempt
    is tried again after ``min(wait_max, wait_initial * 2 ** (n - 1)) + random(0, wait_jitter)``
    seconds; after ``max_attempts`` attempts the delivery is ``dead``, kept with its last
    error until an operator resubmits or discards it. ``durable=True`` means these defaults.

    >>> Durable(max_attempts=5)
    Durable(max_attempts=5, wait_initial=1.0, wait_max=300.0, wait_jitter=1.0)
    """

    max_attempts: int = 10
    wait_initial: float = 1.0
    wait_max: float = 300.0
    wait_jitter: float = 1.0

    def __post_init__(self) -> None:
        check_positive_int("max_attempts", self.max_attempts)
        for name in ("wait_initial", "wait_max", "wait_jitter"):
            check_seconds(name, getattr(self, name), zero=True)

    def wait(self, failures: int, jitter: float) -> float:
        """Seconds before the attempt after ``failures`` failures; ``jitter`` in [0, 1)."""
        exponent = min(failures - 1, 62)  # 2 ** 63 seconds is already far beyond any wait_max
        return min(self.wait_max, self.wait_initial * 2.0**exponent) + jitter * self.wait_jitter


def durable_policy(durable: object) -> Durable | None:
    """``durable=`` of a subscription as a policy: True is the defaults, False is none."""
    if durable is True:
        return Durable()
    if durable is False or durable is None:
        return None
    if isinstance(durable, Durable):
        return durable
    raise TypeError(f"durable must be a bool or a Durable(...), got {durable!r}")


@dataclass(frozen=True, slots=True, kw_only=True)
class Options:
    """How a handler is to be run; checked when made, so a router fails where it records."""

    timeout: float | None = None
    once: bool = False
    retry: Retry | None = None
    batch: BatchPolicy | None = None
    name: str | None = None  # the handler's qualified name unless given
    durable: Durable | None = None

    def __post_init__(self) -> None:
        check_seconds("timeout", self.timeout, none=True)
        check_flag("once", self.once)
        if self.durable is not None and (self.once or self.batch is not None):
            # A delivery row outlives the process: "once" and a batch in memory cannot.
            what = "once=True" if self.once else "a batch handler"
            raise ConfigurationError(f"{what} cannot be durable")
        if self.retry is not None and not isinstance(self.retry, Retry):
            raise TypeError(f"retry must be a Retry(...), got {self.retry!r}")
        if self.name is not None and (type(self.name) is not str or not self.name):
            raise TypeError(f"name must be a non-empty str, got {self.name!r}")
