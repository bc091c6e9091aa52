"""Command line: ``python -m aioevents relay module:bus`` and ``... worker module:bus``.

``relay`` imports the bus and runs it (``async with bus:``) until SIGTERM or SIGINT: its
outbox's relay delivers what is due to the bus's durable handlers, in a process of its own.
Stopping, it finishes what runs (within the outbox's ``drain_timeout``) and gives back what
it had claimed but not started.

``worker`` runs a bus whose handlers are fed from streams (`aioevents.streams.consume`, called
where the bus is made) the same way: it joins the consumer groups, handles entries until
SIGTERM or SIGINT, then reads no more, lets running handlers finish and acknowledges them
(within the consumer's ``drain_timeout``), and leaves its groups. Options override what the
module chose: ``--concurrency``, ``--handler`` (only these groups), ``--drain-timeout``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio

from ._bus import EventBus
from ._checks import check_positive_int, check_seconds

if TYPE_CHECKING:
    from ._streams import Consumer

logger = logging.getLogger("aioevents")


def load_bus(spec: str, *, needs: str = "outbox") -> EventBus:
    """The `EventBus` named ``module:attribute`` (a dotted attribute path is allowed)."""
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise SystemExit(f"expected module:bus, for example myapp.events:bus; got {spec!r}")
    sys.path.insert(0, "")  # as `python -m` does: the current directory's modules
    target: object = importlib.import_module(module_name)
    for part in attribute.split("."):
        target = getattr(target, part)
    if not isinstance(target, EventBus):
        raise SystemExit(f"{spec} is {target!r}, not an EventBus")
    if needs == "outbox" and not target._services:
        raise SystemExit(
            f"{spec} has no outbox: make it with TransactionalEvents(bus, outbox=Outbox(...))"
        )
    return target


async def relay(bus: EventBus) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with bus:
            names = ", ".join(bus.durable_handlers) or "none yet"
            logger.info("relay running; durable handlers: %s", names)
            async for received in signals:
                logger.info("relay stopping on %s", signal.Signals(received).name)
                return


async def worker(bus: EventBus, consumers: Sequence[Consumer]) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with bus:
            for consumer in consumers:
                groups = ", ".join(sorted({feed.group for feed in consumer._feeds})) or "none"
                logger.info("worker %s running; groups: %s", consumer.name, groups)
            async for received in signals:
                logger.info("worker stopping on %s", signal.Signals(received).name)
                return


def _consumers(bus: EventBus, spec: str, arguments: argparse.Namespace) -> list[Consumer]:
    """The bus's stream consumers, with the command line's overrides applied."""
    from ._streams import Consumer  # only here: the relay does not need msgspec

    found = [service() for service in bus._services]
    consumers = [consumer for consumer in found if isinstance(consumer, Consumer)]
    if not consumers:
        raise SystemExit(
            f"{spec} is fed from no streams: call aioevents.streams.consume(bus, ...) where "
            f"the bus is made"
        )
    for consumer in consumers:
        if arguments.concurrency is not None:
            check_positive_int("--concurrency", arguments.concurrency)
            consumer.concurrency = arguments.concurrency
        if arguments.drain_timeout is not None:
            check_seconds("--drain-timeout", arguments.drain_timeout, zero=True)
            consumer.drain_timeout = arguments.drain_timeout
        if arguments.handler:
            consumer.handlers = frozenset(arguments.handler)
            consumer._find_feeds()  # a name no handler has fails here, not in the run
    return consumers


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aioevents")
    commands = parser.add_subparsers(dest="command", required=True)
    relay_command = commands.add_parser("relay", help="deliver a bus's durable handlers")
    relay_command.add_argument("bus", help="module:attribute of the EventBus")
    worker_command = commands.add_parser("worker", help="feed a bus's handlers from streams")
    worker_command.add_argument("bus", help="module:attribute of the EventBus")
    worker_command.add_argument("--concurrency", type=int, help="handlers run at once")
    worker_command.add_argument(
        "--handler", action="append", help="join only this handler's groups (repeatable)"
    )
    worker_command.add_argument(
        "--drain-timeout", type=float, help="seconds running handlers get to finish on stop"
    )
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if arguments.command == "relay":
        anyio.run(relay, load_bus(arguments.bus))
        return
    bus = load_bus(arguments.bus, needs="streams")
    try:
        consumers = _consumers(bus, arguments.bus, arguments)
    except (TypeError, ValueError) as exc:
        raise SystemExit(str(exc)) from None
    anyio.run(worker, bus, consumers)


if __name__ == "__main__":
    main()
