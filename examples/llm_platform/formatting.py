"""How the demos name and count things: handler names, plurals, changes, deliveries."""

from __future__ import annotations

from collections.abc import Sequence

from aioevents.outbox import DeliveryRecord

from .deliveries import count_statuses

HANDLERS_PACKAGE = "examples.llm_platform.handlers."


def short_name(handler: str) -> str:
    """A platform handler's module name, the name the original gave the handler; another
    handler's (one a test adds) own name."""
    if handler.startswith(HANDLERS_PACKAGE):
        return handler.removeprefix(HANDLERS_PACKAGE).split(".", 1)[0]
    return handler.rsplit(".", 1)[-1]


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``1 event``, ``2 events`` (``nouns``: the plural, if not ``noun`` + s)."""
    return f"{count} {noun}" if count == 1 else f"{count} {nouns or noun + 's'}"


def counted(count: int, kind: str) -> str:
    """A change counted: ``kind`` is a plural noun and a verb, ``rows created``."""
    noun, verb = kind.rsplit(" ", 1)
    return f"{plural(count, noun.removesuffix('s'))} {verb}"


def describe(changes: dict[str, int]) -> str:
    return ", ".join(counted(count, kind) for kind, count in changes.items()) or "no change"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """Columns as wide as their widest cell."""
    cells = [[str(cell) for cell in row] for row in rows]
    widths = [
        max([len(header)] + [len(row[n]) for row in cells]) for n, header in enumerate(headers)
    ]
    # Numbers right-aligned, but for the first column: a line never starts with a space.
    numeric = [
        n > 0 and bool(rows) and all(isinstance(row[n], int) for row in rows)
        for n in range(len(headers))
    ]

    def line(row: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(width) if right else cell.ljust(width)
            for cell, width, right in zip(row, widths, numeric, strict=True)
        ).rstrip()

    return [line(headers), *(line(row) for row in cells)]


def deliveries_table(deliveries: Sequence[DeliveryRecord]) -> list[str]:
    """The outbox's view of durable work: one line per delivery (id first, never indented),
    and the count per status."""
    rows = [
        (d.id, short_name(d.handler), d.event_name, d.key or "-", d.status.value, d.attempts)
        for d in deliveries
    ]
    lines = table(("delivery", "handler", "event", "key", "status", "attempts"), rows)
    counts = count_statuses(deliveries)
    statuses = ", ".join(f"{count} {status.value}" for status, count in counts.items() if count)
    lines.append(f"{plural(len(deliveries), 'delivery', 'deliveries')}: {statuses or 'none'}")
    return lines
