"""The relay: claims stored deliveries and runs their durable handlers, at least once.

One relay runs in every process that runs ``async with bus:`` on a bus with an outbox (and
``python -m aioevents relay module:bus`` runs one alone). Its tasks:

- the fetcher claims due deliveries (``FOR UPDATE SKIP LOCKED`` and a lease) when workers
  have room, woken by NOTIFY on PostgreSQL, by its own completions, and by a poll;
- ``concurrency`` workers run one delivery each at a time, through the bus's guard (hooks,
  limiter, isolation), with the delivery readable from `current_delivery`;
- the writer records outcomes in batches, guarded by the lease token, and wakes the fetcher:
  a key's next delivery becomes claimable once the previous one is written complete;
- the renewer extends the leases of what the relay holds, so a long handler keeps its
  delivery; a relay that dies stops renewing and its deliveries are claimed again;
- the listener (PostgreSQL with asyncpg) and the retention sweep.

The committing process hands the deliveries it leased at COMMIT straight to its relay's
queue (`Relay.take`): no poll, no claim. Stopping, the relay stops claiming, gives back what
it holds but has not started, lets running handlers finish within ``drain_timeout``, gives
back those it then cancels, and writes every outcome before it returns.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from contextvars import copy_context
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Self

import anyio
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from ._bus import EventBus
from ._codec import Codec, EventDecodeError
from ._delivery import Delivery, _current, current_delivery
from ._dispatch import record_stray_cancellation, run_in_context, run_to_the_end
from ._exceptions import BusStateError
from ._outbox_store import Claimed, Failure, Store, now
from ._result import HandlerError
from ._subscription import Subscription

__all__ = ["Delivery", "Job", "Relay", "RelaySettings", "current_delivery"]

logger = logging.getLogger("aioevents.outbox")
_PURGE_EVERY = 60.0  # seconds between retention sweeps
_RETRY_WRITE_AFTER = 1.0  # seconds before writing outcomes again after a database error
_WRITE_LINGER = 0.02  # seconds outcomes wait for others to be written with them


@dataclass(frozen=True, slots=True)
class RelaySettings:
    lease: float
    poll_interval: float
    concurrency: int
    batch_size: int
    keep_completed: timedelta | None
    drain_timeout: float
    listen: bool = True


@dataclass(slots=True)
class Job:
    """One leased delivery in a relay's hands: stored (to decode) or handed over at COMMIT."""

    delivery: Delivery
    # Until when (on the monotonic clock) its lease surely holds; renewals move it. A job
    # still queued past it is not started: another relay may have claimed it meanwhile.
    deadline: float
    event: object = None  # the recorded object itself when handed over by its committer
    stored: Claimed | None = field(default=None, repr=False)


