"""Events about datasets."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class DatasetWasDeleted:
    # The dataset row is gone when handlers run: the facts they need travel with the event.
    dataset_id: str
    tenant_id: str
    doc_form: str
    indexing_technique: str
