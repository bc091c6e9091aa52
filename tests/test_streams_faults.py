"""Redis Streams consumers under faults: the Redis server and worker processes killed.

Each test starts a redis-server of its own (AOF, ``appendfsync always``; the `redis_server`
fixture) and kills only that PID, never the shared Redis. Workers are real OS processes
(``python -m aioevents worker tests.streams_worker_app:bus``), killed with SIGKILL or stopped
with SIGTERM by PID. What ran is read from the ledger the handlers append to (see
tests/streams_worker_app.py): a ``done`` line is written before its entry is acknowledged,
so an event with no ``done`` line was lost, and one with two was handled twice.

The tests wait for states, never for durations: every wait is bounded by a generous deadline
(a loaded 2-core machine is slow), and the loss check fails as soon as every entry of the
streams is acknowledged while an event still has no ``done`` line. Counts of handlings and
duplicates are printed (``pytest -s``).

A test marked ``xfail(strict=True, reason="faults.md #N")`` fails because of library bug N,
written up (with a reproducer) in /tmp/notes/faults.md; it turns XPASS, a failure, once fixed.
"""

from __future__ import annotations

import os
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import redis.exceptions
from redis.asyncio import Redis

from aioevents.streams import MemoryStreams, Streams

from .streams_support import RedisServer, Workers, redis_server
from .streams_worker_app import (
    JOB_HANDLER,
    STEP_HANDLER,
    JobWasQueued,
    Ledger,
    LedgerReader,
    Record,
    StepWasTaken,
    build,
    done,
    environment,
    make_streams,
    publish_all,
    read_ledger,
)

__all__ = ["redis_server"]  # the fixture, imported for the tests here

pytestmark = [pytest.mark.redis, pytest.mark.asyncio, pytest.mark.timeout(300)]

PREFIX = "faults"
# consume() in every consumer here: entries of a dead consumer reclaimed after a second; reads
# wake every 0.2 s, so a stop or a restart is noticed soon.
CONSUME: dict[str, Any] = {"min_idle": 1.0, "block": 0.2}
# The per-key order test's: a lease is min_idle long, and one that runs out under a live but
# stalled holder (a loaded machine) is not what that test is about.
ORDERED_CONSUME: dict[str, Any] = {"min_idle": 2.0, "block": 0.2}
SAFETY = 180.0  # seconds a whole test may take: a hang fails, a slow run does not
STATE_WAIT = 120.0  # seconds for a state that comes within a few seconds when all is well
REMOVED_WITHIN = 60.0  # seconds for a dead consumer to leave its groups (many min_idle)
POLL = 0.1  # seconds between looks at the ledger or the groups


# -- looking at Redis and the ledger ---------------------------------------------------------------


class Groups:
    """The consumer groups on the test's server, read with a plain client of the test's own."""

    def __init__(self, server: RedisServer) -> None:
        self.client = Redis.from_url(server.url, decode_responses=True, protocol=2)

    async def consumers(self, streams: Iterable[str], group: str) -> dict[str, int]:
        """Each consumer of the group on any of the streams, with its pending entries."""
        found: Counter[str] = Counter()
        for stream in streams:
            try:
                rows = await self.client.xinfo_consumers(stream, group)
            except redis.exceptions.ResponseError:  # no such stream or group (yet)
                continue
            for row in rows:
                found[row["name"]] += int(row["pending"])
        return dict(found)

    async def pending(self, records: Iterable[Record], group: str) -> list[str]:
        """The entries of these records that are still pending in the group."""
        found = []
        for r in records:
            rows = await self.client.xpending_range(r.stream, group, r.entry_id, r.entry_id, 1)
            if rows:
                found.append(f"{r.label} ({r.stream} {r.entry_id})")
        return found

    async def settled(self, streams: Iterable[str], group: str) -> bool:
        """Whether the group had every entry of the streams and acknowledged it."""
        try:
            for stream in streams:
                last = (await self.client.xinfo_stream(stream))["last-generated-id"]
                mine = [g for g in await self.client.xinfo_groups(stream) if g["name"] == group]
                if not mine or mine[0]["pending"] or mine[0]["last-delivered-id"] != last:
                    return False
        except redis.exceptions.RedisError:  # no stream yet, or the server is coming back
            return False
        return True

    async def aclose(self) -> None:
        await self.client.aclose()


