"""``python -m examples.llm_platform --crash``: a worker killed mid-delivery, a survivor.

1. This process records `EVENTS` document-index-created events, `DOCUMENTS_PER_EVENT`
   documents each, one transaction per event. Its bus does not run, so it has no relay:
   every delivery is left in the outbox for the workers.
2. Worker 1 starts: ``python -m aioevents relay examples.llm_platform.worker:bus``, an OS
   process of its own, indexing slowed to `INDEXING_PAUSE` seconds per document and leases
   of `LEASE` seconds. It claims the deliveries and runs four at a time (the outbox's
   default concurrency).
3. Once it has completed a delivery and is in the middle of others, it is killed with
   SIGKILL: no drain, no outcome written. What it held stays leased until the lease runs out.
4. Worker 2, the survivor, starts, claims what worker 1 left once those leases have run out,
   and finishes the work; then it is stopped with SIGTERM.
5. The report: per delivery, the processes that ran it (from the workers' logs, see
   `worker.DeliveryLog`); the outbox's table; how many deliveries were lost (not completed:
   0) and run twice (cut short in worker 1, run again in worker 2); and the documents, each
   indexed once: as many segments as its text splits into, none doubled.

The exit status is 1 if anything was lost, doubled or left undone, or the kill came too late
to cut a delivery short. It runs on the embedded SQLite default and on PostgreSQL
(``DATABASE_URL``, ``DATABASE_SCHEMA``), as the demo does.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import anyio
from anyio.abc import Process, TaskGroup
from anyio.streams.text import TextReceiveStream
from sqlalchemy import func, select
from sqlalchemy.engine import URL

from aioevents.outbox import DeliveryRecord, DeliveryStatus

from .app import Platform, engine_and_cache_from_env, open_platform, throttle_from_env
from .deliveries import stored_deliveries
from .formatting import deliveries_table, plural, table
from .handlers.create_document_index import split_text
from .models import Document, DocumentSegment
from .worker import parse_delivery_line

ROOT = Path(__file__).resolve().parents[2]  # where ``examples`` is importable from
WORKER = [sys.executable, "-m", "aioevents", "relay", "examples.llm_platform.worker:bus"]
HANDLER = "create_document_index"

EVENTS = 8
DOCUMENTS_PER_EVENT = 2
INDEXING_PAUSE = 0.5  # seconds per document: a delivery takes about a second
LEASE = 2.0  # seconds: what worker 1 held is free again soon after the kill

START_DEADLINE = 60.0  # seconds for worker 1 to start and complete its first delivery
DONE_DEADLINE = 120.0  # seconds for the survivor to finish everything
STOP_DEADLINE = 60.0  # seconds for the survivor to drain and exit on SIGTERM


@dataclass
class Worker:
    """A worker process this demo started, and what its log says it ran."""

    number: int
    process: Process
    started: dict[int, int] = field(default_factory=dict)  # delivery id -> attempt
    completed: set[int] = field(default_factory=set)
    failed: set[int] = field(default_factory=set)
    log: deque[str] = field(default_factory=lambda: deque(maxlen=40))
    killed: bool = False  # with SIGKILL, by this demo
    stopped: bool = False  # with SIGTERM, by this demo

    @property
    def label(self) -> str:
        return f"worker {self.number}"

    @property
    def name(self) -> str:
        return f"worker {self.number} (pid {self.process.pid})"

    @property
    def running(self) -> set[int]:
        """Deliveries it started and has not finished (by its log)."""
        return set(self.started) - self.completed - self.failed

    def note(self, line: str) -> None:
        self.log.append(line)
        logged = parse_delivery_line(line)
        if logged is None:
            return
        if logged.outcome == "started":
            self.started[logged.id] = logged.attempt
        else:
            (self.completed if logged.outcome == "completed" else self.failed).add(logged.id)

    def check_alive(self) -> None:
        """Raise, with its log, if it exited without being told to."""
        told = self.killed or self.stopped
        if not told and self.process.returncode is not None:
            tail = "\n".join(self.log)
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}:\n{tail}")


async def run_crash_demo(*, verbose: bool = False) -> int:
    engine, cache = engine_and_cache_from_env()
    print(f"database: {engine.url.render_as_string(hide_password=True)}")
    environment = worker_environment(engine.url)
    since = datetime.now(UTC)
    async with open_platform(engine, cache, throttle=throttle_from_env(), lease=LEASE) as platform:
        # The bus does not run: this process records, and only the workers deliver.
        texts = await record_indexing(platform)
        deliveries = await stored_deliveries(platform.outbox, handler=HANDLER, since=since)
        print(
            f"recorded {plural(EVENTS, 'document-index-created event')} for "
            f"{plural(len(texts), 'document')}: {plural(len(deliveries), 'delivery', 'deliveries')}"
            f" of {HANDLER} pending, leased to no one; indexing takes {INDEXING_PAUSE:g} s a "
            f"document, leases {LEASE:g} s"
        )
        ids = {delivery.id for delivery in deliveries}
        failure: BaseException | None = None
        try:
            first, survivor = await kill_one_and_finish(platform, ids, environment, verbose)
        except* (TimeoutError, RuntimeError) as failed:  # a worker's log says why
            failure = failed.exceptions[0]
        if failure is not None:
            print(f"\nthe crash demo failed: {failure}")
            return 1
        final = await the_demos(platform, ids)
        indexed_once = await check_documents(platform, texts)
    return report(final, first, survivor, indexed_once)


async def kill_one_and_finish(
    platform: Platform, ids: set[int], environment: dict[str, str], verbose: bool
) -> tuple[Worker, Worker]:
    """Steps 2 to 4: worker 1 killed mid-delivery, the survivor finishing; both workers."""
    workers: list[Worker] = []
    async with anyio.create_task_group() as readers:
        try:
            first = await start_worker(1, environment, readers, workers, verbose)
            await kill_mid_delivery(platform, ids, first)
            await show_what_the_dead_left(platform, ids)
            survivor = await start_worker(2, environment, readers, workers, verbose)
            await wait_for_the_work(platform, ids, survivor)
            await stop(survivor)
        finally:
            with anyio.CancelScope(shield=True):
                await kill_all(workers)
    return first, survivor


def worker_environment(url: URL) -> dict[str, str]:
    """The environment of the workers: this process's, and the same database wherever they
    start (a relative SQLite path made absolute)."""
    if url.get_backend_name() == "sqlite" and url.database and url.database != ":memory:":
        url = url.set(database=os.path.abspath(url.database))
    return {
        **os.environ,
        "DATABASE_URL": url.render_as_string(hide_password=False),
        "OUTBOX_LEASE": str(LEASE),
        "INDEXING_PAUSE": str(INDEXING_PAUSE),
    }


async def record_indexing(platform: Platform) -> dict[str, str]:
    """A tenant, a dataset, and `EVENTS` calls that each add `DOCUMENTS_PER_EVENT` documents
    (one event each); the documents' texts by document id."""
    services = platform.services
    tenant = (await services.tenants.create_tenant("Crash test")).value
    email = f"crash+{tenant.id[:8]}@acme.test"
    account = (await services.tenants.create_account(tenant.id, "Cy", email)).value
    dataset = (await services.datasets.create_dataset(tenant.id, account.id, "Manuals")).value
    texts: dict[str, str] = {}
    for event in range(EVENTS):
        contents = [manual(event * DOCUMENTS_PER_EVENT + n) for n in range(DOCUMENTS_PER_EVENT)]
        files = [
            (await services.documents.upload_file(tenant.id, f"manual-{n}.txt", text)).value.id
            for n, text in enumerate(contents)
        ]
        documents = (await services.documents.create_documents(dataset.id, files)).value
        texts.update(zip((document.id for document in documents), contents, strict=True))
    return texts


