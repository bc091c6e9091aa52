"""What one emit reports: the handlers that ran and the failures among them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ._subscription import Subscription

__all__ = ["EmitResult", "HandlerError"]


@dataclass(frozen=True, slots=True)
class HandlerError:
    """One handler's failure during an emit.

    A handler that overran its ``timeout`` is recorded with a `TimeoutError`; ``attempts``
    counts the tries of a handler subscribed with ``retry``.
    """

    handler_name: str
    exception: Exception
    event: object = field(default=None, kw_only=True, repr=False)
    subscription: Subscription | None = field(default=None, kw_only=True, repr=False)
    attempts: int = field(default=1, kw_only=True)


@dataclass(frozen=True, slots=True)
class EmitResult:
    """The report of one `EventBus.emit`.

    ``handlers`` names every handler that ran, in the order they started, failed ones
    included; ``errors`` holds the failures in the order they happened.
    """

    handlers: tuple[str, ...] = ()
    errors: Sequence[HandlerError] = ()

    @property
    def ok(self) -> bool:
        """True when no handler failed."""
        return not self.errors

    @property
    def handled(self) -> int:
        """How many handlers ran, failed ones included."""
        return len(self.handlers)