@asynccontextmanager
async def connected(
    server: RedisServer, partitions: int | None = None
) -> AsyncIterator[tuple[Streams, Groups]]:
    """The streams the workers read (to publish to) and a look at their groups; closed after."""
    streams = make_streams(server.url, PREFIX, partitions)
    groups = Groups(server)
    try:
        yield streams, groups
    finally:
        await streams.transport.aclose()
        await groups.aclose()


@asynccontextmanager
async def closing(streams: Streams) -> AsyncIterator[Streams]:
    try:
        yield streams
    finally:
        await streams.transport.aclose()


def job_streams(partitions: int | None = None) -> list[str]:
    """The streams the jobs are in (their names only: no transport is used)."""
    return Streams(MemoryStreams(), prefix=PREFIX, partitions=partitions).partition_streams(
        JobWasQueued
    )


def step_streams(partitions: int | None = None) -> list[str]:
    return Streams(MemoryStreams(), prefix=PREFIX, partitions=partitions).partition_streams(
        StepWasTaken
    )


async def wait_handled(
    reader: LedgerReader,
    handler: str,
    labels: set[str],
    groups: Groups,
    streams: Sequence[str],
    workers: Workers | None = None,
) -> Counter[str]:
    """Wait until every label was done at least once; how often each was.

    Call it once everything is published. It fails as soon as a label is lost: the group had
    and acknowledged every entry of the streams (done lines are written before the
    acknowledgement), and the label still has no done line. Also when a worker the test did
    not signal exited.
    """
    while True:
        counts = done(reader.read(), handler)
        if labels <= counts.keys():
            return counts
        if workers is not None:
            workers.check_alive()
        if await groups.settled(streams, handler):
            counts = done(reader.read(), handler)
            lost = sorted(labels - counts.keys())
            if lost:
                pytest.fail(f"{len(lost)} event(s) lost (acknowledged, never done): {lost[:20]}")
        await anyio.sleep(POLL)


async def wait_done_count(
    reader: LedgerReader, handler: str, count: int, workers: Workers
) -> list[Record]:
    """Wait until the handler was done ``count`` times (any events); the records so far."""
    while True:
        records = reader.read()
        if sum(done(records, handler).values()) >= count:
            return records
        workers.check_alive()
        await anyio.sleep(POLL / 2)


async def until(
    what: str, check: Callable[[], Awaitable[bool]], workers: Workers, within: float = STATE_WAIT
) -> None:
    """Wait until ``check()`` is true; fail saying what did not happen (with the workers'
    logs) after ``within`` seconds, or at once when a worker the test did not signal exits."""
    deadline = anyio.current_time() + within
    while not await check():
        workers.check_alive()
        if anyio.current_time() > deadline:
            pytest.fail(f"not {what} after {within:.0f} s:\n{workers.logs_tail()}")
        await anyio.sleep(POLL)


def handled_by(records: Iterable[Record], handler: str) -> dict[int, int]:
    """How many runs of the handler each process finished, by PID."""
    return dict(Counter(r.pid for r in records if r.phase == "done" and r.handler == handler))


def duplicates(counts: Counter[str]) -> int:
    """Handlings beyond the first, over every label."""
    return sum(counts.values()) - len(counts)


def in_flight(records: Iterable[Record], pid: int) -> int:
    """How many handler runs of the process have started and not (yet) written done."""
    runs = Counter[tuple[str, str, str, int]]()
    for r in records:
        if r.pid == pid:
            run = (r.handler, r.stream, r.entry_id, r.deliveries)
            runs[run] += 1 if r.phase == "start" else -1
    return sum(1 for open_runs in runs.values() if open_runs > 0)


def busiest(
    records: Sequence[Record], processes: Sequence[subprocess.Popen[bytes]]
) -> subprocess.Popen[bytes]:
    """The process with the most handlers in flight: killing it strands the most."""
    return max(processes, key=lambda process: in_flight(records, process.pid))


