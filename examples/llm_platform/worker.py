"""A process that only delivers: ``python -m aioevents relay examples.llm_platform.worker:bus``.

``bus`` is the platform's bus wired from the environment as the demo and the web app wire
it (``DATABASE_URL``, by default the demo's SQLite file; ``DATABASE_SCHEMA``; ``REDIS_URL``),
built on first access. ``python -m aioevents relay`` runs it until SIGTERM or SIGINT: its
relay claims the due deliveries of the durable handlers, those a dead process left included,
once their lease has run out. The tables must exist: the demo or the web app creates them.

Two more variables, for the crash demo (`examples.llm_platform.crash`): ``OUTBOX_LEASE``,
seconds (default `app.LEASE`), and ``INDEXING_PAUSE``, seconds per document indexed
(default 0). Every delivery the process runs is logged, when it starts and when it ends
(`DeliveryLog`): that is how the crash demo sees which process ran what.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass

from aioevents import EventBus, Subscription
from aioevents.outbox import Delivery, current_delivery

from .app import LEASE, Platform, engine_and_cache_from_env, throttle_from_env, wire_platform

# And ``bus``, made on first access (see __getattr__).
__all__ = ["DELIVERY_LINE", "DeliveryLog", "LoggedDelivery", "parse_delivery_line"]

logger = logging.getLogger(__name__)

DELIVERY_LINE = re.compile(
    r"delivery (?P<id>\d+) of (?P<handler>\S+), attempt (?P<attempt>\d+) in pid (?P<pid>\d+): "
    r"(?P<outcome>started|completed|failed)"
)


@dataclass(frozen=True, slots=True)
class LoggedDelivery:
    """A line `DeliveryLog` wrote, read back."""

    id: int
    handler: str
    attempt: int
    pid: int
    outcome: str  # started, completed or failed


def parse_delivery_line(line: str) -> LoggedDelivery | None:
    found = DELIVERY_LINE.search(line)
    if found is None:
        return None
    return LoggedDelivery(
        int(found["id"]),
        found["handler"],
        int(found["attempt"]),
        int(found["pid"]),
        found["outcome"],
    )


class DeliveryLog:
    """A hook that logs each delivery a durable handler runs here: its start and its end.

    A process killed in the middle of a delivery logged its start and nothing after.
    """

    def handler_started(self, event: object, subscription: Subscription) -> object:
        delivery = current_delivery()
        if delivery is not None:
            logger.info("%s: started", _delivery_text(delivery))
        return delivery

    def handler_finished(
        self,
        event: object,
        subscription: Subscription,
        *,
        token: object,
        duration: float,
        error: BaseException | None,
    ) -> None:
        if not isinstance(token, Delivery):
            return
        if error is None:
            logger.info("%s: completed in %.2f s", _delivery_text(token), duration)
        else:
            logger.info("%s: failed after %.2f s: %r", _delivery_text(token), duration, error)


def _delivery_text(delivery: Delivery) -> str:
    return (
        f"delivery {delivery.id} of {delivery.handler}, attempt {delivery.attempt} "
        f"in pid {os.getpid()}"
    )


def platform_from_env() -> Platform:
    engine, cache = engine_and_cache_from_env()
    return wire_platform(
        engine,
        cache,
        throttle_from_env(),
        hooks=[DeliveryLog()],
        lease=float(os.environ.get("OUTBOX_LEASE") or LEASE),
        indexing_pause=float(os.environ.get("INDEXING_PAUSE") or 0.0),
    )


_platform: Platform | None = None


def __getattr__(name: str) -> EventBus:
    """``bus``, built from the environment on first access: importing the module (a test
    reading `DELIVERY_LINE`) needs no database."""
    global _platform
    if name != "bus":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _platform is None:
        _platform = platform_from_env()
    return _platform.bus