def manual(number: int) -> str:
    """A document of a few paragraphs: a few segments once indexed."""
    return "\n\n".join(
        f"Manual {number}, chapter {chapter}: " + "steps to follow " * (number % 3 + 2)
        for chapter in range(1, number % 3 + 3)
    )


async def start_worker(
    number: int,
    environment: dict[str, str],
    readers: TaskGroup,
    workers: list[Worker],
    verbose: bool,
) -> Worker:
    process = await anyio.open_process(
        WORKER,
        cwd=ROOT,
        env=environment,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    worker = Worker(number, process)
    workers.append(worker)
    readers.start_soon(read_log, worker, verbose)
    print(f"started {worker.name}: {' '.join(['python', *WORKER[1:]])}")
    return worker


async def read_log(worker: Worker, verbose: bool) -> None:
    """Read the worker's log (its stderr) line by line until it exits."""
    assert worker.process.stderr is not None
    pending = ""
    async for chunk in TextReceiveStream(worker.process.stderr, errors="replace"):
        *lines, pending = (pending + chunk).split("\n")
        for line in lines:
            worker.note(line)
            if verbose:
                print(f"    | worker {worker.number}: {line}")


async def kill_mid_delivery(platform: Platform, ids: set[int], worker: Worker) -> None:
    """Once the outbox has a delivery the worker completed, and the worker is in the middle
    of others (by its log), SIGKILL it."""
    deadline = time.monotonic() + START_DEADLINE
    while True:
        worker.check_alive()
        if worker.running and await completed(platform, ids):
            break
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {START_DEADLINE:g} s for {worker.name} to deliver")
        await anyio.sleep(0.02)
    worker.killed = True
    worker.process.kill()  # SIGKILL
    await worker.process.wait()
    interrupted = sorted(worker.running)
    done = await completed(platform, ids)
    print(
        f"killed {worker.name} with SIGKILL once the outbox had "
        f"{plural(done, 'delivery', 'deliveries')} completed, in the middle of "
        f"{plural(len(interrupted), 'delivery', 'deliveries')} ({', '.join(map(str, interrupted))})"
    )


async def completed(platform: Platform, ids: set[int]) -> int:
    """How many of the demo's deliveries the outbox has completed."""
    done = await the_demos(platform, ids, status=DeliveryStatus.COMPLETED)
    return len(done)


async def the_demos(
    platform: Platform, ids: set[int], *, status: DeliveryStatus | None = None
) -> list[DeliveryRecord]:
    """The demo's deliveries as stored now."""
    stored = await stored_deliveries(
        platform.outbox, status=status, handler=HANDLER, after=min(ids) - 1
    )
    return [delivery for delivery in stored if delivery.id in ids]


async def show_what_the_dead_left(platform: Platform, ids: set[int]) -> None:
    now = datetime.now(UTC)
    pending = await the_demos(platform, ids, status=DeliveryStatus.PENDING)
    held = [d.leased_until for d in pending if d.leased_until is not None and d.leased_until > now]
    free_in = max(((until - now).total_seconds() for until in held), default=0.0)
    print(
        f"the dead worker holds {plural(len(held), 'lease')} (running or claimed), free again "
        f"within {free_in:.1f} s; {len(pending) - len(held)} more pending, unclaimed"
    )


async def wait_for_the_work(platform: Platform, ids: set[int], survivor: Worker) -> None:
    """Poll the outbox until none of the demo's deliveries is pending."""
    deadline = time.monotonic() + DONE_DEADLINE
    while True:
        survivor.check_alive()
        if not await the_demos(platform, ids, status=DeliveryStatus.PENDING):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"deliveries still pending after {DONE_DEADLINE:g} s")
        await anyio.sleep(0.1)


