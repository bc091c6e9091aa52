"""A synced draft may change its tools' parameters: drop what the runtime cached for them."""

from __future__ import annotations

import logging

from ..changes import note_change
from ..events import AppDraftWorkflowWasSynced
from ..graph import TOOL, nodes
from ._common import Handler
from ._workflow import load_workflow

logger = logging.getLogger(__name__)


def tool_parameters_cache_key(app_id: str, node_id: str) -> str:
    return f"tool_parameters:app:{app_id}:node:{node_id}"


class DeleteToolParametersCacheWhenSyncDraftWorkflow(Handler):
    async def __call__(self, event: AppDraftWorkflowWasSynced) -> None:
        async with self.deps.sessions.begin() as session:  # read-only: the graph's tool nodes
            workflow = await load_workflow(session, event)
            if workflow is None:
                return
            keys = [
                tool_parameters_cache_key(event.app_id, node.id)
                for node in nodes(workflow.graph, TOOL)
            ]
        deleted = await self.deps.cache.delete(*keys)
        note_change("cache keys deleted", deleted)
        logger.info(
            "tool parameter caches of app %s: %d of %d deleted", event.app_id, deleted, len(keys)
        )
