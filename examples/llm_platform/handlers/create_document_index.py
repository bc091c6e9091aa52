"""Index new documents: split each one's text into segments.

Each document goes through its own transactions: 'parsing' with a start time is committed
first, so the state is visible while it runs; then its segments and 'completed'. A failure
marks that document 'error' with the message and the others go on: the document's own
problem (its file is gone, it has no text) is a warning; any other error is logged at ERROR
with its traceback, as the original does since it stopped swallowing indexing errors. A
paused document is skipped. Only a 'waiting' document (or one left 'parsing' by a crash) is
indexed: running twice indexes nothing twice, and an 'error' stays for the user to retry.

It is durable: a delivery runs at least once, and again after a crash or a failed attempt.
Its idempotency is the document's own state (naturally idempotent, no inbox): the inbox
(`Outbox.first_time`) makes one transaction exactly once, and indexing commits several per
document, so the state each one checks is what keeps a second run from adding anything.
"""

from __future__ import annotations

import logging

import anyio

from ..deps import Deps
from ..events import DocumentIndexCreated
from ..models import Document, DocumentSegment, UploadFile, utcnow
from ._common import Handler

logger = logging.getLogger(__name__)

SEGMENT_MAX_CHARS = 500
INDEXABLE = frozenset({"waiting", "parsing"})


def split_text(text: str, max_chars: int = SEGMENT_MAX_CHARS) -> list[str]:
    """Paragraphs, and paragraphs longer than ``max_chars`` cut at word boundaries."""
    segments: list[str] = []
    for paragraph in (part.strip() for part in text.split("\n\n")):
        current = ""
        for word in paragraph.split():
            if current and len(current) + 1 + len(word) > max_chars:
                segments.append(current)
                current = ""
            current = f"{current} {word}" if current else word
        if current:
            segments.append(current)
    return segments


class NotIndexable(Exception):
    """Raised when a document cannot be indexed through no fault of the platform."""


class CreateDocumentIndex(Handler):
    """``pause``: seconds each document waits between 'parsing' and its segments, standing in
    for the embedding model the original calls there (the crash demo makes indexing slow
    enough to kill a worker in the middle of it)."""

    def __init__(self, deps: Deps, *, pause: float = 0.0) -> None:
        super().__init__(deps)
        self.pause = pause

    async def __call__(self, event: DocumentIndexCreated) -> None:
        for document_id in event.document_ids:
            if await self._start(document_id):
                try:
                    if self.pause:
                        await anyio.sleep(self.pause)
                    await self._index(document_id)
                except NotIndexable as exc:
                    logger.warning("document %s not indexed: %s", document_id, exc)
                    await self._fail(document_id, exc)
                except Exception as exc:
                    # The document records the failure; the handler itself goes on and succeeds.
                    logger.exception("indexing document %s failed: %r", document_id, exc)
                    await self._fail(document_id, exc)

    async def _start(self, document_id: str) -> bool:
        async with self.deps.sessions.begin() as session:
            document = await session.get(Document, document_id)
            if document is None or document.indexing_status not in INDEXABLE:
                logger.info("document %s is gone or already indexed; skipped", document_id)
                return False
            if document.is_paused:
                logger.info("document %s is paused; skipped", document_id)
                return False
            document.indexing_status = "parsing"
            document.processing_started_at = utcnow()
            return True

    async def _index(self, document_id: str) -> None:
        async with self.deps.sessions.begin() as session:
            # Locked, and 'parsing' checked again: a concurrent run of the same event (a
            # delivery run again after its lease ran out) must not add the segments twice.
            document = await session.get(Document, document_id, with_for_update=True)
            if document is None or document.indexing_status != "parsing":
                return
            upload = await session.get(UploadFile, document.upload_file_id or "")
            if upload is None:
                raise NotIndexable(f"the uploaded file {document.upload_file_id} is gone")
            texts = split_text(upload.content)
            if not texts:
                raise NotIndexable("the document has no text to index")
            session.add_all(
                _segment(document, position, text) for position, text in enumerate(texts, 1)
            )
            document.word_count = sum(len(text.split()) for text in texts)
            document.indexing_status = "completed"
            document.completed_at = utcnow()
        logger.info("indexed document %s into %d segments", document_id, len(texts))

    async def _fail(self, document_id: str, exc: Exception) -> None:
        async with self.deps.sessions.begin() as session:
            document = await session.get(Document, document_id)
            if document is not None:
                document.indexing_status = "error"
                document.error = str(exc)


def _segment(document: Document, position: int, text: str) -> DocumentSegment:
    return DocumentSegment(
        tenant_id=document.tenant_id,
        dataset_id=document.dataset_id,
        document_id=document.id,
        position=position,
        content=text,
        word_count=len(text.split()),
    )
