"""Events about documents."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True, kw_only=True)
class DocumentWasDeleted:
    document_id: str
    dataset_id: str
    doc_form: str
    file_id: str | None  # the uploaded file to clean up, if the document came from one