async def stop(worker: Worker) -> None:
    """SIGTERM: the relay finishes what runs, gives back the rest and exits."""
    worker.stopped = True
    worker.process.send_signal(signal.SIGTERM)
    with anyio.move_on_after(STOP_DEADLINE):
        await worker.process.wait()
    if worker.process.returncode is None:
        raise TimeoutError(f"{worker.name} still running {STOP_DEADLINE:g} s after SIGTERM")
    if worker.process.returncode != 0:
        tail = "\n".join(worker.log)
        raise RuntimeError(f"{worker.name} exited with {worker.process.returncode}:\n{tail}")
    print(f"stopped {worker.name} with SIGTERM")


async def kill_all(workers: Sequence[Worker]) -> None:
    """No worker outlives the demo, whatever happened: only those it started, by their pid."""
    for worker in workers:
        if worker.process.returncode is None:
            worker.killed = True
            worker.process.kill()
            await worker.process.wait()


async def check_documents(platform: Platform, texts: dict[str, str]) -> bool:
    """Each document indexed, with exactly the segments its text splits into: none lost,
    none doubled by the run that was cut short and run again."""
    ids = list(texts)
    documents = select(Document.id, Document.indexing_status).where(Document.id.in_(ids))
    counted = (
        select(DocumentSegment.document_id, func.count())
        .where(DocumentSegment.document_id.in_(ids))
        .group_by(DocumentSegment.document_id)
    )
    async with platform.sessions() as session:
        statuses = dict((await session.execute(documents)).all())
        segments = dict((await session.execute(counted)).all())
    wrong = [
        document_id
        for document_id, text in texts.items()
        if statuses.get(document_id) != "completed"
        or segments.get(document_id, 0) != len(split_text(text))
    ]
    total = sum(segments.get(document_id, 0) for document_id in texts)
    print(
        f"documents: {len(texts) - len(wrong)} of {len(texts)} indexed with exactly their "
        f"segments ({total} in all); {len(wrong)} missing or doubled"
    )
    return not wrong


