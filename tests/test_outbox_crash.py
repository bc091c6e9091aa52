"""The outbox under crashes and concurrency: real relay processes on a real PostgreSQL.

Relays run as ``python -m aioevents relay tests.outbox_relay_app:bus``, OS processes started
here, on tables of their own (a random prefix, dropped afterwards). This process only records:
its bus never runs, so every delivery is claimed by a relay process.

What the handlers did is read from the handlers' own tables (see tests/outbox_relay_app.py),
not from what the library says of itself: runs, effects, and the order of handling.
Run with ``-s`` to see the counts (duplicates, attempts) and timings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import pytest_asyncio
from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.ext.asyncio import async_sessionmaker

from aioevents import Durable, EventBus
from aioevents.sqlalchemy import Outcome, TransactionalEvents

from .outbox_relay_app import (
    DATABASE_URL_VARIABLE,
    TABLE_PREFIX_VARIABLE,
    PaymentWasTaken,
    RelayApp,
    StepWasTaken,
    build,
)

pytestmark = pytest.mark.postgres

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RELAY_COMMAND = [sys.executable, "-m", "aioevents", "relay", "tests.outbox_relay_app:bus"]
RECORDING_TASKS = 8
DELIVERY_DEADLINE = 300.0  # seconds for every delivery to complete: a loaded CI machine is slow
STOP_DEADLINE = 60.0  # seconds for a relay to stop on SIGTERM (drain_timeout is 30)

PAYMENTS = 10_000
STEPS = 1_000
KEYS = [f"key-{index:02d}" for index in range(16)]


# -- the relay processes ----------------------------------------------------------------------


class Relays:
    """The relay processes of one test; only those it started are signalled, by their pid."""

    def __init__(self, app: RelayApp, logs: Path) -> None:
        self.environment = {
            **os.environ,
            DATABASE_URL_VARIABLE: app.engine.url.render_as_string(hide_password=False),
            TABLE_PREFIX_VARIABLE: app.table_prefix,
        }
        self.logs = logs
        self.started: list[subprocess.Popen[bytes]] = []
        self.killed: list[int] = []

    def start(self) -> subprocess.Popen[bytes]:
        log = self._log_file(len(self.started))
        with log:  # the child has its own descriptor
            process = subprocess.Popen(
                RELAY_COMMAND,
                cwd=PROJECT_ROOT,
                env=self.environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.started.append(process)
        return process

    def _log_file(self, index: int) -> IO[bytes]:
        return (self.logs / f"relay-{index}.log").open("wb")

    def kill(self, process: subprocess.Popen[bytes]) -> None:
        """kill -9: no drain, no outcome written, leases left to run out."""
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        self.killed.append(process.pid)

    def running(self) -> list[subprocess.Popen[bytes]]:
        return [process for process in self.started if process.poll() is None]

    def check_alive(self) -> None:
        """Fail at once, with its log, if a relay this test did not kill has exited."""
        for index, process in enumerate(self.started):
            if process.poll() is not None and process.pid not in self.killed:
                pytest.fail(
                    f"relay {index} (pid {process.pid}) exited with {process.returncode}:\n"
                    f"{self.log_tail(index)}"
                )

    async def stop(self) -> None:
        """SIGTERM every running relay and wait for it to drain and exit."""
        running = self.running()
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_DEADLINE
        while any(process.poll() is None for process in running):
            if time.monotonic() > deadline:
                pytest.fail(f"relays still running {STOP_DEADLINE}s after SIGTERM")
            await asyncio.sleep(0.1)
        for process in running:
            assert process.returncode == 0, self.log_tail(self.started.index(process))

    def kill_survivors(self) -> None:
        for process in self.running():
            os.kill(process.pid, signal.SIGKILL)
            process.wait()

    def log_tail(self, index: int, lines: int = 30) -> str:
        text = (self.logs / f"relay-{index}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@pytest_asyncio.fixture
async def app(database_url: str) -> AsyncIterator[RelayApp]:
    """The recording side: the relays' handlers on a bus that never runs, and the tables."""
    app = build(database_url, f"aioevents_crash_{uuid.uuid4().hex[:10]}_")
    try:
        await app.outbox.create_tables()
        async with app.engine.begin() as connection:
            await connection.run_sync(app.tables.metadata.create_all)
        yield app
    finally:
        async with app.engine.begin() as connection:
            await connection.run_sync(app.tables.metadata.drop_all)
        await app.outbox.drop_tables()
        await app.engine.dispose()


@pytest.fixture
def relays(app: RelayApp, tmp_path: Path) -> Iterator[Relays]:
    relays = Relays(app, tmp_path)
    try:
        yield relays
    finally:
        relays.kill_survivors()  # whatever happened in the test: no relay outlives it


# -- reading what happened ----------------------------------------------------------------------


def deliveries_table(app: RelayApp) -> Table:
    table: Table = app.outbox.metadata.tables[f"{app.table_prefix}deliveries"]
    return table


