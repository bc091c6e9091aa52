"""``python -m examples.llm_platform``: the scripted scenario, with a report per event.

Per event it prints which handlers ran, how long each took and what each changed (rows
created, updated and deleted as the database counted them; cache keys deleted), then a table
per handler, then the outbox's deliveries of the durable handlers (handler, event, key,
status, attempts). The bus runs, so its relay delivers them at once after each COMMIT; each
step waits for them before it is printed. The exit status is 1 if any handler failed or a
delivery was not completed.

``--crash`` instead runs `examples.llm_platform.crash`: a worker process killed in the middle
of durable work, and a survivor that finishes it. ``--workers N`` runs the scenario with the
heavy handlers in N workers fed from streams (`examples.llm_platform.workers_demo`).
"""

from __future__ import annotations

import argparse
import logging
import os
from collections import Counter, defaultdict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import anyio

from aioevents import event_name
from aioevents.outbox import DeliveryRecord, DeliveryStatus, Outbox
from aioevents.testing import CapturedEvents, capture

from .app import Platform, engine_and_cache_from_env, open_platform, throttle_from_env
from .changes import ChangeRecorder, HandlerRun, count_rows
from .crash import run_crash_demo
from .deliveries import settled, stored_deliveries
from .formatting import deliveries_table, describe, plural, short_name
from .scenario import run_scenario
from .uow import Done

__all__ = ["Report", "describe", "main", "plural", "run", "run_demo", "short_name"]

T = TypeVar("T")


@dataclass
class Report:
    """Prints each step's events and handler runs as they happen, and the summary."""

    recorder: ChangeRecorder
    events: CapturedEvents
    outbox: Outbox
    # Handler name -> its place among the bus's subscriptions. An event's handlers run
    # concurrently and finish in any order: they are listed in this one, the same every run.
    order: dict[str, int] = field(default_factory=dict)
    # What else a step waits for before it is printed (the workers, with --workers).
    also_wait: Callable[[], Awaitable[None]] | None = None
    failures: int = 0
    _seen_runs: int = 0
    _seen_events: int = 0
    _totals: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    async def step(self, title: str, call: Awaitable[Done[T]]) -> T:
        done = await call
        # The durable handlers run on the relay after the COMMIT, concurrently: their runs
        # belong to this step too.
        await settled(self.outbox)
        if self.also_wait is not None:
            await self.also_wait()
        emitted = self.events[self._seen_events :]
        print(f"> {title}" + ("" if emitted else ": no event"))
        runs = self.recorder.runs[self._seen_runs :]
        for event in emitted:
            # Equal, not identical: a delivery run again is decoded from the outbox.
            self._print_event(event, [run for run in runs if run.event == event])
        self._seen_runs, self._seen_events = len(self.recorder.runs), len(self.events)
        return done.value

    def _print_event(self, event: object, runs: list[HandlerRun]) -> None:
        print(f"  {event_name(event)}: {plural(len(runs), 'handler')}")
        for run in sorted(runs, key=self._place):
            self._total(run)
            if run.error is None:
                outcome = describe(run.changes)
            else:
                outcome = f"FAILED {run.error!r}"
            status = "ok " if run.error is None else "ERR"
            took = f"{run.duration * 1000:7.1f} ms"
            print(f"    {status} {short_name(run.handler):<60} {took}  {outcome}")

    def _place(self, run: HandlerRun) -> tuple[int, str]:
        return self.order.get(run.handler, len(self.order)), run.handler

    def _total(self, run: HandlerRun) -> None:
        totals = self._totals[short_name(run.handler)]
        totals["runs"] += 1
        totals["failed"] += run.error is not None
        totals["us"] += round(run.duration * 1_000_000)
        totals.update(run.changes)
        self.failures += run.error is not None

    def print_summary(self, deliveries: Sequence[DeliveryRecord]) -> None:
        columns = {"runs": "runs", "failed": "failed", "rows created": "created",
                   "rows updated": "updated", "rows deleted": "deleted",
                   "cache keys deleted": "cache del"}  # fmt: skip
        header = " ".join(f"{title:>9}" for title in columns.values())
        print(f"\n{'handler':<60} {header} {'ms':>8}")
        for handler, totals in sorted(self._totals.items()):
            cells = " ".join(f"{totals[column]:>9}" for column in columns)
            print(f"{handler:<60} {cells} {totals['us'] / 1000:>8.1f}")
        print("\ndurable deliveries, as the outbox stores them:")
        print("\n".join(deliveries_table(deliveries)))
        runs = sum(totals["runs"] for totals in self._totals.values())
        events = plural(len(self.events), "event")
        print(f"\n{events}, {plural(runs, 'handler run')}, {self.failures} failed")


def subscription_order(platform: Platform) -> dict[str, int]:
    """Each handler's place among the bus's subscriptions, by its first subscription."""
    order: dict[str, int] = {}
    for subscription in platform.bus.subscriptions:
        order.setdefault(subscription.name, len(order))
    return order


async def run_demo(
    platform: Platform,
    recorder: ChangeRecorder,
    *,
    also_wait: Callable[[], Awaitable[None]] | None = None,
) -> int:
    """Run the scenario on ``platform``, whose bus runs, and print the report (``also_wait``:
    what each step waits for besides the durable deliveries)."""
    started = datetime.now(UTC)
    with capture(platform.bus) as events:
        order = subscription_order(platform)
        report = Report(recorder, events, platform.outbox, order, also_wait)
        await run_scenario(platform.services, report.step, platform.cache.set)
    deliveries = await stored_deliveries(platform.outbox, since=started)
    report.print_summary(deliveries)
    undone = [d for d in deliveries if d.status is not DeliveryStatus.COMPLETED]
    return 1 if report.failures or undone else 0


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.llm_platform", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="show the handlers' logs")
    parser.add_argument(
        "--crash",
        action="store_true",
        help="kill a worker process in the middle of durable work; a survivor finishes it",
    )
    parser.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="leave the heavy handlers to N workers fed from streams: worker processes on "
        "Redis with REDIS_URL, else consumers in this process",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.ERROR, format="    | %(name)s: %(message)s"
    )
    if args.crash:
        return await run_crash_demo(verbose=args.verbose)
    if args.workers is not None:
        if args.workers < 1:
            parser.error("--workers takes a number of workers, 1 or more")
        from .workers_demo import run_workers_demo  # here: it imports this module

        redis_url = os.environ.get("REDIS_URL") or None
        return await run_workers_demo(args.workers, redis_url=redis_url, verbose=args.verbose)
    engine, cache = engine_and_cache_from_env()
    database = engine.url.render_as_string(hide_password=True)
    print(f"database: {database}; cache: {type(cache).__name__}")
    count_rows(engine)
    recorder = ChangeRecorder()
    throttle = throttle_from_env()
    async with open_platform(engine, cache, throttle=throttle, hooks=[recorder]) as platform:
        print_handlers(platform)
        async with platform.bus:  # runs the relay that delivers to the durable handlers
            return await run_demo(platform, recorder)


def print_handlers(platform: Platform) -> None:
    """The handlers on the platform's bus, and which of them are durable."""
    subscriptions = platform.bus.subscriptions
    print("handlers: " + ", ".join(sorted({short_name(sub.name) for sub in subscriptions})))
    durable = sorted(short_name(name) for name in platform.bus.durable_handlers)
    print("durable, through the outbox: " + ", ".join(durable))


def run(argv: list[str] | None = None) -> Any:
    return anyio.run(main, argv)
