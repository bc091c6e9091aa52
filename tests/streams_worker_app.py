"""The application the worker processes of the streams fault tests run.

``python -m aioevents worker tests.streams_worker_app:bus`` imports this module and reads
``bus``: it is built on first access from the environment that `environment` makes (the test's
own redis-server, a stream prefix of the test's own, partitions, a ledger file, `consume`'s
options), so importing the module, as the tests do for the event types, needs none of it.

The handlers write what they do to the *ledger*, one file every worker appends to, which is how
a test sees what ran, how often and in which order without asking the library: a line when a
handler starts and one when it is done, each a single ``write`` to a descriptor opened with
``O_APPEND``. A line written is in the file whatever happens to the process afterwards (the
kernel has it: ``kill -9`` loses nothing written; only a machine crash would, which these tests
do not cause, so there is no fsync). Appends to one file are serialised by the kernel, so the
file's order is the order in which handlers finished, across processes: per-key order is read
from it. The ledger is a file, not a Redis list, so that a test that kills the Redis server
does not make the handlers fail and change what is being measured.

A ``done`` line is written before the handler returns, so before its entry is acknowledged:
every acknowledged entry has one, and an entry run again after a kill has two (a duplicate,
which the tests count).
"""

from __future__ import annotations

import json
import os
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio

from aioevents import EventBus
from aioevents.outbox import uuid7
from aioevents.redis_streams import RedisStreams
from aioevents.streams import Consumer, Entry, Streams, consume, current_entry

__all__ = [
    "CONSUME_DEFAULTS",
    "JOB_HANDLER",
    "STEP_HANDLER",
    "FailedOnPurpose",
    "JobWasQueued",
    "Ledger",
    "LedgerReader",
    "Record",
    "StepWasTaken",
    "WorkerApp",
    "build",
    "done",
    "environment",
    "from_environment",
    "make_streams",
    "publish_all",
    "read_ledger",
    "running_entry",
]

REDIS_URL_VARIABLE = "AIOEVENTS_WORKER_REDIS_URL"
PREFIX_VARIABLE = "AIOEVENTS_WORKER_PREFIX"
PARTITIONS_VARIABLE = "AIOEVENTS_WORKER_PARTITIONS"  # empty: one stream per event type
LEDGER_VARIABLE = "AIOEVENTS_WORKER_LEDGER"
OPTIONS_VARIABLE = "AIOEVENTS_WORKER_OPTIONS"  # JSON: keyword arguments of consume()

JOB_HANDLER = "worker-test.run-job"
STEP_HANDLER = "worker-test.log-step"
GATE_POLL = 0.05  # seconds between a gated job's looks for its gate file

# consume()'s options in the workers unless a test says otherwise. min_idle is short, so that
# a killed worker's entries are reclaimed within seconds, but not so short that a worker
# stalled on a loaded machine loses what it holds; retries are quick.
CONSUME_DEFAULTS: Mapping[str, Any] = {
    "concurrency": 16,
    "min_idle": 5.0,
    "max_deliveries": 10,
    "wait_initial": 0.05,
    "wait_max": 1.0,
    "wait_jitter": 0.05,
    "drain_timeout": 30.0,
}


@dataclass(frozen=True, slots=True, kw_only=True)
class JobWasQueued:
    """Job ``number``: no order. Its handler takes ``seconds`` (so that it is in flight when a
    worker is stopped) and fails its first ``failures`` deliveries. With a ``gate`` (a file
    path) it waits, started, until the file exists: the test holds it in flight for as long
    as it needs, whatever the machine's speed, and lets it go by creating the file."""

    __event_name__ = "worker-test.job-was-queued"

    number: int
    seconds: float = 0.0
    failures: int = 0
    gate: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class StepWasTaken:
    """Step ``n`` of ``key``: published in ``n`` order per key, handled in that order. Its
    handler takes ``seconds`` between its start and done lines (a kill can land in between)."""

    __event_name__ = "worker-test.step-was-taken"
    __event_key__ = "key"

    key: str
    n: int
    seconds: float = 0.0


class FailedOnPurpose(Exception):
    """A job's delivery that was told to fail."""


# -- the ledger ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Record:
    """One ledger line: a handler started or was done with one delivery of an entry."""

    phase: str  # "start" or "done"
    handler: str
    label: str  # "job:<number>" or "<key>:<n>": what the test published
    event_id: str
    stream: str
    entry_id: str
    deliveries: int  # 1 the first time the handler's group had the entry
    pid: int


class Ledger:
    """The file the handlers of every worker append their records to (see the module doc)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def write(self, phase: str, handler: str, label: str, entry: Entry) -> None:
        record = Record(
            phase,
            handler,
            label,
            entry.envelope.id,
            entry.stream,
            entry.id,
            entry.deliveries,
            os.getpid(),
        )
        line = json.dumps([*_fields(record)]) + "\n"
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        os.write(self._fd, line.encode())  # one write: a whole line, never interleaved


def _fields(record: Record) -> tuple[object, ...]:
    return tuple(getattr(record, name) for name in Record.__slots__)


def read_ledger(path: Path) -> list[Record]:
    """Every complete record, in the order they were written (no file yet: none)."""
    return LedgerReader(path).read()


class LedgerReader:
    """Reads a growing ledger: each `read` parses only what was appended since the last one
    (a test polling a ledger of 40,000 lines leaves the workers the CPU)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[Record] = []  # every complete record read so far, in order
        self._offset = 0

    def read(self) -> list[Record]:
        """Read what was appended; return all the records so far."""
        try:
            with self.path.open("rb") as ledger:
                ledger.seek(self._offset)
                appended = ledger.read()
        except FileNotFoundError:
            return self.records
        complete = appended[: appended.rfind(b"\n") + 1]  # a line still being written waits
        self._offset += len(complete)
        for line in complete.splitlines():
            self.records.append(Record(*json.loads(line)))
        return self.records