async def delivery_statuses(app: RelayApp) -> Counter[str]:
    deliveries = deliveries_table(app)
    query = select(deliveries.c.status, func.count()).group_by(deliveries.c.status)
    async with app.engine.connect() as connection:
        rows = (await connection.execute(query)).all()
    return Counter(dict(rows))


async def deliveries_claimed_again(app: RelayApp) -> int:
    """How many deliveries were claimed more than once: after a kill, or a failure."""
    deliveries = deliveries_table(app)
    query = select(func.count()).where(deliveries.c.attempts > 1)
    async with app.engine.connect() as connection:
        return int((await connection.execute(query)).scalar_one())


async def wait_for_completed(app: RelayApp, relays: Relays, count: int, deadline: float) -> None:
    """Poll until ``count`` deliveries are completed; fail once ``deadline`` (monotonic) passed."""
    while (statuses := await delivery_statuses(app))["completed"] < count:
        relays.check_alive()
        if time.monotonic() > deadline:
            tails = "\n".join(relays.log_tail(index) for index in range(len(relays.started)))
            pytest.fail(f"{count} completed deliveries expected, got {dict(statuses)}\n{tails}")
        await asyncio.sleep(0.05)


# -- crash: kill -9 of relays while they deliver ------------------------------------------------


def amount_of(number: int) -> int:
    return number % 100 + 1


async def record_payments(app: RelayApp, count: int) -> dict[int, uuid.UUID]:
    """Record ``count`` payments, each in its own transaction, from concurrent tasks."""
    sessions = async_sessionmaker(app.engine)
    event_ids: dict[int, uuid.UUID] = {}

    async def record_share(task: int) -> None:
        async with sessions() as session:
            for number in range(task, count, RECORDING_TASKS):
                async with session.begin():
                    event = PaymentWasTaken(number=number, amount=amount_of(number))
                    recorded = app.events.record(session, event)
                assert recorded.outcome is Outcome.DELIVERED  # committed, deliveries stored
                assert recorded.event_id is not None
                event_ids[number] = recorded.event_id

    async with asyncio.TaskGroup() as group:
        for task in range(RECORDING_TASKS):
            group.create_task(record_share(task))
    return event_ids


