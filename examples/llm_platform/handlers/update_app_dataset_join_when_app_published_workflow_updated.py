"""An app's dataset joins follow the knowledge-retrieval nodes of its published workflow."""

from __future__ import annotations

import logging

from ..events import AppPublishedWorkflowWasUpdated
from ..graph import knowledge_dataset_ids
from ._common import Handler, sync_dataset_joins
from ._workflow import load_workflow

logger = logging.getLogger(__name__)


class UpdateAppDatasetJoinWhenAppPublishedWorkflowUpdated(Handler):
    async def __call__(self, event: AppPublishedWorkflowWasUpdated) -> None:
        async with self.deps.sessions.begin() as session:
            workflow = await load_workflow(session, event)
            if workflow is None:
                return
            wanted = knowledge_dataset_ids(workflow.graph)
            added, removed = await sync_dataset_joins(session, event.app_id, wanted)
        logger.info("dataset joins of app %s: %d added, %d removed", event.app_id, added, removed)
