"""The ``on``, ``once`` and ``on_batch`` decorators, shared by EventBus and Router."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._background import BatchPolicy
from ._checks import check_event_type, check_seconds
from ._retry import Retry

__all__ = ["HandlerDecorators"]

E = TypeVar("E")
R = TypeVar("R")


class HandlerDecorators:
    """Decorators over ``_add_handler``, which the subclass defines (subscribe or record).

    The handler's parameter is typed with the event type, so that ``mypy --strict`` reports
    a handler for an unrelated event on the decorator line.
    """

    def _add_handler(
        self,
        event_type: type[Any],
        handler: Callable[[Any], object],
        *,
        timeout: float | None,
        once: bool,
        retry: Retry | None,
        batch: BatchPolicy | None,
    ) -> object:
        raise NotImplementedError

    def on(
        self,
        event_type: type[E],
        *,
        timeout: float | None = None,
        once: bool = False,
        retry: Retry | None = None,
    ) -> Callable[[Callable[[E], R]], Callable[[E], R]]:
        """Decorator: subscribe the function to ``event_type``; returns it unchanged."""
        check_event_type(event_type)  # refuse @bus.on without (EventType) right here
        check_seconds("timeout", timeout, none=True)

        def decorator(handler: Callable[[E], R]) -> Callable[[E], R]:
            self._add_handler(
                event_type, handler, timeout=timeout, once=once, retry=retry, batch=None
            )
            return handler

        return decorator

    def once(
        self, event_type: type[E], *, timeout: float | None = None
    ) -> Callable[[Callable[[E], R]], Callable[[E], R]]:
        """Decorator: like ``on(event_type, once=True)``."""
        return self.on(event_type, timeout=timeout, once=True)

    def on_batch(
        self,
        event_type: type[E],
        *,
        max_size: int = 100,
        max_wait: float = 1.0,
        timeout: float | None = None,
        retry: Retry | None = None,
    ) -> Callable[[Callable[[Sequence[E]], R]], Callable[[Sequence[E]], R]]:
        """Decorator: the function receives ``event_type`` events in batches (see `BatchPolicy`).

        A batch is delivered when ``max_size`` events wait or the oldest has waited
        ``max_wait`` seconds, and when the bus stops. Batches are collected only while the
        bus runs (``async with bus:``), from both ``emit`` and ``publish``.
        """
        check_event_type(event_type)
        policy = BatchPolicy(max_size, max_wait)

        def decorator(handler: Callable[[Sequence[E]], R]) -> Callable[[Sequence[E]], R]:
            self._add_handler(
                event_type, handler, timeout=timeout, once=False, retry=retry, batch=policy
            )
            return handler

        return decorator
