"""A deleted document's segments and uploaded file go with it.

Durable, so run at least once: naturally idempotent (no inbox needed), since deleting what
is already gone deletes nothing, and the one transaction commits all of it or none.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete

from ..events import DocumentWasDeleted
from ..models import DocumentSegment, UploadFile
from ._common import Handler, rowcount

logger = logging.getLogger(__name__)


class CleanWhenDocumentDeleted(Handler):
    async def __call__(self, event: DocumentWasDeleted) -> None:
        segments = delete(DocumentSegment).where(DocumentSegment.document_id == event.document_id)
        async with self.deps.sessions.begin() as session:
            deleted_segments = await rowcount(session, segments)
            deleted_files = 0
            if event.file_id is not None:
                files = delete(UploadFile).where(UploadFile.id == event.file_id)
                deleted_files = await rowcount(session, files)
        logger.info(
            "document %s cleaned: %d segments, %d files deleted",
            event.document_id, deleted_segments, deleted_files,
        )  # fmt: skip
