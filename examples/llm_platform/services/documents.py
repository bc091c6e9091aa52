"""Uploaded files and the documents made from them."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import select

from ..events import DocumentIndexCreated, DocumentWasDeleted
from ..models import Dataset, Document, Tenant, UploadFile
from ..uow import Done
from ._base import Service, get_or_404
from .errors import Invalid, NotFound


class DocumentService(Service):
    async def upload_file(self, tenant_id: str, name: str, content: str) -> Done[UploadFile]:
        async with self.unit_of_work() as uow:
            await get_or_404(uow.session, Tenant, tenant_id)
            upload = UploadFile(
                tenant_id=tenant_id, name=name, size=len(content.encode()), content=content
            )
            uow.session.add(upload)
            await uow.session.flush()
        return uow.done(upload)

    async def create_documents(
        self, dataset_id: str, file_ids: Sequence[str]
    ) -> Done[list[Document]]:
        """A document per uploaded file, all indexed after the commit."""
        if not file_ids:
            raise Invalid("give at least one file id")
        async with self.unit_of_work() as uow:
            dataset = await get_or_404(uow.session, Dataset, dataset_id)
            query = select(UploadFile).where(
                UploadFile.id.in_(file_ids), UploadFile.tenant_id == dataset.tenant_id
            )
            uploads = {upload.id: upload for upload in await uow.session.scalars(query)}
            missing = [file_id for file_id in file_ids if file_id not in uploads]
            if missing:
                raise NotFound("upload file", ", ".join(missing))
            documents = [_document(dataset, uploads[file_id]) for file_id in file_ids]
            uow.session.add_all(documents)
            await uow.session.flush()
            ids = tuple(document.id for document in documents)
            uow.record(DocumentIndexCreated(dataset_id=dataset.id, document_ids=ids))
        return uow.done(documents)

    async def delete_document(self, document_id: str) -> Done[None]:
        async with self.unit_of_work() as uow:
            document = await get_or_404(uow.session, Document, document_id)
            await uow.session.delete(document)
            uow.record(
                DocumentWasDeleted(
                    document_id=document.id,
                    dataset_id=document.dataset_id,
                    doc_form=document.doc_form,
                    file_id=document.upload_file_id,
                )
            )
        return uow.done(None)


def _document(dataset: Dataset, upload: UploadFile) -> Document:
    return Document(
        tenant_id=dataset.tenant_id,
        dataset_id=dataset.id,
        name=upload.name,
        upload_file_id=upload.id,
        doc_form=dataset.doc_form,
    )
