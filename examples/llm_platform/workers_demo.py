"""``python -m examples.llm_platform --workers N``: the heavy handlers in N workers.

1. This process is the web process: its platform externalizes the heavy handlers' events to
   streams (see `offload`) instead of running them. The streams are on Redis at ``REDIS_URL``,
   under a prefix of this run's own whose keys are deleted at the end; without ``REDIS_URL``
   they are in memory.
2. N workers start. With Redis, N OS processes: ``python -m aioevents worker
   examples.llm_platform.worker:heavy_bus`` on the same database. Without, N consumers in this
   process, each with a bus of its own (streams in memory cannot be shared between processes).
3. The default demo's scenario runs (`demo.run_demo`). A step is printed once its durable
   deliveries are done (the externalizing ones among them) and every event it externalized
   was handled by a worker: counted from the workers' ledger (`offload.LedgerHook`).
4. The workers are stopped with SIGTERM (in-process: their buses stopped): each finishes what it
   runs, acknowledges it, leaves its consumer groups and exits 0.
5. The report: the default demo's, then the consumer groups (consumers, pending, lag), and per
   event externalized which worker handled it (pid and consumer name), with the counts: handled,
   more than once, not at all.

The exit status is 1 if a handler failed, a delivery or an externalized event was left undone,
or a worker did not start or stop cleanly.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

import anyio
from anyio.abc import Process, TaskGroup, TaskStatus
from anyio.streams.text import TextReceiveStream
from redis.asyncio import Redis
from sqlalchemy.engine import URL, make_url

from aioevents import EventBus, event_name
from aioevents.outbox import Outbox
from aioevents.streams import Streams

from . import handlers
from .app import Platform, engine_and_cache_from_env, open_platform, throttle_from_env
from .changes import ChangeRecorder, count_rows
from .deliveries import stored_deliveries
from .demo import print_handlers, run_demo
from .deps import Deps
from .formatting import plural, table
from .offload import FileLedger, Handled, Ledger, MemoryLedger, open_streams, worker_bus

__all__ = ["Outcome", "Worker", "run_with_workers", "run_workers_demo"]

ROOT = Path(__file__).resolve().parents[2]  # where ``examples`` is importable from
WORKER = [sys.executable, "-m", "aioevents", "worker", "examples.llm_platform.worker:heavy_bus"]
# What `python -m aioevents worker` logs once its consumer runs: its name and groups.
JOINED = re.compile(r"worker (?P<consumer>\S+) running; groups: (?P<groups>.*)")
# The durable handlers that externalize the heavy events are named after them.
EXTERNALIZING = {f"externalize:{event_name(t)}" for t in handlers.HEAVY_EVENTS}

START_DEADLINE = 60.0  # seconds for a worker process to start and join its groups
HANDLED_DEADLINE = 60.0  # seconds for the workers to handle what a step externalized
STOP_DEADLINE = 60.0  # seconds for a worker to drain and exit on SIGTERM


@dataclass
class Worker:
    """A worker of this run: an OS process, or (``process`` None) a consumer in this one."""

    number: int
    consumer: str = ""  # its name in the consumer groups
    process: Process | None = None
    stopping: anyio.Event = field(default_factory=anyio.Event)  # tells an in-process one
    done: anyio.Event = field(default_factory=anyio.Event)  # an in-process one stopped
    log: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    stopped: bool = False

    @property
    def pid(self) -> int:
        return os.getpid() if self.process is None else self.process.pid

    @property
    def name(self) -> str:
        if self.process is None:
            return f"worker {self.number} (consumer {self.consumer} in this process)"
        return f"worker {self.number} (pid {self.pid})"

    def did(self, record: Handled) -> bool:
        if self.process is None:
            return record.consumer == self.consumer
        return record.pid == self.pid

    def check_alive(self) -> None:
        """Raise, with its log, if its process exited without being told to."""
        if self.process is None or self.stopped or self.process.returncode is None:
            return
        tail = "\n".join(self.log)
        raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")


@dataclass
class Outcome:
    """What a run did: its exit status, its workers, the events the web process externalized
    (event id: event name) and the workers' ledger."""

    status: int
    workers: list[Worker]
    externalized: dict[str, str]
    handled: list[Handled]


