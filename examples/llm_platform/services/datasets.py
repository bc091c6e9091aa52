"""Datasets (knowledge bases)."""

from __future__ import annotations

from ..events import DatasetWasDeleted
from ..models import Account, Dataset, Tenant
from ..uow import Done
from ._base import Service, get_or_404
from .errors import Invalid

INDEXING_TECHNIQUES = frozenset({"high_quality", "economy"})
DOC_FORMS = frozenset({"text_model", "qa_model", "hierarchical_model"})


class DatasetService(Service):
    async def create_dataset(
        self,
        tenant_id: str,
        account_id: str,
        name: str,
        *,
        indexing_technique: str = "economy",
        doc_form: str = "text_model",
    ) -> Done[Dataset]:
        if indexing_technique not in INDEXING_TECHNIQUES or doc_form not in DOC_FORMS:
            raise Invalid(
                f"indexing_technique must be one of {sorted(INDEXING_TECHNIQUES)} and "
                f"doc_form one of {sorted(DOC_FORMS)}"
            )
        async with self.unit_of_work() as uow:
            await get_or_404(uow.session, Tenant, tenant_id)
            await get_or_404(uow.session, Account, account_id)
            dataset = Dataset(
                tenant_id=tenant_id,
                name=name,
                indexing_technique=indexing_technique,
                doc_form=doc_form,
                created_by=account_id,
            )
            uow.session.add(dataset)
            await uow.session.flush()
        return uow.done(dataset)

    async def delete_dataset(self, dataset_id: str) -> Done[None]:
        async with self.unit_of_work() as uow:
            dataset = await get_or_404(uow.session, Dataset, dataset_id)
            await uow.session.delete(dataset)
            uow.record(
                DatasetWasDeleted(
                    dataset_id=dataset.id,
                    tenant_id=dataset.tenant_id,
                    doc_form=dataset.doc_form,
                    indexing_technique=dataset.indexing_technique,
                )
            )
        return uow.done(None)
