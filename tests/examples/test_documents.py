"""create_document_index and clean_when_document_deleted: durable, run on the relay after
the COMMIT, so the tests wait for their deliveries before reading their work."""

from __future__ import annotations

import pytest
from sqlalchemy import update

from aioevents.testing import capture, muted
from examples.llm_platform.events import DocumentIndexCreated, DocumentWasDeleted
from examples.llm_platform.handlers import create_document_index
from examples.llm_platform.handlers.create_document_index import CreateDocumentIndex
from examples.llm_platform.models import Document, DocumentSegment, UploadFile

from .conftest import Harness

pytestmark = pytest.mark.asyncio

TEXT = "The first paragraph.\n\nThe second paragraph, a little longer."


async def dataset(harness: Harness) -> str:
    done = await harness.services.datasets.create_dataset(
        harness.tenant_id, harness.account_id, "KB"
    )
    return done.value.id


async def upload(harness: Harness, content: str = TEXT) -> str:
    return (
        await harness.services.documents.upload_file(harness.tenant_id, "notes.txt", content)
    ).value.id


async def add_documents(harness: Harness, dataset_id: str, *contents: str) -> list[Document]:
    file_ids = [await upload(harness, content) for content in contents]
    done = await harness.services.documents.create_documents(dataset_id, file_ids)
    assert done.ok, done.reports
    await harness.deliveries_done()
    return [(await harness.rows(Document, id=document.id))[0] for document in done.value]


async def test_indexing_splits_each_document_into_segments(harness: Harness) -> None:
    [document] = await add_documents(harness, await dataset(harness), TEXT)

    assert document.indexing_status == "completed"
    assert document.processing_started_at is not None and document.completed_at is not None
    assert document.word_count == 9
    segments = await harness.rows(DocumentSegment, document_id=document.id)
    assert [(s.position, s.content) for s in segments] == [
        (1, "The first paragraph."),
        (2, "The second paragraph, a little longer."),
    ]


async def test_a_failing_document_is_marked_error_and_the_others_are_indexed(
    harness: Harness,
) -> None:
    empty, good = await add_documents(harness, await dataset(harness), "   ", TEXT)

    assert (empty.indexing_status, empty.error) == ("error", "the document has no text to index")
    assert good.indexing_status == "completed"
    assert await harness.rows(DocumentSegment, document_id=empty.id) == []


async def test_an_unexpected_indexing_error_is_logged_at_error_with_its_traceback(
    harness: Harness, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(text: str) -> list[str]:
        raise RuntimeError("the splitter crashed")

    monkeypatch.setattr(create_document_index, "split_text", crash)
    dataset_id = await dataset(harness)

    [document] = await add_documents(harness, dataset_id, TEXT)

    assert (document.indexing_status, document.error) == ("error", "the splitter crashed")
    [record] = [r for r in caplog.records if r.name == create_document_index.__name__]
    assert record.levelname == "ERROR"
    assert record.getMessage() == (
        f"indexing document {document.id} failed: RuntimeError('the splitter crashed')"
    )
    assert record.exc_info is not None and record.exc_info[1] is not None
    assert str(record.exc_info[1]) == "the splitter crashed"


async def test_a_document_without_text_is_a_warning_without_a_traceback(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # The document's own problem, which its error says: not a failure of the platform.
    [document] = await add_documents(harness, await dataset(harness), "  ")

    [record] = [r for r in caplog.records if r.name == create_document_index.__name__]
    assert (record.levelname, record.exc_info) == ("WARNING", None)
    assert record.getMessage() == (
        f"document {document.id} not indexed: the document has no text to index"
    )


async def test_a_paused_document_is_skipped_with_an_info_log(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    dataset_id = await dataset(harness)
    file_id = await upload(harness)
    # Pause the document between its creation and its indexing: index it by hand afterwards.
    [sub] = [
        sub for sub in harness.bus.subscriptions if isinstance(sub.handler, CreateDocumentIndex)
    ]
    with muted(harness.bus, sub), capture(harness.bus) as events:
        await harness.services.documents.create_documents(dataset_id, [file_id])
    event = events.assert_emitted(DocumentIndexCreated)
    async with harness.platform.sessions.begin() as session:
        await session.execute(update(Document).values(is_paused=True))
    caplog.set_level("INFO")

    await harness.bus.emit(event)

    [document] = await harness.rows(Document, id=event.document_ids[0])
    assert document.indexing_status == "waiting"
    assert f"document {document.id} is paused; skipped" in caplog.messages


async def test_indexing_is_idempotent(harness: Harness) -> None:
    dataset_id = await dataset(harness)
    with capture(harness.bus) as events:
        await add_documents(harness, dataset_id, TEXT, "")

    changes = await harness.emit_again(events.assert_emitted(DocumentIndexCreated))

    assert changes == {"create_document_index": {}}


async def test_deleting_a_document_cleans_its_segments_and_file(harness: Harness) -> None:
    dataset_id = await dataset(harness)
    gone, kept = await add_documents(harness, dataset_id, TEXT, TEXT)

    done = await harness.services.documents.delete_document(gone.id)
    await harness.deliveries_done()

    assert done.ok
    assert await harness.rows(Document, id=gone.id) == []
    assert await harness.rows(DocumentSegment, document_id=gone.id) == []
    assert await harness.rows(UploadFile, id=gone.upload_file_id) == []
    assert len(await harness.rows(DocumentSegment, document_id=kept.id)) == 2
    assert await harness.rows(UploadFile, id=kept.upload_file_id) != []


async def test_document_cleaning_is_idempotent(harness: Harness) -> None:
    [document] = await add_documents(harness, await dataset(harness), TEXT)
    with capture(harness.bus) as events:
        await harness.services.documents.delete_document(document.id)

    changes = await harness.emit_again(events.assert_emitted(DocumentWasDeleted))

    assert changes == {"clean_when_document_deleted": {}}
