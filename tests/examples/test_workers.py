"""``python -m examples.llm_platform --workers 2``: the heavy handlers in two workers.

In memory (no REDIS_URL), the workers are two consumers in the test's process; on the shared
Redis, two real worker processes, under a stream prefix of the test's own whose keys are
deleted afterwards. Either way every event the web process externalized (read from the outbox,
not from the demo's report) was handled at least once, by one of the workers (its pid, or its
consumer name in one process); duplicates are counted and must match what the demo says. The
workers' work is then checked in the database.
"""

from __future__ import annotations

import os
import uuid
from collections import Counter
from pathlib import Path

import pytest
from redis.asyncio import Redis
from sqlalchemy import func, select

from aioevents.outbox import DeliveryStatus, Outbox
from examples.llm_platform import workers_demo
from examples.llm_platform.db import create_engine
from examples.llm_platform.demo import main
from examples.llm_platform.handlers.create_document_index import split_text
from examples.llm_platform.models import Document, DocumentSegment
from examples.llm_platform.scenario import FAQ

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]

# What the scenario externalizes: two index requests, a deleted document, a deleted dataset.
EXTERNALIZED = {"document-index-created": 2, "document-was-deleted": 1, "dataset-was-deleted": 1}
HANDLERS = {
    "document-index-created": "create_document_index",
    "document-was-deleted": "clean_when_document_deleted",
    "dataset-was-deleted": "clean_when_dataset_deleted",
}


@pytest.fixture
def sqlite_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The platform on a SQLite file of the test's own; cache and throttle in memory."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'workers.sqlite3'}"
    for name in ("REDIS_URL", "DATABASE_SCHEMA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", url)
    return url


async def test_in_memory_two_consumers_in_this_process_handle_every_externalized_event(
    sqlite_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    outcome = await workers_demo.run_with_workers(2, redis_url=None)

    output = capsys.readouterr().out
    assert outcome.status == 0, output
    assert "the 2 workers are consumers in this process" in output
    assert [worker.process for worker in outcome.workers] == [None, None]
    consumers = {worker.consumer for worker in outcome.workers}
    assert len(consumers) == 2
    assert {record.consumer for record in outcome.handled} <= consumers
    assert {record.pid for record in outcome.handled} == {os.getpid()}
    await assert_every_externalized_event_handled(sqlite_env, outcome, output)
    await assert_the_workers_did_the_work(sqlite_env)


async def test_the_workers_flag_runs_the_workers_demo(
    sqlite_env: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await main(["--workers", "2"]) == 0

    output = capsys.readouterr().out
    assert "13 events, 19 handler runs, 0 failed" in output
    assert "4 externalized events: 4 handled (" in output
    for line in ledger_rows(output):
        assert line[2] in {"worker 1", "worker 2"}, line
    with pytest.raises(SystemExit):
        await main(["--workers", "0"])


@pytest.mark.redis
async def test_on_redis_two_worker_processes_handle_every_externalized_event(
    sqlite_env: str, redis_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"aioevents-test-workers-{uuid.uuid4().hex[:12]}"
    try:
        outcome = await workers_demo.run_with_workers(2, redis_url=redis_url, prefix=prefix)
        left = await keys_under(redis_url, prefix)
    finally:
        await delete_keys_under(redis_url, prefix)

    output = capsys.readouterr().out
    assert outcome.status == 0, output
    assert left == []  # the demo deleted its streams, and only those
    pids = {worker.pid for worker in outcome.workers}
    assert len(pids) == 2 and os.getpid() not in pids
    for worker in outcome.workers:
        assert worker.process is not None and worker.process.returncode == 0  # drained on SIGTERM
        assert f"stopped worker {worker.number} (pid {worker.pid}) with SIGTERM" in output
    assert {record.pid for record in outcome.handled} <= pids
    await assert_every_externalized_event_handled(sqlite_env, outcome, output)
    await assert_the_workers_did_the_work(sqlite_env)


async def assert_every_externalized_event_handled(
    url: str, outcome: workers_demo.Outcome, output: str
) -> None:
    """What the outbox says was externalized, each handled at least once by its handler."""
    externalized = await externalized_events(url)
    assert Counter(externalized.values()) == EXTERNALIZED
    assert outcome.externalized == externalized
    runs = Counter(record.event_id for record in outcome.handled)
    assert runs.keys() == externalized.keys()  # none missing, nothing else
    for record in outcome.handled:
        assert record.event == externalized[record.event_id]
        assert record.handler == HANDLERS[record.event]
        assert any(worker.did(record) for worker in outcome.workers)
    twice = sum(1 for count in runs.values() if count > 1)
    duplicates = sum(count - 1 for count in runs.values())
    print(f"{len(runs)} events handled, {duplicates} duplicate runs")
    assert f"{len(runs)} handled (" in output
    assert f"), {twice} more than once, 0 not at all" in output
    assert len(ledger_rows(output)) == len(outcome.handled)
    # Every group acknowledged everything, and its consumers left it.
    groups = group_rows(output)
    assert sorted(row[1] for row in groups) == sorted(HANDLERS.values())
    assert {tuple(row[2:]) for row in groups} == {("0", "0", "0")}  # consumers, pending, lag


async def externalized_events(url: str) -> dict[str, str]:
    """The outbox's deliveries of the externalizing handlers, each completed: id -> name."""
    engine = create_engine(url)
    try:
        deliveries = await Outbox(engine).deliveries(limit=1000)
    finally:
        await engine.dispose()
    mine = [d for d in deliveries if d.handler.startswith("externalize:")]
    assert {d.status for d in mine} == {DeliveryStatus.COMPLETED}
    return {str(d.event_id): d.event_name for d in mine}


async def assert_the_workers_did_the_work(url: str) -> None:
    """Of the scenario's four documents, the handbook one was deleted and the FAQ dataset's
    with its dataset: left, the FAQ indexed (its segments) and the empty one failed."""
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            statuses = (await connection.execute(select(Document.indexing_status))).scalars()
            segments = await connection.scalar(select(func.count(DocumentSegment.id)))
    finally:
        await engine.dispose()
    assert sorted(statuses) == ["completed", "error"]
    assert segments == len(split_text(FAQ))


def group_rows(output: str) -> list[list[str]]:
    """The rows of the demo's consumer groups table: stream, group, consumers, pending, lag."""
    text = output.split("\nconsumer groups, the workers gone:\n", 1)[1]
    header, *lines = text.split("\n\n", 1)[0].splitlines()
    assert header.split() == ["stream", "group", "consumers", "pending", "lag"]
    return [line.split() for line in lines]


def ledger_rows(output: str) -> list[list[str]]:
    """The rows of the demo's ledger table: event, handler, handled by, pid, consumer, ..."""
    text = output.split("\nexternalized events, as the workers' ledger has them:\n", 1)[1]
    header, *lines = text.splitlines()
    assert header.split()[:3] == ["event", "handler", "handled"]
    rows = []
    for line in lines:
        if line.split()[0] not in EXTERNALIZED:
            break
        event, handler, _, number, *rest = line.split()
        rows.append([event, handler, f"worker {number}", *rest])
    return rows


async def keys_under(redis_url: str, prefix: str) -> list[bytes]:
    client = Redis.from_url(redis_url)
    try:
        return [key async for key in client.scan_iter(match=f"{prefix}:*")]
    finally:
        await client.aclose()


async def delete_keys_under(redis_url: str, prefix: str) -> None:
    """Only the test's own keys, whatever the demo left."""
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
