"""``python -m examples.llm_platform --crash``: a worker killed mid-delivery loses nothing.

The demo runs here, in-process, and starts its two worker processes itself; what it says
is checked, and then what the database holds, read here without the demo's help.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from aioevents.outbox import DeliveryStatus, Outbox
from examples.llm_platform import crash
from examples.llm_platform.db import create_engine
from examples.llm_platform.demo import main
from examples.llm_platform.handlers.create_document_index import split_text
from examples.llm_platform.models import Document, DocumentSegment

from .conftest import _postgres_schema

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(300)]

DELIVERIES = crash.EVENTS
DOCUMENTS = crash.EVENTS * crash.DOCUMENTS_PER_EVENT


async def test_the_crash_demo_loses_nothing_on_sqlite(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'crash.sqlite3'}"
    for name in ("REDIS_URL", "DATABASE_SCHEMA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", url)

    status = await main(["--crash"])

    output = capsys.readouterr().out
    assert status == 0, output
    assert_the_report_says_nothing_was_lost(output)
    await assert_the_database_has_all_the_work_once(url)


@pytest.mark.postgres
async def test_the_crash_demo_loses_nothing_on_postgresql(
    database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    async with _postgres_schema(database_url) as schema:
        monkeypatch.delenv("REDIS_URL", raising=False)
        monkeypatch.setenv("DATABASE_URL", database_url)
        monkeypatch.setenv("DATABASE_SCHEMA", schema)

        status = await main(["--crash"])

        output = capsys.readouterr().out
        assert status == 0, output
        assert_the_report_says_nothing_was_lost(output)
        await assert_the_database_has_all_the_work_once(database_url, schema)


def assert_the_report_says_nothing_was_lost(output: str) -> None:
    assert "killed worker 1 " in output and "with SIGKILL" in output
    assert "cut short by the kill" in output  # in the middle of at least one delivery
    assert f"\n{DELIVERIES} deliveries: {DELIVERIES} completed, 0 lost; " in output
    assert f"documents: {DOCUMENTS} of {DOCUMENTS} indexed with exactly their segments" in output


async def assert_the_database_has_all_the_work_once(url: str, schema: str | None = None) -> None:
    engine = create_engine(url, search_path=schema)
    try:
        deliveries = await Outbox(engine).deliveries(handler=crash.HANDLER)
        async with engine.connect() as connection:
            statuses = (await connection.execute(select(Document.indexing_status))).scalars()
            segments = await connection.scalar(select(func.count(DocumentSegment.id)))
    finally:
        await engine.dispose()
    assert [d.status for d in deliveries] == [DeliveryStatus.COMPLETED] * DELIVERIES
    assert max(d.attempts for d in deliveries) >= 2  # what the killed worker held ran again
    assert list(statuses) == ["completed"] * DOCUMENTS
    # Exactly the segments of each text, once (a segment's position is unique per document).
    assert segments == sum(len(split_text(crash.manual(n))) for n in range(DOCUMENTS))