def pid_of(consumer: str) -> int:
    """A consumer name is "<host>:<pid>:<random>"."""
    return int(consumer.split(":")[-2])


async def wait_removed(
    groups: Groups, streams: Sequence[str], group: str, consumer: str
) -> dict[str, int]:
    """Wait until ``consumer`` is in none of the group's streams; the consumers left."""
    with anyio.move_on_after(REMOVED_WITHIN):
        while True:
            left = await groups.consumers(streams, group)
            if consumer not in left:
                return left
            await anyio.sleep(POLL)
    pytest.fail(
        f"dead consumer {consumer} still in group {group} after {REMOVED_WITHIN:.0f} s: "
        f"{await groups.consumers(streams, group)}"
    )


def jobs(count: int, **fields: Any) -> list[JobWasQueued]:
    return [JobWasQueued(number=n, **fields) for n in range(count)]


def job_labels(count: int) -> set[str]:
    return {f"job:{n}" for n in range(count)}


# -- 4: Redis killed and restarted while publishing and consuming ---------------------------------

RECONNECT_EVENTS = 10_000
RECONNECT_PUBLISHERS = 100


async def test_reconnect_redis_killed_and_restarted_twice_loses_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """10,000 events from 100 publishers; Redis killed (SIGKILL) and restarted at 1/3 and at
    1/2 of the publishing, while two worker processes and one in-process consumer handle them:
    each is handled at least once. Publishers retry a failed publish with the same event id."""
    ledger = tmp_path / "ledger.jsonl"
    # a consumer in this process too, on a transport of its own
    local = build(make_streams(redis_server.url, PREFIX), Ledger(ledger), **CONSUME)
    marks = [RECONNECT_EVENTS // 3, RECONNECT_EVENTS // 2]
    reached = [anyio.Event() for _ in marks]
    killed_at: list[int] = []
    published = 0

    def count() -> None:
        nonlocal published
        published += 1
        for mark, event in zip(marks, reached, strict=True):
            if published >= mark:
                event.set()

    async def kill_and_restart() -> None:
        for event in reached:
            await event.wait()
            killed_at.append(published)
            redis_server.kill()
            await redis_server.astart()  # in a thread: publishers and consumers go on failing

    with anyio.fail_after(SAFETY):
        env = environment(redis_server.url, PREFIX, ledger, **CONSUME)
        async with connected(redis_server) as (streams, groups), closing(local.streams):
            with Workers(env, tmp_path / "logs") as workers:
                for process in workers.start_many(2):
                    await workers.wait_running(process)
                async with local.bus:
                    async with anyio.create_task_group() as tasks:
                        tasks.start_soon(kill_and_restart)
                        retried = await publish_all(
                            streams,
                            jobs(RECONNECT_EVENTS),
                            publishers=RECONNECT_PUBLISHERS,
                            published=count,
                        )
                    counts = await wait_handled(
                        LedgerReader(ledger),
                        JOB_HANDLER,
                        job_labels(RECONNECT_EVENTS),
                        groups,
                        job_streams(),
                        workers,
                    )
                exit_codes = await workers.stop()

    print(
        f"\nreconnect: {RECONNECT_EVENTS} events, {sum(counts.values())} handled, "
        f"{duplicates(counts)} duplicates (Redis killed at {killed_at} published; "
        f"{retried} publish attempts failed and were retried; handled by PID: "
        f"{handled_by(read_ledger(ledger), JOB_HANDLER)}, this test's {os.getpid()})"
    )
    assert len(redis_server.started_pids) == 1 + len(marks)
    assert retried > 0  # the publishers did meet the dead server
    assert set(exit_codes.values()) == {0}, workers.logs_tail()


# -- 5: three worker processes, one killed with kill -9 at half way -------------------------------

WORKER_EVENTS = 20_000
JOB_SECONDS = 0.002  # each job's handler takes this long: the kill strands some in flight


async def test_three_workers_one_killed_at_half_way_lose_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """20,000 events, 3 worker processes; once half are done, the one with the most handlers
    in flight is killed with SIGKILL: every event is handled at least once, the survivors
    exit 0 on SIGTERM."""
    ledger = tmp_path / "ledger.jsonl"
    reader = LedgerReader(ledger)
    env = environment(redis_server.url, PREFIX, ledger, **CONSUME)
    with anyio.fail_after(SAFETY):
        async with connected(redis_server) as (streams, groups):
            with Workers(env, tmp_path / "logs") as workers:
                processes = workers.start_many(3)
                for process in processes:
                    await workers.wait_running(process)
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(publish_all, streams, jobs(WORKER_EVENTS, seconds=JOB_SECONDS))
                    records = await wait_done_count(
                        reader, JOB_HANDLER, WORKER_EVENTS // 2, workers
                    )
                    victim = busiest(records, processes)
                    stranded = in_flight(records, victim.pid)
                    workers.kill(victim)
                counts = await wait_handled(
                    reader, JOB_HANDLER, job_labels(WORKER_EVENTS), groups, job_streams(), workers
                )
                exit_codes = await workers.stop()

    print(
        f"\nworkers: {WORKER_EVENTS} events, {sum(counts.values())} handled, "
        f"{duplicates(counts)} duplicates (worker {victim.pid} killed with {stranded} "
        f"handler(s) in flight; handled by PID: {handled_by(reader.read(), JOB_HANDLER)})"
    )
    assert len(exit_codes) == 2
    assert set(exit_codes.values()) == {0}, workers.logs_tail()


# -- 8: per-key order over 4 partitions, 4 worker processes, one killed midway -------------------

ORDER_EVENTS = 1_000
ORDER_KEYS = 16
STEP_SECONDS = 0.005  # each step's handler takes this long: a kill lands in some


def steps() -> list[StepWasTaken]:
    """Step n of key k, in publish order: key i % 16 gets its steps 0, 1, 2, ..."""
    return [
        StepWasTaken(key=f"key-{i % ORDER_KEYS:02d}", n=i // ORDER_KEYS, seconds=STEP_SECONDS)
        for i in range(ORDER_EVENTS)
    ]


def order_breaks(records: Iterable[Record]) -> tuple[dict[str, list[int]], int]:
    """Per key, the steps in the order they were done, where that is not the publish order
    once consecutive repeats (a step run again by the next holder) are folded; and how many
    repeats were folded."""
    done_in_order: dict[str, list[int]] = {}
    for r in records:
        if r.phase == "done" and r.handler == STEP_HANDLER:
            key, _, n = r.label.rpartition(":")
            done_in_order.setdefault(key, []).append(int(n))
    broken, repeats = {}, 0
    for key, seen in done_in_order.items():
        folded = [n for i, n in enumerate(seen) if i == 0 or n != seen[i - 1]]
        repeats += len(seen) - len(folded)
        if folded != list(range(len(folded))):
            broken[key] = seen
    return broken, repeats


async def test_per_key_order_with_four_partitions_one_worker_killed_midway(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """1,000 steps over 16 keys on Streams(partitions=4), 4 worker processes; once half are
    done, the one with a step in flight is killed with SIGKILL: per key, the steps are done in
    publish order; a step the killed worker had done but not acknowledged is done again right
    after (a consecutive repeat, counted)."""
    ledger = tmp_path / "ledger.jsonl"
    reader = LedgerReader(ledger)
    env = environment(redis_server.url, PREFIX, ledger, partitions=4, **ORDERED_CONSUME)
    labels = {f"{s.key}:{s.n}" for s in steps()}
    with anyio.fail_after(SAFETY):
        async with connected(redis_server, 4) as (streams, groups):
            with Workers(env, tmp_path / "logs") as workers:
                processes = workers.start_many(4)
                for process in processes:
                    await workers.wait_running(process)
                async with anyio.create_task_group() as tasks:
                    tasks.start_soon(partial(publish_all, streams, steps(), publishers=ORDER_KEYS))
                    records = await wait_done_count(
                        reader, STEP_HANDLER, ORDER_EVENTS // 2, workers
                    )
                    victim = busiest(records, processes)
                    stranded = in_flight(records, victim.pid)
                    workers.kill(victim)
                counts = await wait_handled(
                    reader, STEP_HANDLER, labels, groups, step_streams(4), workers
                )
                exit_codes = await workers.stop()

    broken, repeats = order_breaks(reader.read())
    print(
        f"\norder: {ORDER_EVENTS} events over {ORDER_KEYS} keys, {sum(counts.values())} "
        f"handled, {duplicates(counts)} duplicates, {repeats} consecutive repeats "
        f"(worker {victim.pid} killed with {stranded} step(s) in flight)"
    )
    assert not broken, f"steps done out of publish order, per key: {broken}"
    assert repeats == duplicates(counts)  # every duplicate is a consecutive repeat
    assert set(exit_codes.values()) == {0}, workers.logs_tail()


# -- 9: SIGTERM of a worker with handlers in flight ------------------------------------------------

SIGTERM_CONCURRENCY = 4
SIGTERM_JOBS = 12  # 4 run in the worker stopped; the rest wait (read ahead, or unread)


async def wait_full(
    workers: Workers, process: subprocess.Popen[bytes], reader: LedgerReader
) -> None:
    """Until the worker runs as many (gated) jobs as its concurrency allows."""

    async def full() -> bool:
        return in_flight(reader.read(), process.pid) == SIGTERM_CONCURRENCY

    await until("4 jobs in flight in the worker to stop", full, workers)


async def stop_while_gated(
    workers: Workers, process: subprocess.Popen[bytes], reader: LedgerReader, gate: Path
) -> tuple[list[Record], int]:
    """SIGTERM the worker, whose jobs wait for the gate; open the gate once it is stopping (so
    they were in flight when its stop began); the jobs it had started, and its exit code."""
    started = [r for r in reader.read() if r.pid == process.pid and r.phase == "start"]
    workers.terminate(process)

    async def stopping() -> bool:
        return "worker stopping on SIGTERM" in workers.log_text(process)

    await until("the worker stopping", stopping, workers)
    await anyio.Path(gate).touch()
    return started, await workers.wait_exit(process)


async def test_sigterm_finishes_and_acks_in_flight_handlers(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A worker runs 4 gated jobs (of 12); a second worker joins; the first gets SIGTERM, then
    the gate opens: its 4 finish there and are acknowledged, it exits 0; no job is done twice;
    the second worker handles the rest, and the stopped one is gone from the group."""
    ledger = tmp_path / "ledger.jsonl"
    reader = LedgerReader(ledger)
    gate = tmp_path / "gate"
    env = environment(redis_server.url, PREFIX, ledger, **CONSUME)
    with anyio.fail_after(SAFETY):
        async with connected(redis_server) as (streams, groups):
            with Workers(env, tmp_path / "logs") as workers:
                # The first alone at first, so that it surely runs 4 (a worker reads ahead:
                # one that came first could take all 12).
                first = workers.start("--concurrency", str(SIGTERM_CONCURRENCY))
                leaving = await workers.wait_running(first)
                await publish_all(streams, jobs(SIGTERM_JOBS, gate=str(gate)))
                await wait_full(workers, first, reader)
                second = workers.start("--concurrency", str(SIGTERM_CONCURRENCY))
                await workers.wait_running(second)

                started, exit_code = await stop_while_gated(workers, first, reader, gate)
                unacknowledged = await groups.pending(started, JOB_HANDLER)
                counts = await wait_handled(
                    reader, JOB_HANDLER, job_labels(SIGTERM_JOBS), groups, job_streams(), workers
                )
                left = await wait_removed(groups, job_streams(), JOB_HANDLER, leaving)
                remaining_codes = await workers.stop()

    done_by = {r.label: r.pid for r in reader.read() if r.phase == "done"}
    held = {r.label for r in started}
    by_first = {label for label, pid in done_by.items() if pid == first.pid}
    print(
        f"\nsigterm: {SIGTERM_JOBS} jobs, {sum(counts.values())} handled, "
        f"{duplicates(counts)} duplicates; worker {first.pid} stopped with {sorted(held)} in "
        f"flight, did {len(by_first)}, the other {len(done_by) - len(by_first)}; consumers "
        f"left: {left}"
    )
    assert exit_code == 0, workers.log_tail(first)
    assert held <= by_first, "a job in flight at the stop was not finished there"
    assert not unacknowledged, f"in flight at the stop, still pending after: {unacknowledged}"
    assert duplicates(counts) == 0, f"a job that had completed ran again: {counts}"
    assert set(done_by.values()) <= {first.pid, second.pid}
    assert remaining_codes == {second.pid: 0}, workers.log_tail(second)


async def test_a_stopped_worker_leaves_nothing_pending_and_leaves_its_groups(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """A worker alone, 12 gated jobs waiting, 4 of them running: SIGTERM, the gate opens;
    once it exited 0, nothing is pending under its name and it is in no group (what
    ``python -m aioevents worker`` promises: it finishes what it has and leaves)."""
    ledger = tmp_path / "ledger.jsonl"
    reader = LedgerReader(ledger)
    gate = tmp_path / "gate"
    env = environment(redis_server.url, PREFIX, ledger, **CONSUME)
    with anyio.fail_after(SAFETY):
        async with connected(redis_server) as (streams, groups):
            with Workers(env, tmp_path / "logs") as workers:
                await publish_all(streams, jobs(SIGTERM_JOBS, gate=str(gate)))
                worker = workers.start("--concurrency", str(SIGTERM_CONCURRENCY))
                name = await workers.wait_running(worker)
                await wait_full(workers, worker, reader)
                started, exit_code = await stop_while_gated(workers, worker, reader, gate)
                left = await groups.consumers(job_streams(), JOB_HANDLER)

    print(f"\nstopped alone: {len(started)} in flight at the stop; consumers left: {left}")
    assert exit_code == 0, workers.log_tail(worker)
    assert name not in left, f"the stopped worker is still in the group, pending: {left[name]}"


# -- 3: a worker killed while holding pending entries ------------------------------------------

HELD_JOBS = 10


@pytest.mark.parametrize("partitions", [None, 4], ids=["no-partitions", "4-partitions"])
async def test_a_killed_workers_pending_entries_go_to_another_and_it_leaves_the_group(
    redis_server: RedisServer, tmp_path: Path, partitions: int | None
) -> None:
    """A worker holds 10 pending entries (gated jobs); a second worker joins; the first is
    killed with SIGKILL: the second gets all 10 (each one more delivery) and the dead
    consumer is removed from every group."""
    ledger = tmp_path / "ledger.jsonl"
    reader = LedgerReader(ledger)
    gate = tmp_path / "gate"
    env = environment(redis_server.url, PREFIX, ledger, partitions=partitions, **CONSUME)
    streams_of_jobs = job_streams(partitions)
    with anyio.fail_after(SAFETY):
        async with connected(redis_server, partitions) as (streams, groups):
            with Workers(env, tmp_path / "logs") as workers:
                # Published first, so that the holder reads all 10 at once: a partition's
                # holder reads no more while its entry in hand waits for the gate.
                await publish_all(streams, jobs(HELD_JOBS, gate=str(gate)))
                holder = workers.start()
                dead = await workers.wait_running(holder)

                async def holds_all() -> bool:
                    held = await groups.consumers(streams_of_jobs, JOB_HANDLER)
                    return held.get(dead, 0) == HELD_JOBS

                await until("10 entries pending for the first worker", holds_all, workers)
                survivor = workers.start()
                await workers.wait_running(survivor)

                workers.kill(holder)
                await anyio.Path(gate).touch()
                await wait_handled(
                    reader,
                    JOB_HANDLER,
                    job_labels(HELD_JOBS),
                    groups,
                    streams_of_jobs,
                    workers,
                )
                left = await wait_removed(groups, streams_of_jobs, JOB_HANDLER, dead)
                exit_codes = await workers.stop()

    finished = [r for r in reader.read() if r.phase == "done"]
    print(
        f"\nkilled holder ({partitions} partitions): {HELD_JOBS} held, {len(finished)} done by "
        f"the survivor, deliveries {sorted(r.deliveries for r in finished)}; consumers left: "
        f"{left}"
    )
    assert {r.pid for r in finished} == {survivor.pid}
    assert all(r.deliveries >= 2 for r in finished)  # the dead worker had each delivered
    assert exit_codes == {survivor.pid: 0}, workers.log_tail(survivor)
    assert pid_of(dead) == holder.pid
