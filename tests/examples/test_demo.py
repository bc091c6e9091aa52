"""The demo: green on SQLite and on PostgreSQL with Redis, and red when a handler fails."""

from __future__ import annotations

from pathlib import Path

import pytest

from examples.llm_platform.demo import main, run_demo
from examples.llm_platform.events import DocumentWasDeleted

from .conftest import Harness

pytestmark = pytest.mark.asyncio

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


def assert_every_handler_ran_green(output: str) -> None:
    summary = output.split("\nhandler ", 1)[1]
    for handler in EVERY_HANDLER:
        assert f"\n{handler} " in summary
    assert summary.rstrip().endswith("13 events, 19 handler runs, 0 failed")
    # The tenant starts with a trial quota of the hosted openai, which the chat app uses: each
    # of the two messages adds a ledger row and charges the provider row.
    runs, failed, created, updated, *_ = totals(summary, "update_provider_when_message_created")
    assert (runs, failed, created, updated) == (2, 0, 2, 2)


def totals(summary: str, handler: str) -> list[int]:
    """A handler's row of the summary: runs, failed, created, updated, deleted, cache del."""
    [row] = [line for line in summary.splitlines() if line.startswith(f"{handler} ")]
    return [int(cell) for cell in row.split()[1:7]]


async def test_the_demo_runs_green_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("DATABASE_URL", f"sqlite+aiosqlite:///{tmp_path / 'demo.sqlite3'}")

    assert await main([]) == 0

    output = capsys.readouterr().out
    assert "cache: MemoryCache" in output
    assert_every_handler_ran_green(output)


async def test_the_demo_runs_green_on_the_test_platform(
    harness: Harness, capsys: pytest.CaptureFixture[str]
) -> None:
    # The harness is SQLite, or PostgreSQL (in a schema of its own) with Redis.
    assert await run_demo(harness.platform, harness.recorder) == 0

    assert_every_handler_ran_green(capsys.readouterr().out)


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