class Relay:
    """Runs the durable handlers of one bus for the deliveries of one outbox.

    An async context manager (asyncio): `Outbox.relay` makes one, and a bus given to
    `TransactionalEvents` with an outbox runs one while it runs. ``delivered`` counts the
    deliveries completed here, ``failed`` the failed attempts, ``dead`` those out of attempts.
    """

    def __init__(
        self,
        bus: EventBus,
        engine: AsyncEngine,
        store: Store,
        codec: Codec,
        settings: RelaySettings,
        *,
        on_close: Callable[[Relay], object] | None = None,
    ) -> None:
        self.bus = bus
        self.token = uuid.uuid4()  # what its leases and writes carry
        self.delivered = 0
        self.failed = 0
        self.dead = 0
        self._engine = engine
        # Each of the relay's writes is one statement, atomic on its own: no BEGIN and COMMIT
        # round trips around it (a claim's row locks last as long as its statement).
        self._statements = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._store = store
        self._codec = codec
        self._settings = settings
        self._on_close = on_close
        self._queue: deque[Job] = deque()
        self._running: dict[int, Job] = {}
        self._completed: list[int] = []
        self._durations: dict[int, float] = {}  # completed id -> seconds its handler ran
        self._failures: list[Failure] = []
        self._released: list[int] = []
        self._job_ready = asyncio.Event()
        self._fetch_wanted = asyncio.Event()
        self._write_wanted = asyncio.Event()
        self._workers_left = 0
        self._workers_done = asyncio.Event()
        self._known: Mapping[str, Subscription] | None = None  # handlers the codec knows
        self._starved = False  # the fetcher waits for room: wake it when some is made
        self._key_freed = False  # a keyed delivery completed: its key's next may be due
        self._accepting = False
        self._group: Any = None
        # Shielded scopes, as the bus's own workers: whatever cancels the task that entered
        # the relay (a timeout, a failing sibling), only the relay's stop ends its tasks.
        self._services = anyio.CancelScope(shield=True)  # listener, sweeper, renewer, writer
        self._workers: list[anyio.CancelScope] = []
        self._fetcher = anyio.CancelScope(shield=True)
        self._fetcher_done = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Relay bus={self.bus!r} running={len(self._running)} queued={len(self._queue)}>"

    # -- handing over ------------------------------------------------------------------------

    def has_room(self) -> bool:
        """Whether deliveries leased at COMMIT may be handed to this relay."""
        return self._accepting and self._held() < self._capacity()

    def _held(self) -> int:
        return len(self._queue) + len(self._running)

    def _capacity(self) -> int:
        # Two batches besides the running handlers: the next claim overlaps the work on the
        # last one, so workers never wait for a round trip while deliveries are due.
        return self._settings.concurrency + 2 * self._settings.batch_size

    def take(self, jobs: Sequence[Job]) -> bool:
        """Queue deliveries its committer leased to this relay; False once it stops."""
        if not self._accepting:
            return False
        self._queue.extend(jobs)
        self._job_ready.set()
        return True

    async def hand_over(self, jobs: Sequence[Job]) -> None:
        """`take` them; if it stopped meanwhile, give them back at once rather than leave
        them to wait out their lease."""
        if self.take(jobs):
            return
        async with self._statement() as connection:
            await self._store.release(connection, [job.delivery.id for job in jobs], self.token)

    # -- running ---------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        if asyncio._get_running_loop() is None:
            raise BusStateError("the outbox's relay runs on asyncio (SQLAlchemy's asyncio)")
        if self._group is not None:
            raise BusStateError(f"{self!r} has run already: make another with outbox.relay(bus)")
        self._handlers()  # the codec learns their event types
        self._group = anyio.create_task_group()
        await self._group.__aenter__()
        self._accepting = True
        self._group.start_soon(self._run_services)
        self._workers_left = self._settings.concurrency
        for _ in range(self._settings.concurrency):
            self._group.start_soon(self._work)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            # To its end whatever cancels the owner meanwhile, a second native cancel too.
            await run_to_the_end(self._stop(), what="the relay's stop")
        finally:
            if self._on_close is not None:
                self._on_close(self)
            for scope in (self._fetcher, self._services, *self._workers):
                scope.cancel()  # done already, unless the stop itself failed
            await self._group.__aexit__(None, None, None)

    async def _stop(self) -> None:
        self._accepting = False
        # Before any await: no worker starts a queued delivery from here on.
        unstarted = [job.delivery.id for job in self._queue]
        self._queue.clear()
        self._released.extend(unstarted)
        self._job_ready.set()  # idle workers see the end
        # The fetcher, waited for: what a claim in flight gets is given back below.
        self._fetcher.cancel()
        await self._fetcher_done.wait()
        with anyio.move_on_after(self._settings.drain_timeout):
            await self._workers_done.wait()
        if not self._workers_done.is_set():
            logger.warning(
                "relay: %d handler(s) still running after %ss: cancelled, their deliveries "
                "given back to run again",
                len(self._running),
                self._settings.drain_timeout,
            )
            for scope in self._workers:
                scope.cancel()
            await self._workers_done.wait()
        self._services.cancel()
        await self._write()  # every outcome, and what it gives back

    async def _run_services(self) -> None:
        with self._services:
            async with anyio.create_task_group() as services:
                services.start_soon(self._fetch_loop)
                services.start_soon(self._write_loop)
                services.start_soon(self._renew_loop)
                services.start_soon(self._listen_loop)
                services.start_soon(self._purge_loop)

    def _handlers(self) -> Mapping[str, Subscription]:
        handlers = self.bus.durable_handlers
        if handlers is not self._known:  # subscribed since: their events become decodable
            self._codec.register(*{sub.event_type for sub in handlers.values()})
            self._known = handlers
        return handlers

    @asynccontextmanager
    async def _statement(self) -> AsyncIterator[AsyncConnection]:
        """A connection in autocommit mode, committed all the same at the end: a "begin"
        hook of the application's (SQLAlchemy's recipe for SQLite issues BEGIN there) may
        have opened a transaction that autocommit would not end. Without one it costs
        nothing: the driver has nothing to commit."""
        async with self._statements.connect() as connection:
            yield connection
            await connection.commit()

    # -- claiming --------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        try:
            with self._fetcher:
                await self._fetch()
        finally:
            self._fetcher_done.set()

    async def _fetch(self) -> None:
        settings = self._settings
        while self._accepting:
            room = self._capacity() - self._held()
            # A whole batch at a time while work is in hand: fewer, fuller round trips.
            self._starved = room < settings.batch_size and self._held() > 0
            if not self._starved:
                limit = min(room, settings.batch_size)
                if await self._claim(limit) == limit:
                    continue  # more may be due at once
            self._fetch_wanted.clear()
            with anyio.move_on_after(settings.poll_interval):
                await self._fetch_wanted.wait()

    async def _claim(self, limit: int) -> int:
        handlers = self._handlers()
        if not handlers:
            return 0
        started = time.monotonic()  # the leases run from about now: a safe lower bound
        try:
            # Shielded: a claim cut short after its COMMIT would leave its leases unknown here.
            with anyio.CancelScope(shield=True):
                async with self._statement() as connection:
                    claimed = await self._store.claim(
                        connection, handlers, self.token, self._settings.lease, limit
                    )
        except Exception as exc:
            logger.warning("relay: claiming deliveries failed, retrying at the next poll: %r", exc)
            return 0
        if claimed and not self._accepting:  # stopped meanwhile: given back at the final write
            self._released.extend(row.id for row in claimed)
        elif claimed:
            # One this relay still runs, whose lease ran out while its loop stalled: the claim
            # renewed the lease; running it twice at once here is what it must not do.
            claimed = [row for row in claimed if row.id not in self._running]
            deadline = started + self._settings.lease
            decode = self._codec.decode_headers
            self._queue.extend(_stored_job(row, deadline, decode) for row in claimed)
            self._job_ready.set()
        return len(claimed)

    def wake(self) -> None:
        self._fetch_wanted.set()

    # -- working ----------------------------------------------------------------------------

    async def _work(self) -> None:
        scope = anyio.CancelScope(shield=True)
        self._workers.append(scope)
        try:
            with scope:
                while True:
                    job = await self._next_job()
                    if job is None:
                        return
                    await self._run(job)
        finally:
            self._workers_left -= 1
            if not self._workers_left:
                self._workers_done.set()

    async def _next_job(self) -> Job | None:
        while self._accepting and not self._queue:
            self._job_ready.clear()
            await self._job_ready.wait()
        return self._queue.popleft() if self._accepting else None

    async def _run(self, job: Job) -> None:
        delivery = job.delivery
        if time.monotonic() >= job.deadline:  # not renewed in time: maybe another's by now
            logger.warning("relay: delivery %d not started, its lease may have passed", delivery.id)
            return
        sub = self._handlers().get(delivery.handler)
        if sub is None or sub.durable is None:  # unsubscribed since: left for another relay
            self._released.append(delivery.id)
            self._write_wanted.set()
            return
        try:
            event = job.event if job.stored is None else self._decode(job.stored)
        except EventDecodeError as exc:  # retrying would not help: dead, with the reason
            logger.error("relay: delivery %d to %s is dead: %s", delivery.id, sub.name, exc)
            self._fail(delivery, exc, dead=True)
            return
        self._running[delivery.id] = job
        errors: list[HandlerError] = []
        context = copy_context()
        context.run(_current.set, delivery)
        started = time.monotonic()  # the attempt's duration, for the panel's percentiles
        try:
            await run_in_context(context, self.bus._guarded(sub, event, errors))
        except anyio.get_cancelled_exc_class() as exc:
            if self._accepting:  # not the relay stopping: the handler's own doing, a failure
                record_stray_cancellation(sub, event, exc, errors)
            else:  # cut short by the drain timeout: given back, to run again elsewhere
                self._released.append(delivery.id)
                raise
        except BaseException:  # KeyboardInterrupt and the like: given back, and raised
            self._released.append(delivery.id)
            raise
        finally:
            if self._running.get(delivery.id) is job:
                del self._running[delivery.id]
        took = time.monotonic() - started
        if errors:
            assert sub.durable is not None
            dead = delivery.attempt >= sub.durable.max_attempts
            self._fail(delivery, errors[0].exception, dead=dead, wait=sub.durable.wait, took=took)
        else:
            self._completed.append(delivery.id)
            self._durations[delivery.id] = took
            self._key_freed |= delivery.key is not None
            self._write_wanted.set()

    def _decode(self, stored: Claimed) -> object:
        return self._codec.decode(stored.event_name, stored.event_version, stored.payload)

    def _fail(
        self,
        delivery: Delivery,
        error: BaseException,
        *,
        dead: bool,
        wait: Callable[[int, float], float] | None = None,
        took: float | None = None,
    ) -> None:
        delay = 0.0 if wait is None else wait(delivery.attempt, random.random())
        due = now() + timedelta(seconds=delay)
        self._failures.append(Failure(delivery.id, dead, due, error, delivery.attempt, took))
        self._write_wanted.set()

    # -- writing ------------------------------------------------------------------------------

    async def _write_loop(self) -> None:
        while True:
            await self._write_wanted.wait()
            if len(self._completed) < self._settings.batch_size and not self._key_freed:
                # Outcomes that follow share the statement: one write for many deliveries. Not
                # when a key waits for it: its next delivery starts after this write.
                await anyio.sleep(_WRITE_LINGER)
            self._write_wanted.clear()
            if not await self._write():
                await anyio.sleep(_RETRY_WRITE_AFTER)
                self._write_wanted.set()

    async def _write(self) -> bool:
        """Write the outcomes gathered so far in one transaction; False if it failed (they
        are kept for the next try, and their leases renewed meanwhile)."""
        completed, failures, released = self._completed, self._failures, self._released
        if not (completed or failures or released):
            return True
        self._completed, self._failures, self._released = [], [], []
        try:
            # Shielded: the outcomes are out of the lists; they must reach the database.
            with anyio.CancelScope(shield=True):
                written = await self._write_outcomes(completed, failures, released)
        except Exception as exc:
            logger.warning("relay: writing %d outcome(s) failed: %r", len(completed), exc)
            self._completed[:0], self._failures[:0] = completed, failures
            self._released[:0] = released
            return False
        self._count(completed, failures, written)
        for delivery_id in completed:
            del self._durations[delivery_id]
        if self._starved or self._key_freed:  # otherwise a claim now would find nothing new
            self._key_freed = False
            self.wake()
        return True

    async def _write_outcomes(
        self, completed: list[int], failures: list[Failure], released: list[int]
    ) -> int:
        store, token = self._store, self.token
        async with self._statement() as connection:
            written = 0
            if completed:
                keep = self._settings.keep_completed is not None
                durations = [self._durations[delivery_id] for delivery_id in completed]
                written += await store.complete(
                    connection, completed, token, keep=keep, durations=durations
                )
            if failures:
                written += await store.fail(connection, failures, token)
            if released:
                await store.release(connection, released, token)
        return written

    def _count(self, completed: list[int], failures: list[Failure], written: int) -> None:
        self.delivered += len(completed)
        self.failed += len(failures)
        self.dead += sum(failure.dead for failure in failures)
        lost = len(completed) + len(failures) - written
        if lost:
            logger.warning(
                "relay: %d delivery outcome(s) written after their lease had passed to another "
                "relay: those deliveries may run twice (at least once)",
                lost,
            )

    # -- leases, wake-ups, retention --------------------------------------------------------

    async def _renew_loop(self) -> None:
        lease = self._settings.lease
        while True:
            await anyio.sleep(lease / 3)
            jobs = [*self._queue, *self._running.values()]
            held = [job.delivery.id for job in jobs]
            held += self._completed + [failure.id for failure in self._failures]
            if not held:
                continue
            started = time.monotonic()
            try:
                # Shielded, as every transaction here: a statement cut short invalidates its
                # connection (and on aiosqlite its close never ends); a stop waits for it.
                with anyio.CancelScope(shield=True):
                    async with self._statement() as connection:
                        still = await self._store.renew(connection, held, self.token, lease)
            except Exception as exc:
                logger.warning("relay: renewing %d lease(s) failed: %r", len(held), exc)
                continue
            for job in jobs:
                if job.delivery.id in still:
                    job.deadline = started + lease
            self._drop_lost(still)

    def _drop_lost(self, still: set[int]) -> None:
        """Forget queued jobs whose lease another relay took (their owner stalled): that relay
        runs them now. Running ones finish; their outcome is not written over the other's."""
        lost = [job for job in self._queue if job.delivery.id not in still]
        if lost:
            logger.warning(
                "relay: %d queued deliveries lost their lease; left to another", len(lost)
            )
            self._queue = deque(job for job in self._queue if job.delivery.id in still)

    async def _listen_loop(self) -> None:
        if not self._settings.listen or self._engine.dialect.driver != "asyncpg":
            return  # polling alone
        while True:
            try:
                await self._listen()
            except Exception as exc:
                logger.info("relay: LISTEN connection lost (%r); polling meanwhile", exc)
            await anyio.sleep(self._settings.poll_interval)

    async def _listen(self) -> None:
        async with self._engine.connect() as connection:
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection
            lost = asyncio.Event()
            channel = self._store.channel

            def notified(*_: object) -> None:
                self.wake()

            await driver.add_listener(channel, notified)
            driver.add_termination_listener(lambda *_: lost.set())
            self.wake()  # what was committed while nobody listened
            try:
                await lost.wait()
            finally:
                with anyio.CancelScope(shield=True):
                    if not driver.is_closed():
                        await driver.remove_listener(channel, notified)

    async def _purge_loop(self) -> None:
        keep = self._settings.keep_completed or timedelta(0)
        while True:
            try:
                with anyio.CancelScope(shield=True):
                    async with self._statement() as connection:
                        await self._store.purge(connection, now() - keep)
            except Exception as exc:
                logger.warning("relay: the retention sweep failed: %r", exc)
            await anyio.sleep(_PURGE_EVERY)


def _stored_job(
    claimed: Claimed, deadline: float, decode_headers: Callable[[str], dict[str, str]]
) -> Job:
    delivery = Delivery(
        id=claimed.id,
        event_id=claimed.event_id,
        event_name=claimed.event_name,
        handler=claimed.handler,
        attempt=claimed.attempt,
        key=claimed.key,
        headers=_LazyHeaders(claimed.headers, decode_headers),
        recorded_at=claimed.recorded_at,
    )
    return Job(delivery, deadline, stored=claimed)


class _LazyHeaders(Mapping[str, str]):
    """Headers decoded when first read: most handlers never look."""

    __slots__ = ("_decode", "_decoded", "_text")

    def __init__(self, text: str, decode: Callable[[str], dict[str, str]]) -> None:
        self._text = text
        self._decode = decode
        self._decoded: dict[str, str] | None = None

    def _headers(self) -> dict[str, str]:
        if self._decoded is None:
            self._decoded = self._decode(self._text)
        return self._decoded

    def __getitem__(self, key: str) -> str:
        return self._headers()[key]

    def __iter__(self) -> Any:
        return iter(self._headers())

    def __len__(self) -> int:
        return len(self._headers())

    def __repr__(self) -> str:
        return repr(self._headers())