async def run_workers_demo(count: int, *, redis_url: str | None, verbose: bool = False) -> int:
    outcome = await run_with_workers(count, redis_url=redis_url, verbose=verbose)
    return outcome.status


async def run_with_workers(
    count: int, *, redis_url: str | None, prefix: str | None = None, verbose: bool = False
) -> Outcome:
    """The demo with ``count`` workers, on Redis at ``redis_url`` or in memory (None).

    ``prefix`` names the streams (by default one of this run's own); every key under it is
    deleted at the end.
    """
    prefix = prefix or f"llm-platform-demo-{secrets.token_hex(4)}"
    engine, cache = engine_and_cache_from_env()
    database = engine.url.render_as_string(hide_password=True)
    print(f"database: {database}; cache: {type(cache).__name__}")
    count_rows(engine)
    streams = open_streams(redis_url, prefix)
    print(streams_line(redis_url, prefix, count))
    recorder = ChangeRecorder()
    outcome = Outcome(1, [], {}, [])
    try:
        with tempfile.TemporaryDirectory(prefix="llm-platform-") as directory:
            ledger: Ledger = MemoryLedger()
            if redis_url is not None:
                ledger = FileLedger(Path(directory) / "handled.jsonl")
            async with open_platform(
                engine, cache, throttle=throttle_from_env(), hooks=[recorder], streams=streams
            ) as platform:
                print_handlers(platform)
                heavy = ", ".join(event_name(t) for t in handlers.HEAVY_EVENTS)
                print(f"externalized, for the workers' heavy handlers: {heavy}")
                async with platform.bus:  # its relay runs the externalizing handlers
                    if redis_url is None:
                        outcome = await run_here(count, platform, recorder, streams, ledger)
                    else:
                        environment = worker_environment(engine.url, redis_url, prefix, ledger)
                        outcome = await run_on_processes(
                            count, platform, recorder, streams, ledger, environment, verbose
                        )
    finally:
        with anyio.CancelScope(shield=True):
            await streams.transport.aclose()
            if redis_url is not None:
                await delete_keys(redis_url, prefix)
    return outcome


def streams_line(redis_url: str | None, prefix: str, count: int) -> str:
    if redis_url is None:
        return (
            f"streams: in memory, prefix {prefix} (no REDIS_URL: the {plural(count, 'worker')} "
            f"are consumers in this process, pid {os.getpid()}; set REDIS_URL for worker "
            f"processes)"
        )
    where = make_url(redis_url).render_as_string(hide_password=True)
    return f"streams: Redis at {where}, prefix {prefix} (this run's own: deleted at the end)"


def worker_environment(url: URL, redis_url: str, prefix: str, ledger: Ledger) -> dict[str, str]:
    """What the worker processes read: this process's environment, the streams, the ledger, and
    the same database wherever they start (a relative SQLite path made absolute)."""
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        url = url.set(database=os.path.abspath(url.database))
    assert isinstance(ledger, FileLedger)
    return {
        **os.environ,
        "DATABASE_URL": url.render_as_string(hide_password=False),
        "REDIS_URL": redis_url,
        "STREAMS_PREFIX": prefix,
        "HANDLED_LEDGER": str(ledger.path),
    }


# -- the workers ---------------------------------------------------------------------------------


