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

``heavy_bus`` is a worker of the heavy handlers, fed from streams on Redis (see `offload`):
``python -m aioevents worker examples.llm_platform.worker:heavy_bus``. It reads ``REDIS_URL``
(required: the streams), ``STREAMS_PREFIX`` (default `offload.STREAMS_PREFIX_DEFAULT`),
``DATABASE_URL`` and ``DATABASE_SCHEMA``, and ``HANDLED_LEDGER``, a file to write what it
handled to (`offload.FileLedger`; none if unset).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from aioevents import EventBus, Subscription
from aioevents.outbox import Delivery, current_delivery

from .app import LEASE, Platform, engine_and_cache_from_env, throttle_from_env, wire_platform
from .db import session_factory
from .deps import Deps
from .offload import STREAMS_PREFIX_DEFAULT, FileLedger, open_streams, worker_bus

# And ``bus`` and ``heavy_bus``, made on first access (see __getattr__).
__all__ = [
    "DELIVERY_LINE",
    "DeliveryLog",
    "LoggedDelivery",
    "heavy_bus_from_env",
    "parse_delivery_line",
]

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


def heavy_bus_from_env() -> EventBus:
    redis_url = os.environ.get("REDIS_URL")
    if not redis_url:
        raise SystemExit("a worker of the heavy handlers reads streams on Redis: set REDIS_URL")
    streams = open_streams(redis_url, os.environ.get("STREAMS_PREFIX") or STREAMS_PREFIX_DEFAULT)
    engine, cache = engine_and_cache_from_env()
    deps = Deps(session_factory(engine), cache, throttle_from_env())
    ledger = os.environ.get("HANDLED_LEDGER")
    bus, _ = worker_bus(deps, streams, ledger=FileLedger(Path(ledger)) if ledger else None)
    return bus


_platform: Platform | None = None
_heavy_bus: EventBus | None = None


def __getattr__(name: str) -> EventBus:
    """``bus`` and ``heavy_bus``, built from the environment on first access: importing the
    module (a test reading `DELIVERY_LINE`) needs no database."""
    global _platform, _heavy_bus
    if name == "bus":
        if _platform is None:
            _platform = platform_from_env()
        return _platform.bus
    if name == "heavy_bus":
        if _heavy_bus is None:
            _heavy_bus = heavy_bus_from_env()
        return _heavy_bus
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
