"""A deleted dataset's documents, their segments and files, and its app joins go with it.

Durable, so run at least once: naturally idempotent (no inbox needed), since deleting what
is already gone deletes nothing, and the one transaction commits all of it or none.
"""

from __future__ import annotations

import logging

from sqlalchemy import delete, select

from ..events import DatasetWasDeleted
from ..models import AppDatasetJoin, Document, DocumentSegment, UploadFile
from ._common import Handler, rowcount

logger = logging.getLogger(__name__)


class CleanWhenDatasetDeleted(Handler):
    async def __call__(self, event: DatasetWasDeleted) -> None:
        dataset_id = event.dataset_id
        async with self.deps.sessions.begin() as session:
            files = select(Document.upload_file_id).where(Document.dataset_id == dataset_id)
            file_ids = [file_id for file_id in await session.scalars(files) if file_id]
            await session.execute(
                delete(DocumentSegment).where(DocumentSegment.dataset_id == dataset_id)
            )
            if file_ids:
                await session.execute(delete(UploadFile).where(UploadFile.id.in_(file_ids)))
            documents = await rowcount(
                session, delete(Document).where(Document.dataset_id == dataset_id)
            )
            await session.execute(
                delete(AppDatasetJoin).where(AppDatasetJoin.dataset_id == dataset_id)
            )
        logger.info("dataset %s cleaned: %d documents deleted", dataset_id, documents)