async def run_here(
    count: int, platform: Platform, recorder: ChangeRecorder, streams: Streams, ledger: Ledger
) -> Outcome:
    """The workers as consumers in this process, each with a bus of its own, run in a task of
    its own as a process would run it."""
    workers: list[Worker] = []
    failure: BaseException | None = None
    try:
        async with anyio.create_task_group() as tasks:
            try:
                for number in range(1, count + 1):
                    deps = Deps(platform.sessions, platform.cache)
                    bus, consumer = worker_bus(deps, streams, ledger=ledger)
                    worker = Worker(number, consumer.name)
                    workers.append(worker)
                    await tasks.start(serve, bus, worker)
                    print(f"started {worker.name}")
                return await scenario(platform, recorder, streams, ledger, workers)
            finally:
                with anyio.CancelScope(shield=True):
                    for worker in workers:
                        if not worker.stopped:
                            await stop(worker)
    except* (TimeoutError, RuntimeError) as failed:
        failure = failed.exceptions[0]
    print(f"\nthe workers demo failed: {failure}")
    return Outcome(1, workers, {}, ledger.read())


async def serve(
    bus: EventBus, worker: Worker, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED
) -> None:
    """Run an in-process worker's bus (its consumer joins the groups) until it is stopped."""
    try:
        async with bus:
            task_status.started()
            await worker.stopping.wait()
    finally:
        worker.done.set()


async def run_on_processes(
    count: int,
    platform: Platform,
    recorder: ChangeRecorder,
    streams: Streams,
    ledger: Ledger,
    environment: dict[str, str],
    verbose: bool,
) -> Outcome:
    """The workers as OS processes; their logs read as they come."""
    workers: list[Worker] = []
    failure: BaseException | None = None
    try:
        async with anyio.create_task_group() as readers:
            try:
                for number in range(1, count + 1):
                    await start_process(number, environment, readers, workers, verbose)
                await joined(workers)
                return await scenario(platform, recorder, streams, ledger, workers)
            finally:
                with anyio.CancelScope(shield=True):
                    await kill_all(workers)
    except* (TimeoutError, RuntimeError) as failed:  # a worker's log says why
        failure = failed.exceptions[0]
    print(f"\nthe workers demo failed: {failure}")
    return Outcome(1, workers, {}, ledger.read())


async def start_process(
    number: int,
    environment: dict[str, str],
    readers: TaskGroup,
    workers: list[Worker],
    verbose: bool,
) -> None:
    process = await anyio.open_process(
        WORKER,
        cwd=ROOT,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    worker = Worker(number, process=process)
    workers.append(worker)
    readers.start_soon(read_log, worker, verbose)
    print(f"started {worker.name}: {' '.join(['python', *WORKER[1:]])}")


async def read_log(worker: Worker, verbose: bool) -> None:
    """Read the worker's log (its stderr) line by line until it exits; learn its name."""
    assert worker.process is not None and worker.process.stderr is not None
    pending = ""
    async for chunk in TextReceiveStream(worker.process.stderr, errors="replace"):
        *lines, pending = (pending + chunk).split("\n")
        for line in lines:
            worker.log.append(line)
            found = JOINED.search(line)
            if found is not None:
                worker.consumer = found["consumer"]
            if verbose:
                print(f"    | worker {worker.number}: {line}")


async def joined(workers: Sequence[Worker]) -> None:
    """Wait until every worker process says its consumer runs."""
    deadline = time.monotonic() + START_DEADLINE
    for worker in workers:
        while not worker.consumer:
            worker.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker.name} did not start within {START_DEADLINE:g} s")
            await anyio.sleep(0.05)
        print(f"{worker.name} joined the consumer groups as {worker.consumer}")


async def stop(worker: Worker) -> None:
    """SIGTERM (in this process: its bus stopped): it finishes what it runs, acknowledges it,
    leaves its groups and exits."""
    worker.stopped = True
    if worker.process is None:
        worker.stopping.set()
        await worker.done.wait()
        print(f"stopped {worker.name}: drained")
        return
    assert worker.process is not None
    worker.process.send_signal(signal.SIGTERM)
    with anyio.move_on_after(STOP_DEADLINE):
        await worker.process.wait()
    if worker.process.returncode is None:
        raise TimeoutError(f"{worker.name} still running {STOP_DEADLINE:g} s after SIGTERM")
    if worker.process.returncode != 0:
        tail = "\n".join(worker.log)
        raise RuntimeError(f"{worker.name} exited with {worker.process.returncode}:\n{tail}")
    print(f"stopped {worker.name} with SIGTERM: drained, exit 0")


