"""The publishers: each call is one transaction, and its events are emitted after COMMIT."""

from __future__ import annotations

from aioevents.sqlalchemy import TransactionalEvents

from ..db import SessionFactory
from .apps import AppService
from .datasets import DatasetService
from .documents import DocumentService
from .errors import Conflict, Invalid, NotFound, ServiceError
from .messages import MessageService
from .tenants import TenantService
from .workflows import WorkflowService

__all__ = ["Conflict", "Invalid", "NotFound", "ServiceError", "Services"]


class Services:
    """Every service of the platform, sharing one session factory and one delivery."""

    def __init__(self, sessions: SessionFactory, events: TransactionalEvents) -> None:
        self.tenants = TenantService(sessions, events)
        self.apps = AppService(sessions, events)
        self.workflows = WorkflowService(sessions, events)
        self.datasets = DatasetService(sessions, events)
        self.documents = DocumentService(sessions, events)
        self.messages = MessageService(sessions, events)
