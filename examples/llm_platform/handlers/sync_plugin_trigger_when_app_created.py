"""Keep an app's plugin-trigger rows in step with the trigger-plugin nodes of its workflow.

A draft sync adds and updates rows but keeps stale ones (the draft is still being edited);
a publish also removes the rows of nodes the published workflow no longer has.
"""

from __future__ import annotations

import logging

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from ..events import AppPublishedWorkflowWasUpdated
from ..graph import TRIGGER_PLUGIN, Node, nodes
from ..models import WorkflowPluginTrigger
from ._common import Handler, assign
from ._workflow import WorkflowEvent, load_workflow

logger = logging.getLogger(__name__)


def _values(node: Node) -> dict[str, str]:
    return {
        "provider_id": str(node.data.get("provider_id", "")),
        "event_name": str(node.data.get("event_name", "")),
        "subscription_id": str(node.data.get("subscription_id", "")),
    }


class SyncPluginTriggerWhenAppCreated(Handler):
    async def __call__(self, event: WorkflowEvent) -> None:
        if event.mode != "workflow":
            return
        async with self.deps.sessions.begin() as session:
            workflow = await load_workflow(session, event)
            if workflow is None:
                return
            wanted = {node.id: _values(node) for node in nodes(workflow.graph, TRIGGER_PLUGIN)}
            prune = isinstance(event, AppPublishedWorkflowWasUpdated)
            added, updated, removed = await self._sync(session, event, wanted, prune=prune)
        logger.info(
            "plugin triggers of app %s: %d added, %d updated, %d removed",
            event.app_id, added, updated, removed,
        )  # fmt: skip

    async def _sync(
        self,
        session: AsyncSession,
        event: WorkflowEvent,
        wanted: dict[str, dict[str, str]],
        *,
        prune: bool,
    ) -> tuple[int, int, int]:
        query = select(WorkflowPluginTrigger).where(WorkflowPluginTrigger.app_id == event.app_id)
        rows = {row.node_id: row for row in await session.scalars(query)}
        updated = sum(
            assign(rows[node_id], values) for node_id, values in wanted.items() if node_id in rows
        )
        new = [node_id for node_id in wanted if node_id not in rows]
        for node_id in new:
            session.add(
                WorkflowPluginTrigger(
                    tenant_id=event.tenant_id,
                    app_id=event.app_id,
                    node_id=node_id,
                    **wanted[node_id],
                )
            )
        stale = [row for node_id, row in rows.items() if node_id not in wanted] if prune else []
        for row in stale:
            await session.delete(row)
        return len(new), updated, len(stale)
