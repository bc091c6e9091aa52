"""An app's trigger rows follow the trigger nodes of its published workflow, by node id.

Removed nodes lose their row; new ones get a disabled row (a user enables a trigger);
a changed title is updated. Only a workflow-mode app has trigger rows, as in the original:
an advanced-chat app is started by a chat message, never by a trigger.
"""

from __future__ import annotations

import logging

from sqlalchemy import select

from ..events import AppPublishedWorkflowWasUpdated
from ..graph import TRIGGER_TYPES, nodes
from ..models import AppTrigger
from ._common import Handler, assign
from ._workflow import load_workflow

logger = logging.getLogger(__name__)


class UpdateAppTriggersWhenAppPublishedWorkflowUpdated(Handler):
    async def __call__(self, event: AppPublishedWorkflowWasUpdated) -> None:
        if event.mode != "workflow":
            return
        async with self.deps.sessions.begin() as session:
            workflow = await load_workflow(session, event)
            if workflow is None:
                return
            wanted = {node.id: node for node in nodes(workflow.graph, *TRIGGER_TYPES)}
            query = select(AppTrigger).where(AppTrigger.app_id == event.app_id)
            rows = {row.node_id: row for row in await session.scalars(query)}
            for node_id in rows.keys() - wanted.keys():
                await session.delete(rows[node_id])
            new = sorted(wanted.keys() - rows.keys())
            session.add_all(
                AppTrigger(
                    tenant_id=event.tenant_id,
                    app_id=event.app_id,
                    node_id=node_id,
                    trigger_type=wanted[node_id].type,
                    title=wanted[node_id].title,
                    status="disabled",
                )
                for node_id in new
            )
            kept = rows.keys() & wanted.keys()
            retitled = sum(
                assign(rows[node_id], {"title": wanted[node_id].title}) for node_id in kept
            )
        removed = len(rows) - len(kept)
        logger.info(
            "triggers of app %s: %d added, %d retitled, %d removed",
            event.app_id, len(new), retitled, removed,
        )  # fmt: skip
