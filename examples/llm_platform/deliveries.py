"""The durable deliveries in the outbox: listing them, and waiting for them to be done.

A durable handler runs on a relay after the COMMIT, concurrently with whatever the publisher
does next. Code that must see its work (the demo's report, the tests) waits for the
deliveries to settle: polling the outbox, with a deadline, rather than sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime

import anyio

from aioevents.outbox import DeliveryRecord, DeliveryStatus, Outbox

PAGE = 500  # deliveries read per query


async def stored_deliveries(
    outbox: Outbox,
    *,
    status: DeliveryStatus | None = None,
    handler: str | None = None,
    since: datetime | None = None,
    after: int | None = None,
) -> list[DeliveryRecord]:
    """Every stored delivery matching the filters, oldest first (read page by page);
    ``after``: only those with a greater id."""
    found: list[DeliveryRecord] = []
    while True:
        after = found[-1].id if found else after
        page = await outbox.deliveries(
            status=status, handler=handler, since=since, after=after, limit=PAGE
        )
        found += page
        if len(page) < PAGE:
            return found


def busy(delivery: DeliveryRecord, now: datetime) -> bool:
    """Pending, and running (leased) or due: a relay runs it now or soon. A pending delivery
    that is neither has failed and waits for its next attempt."""
    if delivery.status is not DeliveryStatus.PENDING:
        return False
    leased = delivery.leased_until is not None and delivery.leased_until > now
    return leased or delivery.due_at <= now


async def settled(
    outbox: Outbox,
    *,
    since: datetime | None = None,
    within: float = 60.0,
    interval: float = 0.05,
) -> list[DeliveryRecord]:
    """Wait until no durable delivery is running or due; return those still pending.

    Those failed and wait for their next attempt (the list is empty when every delivery is
    done). Raises `TimeoutError` when deliveries are still busy after ``within`` seconds.
    """
    deadline = time.monotonic() + within
    while True:
        pending = await stored_deliveries(outbox, status=DeliveryStatus.PENDING, since=since)
        now = datetime.now(UTC)
        running = [delivery for delivery in pending if busy(delivery, now)]
        if not running:
            return pending
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{len(running)} durable deliveries still running or due after {within:g} s: "
                + ", ".join(f"{d.id} ({d.handler})" for d in running[:10])
            )
        await anyio.sleep(interval)


def count_statuses(deliveries: Iterable[DeliveryRecord]) -> dict[DeliveryStatus, int]:
    """How many deliveries are in each status, every status listed."""
    counts = dict.fromkeys(DeliveryStatus, 0)
    for delivery in deliveries:
        counts[delivery.status] += 1
    return counts