def report(
    deliveries: Sequence[DeliveryRecord],
    first: Worker,
    survivor: Worker,
    indexed_once: bool,
) -> int:
    """Per delivery what each worker did with it, the outbox's table, and the counts."""
    print("\nper delivery, what each worker did with it (from their logs):")
    headers = ("delivery", f"{first.label} (killed)", f"{survivor.label} (survivor)", "attempts")
    rows = [
        (d.id, what_the_first_did(d.id, first, survivor), what_it_did(d.id, survivor), d.attempts)
        for d in deliveries
    ]
    print("\n".join(table(headers, rows)))
    print("\nthe outbox's deliveries:")
    print("\n".join(deliveries_table(deliveries)))
    lost = [d for d in deliveries if d.status is not DeliveryStatus.COMPLETED]
    twice = [d.id for d in deliveries if d.id in first.started and d.id in survivor.started]
    cut_short = [i for i in twice if i not in first.completed]
    why = [f"{len(cut_short)} cut short by the kill"]
    if len(twice) > len(cut_short):
        why.append(f"{len(twice) - len(cut_short)} completed but killed before it was written")
    print(
        f"\n{plural(len(deliveries), 'delivery', 'deliveries')}: "
        f"{len(deliveries) - len(lost)} completed, {len(lost)} lost; "
        f"{len(twice)} run twice ({', '.join(why)})"
    )
    return 0 if not lost and cut_short and indexed_once else 1


def what_the_first_did(delivery_id: int, first: Worker, survivor: Worker) -> str:
    if delivery_id in first.started:
        done = what_it_did(delivery_id, first)
        if done == "completed" and delivery_id in survivor.started:
            return "completed, not written"
        return done
    if survivor.started.get(delivery_id, 1) > 1:
        return "claimed, not started"  # the survivor's claim was not the first
    return "-"


def what_it_did(delivery_id: int, worker: Worker) -> str:
    if delivery_id in worker.completed:
        return "completed"
    if delivery_id in worker.failed:
        return "failed"
    if delivery_id in worker.started:
        return "cut short by the kill" if worker.killed else "running"
    return "-"
