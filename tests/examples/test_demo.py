"""The demo: green on SQLite and on PostgreSQL with Redis, and red when a handler fails."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import anyio
import pytest

from examples.llm_platform.demo import describe, main, plural, run_demo, short_name
from examples.llm_platform.events import DocumentWasDeleted, TenantWasUpdated

from .conftest import Harness

EVERY_HANDLER = [
    "clean_when_dataset_deleted",
    "clean_when_document_deleted",
    "create_document_index",
    "create_installed_app_when_app_created",
    "create_site_record_when_app_created",
    "delete_tool_parameters_cache_when_sync_draft_workflow",
    "sync_plugin_trigger_when_app_created",
    "sync_webhook_when_app_created",
    "sync_workflow_schedule_when_app_published",
    "update_app_dataset_join_when_app_model_config_updated",
    "update_app_dataset_join_when_app_published_workflow_updated",
    "update_app_triggers_when_app_published_workflow_updated",
    "update_provider_when_message_created",
]


DURABLE_DELIVERIES = {
    ("create_document_index", "document-index-created"): 2,
    ("update_provider_when_message_created", "message-was-created"): 2,
    ("clean_when_document_deleted", "document-was-deleted"): 1,
    ("clean_when_dataset_deleted", "dataset-was-deleted"): 1,
}


def assert_every_handler_ran_green(output: str) -> None:
    summary = output.split("\nhandler ", 1)[1]
    for handler in EVERY_HANDLER:
        assert f"\n{handler} " in summary
    assert summary.rstrip().endswith("13 events, 19 handler runs, 0 failed")
    # The tenant starts with a trial quota of the hosted openai, which the chat app uses: each
    # of the two messages adds a ledger row and charges the provider row.
    runs, failed, created, updated, *_ = totals(summary, "update_provider_when_message_created")
    assert (runs, failed, created, updated) == (2, 0, 2, 2)
    # The durable handlers' runs are among those, and the outbox has their deliveries of this
    # run: each completed at its first attempt.
    deliveries = deliveries_listed(summary)
    assert Counter((handler, event) for handler, event, *_ in deliveries) == DURABLE_DELIVERIES
    assert {(key, status, attempts) for *_, key, status, attempts in deliveries} == {
        ("-", "completed", "1")
    }
    assert "\n6 deliveries: 6 completed\n" in summary


def deliveries_listed(summary: str) -> list[list[str]]:
    """The rows of the deliveries table: handler, event, key, status, attempts."""
    table = summary.split("\ndurable deliveries, as the outbox stores them:\n", 1)[1]
    header, *lines = table.split("\n\n", 1)[0].splitlines()
    assert header.split() == ["delivery", "handler", "event", "key", "status", "attempts"]
    rows = [line.split() for line in lines[:-1]]  # the last line counts them
    assert all(len(row) == 6 and row[0].isdigit() for row in rows), lines
    return [row[1:] for row in rows]


def totals(summary: str, handler: str) -> list[int]:
    """A handler's row of the summary: runs, failed, created, updated, deleted, cache del."""
    [row] = [line for line in summary.splitlines() if line.startswith(f"{handler} ")]
    return [int(cell) for cell in row.split()[1:7]]


@pytest.mark.asyncio
async def test_the_demo_runs_green_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'demo.sqlite3'}")

    assert await main([]) == 0

    output = capsys.readouterr().out
    assert "cache: MemoryCache" in output
    assert_every_handler_ran_green(output)


@pytest.mark.asyncio
async def test_the_demo_runs_green_on_the_test_platform(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # The harness is SQLite, or PostgreSQL (in a schema of its own) with Redis.
    assert await run_demo(harness.platform, harness.recorder) == 0

    assert_every_handler_ran_green(capsys.readouterr().out)


@pytest.mark.asyncio
async def test_the_demo_fails_when_a_handler_fails(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    async def broken(event: DocumentWasDeleted) -> None:
        raise RuntimeError("storage unreachable")

    harness.bus.subscribe(DocumentWasDeleted, broken)

    assert await run_demo(harness.platform, harness.recorder) == 1

    output = capsys.readouterr().out
    assert "FAILED RuntimeError('storage unreachable')" in output
    assert output.rstrip().endswith("13 events, 20 handler runs, 1 failed")


@pytest.mark.asyncio
async def test_an_events_handlers_are_listed_in_subscription_order(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # The first subscribed finishes last: listed by finishing, they would come out reversed.
    second_done = anyio.Event()

    async def first_subscribed(event: TenantWasUpdated) -> None:
        with anyio.move_on_after(10):  # only a guard: the second one sets it at once
            await second_done.wait()

    async def second_subscribed(event: TenantWasUpdated) -> None:
        second_done.set()

    harness.bus.subscribe(TenantWasUpdated, first_subscribed)
    harness.bus.subscribe(TenantWasUpdated, second_subscribed)

    assert await run_demo(harness.platform, harness.recorder) == 0

    listed = handlers_listed(capsys.readouterr().out)
    assert listed["tenant-was-updated"] == [["first_subscribed", "second_subscribed"]]
    order = [short_name(sub.name) for sub in harness.bus.subscriptions]
    for runs in listed.values():
        for names in runs:
            assert names == sorted(names, key=order.index)


@pytest.mark.asyncio
async def test_two_runs_list_the_same_handlers_in_the_same_order(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await run_demo(harness.platform, harness.recorder) == 0
    first = handlers_listed(capsys.readouterr().out)
    assert await run_demo(harness.platform, harness.recorder) == 0

    assert handlers_listed(capsys.readouterr().out) == first


def handlers_listed(output: str) -> dict[str, list[list[str]]]:
    """Per event name, the handler names each of its emits listed, in the order printed."""
    listed: dict[str, list[list[str]]] = {}
    names: list[str] = []
    for line in output.split("\nhandler ", 1)[0].splitlines():
        if line.startswith("  ") and not line.startswith("    "):  # "  event-name: 2 handlers"
            names = []
            listed.setdefault(line.strip().split(":")[0], []).append(names)
        elif line.startswith("    "):  # "    ok  handler_name   1.2 ms  ..."
            names.append(line.split()[1])
    return listed


@pytest.mark.parametrize(
    ("changes", "described"),
    [
        ({"rows created": 1}, "1 row created"),
        ({"rows created": 2, "rows updated": 1}, "2 rows created, 1 row updated"),
        ({"cache keys deleted": 1}, "1 cache key deleted"),
        ({"cache keys deleted": 3}, "3 cache keys deleted"),
        ({}, "no change"),
    ],
)
def test_changes_are_counted_in_proper_plurals(changes: dict[str, int], described: str) -> None:
    assert describe(changes) == described


def test_counts_of_things_use_proper_plurals() -> None:
    assert [plural(count, "handler") for count in (0, 1, 2)] == [
        "0 handlers",
        "1 handler",
        "2 handlers",
    ]
