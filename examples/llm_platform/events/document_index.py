"""Events about document indexing."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentIndexCreated:
    dataset_id: str
    document_ids: tuple[str, ...]