async def kill_all(workers: Sequence[Worker]) -> None:
    """No worker process outlives the demo, whatever happened: only those it started, by pid."""
    for worker in workers:
        if worker.process is not None and worker.process.returncode is None:
            worker.stopped = True
            worker.process.kill()
            await worker.process.wait()


# -- the scenario, and what the workers did -------------------------------------------------------


async def scenario(
    platform: Platform,
    recorder: ChangeRecorder,
    streams: Streams,
    ledger: Ledger,
    workers: list[Worker],
) -> Outcome:
    """The default demo's scenario, each step waiting for the workers; then the workers stopped
    and the report."""
    since = datetime.now(UTC)
    wait = partial(wait_handled, platform.outbox, ledger, since, workers)
    status = await run_demo(platform, recorder, also_wait=wait)
    print()
    for worker in workers:
        await stop(worker)
    externalized = await externalized_since(platform.outbox, since)
    handled = ledger.read()
    await print_groups(streams)
    missing = print_handled(externalized, handled, workers)
    return Outcome(1 if status or missing else 0, workers, externalized, handled)


async def externalized_since(outbox: Outbox, since: datetime) -> dict[str, str]:
    """The events externalized since ``since``, by the outbox's deliveries of the externalizing
    handlers: event id -> event name."""
    deliveries = await stored_deliveries(outbox, since=since)
    return {str(d.event_id): d.event_name for d in deliveries if d.handler in EXTERNALIZING}


async def wait_handled(
    outbox: Outbox, ledger: Ledger, since: datetime, workers: Sequence[Worker]
) -> None:
    """Poll the ledger until every event externalized since ``since`` was handled."""
    deadline = time.monotonic() + HANDLED_DEADLINE
    while True:
        for worker in workers:
            worker.check_alive()
        wanted = await externalized_since(outbox, since)
        missing = wanted.keys() - {record.event_id for record in ledger.read()}
        if not missing:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"{plural(len(missing), 'externalized event')} not handled by the workers "
                f"after {HANDLED_DEADLINE:g} s"
            )
        await anyio.sleep(0.05)


async def print_groups(streams: Streams) -> None:
    groups = await streams.groups(*handlers.HEAVY_EVENTS)
    rows = [
        (g.stream, g.group, g.consumers, g.pending, "-" if g.lag is None else g.lag) for g in groups
    ]
    print("consumer groups, the workers gone:")
    print("\n".join(table(("stream", "group", "consumers", "pending", "lag"), rows)))


def print_handled(
    externalized: dict[str, str], handled: Sequence[Handled], workers: Sequence[Worker]
) -> int:
    """The workers' ledger, and the counts; return how many events no worker handled."""

    def label(record: Handled) -> str:
        by = [worker for worker in workers if worker.did(record)]
        return f"worker {by[0].number}" if by else "?"

    rows = [(r.event, r.handler, label(r), r.pid, r.consumer, r.deliveries) for r in handled]
    print("\nexternalized events, as the workers' ledger has them:")
    headers = ("event", "handler", "handled by", "pid", "consumer", "deliveries")
    print("\n".join(table(headers, rows)))
    runs = Counter(record.event_id for record in handled if record.event_id in externalized)
    per_worker = Counter(label(record) for record in handled)
    spread = ", ".join(f"{name}: {per_worker[name]}" for name in sorted(per_worker))
    missing = len(externalized.keys() - runs.keys())
    twice = sum(1 for n in runs.values() if n > 1)
    print(
        f"{plural(len(externalized), 'externalized event')}: {len(runs)} handled ({spread}), "
        f"{twice} more than once, {missing} not at all"
    )
    return missing


async def delete_keys(redis_url: str, prefix: str) -> None:
    """Delete this run's streams: every key under its prefix, and nothing else."""
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
