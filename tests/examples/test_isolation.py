"""A failing handler leaves the others and the commit intact; a rollback emits nothing."""

from __future__ import annotations

import logging

import pytest

from aioevents.testing import capture
from examples.llm_platform.events import AppWasCreated
from examples.llm_platform.models import App, Document, InstalledApp, Site, UploadFile
from examples.llm_platform.services import NotFound

from .conftest import Harness

pytestmark = pytest.mark.asyncio


async def broken_handler(event: AppWasCreated) -> None:
    raise RuntimeError(f"cannot notify about app {event.app_id}")


async def test_a_failing_handler_leaves_the_others_and_the_commit(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.bus.subscribe(AppWasCreated, broken_handler)

    done = await harness.services.apps.create_app(
        harness.tenant_id, harness.account_id, "Bot", "chat"
    )

    [report] = done.reports
    assert report.handled == 3 and not done.ok
    [error] = report.errors
    assert error.handler_name.endswith("broken_handler")
    assert str(error.exception) == f"cannot notify about app {done.value.id}"
    assert await harness.rows(App, id=done.value.id)  # the publisher's commit
    assert await harness.rows(Site, app_id=done.value.id)
    assert await harness.rows(InstalledApp, app_id=done.value.id)
    [record] = [r for r in caplog.records if r.name == "aioevents" and r.levelno == logging.ERROR]
    assert "broken_handler" in record.getMessage() and record.exc_info is not None


async def test_a_refused_call_writes_nothing_and_emits_nothing(harness: Harness) -> None:
    dataset = (
        await harness.services.datasets.create_dataset(harness.tenant_id, harness.account_id, "KB")
    ).value
    upload = (
        await harness.services.documents.upload_file(harness.tenant_id, "a.txt", "text")
    ).value

    with (
        capture(harness.bus) as events,
        pytest.raises(NotFound, match="upload file missing-id not found"),
    ):
        await harness.services.documents.create_documents(dataset.id, [upload.id, "missing-id"])

    assert len(events) == 0
    assert await harness.rows(Document, dataset_id=dataset.id) == []
    assert await harness.rows(UploadFile, id=upload.id)  # committed by its own earlier call
