"""Command line: ``python -m aioevents relay module:bus``.

``relay`` imports the bus and runs it (``async with bus:``) until SIGTERM or SIGINT: its
outbox's relay delivers what is due to the bus's durable handlers, in a process of its own.
Stopping, it finishes what runs (within the outbox's ``drain_timeout``) and gives back what
it had claimed but not started.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
from collections.abc import Sequence

import anyio

from ._bus import EventBus

logger = logging.getLogger("aioevents")


def load_bus(spec: str) -> EventBus:
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
    if not target._services:
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m aioevents")
    commands = parser.add_subparsers(dest="command", required=True)
    relay_command = commands.add_parser("relay", help="deliver a bus's durable handlers")
    relay_command.add_argument("bus", help="module:attribute of the EventBus")
    arguments = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    anyio.run(relay, load_bus(arguments.bus))


if __name__ == "__main__":
    main()
