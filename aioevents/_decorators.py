"""``on``, ``once`` and ``on_batch``: the decorators shared by EventBus and Router."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from ._checks import check_event_type
from ._policies import BatchPolicy, Durable, Options, Retry, durable_policy

__all__ = ["HandlerDecorators"]

E = TypeVar("E")
R = TypeVar("R")


class HandlerDecorators:
    """Decorators over ``_add``, which the subclass defines (subscribe, or record).

    The handler's parameter is typed with the event type, so that ``mypy --strict`` reports
    a handler for an unrelated event on the decorator line.
    """

    def _add(
        self, event_type: type[Any], handler: Callable[[Any], object], options: Options
    ) -> Any:
        raise NotImplementedError

    def on(
        self,
        event_type: type[E],
        *,
        timeout: float | None = None,
        once: bool = False,
        retry: Retry | None = None,
        name: str | None = None,
        durable: bool | Durable = False,
    ) -> Callable[[Callable[[E], R]], Callable[[E], R]]:
        """Decorator: subscribe the function to ``event_type``; returns it unchanged.

        With ``durable`` (True, or a `Durable` policy) events recorded in a transaction reach
        it through the outbox, at least once; see `aioevents.outbox`.
        """
        check_event_type(event_type)  # refuse @bus.on without (EventType) right here
        options = Options(
            timeout=timeout, once=once, retry=retry, name=name, durable=durable_policy(durable)
        )

        def decorator(handler: Callable[[E], R]) -> Callable[[E], R]:
            self._add(event_type, handler, options)
            return handler

        return decorator

    def once(
        self, event_type: type[E], *, timeout: float | None = None, name: str | None = None
    ) -> Callable[[Callable[[E], R]], Callable[[E], R]]:
        """Decorator: like ``on(event_type, once=True)``."""
        return self.on(event_type, timeout=timeout, once=True, name=name)

    def on_batch(
        self,
        event_type: type[E],
        *,
        max_size: int = 100,
        max_wait: float = 1.0,
        timeout: float | None = None,
        retry: Retry | None = None,
        name: str | None = None,
    ) -> Callable[[Callable[[Sequence[E]], R]], Callable[[Sequence[E]], R]]:
        """Decorator: the function receives ``event_type`` events in batches (see `BatchPolicy`).

        A batch is delivered when ``max_size`` events wait or the oldest has waited
        ``max_wait`` seconds, and when the bus stops. Batches are collected while the bus
        runs (``async with bus:``), from both ``emit`` and ``publish``; on a bus that is not
        running, ``emit`` hands the handler a batch of one and waits for it.
        """
        check_event_type(event_type)
        batch = BatchPolicy(max_size, max_wait)
        options = Options(timeout=timeout, retry=retry, batch=batch, name=name)

        def decorator(handler: Callable[[Sequence[E]], R]) -> Callable[[Sequence[E]], R]:
            self._add(event_type, handler, options)
            return handler

        return decorator