@pytest.mark.timeout(600)
@pytest.mark.asyncio
async def test_relays_killed_mid_delivery_lose_nothing_and_the_inbox_keeps_effects_exact(
    app: RelayApp, relays: Relays
) -> None:
    began = time.monotonic()
    event_ids = set((await record_payments(app, PAYMENTS)).values())
    recorded = time.monotonic()

    # Started once everything is recorded: both relays are busy when the kills land.
    deadline = time.monotonic() + DELIVERY_DEADLINE
    first, second = relays.start(), relays.start()
    await wait_for_completed(app, relays, PAYMENTS // 3, deadline)
    relays.kill(first)
    relays.start()  # always two relays
    first_kill = time.monotonic()
    await wait_for_completed(app, relays, PAYMENTS // 2, deadline)
    relays.kill(second)
    relays.start()
    second_kill = time.monotonic()
    await wait_for_completed(app, relays, PAYMENTS, deadline)
    delivered = time.monotonic()
    await relays.stop()  # the counts below are final: nothing runs any more

    runs, ledger = app.tables.runs, app.tables.ledger
    async with app.engine.connect() as connection:
        run_rows = (await connection.execute(select(runs.c.event_id, runs.c.pid))).all()
        effects = await connection.execute(
            select(
                func.count(), func.count(ledger.c.event_id.distinct()), func.sum(ledger.c.amount)
            )
        )
        entries, booked_events, booked_total = effects.one()
        booked_ids = set((await connection.execute(select(ledger.c.event_id))).scalars())
    statuses = await delivery_statuses(app)
    claimed_again = await deliveries_claimed_again(app)
    duplicates = len(run_rows) - PAYMENTS
    runs_by_pid = Counter(pid for _, pid in run_rows)
    print(
        f"\ncrash: {PAYMENTS} events, {len(run_rows)} runs, {duplicates} duplicates, "
        f"{claimed_again} deliveries claimed more than once; runs by relay pid "
        f"{dict(runs_by_pid)}, killed {relays.killed}\n"
        f"crash: recorded in {recorded - began:.1f}s; after the relays started: first kill "
        f"{first_kill - recorded:.1f}s, second kill {second_kill - recorded:.1f}s, all delivered "
        f"{delivered - recorded:.1f}s; {time.monotonic() - began:.1f}s in all"
    )

    # Nothing lost: every event's delivery completed, every event's handler ran.
    assert statuses == Counter(completed=PAYMENTS)
    assert not event_ids - {event_id for event_id, _ in run_rows}
    # The kills landed on working relays, and some deliveries ran twice (at least once)...
    assert all(runs_by_pid[pid] for pid in relays.killed)
    assert duplicates > 0
    # ...yet the effects are exact: one ledger entry per event, and the amounts add up.
    assert (entries, booked_events) == (PAYMENTS, PAYMENTS)
    assert booked_ids == event_ids
    assert booked_total == sum(map(amount_of, range(PAYMENTS)))


# -- order: per key, handled in commit order, across relays and retries ------------------------


def fails_first(failing: bool, n: int) -> bool:
    return failing and n % 20 == 1


async def record_steps(
    app: RelayApp, count: int, failing: bool
) -> dict[uuid.UUID, tuple[str, int]]:
    """Record ``count`` steps on random keys from concurrent tasks, one per transaction; return
    each event's (key, n), n being its key's commit order as the test itself counted it."""
    sessions = async_sessionmaker(app.engine)
    counter = app.tables.key_counter
    take_turn = update(counter).values(n=counter.c.n + 1).returning(counter.c.n)
    steps: dict[uuid.UUID, tuple[str, int]] = {}

    async def record_share(task: int) -> None:
        keys = random.Random(task)
        async with sessions() as session:
            for _ in range(task, count, RECORDING_TASKS):  # its share of the count
                key = keys.choice(KEYS)
                async with session.begin():
                    # The key's row stays locked until COMMIT, so the transactions of one key
                    # commit one after the other, in the order of the n they got here.
                    turn = await session.execute(take_turn.where(counter.c.key == key))
                    n = turn.scalar_one()
                    event = StepWasTaken(key=key, n=n, fail_first=fails_first(failing, n))
                    recorded = app.events.record(session, event)
                assert recorded.event_id is not None
                steps[recorded.event_id] = (key, n)

    async with asyncio.TaskGroup() as group:
        for task in range(RECORDING_TASKS):
            group.create_task(record_share(task))
    return steps


@pytest.mark.parametrize("failing", [False, True], ids=["all-succeed", "some-fail-once"])
@pytest.mark.timeout(500)
@pytest.mark.asyncio
async def test_four_relays_handle_each_key_in_commit_order(
    app: RelayApp, relays: Relays, failing: bool
) -> None:
    tables = app.tables
    async with app.engine.begin() as connection:
        await connection.execute(insert(tables.key_counter), [{"key": k, "n": 0} for k in KEYS])
    began = time.monotonic()
    for _ in range(4):
        relays.start()  # delivering while the steps are recorded
    steps = await record_steps(app, STEPS, failing)
    recorded = time.monotonic()
    await wait_for_completed(app, relays, STEPS, began + DELIVERY_DEADLINE)
    delivered = time.monotonic()
    await relays.stop()

    async with app.engine.connect() as connection:
        query = select(tables.steps.c.key, tables.steps.c.n, tables.steps.c.pid)
        handled = (await connection.execute(query.order_by(tables.steps.c.id))).all()
        failed = set((await connection.execute(select(tables.failures.c.event_id))).scalars())
    handled_by_key: dict[str, list[int]] = defaultdict(list)
    for key, n, _ in handled:
        handled_by_key[key].append(n)
    committed_by_key = Counter(key for key, _ in steps.values())
    by_pid = Counter(pid for _, _, pid in handled)
    print(
        f"\norder ({'some fail once' if failing else 'all succeed'}): {len(steps)} events over "
        f"{len(committed_by_key)} keys, {len(failed)} failed once; handled by relay pid "
        f"{dict(by_pid)}; recorded in {recorded - began:.1f}s, all delivered after "
        f"{delivered - began:.1f}s"
    )

    assert await delivery_statuses(app) == Counter(completed=STEPS)
    assert handled_by_key == {
        key: list(range(1, committed + 1)) for key, committed in committed_by_key.items()
    }
    assert len(by_pid) > 1  # the keys' deliveries went to several relays
    failing_steps = {event_id for event_id, (_, n) in steps.items() if fails_first(failing, n)}
    assert failed == failing_steps


# -- a relay's accounting of the outcomes it writes ---------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class DoomedCharge:
    __event_name__ = "crash-test.doomed-charge"

    number: int


@pytest.mark.asyncio
async def test_failures_written_together_are_not_reported_as_lost_leases(
    app: RelayApp, caplog: pytest.LogCaptureFixture
) -> None:
    bus = EventBus()
    events = TransactionalEvents(bus, outbox=app.outbox)
    all_running = asyncio.Event()
    running = 0

    async def fail_together(event: DoomedCharge) -> None:
        # All four fail in one turn of the loop, so the relay writes them in one batch.
        nonlocal running
        running += 1
        if running == 4:
            all_running.set()
        await all_running.wait()
        raise RuntimeError(f"charge {event.number} fails with the others")

    name = "crash-test.fail-together"
    bus.subscribe(DoomedCharge, fail_together, name=name, durable=Durable(max_attempts=1))
    async with async_sessionmaker(app.engine).begin() as session:
        for number in range(4):
            events.record(session, DoomedCharge(number=number))

    with caplog.at_level(logging.WARNING, logger="aioevents.outbox"):
        async with app.outbox.relay(bus, concurrency=4) as relay:
            for _ in range(600):  # 30 s at most
                if relay.dead == 4:
                    break
                await asyncio.sleep(0.05)

    assert (relay.failed, relay.dead) == (4, 4)
    assert await delivery_statuses(app) == Counter(dead=4)
    lost = [record.getMessage() for record in caplog.records if "lease had" in record.message]
    assert lost == []
