"""The ``on`` and ``once`` decorators, shared by EventBus and Router."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from ._registry import check_event_type, check_timeout

__all__ = ["HandlerDecorators"]

E = TypeVar("E")
R = TypeVar("R")


class HandlerDecorators:
    """Decorators over ``_add_handler``, which the subclass defines (subscribe or record).

    The handler's parameter is typed with the event type, so that ``mypy --strict`` reports
    a handler for an unrelated event on the decorator line.
    """

    def _add_handler(
        self, event_type: type[Any], handler: Callable[[Any], object], *, timeout: Any, once: bool
    ) -> object:
        raise NotImplementedError

    def on(
        self, event_type: type[E], *, timeout: float | None = None, once: bool = False
    ) -> Callable[[Callable[[E], R]], Callable[[E], R]]:
        """Decorator: subscribe the function to ``event_type``; returns it unchanged."""
        check_event_type(event_type)  # refuse @bus.on without (EventType) right here
        check_timeout(timeout)

        def decorator(handler: Callable[[E], R]) -> Callable[[E], R]:
            self._add_handler(event_type, handler, timeout=timeout, once=once)
            return handler

        return decorator

    def once(
        self, event_type: type[E], *, timeout: float | None = None
    ) -> Callable[[Callable[[E], R]], Callable[[E], R]]:
        """Decorator: like ``on(event_type, once=True)``."""
        return self.on(event_type, timeout=timeout, once=True)