def done(records: Iterable[Record], handler: str) -> Counter[str]:
    """How often the handler was done with each label: 1 each when nothing ran twice."""
    return Counter(r.label for r in records if r.phase == "done" and r.handler == handler)


# -- the application -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerApp:
    bus: EventBus
    streams: Streams
    consumer: Consumer
    ledger: Ledger


def make_streams(redis_url: str, prefix: str, partitions: int | None = None) -> Streams:
    """The streams the workers read: the test publishes to (and inspects) the same."""
    return Streams(RedisStreams(redis_url), prefix=prefix, partitions=partitions)


def build(streams: Streams, ledger: Ledger, **options: Any) -> WorkerApp:
    """A bus whose two handlers are fed from ``streams`` by `consume` (``options`` over
    `CONSUME_DEFAULTS`)."""
    bus = EventBus()

    async def run_job(event: JobWasQueued) -> None:
        entry = running_entry()
        ledger.write("start", JOB_HANDLER, f"job:{event.number}", entry)
        if entry.deliveries <= event.failures:
            raise FailedOnPurpose(f"job {event.number}, delivery {entry.deliveries}")
        if event.gate:
            await wait_for_gate(event.gate)
        if event.seconds:
            await anyio.sleep(event.seconds)
        ledger.write("done", JOB_HANDLER, f"job:{event.number}", entry)

    async def log_step(event: StepWasTaken) -> None:
        entry = running_entry()
        ledger.write("start", STEP_HANDLER, f"{event.key}:{event.n}", entry)
        if event.seconds:
            await anyio.sleep(event.seconds)
        ledger.write("done", STEP_HANDLER, f"{event.key}:{event.n}", entry)

    bus.subscribe(JobWasQueued, run_job, name=JOB_HANDLER)
    bus.subscribe(StepWasTaken, log_step, name=STEP_HANDLER)
    settings = {**CONSUME_DEFAULTS, **options}
    consumer = consume(bus, JobWasQueued, StepWasTaken, streams=streams, **settings)
    return WorkerApp(bus, streams, consumer, ledger)


async def wait_for_gate(path: str) -> None:
    """Until the file exists (a test made it): polled, since the test is another process."""
    while True:
        if _exists(path):
            return
        await anyio.sleep(GATE_POLL)


def _exists(path: str) -> bool:
    return os.path.exists(path)  # a stat: too quick to be worth a thread


def running_entry() -> Entry:
    entry = current_entry()
    if entry is None:
        raise RuntimeError("a handler fed by consume() runs for an entry")
    return entry


def environment(
    redis_url: str,
    prefix: str,
    ledger: Path,
    *,
    partitions: int | None = None,
    **options: Any,
) -> dict[str, str]:
    """The variables a worker reads (``options``: consume()'s, over `CONSUME_DEFAULTS`)."""
    return {
        REDIS_URL_VARIABLE: redis_url,
        PREFIX_VARIABLE: prefix,
        PARTITIONS_VARIABLE: "" if partitions is None else str(partitions),
        LEDGER_VARIABLE: str(ledger),
        OPTIONS_VARIABLE: json.dumps(options),
    }


def from_environment() -> WorkerApp:
    partitions = os.environ.get(PARTITIONS_VARIABLE, "")
    streams = make_streams(
        os.environ[REDIS_URL_VARIABLE],
        os.environ[PREFIX_VARIABLE],
        int(partitions) if partitions else None,
    )
    ledger = Ledger(Path(os.environ[LEDGER_VARIABLE]))
    return build(streams, ledger, **json.loads(os.environ.get(OPTIONS_VARIABLE) or "{}"))


# -- publishing (the test's side) ------------------------------------------------------------------


async def publish_all(
    streams: Streams,
    events: Iterable[object],
    *,
    publishers: int = 50,
    within: float = 300.0,
    published: Callable[[], object] | None = None,
) -> int:
    """Publish ``events`` from ``publishers`` concurrent tasks; each StepWasTaken with its key.

    One task publishes all the steps of a key, in the order given: that is their publish
    order. A publish that fails because Redis is down (or was restarted: redis-py's pooled
    connections fail once each) is tried again with the same event id, for up to ``within``
    seconds: an XADD that had gone through makes a second entry of the same event, which the
    ledger shows as that event handled twice, never as one lost. ``published`` is called
    after each event the transport took. Returns how many attempts failed (each retried).
    """
    queues: list[list[object]] = [[] for _ in range(publishers)]
    for index, event in enumerate(events):
        slot = zlib.crc32(event.key.encode()) if isinstance(event, StepWasTaken) else index
        queues[slot % publishers].append(event)
    deadline = time.monotonic() + within
    retried = 0

    async def publish(queue: list[object]) -> None:
        nonlocal retried
        for event in queue:
            key = event.key if isinstance(event, StepWasTaken) else None
            event_id = str(uuid7())
            while True:
                try:
                    await streams.publish(event, key=key, event_id=event_id)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    retried += 1
                    await anyio.sleep(0.1)
            if published is not None:
                published()

    async with anyio.create_task_group() as tasks:
        for queue in queues:
            tasks.start_soon(publish, queue)
    return retried


_app: WorkerApp | None = None


def __getattr__(name: str) -> EventBus:
    """``bus``, for ``python -m aioevents worker tests.streams_worker_app:bus``: built from the
    environment on first access, so that importing this module (as the tests do) needs none."""
    global _app
    if name != "bus":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        _app = from_environment()
    return _app.bus
