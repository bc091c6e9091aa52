"""The platform's events: one module per resource, as in the original.

Events are frozen dataclasses of ids and small immutable facts, never ORM objects: a handler
runs after the publisher's session is gone, in a transaction of its own, and reads what it
needs from the rows the ids name.
"""

from __future__ import annotations

from .app import (
    AppDraftWorkflowWasSynced,
    AppModelConfigWasUpdated,
    AppPublishedWorkflowWasUpdated,
    AppWasCreated,
)
from .dataset import DatasetWasDeleted
from .document import DocumentWasDeleted
from .document_index import DocumentIndexCreated
from .message import MessageWasCreated
from .tenant import TenantWasCreated, TenantWasUpdated

__all__ = [
    "AppDraftWorkflowWasSynced",
    "AppModelConfigWasUpdated",
    "AppPublishedWorkflowWasUpdated",
    "AppWasCreated",
    "DatasetWasDeleted",
    "DocumentIndexCreated",
    "DocumentWasDeleted",
    "MessageWasCreated",
    "TenantWasCreated",
    "TenantWasUpdated",
]
