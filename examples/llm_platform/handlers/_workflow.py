"""Loading the workflow an event names, for the handlers that read its graph."""

from __future__ import annotations

import logging

from sqlalchemy.ext.asyncio import AsyncSession

from ..events import AppDraftWorkflowWasSynced, AppPublishedWorkflowWasUpdated
from ..models import Workflow

WorkflowEvent = AppDraftWorkflowWasSynced | AppPublishedWorkflowWasUpdated

logger = logging.getLogger(__name__)


async def load_workflow(session: AsyncSession, event: WorkflowEvent) -> Workflow | None:
    workflow = await session.get(Workflow, event.workflow_id)
    if workflow is None:
        logger.warning("workflow %s of app %s is gone", event.workflow_id, event.app_id)
    return workflow
