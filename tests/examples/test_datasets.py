"""clean_when_dataset_deleted (durable: the tests wait for its deliveries)."""

from __future__ import annotations

import pytest

from aioevents.testing import capture
from examples.llm_platform.events import DatasetWasDeleted
from examples.llm_platform.models import AppDatasetJoin, Document, DocumentSegment, UploadFile

from .conftest import Harness
from .graphs import model_config


async def knowledge_base(harness: Harness, app_id: str) -> str:
    """A dataset with two indexed documents, joined to the app; returns its id."""
    services = harness.services
    dataset = (
        await services.datasets.create_dataset(harness.tenant_id, harness.account_id, "KB")
    ).value
    files = [
        (await services.documents.upload_file(harness.tenant_id, "a.txt", "one\n\ntwo")).value.id
        for _ in "ab"
    ]
    await services.documents.create_documents(dataset.id, files)
    await harness.deliveries_done()  # indexed
    return dataset.id


@pytest.mark.asyncio
async def test_deleting_a_dataset_cleans_its_documents_files_and_joins(harness: Harness) -> None:
    app = (
        await harness.services.apps.create_app(harness.tenant_id, harness.account_id, "Bot", "chat")
    ).value
    gone, kept = await knowledge_base(harness, app.id), await knowledge_base(harness, app.id)
    await harness.services.apps.update_model_config(app.id, **model_config(datasets=(gone, kept)))
    gone_files = [
        document.upload_file_id for document in await harness.rows(Document, dataset_id=gone)
    ]

    done = await harness.services.datasets.delete_dataset(gone)
    await harness.deliveries_done()  # cleaned

    assert done.ok
    assert await harness.rows(Document, dataset_id=gone) == []
    assert await harness.rows(DocumentSegment, dataset_id=gone) == []
    assert [await harness.rows(UploadFile, id=file_id) for file_id in gone_files] == [[], []]
    assert [join.dataset_id for join in await harness.rows(AppDatasetJoin, app_id=app.id)] == [kept]
    assert len(await harness.rows(Document, dataset_id=kept)) == 2
    assert len(await harness.rows(DocumentSegment, dataset_id=kept)) == 4


@pytest.mark.asyncio
async def test_dataset_cleaning_is_idempotent(harness: Harness) -> None:
    app = (
        await harness.services.apps.create_app(harness.tenant_id, harness.account_id, "Bot", "chat")
    ).value
    dataset_id = await knowledge_base(harness, app.id)
    with capture(harness.bus) as events:
        await harness.services.datasets.delete_dataset(dataset_id)

    changes = await harness.emit_again(events.assert_emitted(DatasetWasDeleted))

    assert changes == {"clean_when_dataset_deleted": {}}
